//! Training end to end: configs, validation before training, the released protocol's step, and
//! an exact resume after SIGKILL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use serde_json::{Value, json};
use skd::seg::config::TrainConfig;
use skd::seg::train::{RunOptions, run};
use skd::train::run::LOG_FILE;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn shipped_configs_parse_and_the_released_one_is_the_default() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("cityscapes_")) {
            TrainConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "{n} cityscapes configs");
    let released = TrainConfig::load(Some(&configs_dir().join("cityscapes_r18_skd.json")), &[]).expect("released");
    assert_eq!(released, TrainConfig::default());
    let paper = TrainConfig::load(Some(&configs_dir().join("cityscapes_r18_skd_paper.json")), &[]).expect("paper");
    let pw = paper.distill.pair_wise.expect("pair-wise");
    assert_eq!((pw.weight, pw.pool), (10.0, skd::distill::NodePool::Avg));
}

fn err_of(overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(None, &o).expect_err("should be refused").to_string()
}

#[test]
fn bad_config_values_are_refused_before_training() {
    assert!(err_of(&["optim.lr=-0.01"]).contains("optim.lr must be finite and >= 0, got -0.01"));
    let e = err_of(&["student.model=pspnet-r19"]);
    assert!(e.contains(r#"unknown model preset "pspnet-r19" (did you mean "pspnet-r18"?)"#), "{e}");
    let e = err_of(&["distill.pair_wise.wieght=10"]);
    assert!(e.contains(r#"unknown key distill.pair_wise.wieght (did you mean "weight"?)"#), "{e}");
    let e = err_of(&["data.augment.crop=[64, 64]"]);
    assert!(e.contains("gives 9x9 logits") && e.contains("at least 16x16"), "{e}");
    let e = err_of(&["teacher=null"]);
    assert!(e.contains("distillation terms are on but there is no teacher"), "{e}");
    assert!(err_of(&["optim.batch_size=1"]).contains("needs at least 2"));
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"optim": {"iterations": 10, "lerning_rate": 1}}"#).expect("write");
    let e = TrainConfig::load(Some(&bad), &[]).expect_err("unknown key").to_string();
    assert!(e.contains("bad.json") && e.contains("unknown field `lerning_rate`"), "{e}");
    // A missing teacher file stops the command before anything is loaded.
    let out = skd_seg()
        .args(["train", "cityscapes", "--teacher", "/nonexistent/teacher.pth", "--data"])
        .arg(dir.path())
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("teacher weights /nonexistent/teacher.pth not found"), "{e}");
    assert!(!dir.path().join("run").exists(), "nothing was written");
}

/// A small network config as JSON (ResNet-18 deep stem at a fraction of the width).
fn small_net(width: f64, psp_out: usize) -> Value {
    json!({
        "backbone": { "block": "basic", "layers": [1, 1, 1, 1], "width": width, "stem": "deep", "stem_width": width, "output_stride": 8 },
        "num_classes": 19, "psp_out": psp_out, "bins": [1, 2, 3, 6], "dsn_mid": psp_out, "dropout": 0.1
    })
}

/// A synthetic dataset and a random small teacher saved as a file.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    skd::seg::synth::write_split(&data, "train", 6, (96, 160), 1).expect("train");
    skd::seg::synth::write_split(&data, "val", 2, (96, 160), 1).expect("val");
    let teacher_cfg: skd::seg::PspConfig = serde_json::from_value(small_net(0.25, 16)).expect("teacher cfg");
    let vm = candle_nn::VarMap::new();
    skd::seg::weights::load_trainable(&teacher_cfg, None, &vm, &Device::Cpu, 0).expect("teacher");
    let teacher = dir.join("teacher.safetensors");
    skd::seg::weights::save(&teacher, &vm, &teacher_cfg, None).expect("save teacher");
    (data, teacher)
}

fn tiny_config(data: &Path, teacher: &Path, iterations: usize) -> Value {
    json!({
        "data": { "root": data, "augment": { "crop": [128, 128] }, "prefetch": 2 },
        "student": { "model": small_net(0.125, 8) },
        "teacher": { "model": small_net(0.25, 16), "weights": { "path": teacher } },
        "distill": { "holistic": { "conv_dim": 8 } },
        "optim": { "iterations": iterations, "batch_size": 2 },
        "checkpoint_every": 4, "log_every": 1, "val_every": 0, "val_images": 1, "seed": 5
    })
}

/// The last logged entry of every iteration.
fn steps(run_dir: &Path) -> BTreeMap<u64, Value> {
    let text = std::fs::read_to_string(run_dir.join(LOG_FILE)).expect("log");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
        .filter(|v| v.get("total").is_some())
        .map(|v| (v["iteration"].as_u64().expect("iteration"), v))
        .collect()
}

fn skd_seg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skd-seg"))
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_with_the_same_losses_step_for_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, teacher) = fixtures(dir.path());
    let total = 12;
    let cfg_path = dir.path().join("tiny.json");
    std::fs::write(&cfg_path, tiny_config(&data, &teacher, total).to_string()).expect("config");

    let whole = dir.path().join("whole");
    let out = skd_seg()
        .args(["train", "cityscapes", "--config"])
        .arg(&cfg_path)
        .arg("--run-dir")
        .arg(&whole)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let killed = dir.path().join("killed");
    let mut child = skd_seg()
        .args(["train", "cityscapes", "--config"])
        .arg(&cfg_path)
        .arg("--run-dir")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let state = killed.join(skd::train::state::STATE_FILE);
    let start = Instant::now();
    while !state.exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    child.wait().expect("reaped");
    let (_, done) = skd::train::state::load_state(&killed).expect("a whole state file");
    assert!(done < total, "the run finished before it was killed ({done} iterations)");

    let out = skd_seg().args(["train", "cityscapes", "--resume"]).arg(&killed).output().expect("resume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (steps(&whole), steps(&killed));
    assert_eq!(a.len(), total);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (it, x) in &a {
        for term in ["total", "ce", "ce_aux", "pixel_wise", "pair_wise", "holistic", "critic_loss", "lr"] {
            assert_eq!(x[term], b[it][term], "iteration {it}, {term} (killed after {done})");
        }
    }
    // Every logged term is finite, the critic included.
    assert!(
        a.values().all(|v| v["total"].as_f64().is_some_and(f64::is_finite)
            && v["critic_loss"].as_f64().is_some_and(f64::is_finite))
    );
}

#[test]
fn the_released_protocol_runs_two_iterations_at_a_small_crop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, _) = fixtures(dir.path());
    // The released teacher (PSPNet-R101) and student (PSPNet-R18) with random weights; the
    // student's ImageNet initialisation from a backbone-only file, as the CSAIL weights.
    let teacher_cfg = skd::seg::PspConfig::pspnet_r101();
    let vm = candle_nn::VarMap::new();
    skd::seg::weights::load_trainable(&teacher_cfg, None, &vm, &Device::Cpu, 0).expect("teacher");
    let teacher = dir.path().join("r101.safetensors");
    skd::seg::weights::save(&teacher, &vm, &teacher_cfg, Some("pspnet-r101")).expect("save");
    drop(vm);
    let student_cfg = skd::seg::PspConfig::pspnet_r18();
    let vm = candle_nn::VarMap::new();
    skd::seg::weights::load_trainable(&student_cfg, None, &vm, &Device::Cpu, 0).expect("student");
    let imagenet: BTreeMap<String, candle_core::Tensor> = vm
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .filter(|(k, _)| k.starts_with("conv") || k.starts_with("bn") || k.starts_with("layer"))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let init = dir.path().join("resnet18-imagenet.safetensors");
    skd::weights::save(&init, &imagenet, Default::default()).expect("save init");

    let overrides: Vec<String> = vec![
        format!("data.root={}", json!(data)),
        "data.augment.crop=[128, 128]".into(),
        "optim.iterations=2".into(),
        "optim.batch_size=2".into(),
        format!("student.init.path={}", json!(init)),
        "student.init.bn=standard".into(),
        format!("teacher.weights.path={}", json!(teacher)),
        "teacher.weights.bn=standard".into(),
        "log_every=1".into(),
    ];
    let cfg = TrainConfig::load(Some(&configs_dir().join("cityscapes_r18_skd.json")), &overrides).expect("config");
    let run_dir = dir.path().join("run");
    let summary = run(&cfg, &run_dir, &RunOptions::default()).expect("two iterations");
    assert_eq!(summary.iterations_done, 2);
    let logged = steps(&run_dir);
    assert_eq!(logged.len(), 2);
    for v in logged.values() {
        for term in ["ce", "ce_aux", "pixel_wise", "pair_wise", "holistic", "critic_loss", "total"] {
            assert!(v[term].as_f64().is_some_and(f64::is_finite), "{term}: {v}");
        }
        assert!(v["skipped"].is_null(), "{v}");
    }
    let val = summary.val.expect("a val split");
    assert_eq!(val.num_images, 2);
    assert!(run_dir.join("student.safetensors").is_file() && run_dir.join("state.safetensors").is_file());
}

#[test]
fn the_quick_start_makes_its_data_trains_three_networks_and_prints_one_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, out) = (dir.path().join("synthetic"), dir.path().join("demo"));
    let res = skd_seg()
        .args(["demo", "--budget", "0.02", "--json", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("demo");
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let report: Value = serde_json::from_slice(&res.stdout).expect("one JSON report");
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["teacher", "student (baseline)", "student + SKD (pi+pa+ho)"]);
    assert!(rows.iter().all(|r| r["miou"].as_f64().is_some_and(|m| (0.0..=1.0).contains(&m))));
    assert!(rows[0]["params"].as_u64() > rows[1]["params"].as_u64(), "the teacher is the larger network");
    assert_eq!(report["train_images"], 300);
    for run in ["teacher", "student_baseline", "student_skd"] {
        assert!(out.join(run).join("student.safetensors").is_file(), "{run}");
    }
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("== student + SKD (pi+pa+ho)") && stderr.contains("iteration"), "shows what it is doing");
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_in_a_row_stop_with_the_checkpoint_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, teacher) = fixtures(dir.path());
    let mut cfg = tiny_config(&data, &teacher, 20);
    cfg["checkpoint_every"] = json!(1);
    cfg["max_skips"] = json!(3);
    let run_dir = dir.path().join("run");
    // Four good iterations, then the run is stopped (here: it ends) ...
    let mut good = cfg.clone();
    good["optim"]["iterations"] = json!(4);
    let good: TrainConfig = serde_json::from_value(good).expect("config");
    run(&good, &run_dir, &RunOptions::default()).expect("four good iterations");
    // ... and resumed with a learning rate that blows the weights up at the next update.
    cfg["optim"]["lr"] = json!(1e30);
    let bad: TrainConfig = serde_json::from_value(cfg).expect("config");
    let err =
        run(&bad, &run_dir, &RunOptions { resume: true, ..Default::default() }).expect_err("must stop").to_string();
    assert!(err.contains("3 non-finite steps in a row") && err.contains("the last checkpoint is intact"), "{err}");
    let logged = steps(&run_dir);
    let skipped: Vec<u64> = logged.iter().filter(|(_, v)| !v["skipped"].is_null()).map(|(i, _)| *i).collect();
    assert_eq!(skipped.len(), 2, "two skips logged before the third stops the run");
    let (state, done) = skd::train::state::load_state(&run_dir).expect("the state still loads");
    // The last checkpoint before the skips (an update that overflows to inf is never written).
    assert!((4..6).contains(&done), "{done}");
    assert!(
        state
            .values()
            .all(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).is_ok_and(|v| v.iter().all(|x| x.is_finite())))
    );
}

#[test]
fn check_teacher_and_list_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, teacher) = fixtures(dir.path());
    // A list file of `image label` lines, as the reference's train.lst.
    let split = skd::seg::cityscapes::Split::discover(&data, "train").expect("split");
    let lines: Vec<String> = split.samples[..3]
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s.image.strip_prefix(&data).expect("rel").display(),
                s.label.strip_prefix(&data).expect("rel").display()
            )
        })
        .collect();
    let list = dir.path().join("train.lst");
    std::fs::write(&list, lines.join("\n")).expect("list");
    let listed = skd::seg::cityscapes::Split::from_list(&data, &list, "train").expect("list split");
    assert_eq!(listed.samples, split.samples[..3].to_vec());
    let mut cfg = tiny_config(&data, &teacher, 1);
    cfg["data"]["train_list"] = json!(list);
    let cfg_path = dir.path().join("cfg.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("cfg");
    let out = skd_seg()
        .args(["train", "cityscapes", "--check-teacher", "1", "--config"])
        .arg(&cfg_path)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("teacher check on 1 val images: mIoU") && stderr.contains("data: 3 train images"),
        "{stderr}"
    );
}

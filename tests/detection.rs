//! FCOS end to end on a tiny synthetic COCO-format set: `skd-det train fcos` with every
//! distillation mode, the checkpoint it writes, `skd-det eval` on it and on a detections file.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use skd::backbone::ResNetConfig;
use skd::det::fcos::{Fcos, FcosConfig};
use skd::det::synth::{SynthConfig, write_dataset};

fn skd_det(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skd-det")).args(args).output().expect("run skd-det")
}

fn tiny(width: f64, channels: usize) -> FcosConfig {
    FcosConfig {
        backbone: ResNetConfig { width, stem_width: width, layers: [1, 1, 1, 1], ..ResNetConfig::r18_fcos() },
        num_classes: 5,
        channels,
        num_convs: 1,
        gn_groups: 8,
        centerness_on_reg: true,
        norm_reg_targets: true,
        freeze_at: 0,
        frozen_bn: false,
        ..FcosConfig::fcos_r18()
    }
}

/// A synthetic set and an (untrained) teacher checkpoint for its classes.
fn setup(dir: &Path) -> std::path::PathBuf {
    let cfg = SynthConfig { train_images: 6, val_images: 3, width: 128, height: 96, seed: 3 };
    write_dataset(&dir.join("data"), &cfg).expect("synthetic set");
    let varmap = VarMap::new();
    let vb = skd::nn::init::seeded_var_builder(&varmap, 7, DType::F32, &Device::Cpu);
    let teacher_cfg = tiny(0.25, 16);
    Fcos::new(&teacher_cfg, vb).expect("teacher");
    let ids: Vec<u64> = skd::det::synth::CATEGORIES.iter().map(|(id, _)| *id).collect();
    let path = dir.join("teacher.safetensors");
    skd::det::weights::save(&path, &varmap, &teacher_cfg, &ids).expect("save teacher");
    path
}

#[test]
fn train_fcos_runs_every_distillation_mode_with_finite_terms_and_eval_reads_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher = setup(dir.path());
    let student = serde_json::to_string(&tiny(0.125, 8)).expect("json");
    let teacher_model = serde_json::to_string(&tiny(0.25, 16)).expect("json");
    let run_dir = dir.path().join("run");
    let data = dir.path().join("data");
    let sets = [
        format!("student={student}"),
        format!("teacher={{\"model\": {teacher_model}, \"weights\": {:?}}}", teacher.display().to_string()),
        "distill.mimic={\"weight\": 1.0}".to_string(),
        r#"data.train={"annotations": "annotations/instances_train.json", "images": "train"}"#.to_string(),
        r#"data.val={"annotations": "annotations/instances_val.json", "images": "val"}"#.to_string(),
        r#"data.input={"min_size": 96, "max_size": 128}"#.to_string(),
        "optim.iterations=2".to_string(),
        "optim.batch_size=2".to_string(),
        "log_every=1".to_string(),
    ];
    let mut args = vec!["train", "fcos", "--data", data.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let out = skd_det(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed:\n{stderr}");

    // Every term of every step is logged and finite: three FCOS losses, three distillation modes.
    let log = std::fs::read_to_string(run_dir.join("train.jsonl")).expect("log");
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .filter(|v: &serde_json::Value| v["total"].is_number())
        .collect();
    assert_eq!(steps.len(), 2, "{log}");
    for step in &steps {
        for term in ["loss_cls", "loss_reg", "loss_ctr", "pixel_wise", "pair_wise", "mimic"] {
            let v = step[term].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{term} = {v} in {step}");
        }
        assert!(step["skipped"].is_null(), "{step}");
    }
    assert!(log.contains("\"val_ap\""), "the end of the run validates:\n{log}");

    // The deployable student has no adapters; the training state keeps them.
    let ckpt = run_dir.join("student.safetensors");
    let loaded = skd::det::weights::load(&ckpt, &Device::Cpu).expect("student checkpoint");
    assert_eq!(loaded.config.channels, 8);
    let state = skd::weights::read_file(&run_dir.join("state.safetensors")).expect("state");
    assert!(state.tensors.keys().any(|k| k.starts_with("adapter/adapters.0.")), "adapters in the state");
    let student_file = skd::weights::read_file(&ckpt).expect("student file");
    assert!(student_file.tensors.keys().all(|k| !k.contains("adapter")));

    // eval --checkpoint writes a detections file that eval --detections scores the same way.
    let dets = dir.path().join("dets.json");
    let gt = data.join("annotations/instances_val.json");
    let (gt_s, dets_s) = (gt.to_str().unwrap(), dets.to_str().unwrap());
    let images = data.join("val");
    let out = skd_det(&[
        "eval",
        "--annotations",
        gt_s,
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--out",
        dets_s,
        "--min-size",
        "96",
        "--max-size",
        "128",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_model: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let out = skd_det(&["eval", "--annotations", gt_s, "--detections", dets_s, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_file: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(from_model["stats"], from_file["stats"]);
    assert_eq!(from_model["detections"], from_file["detections"]);
}

#[test]
fn eval_scores_a_detections_file_as_pycocotools() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/coco_seed1");
    let (gt, dets) = (case.join("coco_gt.json"), case.join("coco_dets.json"));
    let eval = ["eval", "--annotations", gt.to_str().unwrap(), "--detections", dets.to_str().unwrap()];
    let out = skd_det(&[&eval[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("expected_stats.json")).expect("expected"))
            .expect("json");
    let (got, want) = (got["summary"].as_array().expect("summary"), want["stats"].as_array().expect("stats"));
    assert_eq!(got.len(), 12);
    for (g, w) in got.iter().zip(want) {
        assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-4, "{got:?} vs {want:?}");
    }
    // The readable table is pycocotools' summarize().
    let out = skd_det(&eval);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.391"),
        "{table}"
    );
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/coco_seed1");
    let gt = case.join("coco_gt.json");
    // A detection on an image the ground truth lacks.
    let dets = dir.path().join("dets.json");
    std::fs::write(&dets, r#"[{"image_id": 424242, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]"#).unwrap();
    let out = skd_det(&["eval", "--annotations", gt.to_str().unwrap(), "--detections", dets.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("dets.json") && err.contains("424242"), "{err}");
    // Malformed JSON: the file and the position.
    std::fs::write(&dets, "[{\"image_id\": 35,}]").unwrap();
    let out = skd_det(&["eval", "--annotations", gt.to_str().unwrap(), "--detections", dets.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 1 column"), "{err}");
    // The holistic term needs one fixed logit size, which detection does not have.
    let out = skd_det(&["train", "fcos", "--set", "distill.holistic={}", "--print-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("distill.holistic"), "{err}");
    // A teacher checkpoint that is not there.
    let out =
        skd_det(&["train", "fcos", "--teacher", "/nonexistent/t.safetensors", "--data", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent/t.safetensors"), "{err}");
}

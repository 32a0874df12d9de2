//! Weights in and out: every bad-input case gives an error naming the file (and key), never a
//! panic; layouts, conventions, partial loading, the HF cache and the writer's metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use skd::backbone::{Block, ResNetConfig, Stem};
use skd::seg::weights::{load_frozen, load_trainable, save};
use skd::seg::{PspConfig, WeightsSource};
use skd::weights::{BnConvention, KeyLayout, LoadMode, WeightsError, read_file, resolve_hf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// The small student of the goldens (ResNet-18 deep stem at width 0.25).
fn small_r18() -> PspConfig {
    PspConfig {
        backbone: ResNetConfig {
            block: Block::Basic,
            layers: [2, 2, 2, 2],
            width: 0.25,
            stem: Stem::Deep,
            stem_width: 0.25,
            output_stride: 8,
            stem_pool_ceil: true,
        },
        num_classes: 19,
        psp_out: 32,
        bins: vec![1, 2, 3, 6],
        dsn_mid: Some(32),
        dropout: 0.1,
    }
}

/// The small student's weights (standard BN) as `key -> tensor`.
fn small_r18_weights() -> HashMap<String, Tensor> {
    let all = candle_core::safetensors::load(golden("pspnet_forward__r18_deep_w025.safetensors"), &Device::Cpu)
        .expect("golden");
    all.into_iter().filter_map(|(k, t)| k.strip_prefix("param.").map(|k| (k.to_string(), t))).collect()
}

fn write_safetensors(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> String {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).expect("write safetensors");
    path.display().to_string()
}

fn load_err(cfg: &PspConfig, src: &WeightsSource) -> String {
    match load_frozen(cfg, src, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", src.path),
        Err(e) => e.to_string(),
    }
}

fn truncated_copy(dir: &Path, from: &Path, name: &str, keep: usize) -> PathBuf {
    let bytes = std::fs::read(from).expect("read");
    let path = dir.join(name);
    std::fs::write(&path, &bytes[..keep.min(bytes.len())]).expect("write");
    path
}

#[test]
fn truncated_pth_and_safetensors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pth = golden("pspnet_forward__r18_deep_w025.pth");
    let half = std::fs::metadata(&pth).expect("pth").len() as usize / 2;
    let cut = truncated_copy(dir.path(), &pth, "cut.pth", half);
    let err = read_file(&cut).unwrap_err();
    assert!(matches!(err, WeightsError::Corrupt { .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("{}: unreadable or truncated", cut.display())), "{err}");

    let st = truncated_copy(dir.path(), &golden("pixel_wise__odd_b3_c5_7x11.safetensors"), "cut.safetensors", 600);
    let err = read_file(&st).unwrap_err().to_string();
    assert!(err.contains("cut.safetensors: unreadable or truncated"), "{err}");
}

#[test]
fn legacy_empty_and_foreign_files_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let legacy = dir.path().join("legacy.pth");
    // torch.save(..., _use_new_zipfile_serialization=False) starts with pickle protocol 2.
    std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46]).expect("write");
    let err = read_file(&legacy).unwrap_err().to_string();
    assert!(err.contains("legacy (pre-1.6, non-zip) PyTorch file") && err.contains("torch.save(torch.load("), "{err}");

    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").expect("write");
    assert!(
        read_file(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty.pth: not a PyTorch zip checkpoint or a safetensors file (the file is empty)")
    );

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"hello world").expect("write");
    assert!(read_file(&text).unwrap_err().to_string().contains("notes.txt: not a PyTorch zip checkpoint"));

    let missing = dir.path().join("nope.pth");
    let err = read_file(&missing).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:", missing.display())), "{err}");
}

#[test]
fn a_file_of_another_architecture_lists_every_problem_and_names_the_preset_it_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bottleneck =
        candle_core::safetensors::load(golden("pspnet_forward__bottleneck_1121_w025.safetensors"), &Device::Cpu)
            .expect("golden");
    let bottleneck: HashMap<_, _> =
        bottleneck.into_iter().filter_map(|(k, t)| k.strip_prefix("param.").map(|k| (k.to_string(), t))).collect();
    let path = write_safetensors(dir.path(), "bottleneck.safetensors", &bottleneck);
    let err = load_err(&small_r18(), &WeightsSource::skd(&path));
    assert!(err.starts_with(&format!("{path}: does not fit the model:")), "{err}");
    assert!(err.contains("missing (") && err.contains("unexpected (") && err.contains("shape mismatch ("), "{err}");

    // The released student's keys and shapes, loaded as the teacher: the hint names the preset.
    let student = skd::seg::weights::expected_params(&PspConfig::pspnet_r18()).expect("params");
    let zeros: HashMap<_, _> = student
        .iter()
        .map(|(k, s)| (k.clone(), Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).expect("zeros")))
        .collect();
    let path = write_safetensors(dir.path(), "r18.safetensors", &zeros);
    let err = load_err(&PspConfig::pspnet_r18_paper(), &WeightsSource::skd(&path));
    assert!(err.contains(r#"hint: the file fits the preset "pspnet-r18""#), "{err}");
}

#[test]
fn wrong_dtype_and_wrong_shape_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = small_r18_weights();
    w.insert("head.bias".into(), Tensor::zeros(19, DType::I64, &Device::Cpu).expect("zeros"));
    let path = write_safetensors(dir.path(), "dtype.safetensors", &w);
    let err = load_err(&small_r18(), &WeightsSource::skd(&path));
    assert_eq!(err, format!("{path}: key head.bias: dtype I64, expected a floating-point tensor"));

    let mut w = small_r18_weights();
    w.insert("head.weight".into(), Tensor::zeros((19, 16, 1, 1), DType::F32, &Device::Cpu).expect("zeros"));
    let path = write_safetensors(dir.path(), "shape.safetensors", &w);
    let err = load_err(&small_r18(), &WeightsSource::skd(&path));
    assert!(err.contains("shape mismatch (1): head.weight: file [19, 16, 1, 1], model [19, 32, 1, 1]"), "{err}");

    // Other float dtypes are converted, not refused.
    let w: HashMap<_, _> =
        small_r18_weights().into_iter().map(|(k, t)| (k, t.to_dtype(DType::F64).expect("f64"))).collect();
    let path = write_safetensors(dir.path(), "f64.safetensors", &w);
    load_frozen(&small_r18(), &WeightsSource::skd(&path), &Device::Cpu).expect("f64 weights load");
}

#[test]
fn released_conventions_load_through_the_key_layouts() {
    let dir = tempfile::tempdir().expect("tempdir");
    // DataParallel prefix + the toolbox teacher layout (head.0 = pspmodule, head.1 = head) + fc.
    let mut w: HashMap<String, Tensor> = small_r18_weights()
        .into_iter()
        .map(|(k, t)| {
            let k = if let Some(r) = k.strip_prefix("pspmodule.") {
                format!("head.0.{r}")
            } else if let Some(r) = k.strip_prefix("head.") {
                format!("head.1.{r}")
            } else {
                k
            };
            (format!("module.{k}"), t)
        })
        .collect();
    w.insert("module.fc.weight".into(), Tensor::zeros((10, 4), DType::F32, &Device::Cpu).expect("zeros"));
    let path = write_safetensors(dir.path(), "toolbox.safetensors", &w);
    let src = WeightsSource { path: path.clone(), layout: KeyLayout::Toolbox, bn: BnConvention::Standard };
    load_frozen(&small_r18(), &src, &Device::Cpu).expect("toolbox layout loads");
    let err = load_err(&small_r18(), &WeightsSource::skd(&path));
    assert!(err.contains("hint: the keys look like the segmentation-toolbox teacher layout"), "{err}");
}

#[test]
fn released_pth_without_the_inplace_abn_conversion_is_flagged() {
    let pth = golden("pspnet_forward__r18_deep_w025.pth").display().to_string();
    let (_, report) = load_frozen(&small_r18(), &WeightsSource::skd(&pth), &Device::Cpu).expect("loads");
    assert!(
        report.warnings.iter().any(|w| w.contains("BatchNorm weights are negative") && w.contains("inplace_abn")),
        "{report}"
    );
    let abn = WeightsSource { bn: BnConvention::InplaceAbn, ..WeightsSource::skd(&pth) };
    let (_, report) = load_frozen(&small_r18(), &abn, &Device::Cpu).expect("loads");
    assert!(report.warnings.is_empty(), "{report}");
}

#[test]
fn imagenet_backbone_loads_partially_and_reports_what_stays_initial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w: HashMap<String, Tensor> = small_r18_weights()
        .into_iter()
        .filter(|(k, _)| k.starts_with("conv") || k.starts_with("bn") || k.starts_with("layer"))
        .collect();
    let n_backbone = w.len();
    w.insert("fc.weight".into(), Tensor::zeros((1000, 128), DType::F32, &Device::Cpu).expect("zeros"));
    w.insert("fc.bias".into(), Tensor::zeros(1000, DType::F32, &Device::Cpu).expect("zeros"));
    let path = write_safetensors(dir.path(), "resnet18-imagenet.safetensors", &w);
    let src = WeightsSource { path: path.clone(), layout: KeyLayout::Imagenet, bn: BnConvention::Standard };
    let varmap = VarMap::new();
    let (_, report) =
        load_trainable(&small_r18(), Some((&src, LoadMode::Partial)), &varmap, &Device::Cpu, 0).expect("partial");
    let report = report.expect("a report");
    assert_eq!(report.loaded.len(), n_backbone);
    assert!(
        report.kept_initial.iter().any(|k| k.starts_with("pspmodule."))
            && report.kept_initial.contains(&"head.weight".to_string())
    );
    assert!(report.unused.is_empty(), "fc.* is dropped by the imagenet layout: {report}");
    let data = varmap.data().lock().expect("varmap");
    let loaded = data["conv1.weight"].flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
    assert_eq!(loaded, w["conv1.weight"].flatten_all().expect("flat").to_vec1::<f32>().expect("vec"));
    drop(data);

    let strict = WeightsSource { path, layout: KeyLayout::Skd, bn: BnConvention::Standard };
    let err = load_trainable(&small_r18(), Some((&strict, LoadMode::Strict)), &VarMap::new(), &Device::Cpu, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hint: this looks like an ImageNet backbone"), "{err}");
}

#[test]
fn hf_references_resolve_through_a_local_cache_offline() {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let repo = cache_dir.path().join("models--skd--pspnet-small");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), "0123abcd").expect("ref");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    write_safetensors(&snapshot, "student.safetensors", &small_r18_weights());
    let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
    let path = resolve_hf("hf://skd/pspnet-small/student.safetensors", &cache).expect("cached");
    assert_eq!(path, snapshot.join("student.safetensors"));
    load_frozen(&small_r18(), &WeightsSource::skd(path.display().to_string()), &Device::Cpu).expect("loads");

    let err = resolve_hf("hf://skd/pspnet-small/teacher.safetensors", &cache).unwrap_err().to_string();
    assert!(
        err.contains("not in the Hugging Face cache")
            && err.contains("huggingface-cli download skd/pspnet-small teacher.safetensors"),
        "{err}"
    );
    let err = resolve_hf("hf://skd", &cache).unwrap_err().to_string();
    assert!(err.contains("expected hf://owner/repo/path/to/file"), "{err}");
}

#[test]
fn saved_student_is_complete_carries_metadata_and_reloads_strictly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = small_r18();
    let varmap = VarMap::new();
    load_trainable(&cfg, None, &varmap, &Device::Cpu, 0).expect("fresh");
    let path = dir.path().join("student.safetensors");
    save(&path, &varmap, &cfg, Some("small")).expect("save");
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["student.safetensors"], "no temp file left behind");
    let sd = read_file(&path).expect("read back");
    assert_eq!(sd.metadata["format"], "skd");
    assert_eq!(sd.metadata["bn_convention"], "standard");
    assert_eq!(sd.metadata["preset"], "small");
    let stored: PspConfig = serde_json::from_str(&sd.metadata["config"]).expect("config");
    assert_eq!(stored, cfg);

    let src = WeightsSource::skd(path.display().to_string());
    let again = VarMap::new();
    load_trainable(&cfg, Some((&src, LoadMode::Strict)), &again, &Device::Cpu, 0).expect("strict reload");
    let a = varmap.data().lock().expect("a")["layer4.1.bn2.running_var"]
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    let b = again.data().lock().expect("b")["layer4.1.bn2.running_var"]
        .flatten_all()
        .expect("f")
        .to_vec1::<f32>()
        .expect("v");
    assert_eq!(a, b);

    let abn = WeightsSource { bn: BnConvention::InplaceAbn, ..src };
    let err = load_frozen(&cfg, &abn, &Device::Cpu).expect_err("conflict").to_string();
    assert!(err.contains(r#"records BatchNorm convention "standard""#), "{err}");
}

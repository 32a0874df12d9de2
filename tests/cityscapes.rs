//! Cityscapes data and evaluation: the official evaluator's figures on the recorded cases, the
//! synthetic set through the loader, a model evaluated end to end, and every bad input.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;
use skd::nn::SplitMix64;
use skd::seg::cityscapes::{CLASS_NAMES, LABEL_TO_TRAIN, Split, read_gray, read_sample};
use skd::seg::data::{AugmentConfig, Loader, augment, make_batch};
use skd::seg::eval::{EvalError, InferConfig, InferMode, evaluate, score_predictions};
use skd::seg::synth::write_split;

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cases")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cityscapes_")))
        .collect();
    v.sort();
    v
}

#[test]
fn scores_equal_cityscapes_scripts_on_every_recorded_case() {
    let cases = cases();
    assert!(!cases.is_empty(), "no tests/cases/cityscapes_* case");
    for case in cases {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("expected_miou.json")).expect("expected"))
                .expect("json");
        let split = Split::discover(&case, "val").expect("case ground truth");
        let scores = score_predictions(&split, &case.join("pred")).expect("scores");
        let miou = expected["miou"].as_f64().expect("miou");
        assert!((scores.miou - miou).abs() < 1e-4, "{}: mIoU {} vs {miou}", case.display(), scores.miou);
        for (name, iou) in &scores.class_iou {
            match (iou, expected["class_iou"][name].as_f64()) {
                (Some(got), Some(want)) => {
                    assert!((got - want).abs() < 1e-4, "{}: {name} {got} vs {want}", case.display())
                }
                (None, None) => {}
                (got, want) => panic!("{}: {name}: {got:?} vs {want:?}", case.display()),
            }
        }
        assert_eq!(scores.num_images, expected["num_images"].as_u64().expect("n") as usize);
    }
}

fn synthetic(train: usize, val: usize, size: (usize, usize)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_split(dir.path(), "train", train, size, 7).expect("train");
    write_split(dir.path(), "val", val, size, 7).expect("val");
    dir
}

#[test]
fn synthetic_set_round_trips_through_the_loader() {
    let dir = synthetic(2, 0, (64, 96));
    let split = Split::discover(dir.path(), "train").expect("discover");
    assert_eq!(split.samples.len(), 2);
    for s in &split.samples {
        assert!(s.image.to_string_lossy().contains("leftImg8bit/train/"), "{}", s.image.display());
        let raw = read_gray(&s.label).expect("raw label ids");
        let (img, label) = read_sample(s).expect("sample");
        assert_eq!((img.height, img.width), (64, 96));
        // Label ids are mapped through the 34 -> 19 table; ignored ids (ego vehicle) become 255.
        for (&id, &train) in raw.data.iter().zip(&label.data) {
            assert!((id as usize) < 34, "label id {id}");
            assert_eq!(train, LABEL_TO_TRAIN[id as usize]);
        }
        assert!(label.data.contains(&255) && label.data.iter().any(|&v| v < 19));

        // A crop larger than the scaled image: bottom/right padding is image 0 and label 255.
        let cfg = AugmentConfig { crop: [80, 120], scale: false, mirror: false };
        let p = augment(&img, &label, &cfg, &mut SplitMix64::new(1));
        assert_eq!((p.height, p.width, p.image.len(), p.label.len()), (80, 120, 3 * 80 * 120, 80 * 120));
        for y in 0..80 {
            for x in 0..120 {
                if y >= 64 || x >= 96 {
                    assert_eq!(p.label[y * 120 + x], 255);
                    assert!((0..3).all(|c| p.image[c * 80 * 120 + y * 120 + x] == 0.0));
                } else {
                    assert_eq!(p.label[y * 120 + x], label.data[y * 96 + x]);
                    // BGR minus the mean: blue plane from the RGB image's third channel.
                    let want = img.data[(y * 96 + x) * 3 + 2] as f32 - 104.006_99;
                    assert!((p.image[y * 120 + x] - want).abs() < 1e-3);
                }
            }
        }
    }
    // The released protocol's batches: fixed shapes, identical for the same (seed, iteration).
    let cfg = AugmentConfig { crop: [48, 48], ..Default::default() };
    let a = make_batch(&split, &cfg, 3, 2, 5).expect("batch");
    assert_eq!(a.shape, [2, 3, 48, 48]);
    assert_eq!((a.images.len(), a.labels.len()), (2 * 3 * 48 * 48, 2 * 48 * 48));
    assert_eq!(a, make_batch(&split, &cfg, 3, 2, 5).expect("again"));
    assert_ne!(a.images, make_batch(&split, &cfg, 3, 2, 6).expect("next").images);
    assert_ne!(a.images, make_batch(&split, &cfg, 4, 2, 5).expect("other seed").images);
    // The background loader yields exactly those batches, in order, from any start.
    let loaded: Vec<_> = Loader::new(split.clone(), cfg.clone(), 3, 2, 4..7, 2).map(|b| b.expect("batch")).collect();
    assert_eq!(loaded.iter().map(|b| b.iteration).collect::<Vec<_>>(), [4, 5, 6]);
    assert_eq!(loaded[1], a);
}

#[test]
fn a_network_evaluates_end_to_end_and_its_saved_predictions_score_the_same() {
    use skd::backbone::{Block, ResNetConfig, Stem};
    use skd::seg::PspConfig;
    let dir = synthetic(0, 3, (64, 128));
    let cfg = PspConfig {
        backbone: ResNetConfig {
            block: Block::Basic,
            layers: [1, 1, 1, 1],
            width: 0.125,
            stem: Stem::Deep,
            stem_width: 0.125,
            output_stride: 8,
            stem_pool_ceil: true,
        },
        num_classes: 19,
        psp_out: 8,
        bins: vec![1, 2, 3, 6],
        dsn_mid: None,
        dropout: 0.1,
    };
    let varmap = candle_nn::VarMap::new();
    let (net, _) = skd::seg::weights::load_trainable(&cfg, None, &varmap, &Device::Cpu, 0).expect("net");
    let split = Split::discover(dir.path(), "val").expect("val");
    let preds = dir.path().join("pred");
    let scores = evaluate(&net, &split, &InferConfig::default(), &Device::Cpu, Some(&preds), false).expect("eval");
    assert_eq!(scores.num_images, 3);
    assert_eq!(scores.class_iou.len(), CLASS_NAMES.len());
    let rescored = score_predictions(&split, &preds).expect("rescore");
    assert_eq!(scores.class_iou, rescored.class_iou);
    assert!(preds.join("color").read_dir().expect("colour dir").count() == 3);
    // Sliding windows, flip and two scales run and cover the whole image.
    let cfg = InferConfig {
        mode: InferMode::Slide { crop: [48, 48], stride: [32, 32] },
        flip: true,
        scales: vec![0.75, 1.0],
    };
    let s = evaluate(&net, &split, &cfg, &Device::Cpu, None, false).expect("slide");
    assert_eq!(s.pixels, scores.pixels);
}

fn discover_err(root: &Path) -> String {
    Split::discover(root, "val").expect_err("should fail").to_string()
}

#[test]
fn bad_data_gives_errors_naming_the_file() {
    let dir = synthetic(0, 3, (32, 64));
    let root = dir.path();
    let labels: Vec<PathBuf> = {
        let split = Split::discover(root, "val").expect("val");
        split.samples.iter().map(|s| s.label.clone()).collect()
    };
    // Label values that are not Cityscapes ids.
    let mut bad = read_gray(&labels[0]).expect("label");
    bad.data[5] = 40;
    image::save_buffer(&labels[0], &bad.data, 64, 32, image::ExtendedColorType::L8).expect("write");
    let split = Split::discover(root, "val").expect("val");
    let err = read_sample(&split.samples[0]).expect_err("bad id").to_string();
    assert!(err.contains("label value 40 at (y 0, x 5) is not a Cityscapes label id"), "{err}");
    // Image / label size mismatch.
    image::save_buffer(&labels[1], &vec![7u8; 16 * 16], 16, 16, image::ExtendedColorType::L8).expect("write");
    let err = read_sample(&split.samples[1]).expect_err("size").to_string();
    assert!(err.contains("image is (32, 64) but its label") && err.contains("is (16, 16)"), "{err}");
    // A truncated PNG.
    let bytes = std::fs::read(&split.samples[2].image).expect("png");
    std::fs::write(&split.samples[2].image, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = read_sample(&split.samples[2]).expect_err("truncated").to_string();
    assert!(
        err.starts_with(&split.samples[2].image.display().to_string()) && err.contains("cannot decode image"),
        "{err}"
    );
    // A missing label.
    std::fs::remove_file(&labels[2]).expect("rm");
    let err = discover_err(root);
    assert!(err.contains("missing label gtFine/val/<city>/<name>_gtFine_labelIds.png"), "{err}");
    // An empty split.
    let empty = tempfile::tempdir().expect("tempdir");
    let err = discover_err(empty.path());
    assert!(err.contains("no images for split \"val\""), "{err}");
}

#[test]
fn bad_prediction_folders_are_refused_with_names() {
    let case = &cases()[0];
    let split = Split::discover(case, "val").expect("case");
    let preds = tempfile::tempdir().expect("tempdir");
    for s in &split.samples[..4] {
        let name = format!("{}_leftImg8bit.png", s.name);
        std::fs::copy(case.join("pred").join(&name), preds.path().join(&name)).expect("copy");
    }
    match score_predictions(&split, preds.path()) {
        Err(EvalError::MissingPredictions { count, total, .. }) => assert_eq!((count, total), (2, 6)),
        other => panic!("{other:?}"),
    }
    for s in &split.samples[4..] {
        let name = format!("{}_leftImg8bit.png", s.name);
        std::fs::copy(case.join("pred").join(&name), preds.path().join(&name)).expect("copy");
    }
    // A duplicate makes the match ambiguous, as in the official evaluator.
    let first = format!("{}_leftImg8bit.png", split.samples[0].name);
    std::fs::copy(preds.path().join(&first), preds.path().join(format!("{}_copy.png", split.samples[0].name)))
        .expect("dup");
    assert!(matches!(score_predictions(&split, preds.path()), Err(EvalError::AmbiguousPrediction { .. })));
    std::fs::remove_file(preds.path().join(format!("{}_copy.png", split.samples[0].name))).expect("rm");
    // A train id (or anything above 33) in a label-id prediction aborts, as the official one.
    let path = preds.path().join(&first);
    let mut p = read_gray(&path).expect("pred");
    p.data[0] = 255;
    image::save_buffer(&path, &p.data, p.width as u32, p.height as u32, image::ExtendedColorType::L8).expect("write");
    let err = score_predictions(&split, preds.path()).expect_err("bad value").to_string();
    assert!(err.contains(&first) && err.contains("label value 255 at (y 0, x 0)"), "{err}");
}

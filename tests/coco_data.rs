//! COCO-format detection data: the synthetic set round trip, the input pipeline's sizes and
//! boxes against hand-computed maskrcnn-benchmark values, batching, the training/evaluation
//! split semantics, and every bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, IndexOp};
use serde_json::json;
use skd::det::coco::Instances;
use skd::det::data::{
    CAFFE_BGR_MEAN, DataError, DetDataset, InputConfig, Loader, Normalize, Pick, clip_xyxy, coco_to_xyxy, flip_xyxy,
    resized_size, scale_xyxy, xyxy_to_coco,
};
use skd::det::synth::{CATEGORIES, SynthConfig, write_dataset};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out.sort();
    out
}

fn small_synth() -> SynthConfig {
    SynthConfig { train_images: 24, val_images: 12, width: 160, height: 120, seed: 3 }
}

#[test]
fn synthetic_set_reads_back_as_coco_and_is_deterministic() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let cfg = small_synth();
    let summary = write_dataset(a.path(), &cfg).expect("write");
    write_dataset(b.path(), &cfg).expect("write again");
    println!("{summary}");
    for (split, count, s) in [("train", cfg.train_images, &summary.train), ("val", cfg.val_images, &summary.val)] {
        let gt = Instances::read(&a.path().join(format!("annotations/instances_{split}.json"))).expect("read");
        assert_eq!(gt.images.len(), count, "{split}");
        assert_eq!(gt.annotations.len(), s.annotations, "{split}");
        assert!(s.crowd > 0 && s.empty_images > 0, "{split}: wants crowd boxes and empty images: {s:?}");
        assert_eq!(gt.annotations.iter().filter(|a| a.is_crowd()).count(), s.crowd);
        assert_eq!(gt.info, json!({}));
        assert!(gt.licenses.is_empty());
        let ids: Vec<u64> = CATEGORIES.iter().map(|c| c.0).collect();
        assert_eq!(gt.category_ids(), ids);
        assert_eq!(gt.labels(), ids.iter().enumerate().map(|(k, &id)| (id, k + 1)).collect());
        let images: std::collections::HashMap<u64, _> = gt.images.iter().map(|im| (im.id, im)).collect();
        for an in &gt.annotations {
            let im = images[&an.image_id];
            let [x, y, w, h] = an.bbox;
            assert!(x >= 0.0 && y >= 0.0 && w >= 1.0 && h >= 1.0, "annotation {}: {:?}", an.id, an.bbox);
            assert!(
                x + w <= im.width as f64 && y + h <= im.height as f64,
                "annotation {} leaves image {}",
                an.id,
                im.id
            );
            let area = an.area.expect("area written");
            assert!(area > 0.0 && area <= w * h, "annotation {}: area {area} vs box {w}x{h}", an.id);
        }
        for im in &gt.images {
            let path = a.path().join(split).join(&im.file_name);
            assert_eq!(im.file_name, format!("{:012}.jpg", im.id));
            let decoded = image::open(&path).expect("jpeg");
            assert_eq!((decoded.width(), decoded.height()), (im.width, im.height), "{}", path.display());
        }
    }
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.len(), cfg.train_images + cfg.val_images + 2);
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.strip_prefix(a.path()).ok(), y.strip_prefix(b.path()).ok());
        assert!(std::fs::read(x).expect("a") == std::fs::read(y).expect("b"), "{} differs", x.display());
    }
    // Through the dataset: training drops the images without objects, evaluation keeps them.
    let input = InputConfig { min_size: 96, max_size: 160, ..InputConfig::default() };
    let open = |split: &str, train| {
        let ann = a.path().join(format!("annotations/instances_{split}.json"));
        DetDataset::open(&ann, &a.path().join(split), train, input.clone()).expect("open")
    };
    let (train, val) = (open("train", true), open("val", false));
    println!("train: {}\nval: {}", train.report, val.report);
    assert_eq!(val.len(), cfg.val_images);
    assert!(train.len() < cfg.train_images && train.report.unannotated_images == summary.train.empty_images);
    assert!(train.report.degenerate.is_empty() && train.report.outside.is_empty() && train.report.clipped == 0);
    let batch = train.batch(&train.train_picks(1, 4, 0), &Device::Cpu).expect("batch");
    assert_eq!(batch.images.dims()[..2], [4, 3]);
}

#[test]
fn synthetic_objects_cover_the_fpn_levels_at_the_quick_configs_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = SynthConfig { val_images: 0, ..SynthConfig::default() };
    write_dataset(dir.path(), &cfg).expect("write");
    let gt = Instances::read(&dir.path().join("annotations/instances_train.json")).expect("read");
    let images: std::collections::HashMap<u64, _> = gt.images.iter().map(|im| (im.id, im)).collect();
    // FCOS assigns by the largest of (l, t, r, b), which reaches about the box's long side;
    // P3 < 64, P4 64-128, P5 128-256, P6 256-512 input pixels.
    let mut per_level = [0usize; 4];
    for a in gt.annotations.iter().filter(|a| !a.is_crowd()) {
        let im = images[&a.image_id];
        let (h, w) = (im.height as usize, im.width as usize);
        let [x1, y1, x2, y2] = scale_xyxy(coco_to_xyxy(a.bbox), (h, w), resized_size((h, w), 320, 533));
        let long = (x2 - x1).max(y2 - y1);
        per_level[[64.0, 128.0, 256.0].iter().filter(|&&lo| long >= lo).count()] += 1;
    }
    let smallest = gt.annotations.iter().map(|a| a.bbox[2].max(a.bbox[3])).fold(f64::INFINITY, f64::min);
    println!("non-crowd boxes per level P3..P6 at min_size 320: {per_level:?}; smallest long side {smallest} px");
    assert!(per_level.iter().all(|&n| n >= 5), "every level wants positives: {per_level:?}");
    assert!(smallest <= 12.0, "smallest long side {smallest}");
}

#[test]
fn resize_follows_maskrcnn_get_size() {
    // (h, w) in, (h, w) out; hand-computed from `Resize.get_size` with min 800, max 1333.
    // 640x480: 640/480·800 = 1066.7 <= 1333: short side 800, long int(800·640/480) = 1066.
    assert_eq!(resized_size((480, 640), 800, 1333), (800, 1066));
    assert_eq!(resized_size((640, 480), 800, 1333), (1066, 800));
    // 2000x500: 4·800 > 1333: size = round(1333·500/2000) = round(333.25) = 333, long
    // int(333·2000/500) = 1332.
    assert_eq!(resized_size((500, 2000), 800, 1333), (333, 1332));
    // 400x200: round(1333·200/400) = round(666.5) = 666 (Python rounds ties to even).
    assert_eq!(resized_size((200, 400), 800, 1333), (666, 1332));
    assert_eq!(resized_size((500, 500), 800, 1333), (800, 800));
    assert_eq!(resized_size((800, 1066), 800, 1333), (800, 1066));
}

#[test]
fn boxes_convert_scale_and_flip_by_hand() {
    // COCO [10, 20, 30, 40] -> legacy xyxy [10, 20, 39, 59].
    let b = coco_to_xyxy([10.0, 20.0, 30.0, 40.0]);
    assert_eq!(b, [10.0, 20.0, 39.0, 59.0]);
    assert_eq!(xyxy_to_coco(b), [10.0, 20.0, 30.0, 40.0]);
    // 640x480 -> 1066x800: x by 1066/640 = 1.665625, y by 800/480 = 5/3.
    let s = scale_xyxy(b, (480, 640), (800, 1066));
    let want = [16.65625, 33.333332, 64.95938, 98.333336];
    assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3), "{s:?}");
    // Flip in the 1066-wide input: x1' = 1066 - 64.959 - 1 = 1000.0406, x2' = 1066 - 16.656 - 1.
    let f = flip_xyxy(s, 1066);
    let want = [1000.0406, s[1], 1048.3438, s[3]];
    assert!(f.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3), "{f:?}");
    // Flipping twice is the identity (exactly on whole pixels, to f32 rounding otherwise).
    assert_eq!(flip_xyxy(flip_xyxy(b, 640), 640), b);
    assert!(flip_xyxy(f, 1066).iter().zip(s).all(|(a, b)| (a - b).abs() < 1e-4));
    assert_eq!(scale_xyxy(s, (800, 1066), (480, 640)).map(|v| (v * 1e3).round() / 1e3), b);
    assert_eq!(clip_xyxy([-5.0, 3.0, 50.0, 70.0], (60, 40)), [0.0, 3.0, 39.0, 59.0]);
}

/// A dataset written by hand: `images` as `(id, w, h)` (each a PNG of RGB `(200, 100, 50 + x)`),
/// `annotations` as JSON values; categories 5 and 9.
fn hand_dataset(dir: &Path, images: &[(u64, u32, u32)], annotations: serde_json::Value) -> PathBuf {
    let root = dir.join("images");
    std::fs::create_dir_all(&root).expect("mkdir");
    for &(id, w, h) in images {
        let rgb: Vec<u8> = (0..w * h).flat_map(|i| [200u8, 100, 50 + (i % w) as u8]).collect();
        image::save_buffer(root.join(format!("{id}.png")), &rgb, w, h, image::ExtendedColorType::Rgb8).expect("png");
    }
    let json = json!({
        "images": images.iter().map(|&(id, w, h)| json!({"id": id, "file_name": format!("{id}.png"), "width": w, "height": h})).collect::<Vec<_>>(),
        "annotations": annotations,
        "categories": [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}],
    });
    let path = dir.join("instances.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json")).expect("write");
    path
}

fn ann(id: u64, image_id: u64, category_id: u64, bbox: [f64; 4], iscrowd: u8) -> serde_json::Value {
    json!({"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd})
}

fn tiny_input() -> InputConfig {
    InputConfig { min_size: 30, max_size: 100, ..InputConfig::default() }
}

#[test]
fn batch_is_padded_to_a_multiple_of_32_with_unpadded_sizes_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let annotations = json!([ann(1, 1, 9, [4.0, 5.0, 10.0, 8.0], 0), ann(2, 2, 5, [2.0, 2.0, 20.0, 30.0], 0)]);
    // 40x30 stays (short side 30); 30x50 stays; 60x40 -> short 30, long int(30·60/40) = 45.
    let path = hand_dataset(dir.path(), &[(1, 40, 30), (2, 30, 50), (3, 60, 40)], annotations);
    let ds = DetDataset::open(&path, &dir.path().join("images"), false, tiny_input()).expect("open");
    let picks = ds.eval_picks(3);
    assert_eq!(picks.len(), 1);
    let batch = ds.batch(&picks[0], &Device::Cpu).expect("batch");
    assert_eq!(batch.images.dims(), [3, 3, 64, 64], "max (50, 45) rounded up to 32s");
    assert_eq!(batch.image_sizes, [(30, 40), (50, 30), (30, 45)]);
    assert_eq!(batch.original_sizes, [(30, 40), (50, 30), (40, 60)]);
    assert_eq!(batch.image_ids, [1, 2, 3]);
    // Category 9 is label 2 (ids sorted: 5 -> 1, 9 -> 2); boxes are legacy xyxy.
    assert_eq!(batch.gt[0].labels, [2]);
    assert_eq!(batch.gt[0].boxes, [[4.0, 5.0, 13.0, 12.0]]);
    assert_eq!(ds.category_ids, [5, 9]);
    // RGB (200, 100, 50 + 29) at x = 29 -> BGR minus the mean inside, zero in the padding.
    let img = batch.images.i(1).expect("image 1");
    let inside: Vec<f32> = (0..3).map(|c| img.i((c, 49, 29)).and_then(|v| v.to_scalar()).expect("v")).collect();
    let want = [79.0 - CAFFE_BGR_MEAN[0], 100.0 - CAFFE_BGR_MEAN[1], 200.0 - CAFFE_BGR_MEAN[2]];
    assert!(inside.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-4), "{inside:?}");
    let padding_sum = |t: candle_core::Tensor| t.abs().and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f32>());
    assert_eq!(padding_sum(img.narrow(1, 50, 14).expect("rows below")).expect("sum"), 0.0);
    assert_eq!(padding_sum(img.narrow(2, 30, 34).expect("columns right")).expect("sum"), 0.0);
    // ImageNet normalisation: RGB / 255, mean and std.
    let cfg = InputConfig { normalize: Normalize::ImageNet, ..tiny_input() };
    let ds = DetDataset::open(&path, &dir.path().join("images"), false, cfg).expect("open");
    let batch = ds.batch(&[Pick { index: 0, flip: false }], &Device::Cpu).expect("batch");
    let red: f32 = batch.images.i((0, 0, 0, 0)).and_then(|v| v.to_scalar()).expect("v");
    assert!((red - (200.0 / 255.0 - 0.485) / 0.229).abs() < 1e-5, "{red}");
}

#[test]
fn training_batches_are_drawn_from_seed_iteration_and_slot_and_flip_their_boxes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let annotations = json!([ann(1, 1, 5, [4.0, 5.0, 10.0, 8.0], 0), ann(2, 2, 9, [2.0, 2.0, 20.0, 30.0], 0)]);
    let path = hand_dataset(dir.path(), &[(1, 40, 30), (2, 30, 50)], annotations);
    let root = dir.path().join("images");
    let ds = Arc::new(DetDataset::open(&path, &root, true, tiny_input()).expect("open"));
    assert_eq!(ds.train_picks(7, 2, 3), ds.train_picks(7, 2, 3));
    let picks: Vec<Pick> = (0..20).flat_map(|it| ds.train_picks(7, 2, it)).collect();
    assert!(picks.iter().any(|p| p.flip) && picks.iter().any(|p| !p.flip), "flip p = 0.5");
    // Each epoch (one iteration of two) shows both images.
    assert!((0..20).all(|it| {
        let mut idx: Vec<usize> = ds.train_picks(7, 2, it).iter().map(|p| p.index).collect();
        idx.sort();
        idx == [0, 1]
    }));
    let loaded: Vec<_> = Loader::train(ds.clone(), 7, 2, 3..5, 1, Device::Cpu).map(|b| b.expect("batch")).collect();
    assert_eq!(loaded.len(), 2);
    let direct = ds.batch(&ds.train_picks(7, 2, 4), &Device::Cpu).expect("batch");
    assert_eq!(loaded[1].gt, direct.gt);
    assert_eq!(loaded[1].image_ids, direct.image_ids);
    let diff = (&loaded[1].images - &direct.images).and_then(|d| d.abs()).and_then(|d| d.sum_all());
    assert_eq!(diff.and_then(|d| d.to_scalar::<f32>()).expect("diff"), 0.0);
    // Flipping mirrors the boxes in the resized width, and the pixels with them.
    let plain = ds.batch(&[Pick { index: 0, flip: false }], &Device::Cpu).expect("plain");
    let flipped = ds.batch(&[Pick { index: 0, flip: true }], &Device::Cpu).expect("flipped");
    assert_eq!(flipped.gt[0].boxes, [flip_xyxy(plain.gt[0].boxes[0], 40)]);
    assert_eq!(flipped.gt[0].boxes, [[40.0 - 13.0 - 1.0, 5.0, 40.0 - 4.0 - 1.0, 12.0]]);
    let mirrored = plain.images.narrow(3, 0, 40).and_then(|t| t.contiguous()).and_then(|t| t.flip(&[3]));
    let back = flipped.images.narrow(3, 0, 40).expect("unpadded");
    let diff = (mirrored.expect("mirror") - back).and_then(|d| d.abs()).and_then(|d| d.sum_all());
    assert_eq!(diff.and_then(|d| d.to_scalar::<f32>()).expect("diff"), 0.0);
}

#[test]
fn crowd_annotations_are_not_training_targets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let annotations = json!([
        ann(1, 1, 5, [4.0, 5.0, 10.0, 8.0], 0),
        ann(2, 1, 9, [0.0, 0.0, 30.0, 20.0], 1),
        // Image 2 has only a crowd box: kept (it passes `has_valid_annotation`), with no targets.
        ann(3, 2, 9, [1.0, 1.0, 20.0, 20.0], 1),
    ]);
    let path = hand_dataset(dir.path(), &[(1, 40, 30), (2, 40, 30)], annotations);
    let ds = DetDataset::open(&path, &dir.path().join("images"), true, tiny_input()).expect("open");
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.report.crowd, 2);
    assert_eq!(ds.samples[0].gt.boxes, [[4.0, 5.0, 13.0, 12.0]]);
    assert_eq!(ds.samples[0].gt.labels, [1]);
    assert!(ds.samples[1].gt.boxes.is_empty());
    let batch = ds.batch(&[Pick { index: 1, flip: false }], &Device::Cpu).expect("batch");
    assert!(batch.gt[0].boxes.is_empty() && batch.gt[0].labels.is_empty());
}

#[test]
fn evaluation_keeps_images_without_annotations_and_training_drops_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let annotations = json!([
        ann(1, 1, 5, [4.0, 5.0, 10.0, 8.0], 0),
        // Image 3's only box is 1 pixel wide: `has_valid_annotation` drops the image in training.
        ann(2, 3, 5, [4.0, 5.0, 1.0, 8.0], 0),
    ]);
    let path = hand_dataset(dir.path(), &[(3, 40, 30), (2, 40, 30), (1, 40, 30)], annotations);
    let root = dir.path().join("images");
    let val = DetDataset::open(&path, &root, false, tiny_input()).expect("val");
    assert_eq!(val.samples.iter().map(|s| s.image_id).collect::<Vec<_>>(), [1, 2, 3], "sorted by id");
    let batches: Vec<_> = Loader::eval(Arc::new(val), 2, 2, Device::Cpu).map(|b| b.expect("batch")).collect();
    assert_eq!(batches.iter().map(|b| b.image_ids.clone()).collect::<Vec<_>>(), [vec![1, 2], vec![3]]);
    assert!(batches[0].gt[1].boxes.is_empty());
    let train = DetDataset::open(&path, &root, true, tiny_input()).expect("train");
    assert_eq!(train.samples.iter().map(|s| s.image_id).collect::<Vec<_>>(), [1]);
    assert_eq!((train.report.unannotated_images, train.report.tiny_box_images), (1, 1));
    println!("train: {}", train.report);
}

#[test]
fn degenerate_and_outside_boxes_are_dropped_counted_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let annotations = json!([
        ann(10, 1, 5, [4.0, 5.0, 10.0, 8.0], 0),
        ann(11, 1, 5, [5.0, 5.0, 0.5, 10.0], 0),
        ann(12, 1, 9, [100.0, 100.0, 10.0, 10.0], 0),
        ann(13, 1, 9, [30.0, 20.0, 20.0, 20.0], 0),
    ]);
    let path = hand_dataset(dir.path(), &[(1, 40, 30)], annotations);
    let ds = DetDataset::open(&path, &dir.path().join("images"), true, tiny_input()).expect("open");
    assert_eq!(ds.report.degenerate, [11]);
    assert_eq!(ds.report.outside, [12]);
    assert_eq!(ds.report.clipped, 1);
    assert_eq!(ds.samples[0].gt.boxes, [[4.0, 5.0, 13.0, 12.0], [30.0, 20.0, 39.0, 29.0]]);
    let warnings = ds.report.warnings();
    println!("{}\n{}", ds.report, warnings.join("\n"));
    assert_eq!(warnings.len(), 2);
    assert!(
        warnings[0].contains("instances.json") && warnings[0].contains("degenerate") && warnings[0].ends_with("11")
    );
    assert!(warnings[1].contains("instances.json") && warnings[1].contains("outside") && warnings[1].ends_with("12"));
}

fn open_err(dir: &Path, json: &str) -> String {
    let path = dir.join("instances.json");
    std::fs::write(&path, json).expect("write");
    let err = DetDataset::open(&path, dir, true, InputConfig::default()).expect_err("must fail");
    err.to_string()
}

#[test]
fn malformed_json_names_the_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = open_err(dir.path(), "{\"images\": [\n  {\"id\": 1,}\n]}");
    println!("{msg}");
    assert!(msg.contains("instances.json") && msg.contains("malformed JSON") && msg.contains("line 2 column"), "{msg}");
}

#[test]
fn annotation_of_a_missing_image_and_unknown_category_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = |ann: serde_json::Value| {
        json!({"images": [{"id": 1, "file_name": "1.png", "width": 4, "height": 4}],
               "annotations": [ann], "categories": [{"id": 5, "name": "a"}]})
        .to_string()
    };
    let msg = open_err(dir.path(), &base(ann(7, 99, 5, [0.0, 0.0, 2.0, 2.0], 0)));
    println!("{msg}");
    assert!(msg.contains("annotation 7 refers to image 99"), "{msg}");
    let msg = open_err(dir.path(), &base(ann(8, 1, 6, [0.0, 0.0, 2.0, 2.0], 0)));
    println!("{msg}");
    assert!(msg.contains("annotation 8 has category id 6"), "{msg}");
}

#[test]
fn missing_image_file_names_the_file_the_image_and_the_annotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = hand_dataset(dir.path(), &[(1, 40, 30)], json!([ann(1, 1, 5, [4.0, 5.0, 10.0, 8.0], 0)]));
    std::fs::remove_file(dir.path().join("images/1.png")).expect("rm");
    let err = DetDataset::open(&path, &dir.path().join("images"), false, tiny_input()).expect_err("missing file");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, DataError::MissingImage { image_id: 1, .. }), "{err:?}");
    assert!(msg.contains("images/1.png") && msg.contains("image 1") && msg.contains("instances.json"), "{msg}");
}

#[test]
fn image_of_another_size_than_the_annotations_say_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = hand_dataset(dir.path(), &[(1, 40, 30)], json!([ann(1, 1, 5, [4.0, 5.0, 10.0, 8.0], 0)]));
    let rgb = vec![0u8; 3 * 20 * 10];
    image::save_buffer(dir.path().join("images/1.png"), &rgb, 20, 10, image::ExtendedColorType::Rgb8).expect("png");
    let ds = DetDataset::open(&path, &dir.path().join("images"), false, tiny_input()).expect("open");
    let msg = ds.batch(&[Pick { index: 0, flip: false }], &Device::Cpu).expect_err("size").to_string();
    println!("{msg}");
    assert!(
        msg.contains("1.png") && msg.contains("20x10") && msg.contains("40x30") && msg.contains("image 1"),
        "{msg}"
    );
}

#[test]
fn input_config_has_the_official_defaults_and_refuses_unknown_keys() {
    let cfg: InputConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!(cfg, InputConfig::default());
    assert_eq!((cfg.min_size, cfg.max_size, cfg.flip, cfg.size_divisibility), (800, 1333, 0.5, 32));
    assert_eq!(cfg.normalize, Normalize::CaffeBgr);
    let cfg: InputConfig = serde_json::from_str(r#"{"normalize": "image_net", "min_size": 320}"#).expect("parse");
    assert_eq!((cfg.normalize, cfg.min_size), (Normalize::ImageNet, 320));
    let err = serde_json::from_str::<InputConfig>(r#"{"min_sise": 320}"#).expect_err("unknown key").to_string();
    assert!(err.contains("min_sise"), "{err}");
    let bad = InputConfig { flip: 1.5, ..InputConfig::default() };
    assert!(bad.check().expect_err("flip").to_string().contains("flip = 1.5"));
}

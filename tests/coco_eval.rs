//! COCO box evaluation against pycocotools: the recorded figures and summary tables of every
//! case, no detections, and image subsets.
//!
//! A case is a `tests/cases/coco_*` directory with `coco_gt.json` and one or more
//! `expected_stats*.json`, each the output of `check_coco.py coco_gt.json DETS [--img-ids …]`
//! (`shared/reference/`, pycocotools 2.0.11): `stats`, and where recorded `dets` (default
//! `coco_dets.json`), `img_ids` and `summary` (the table `summarize()` printed).

use std::path::{Path, PathBuf};

use serde_json::Value;
use skd::det::coco::{Annotation, Category, Detection, Image, Instances, read_detections};
use skd::det::coco_eval::{CocoStats, evaluate};

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cases")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("coco_")))
        .collect();
    v.sort();
    v
}

fn expectations(case: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(case)
        .expect("case dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("expected_stats")))
        .collect();
    v.sort();
    v
}

/// The `stats` of an expectation, parsed with std's correctly rounded `f64::from_str`: serde_json's
/// default parser can be 1 ulp off on 17-digit numbers, which would hide agreement to the bit.
fn recorded_stats(text: &str) -> Vec<f64> {
    let key = text.find("\"stats\"").expect("stats key");
    let open = key + text[key..].find('[').expect("[") + 1;
    let close = open + text[open..].find(']').expect("]");
    text[open..close].split(',').map(|v| v.trim().parse().expect("stat")).collect()
}

fn seed1() -> (Instances, Vec<Detection>) {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases/coco_seed1");
    let gt = Instances::read(&case.join("coco_gt.json")).expect("gt");
    let dets = read_detections(&case.join("coco_dets.json"), &gt).expect("dets");
    (gt, dets)
}

#[test]
fn stats_and_table_equal_pycocotools_on_every_recorded_case() {
    let mut checked = 0;
    for case in cases() {
        let gt = Instances::read(&case.join("coco_gt.json")).expect("gt");
        for file in expectations(&case) {
            let text = std::fs::read_to_string(&file).expect("read");
            let expected: Value = serde_json::from_str(&text).expect("json");
            let name = file.strip_prefix(file.parent().and_then(Path::parent).expect("cases dir")).expect("prefix");
            let dets = read_detections(&case.join(expected["dets"].as_str().unwrap_or("coco_dets.json")), &gt)
                .expect("detections");
            let img_ids: Option<Vec<u64>> = expected
                .get("img_ids")
                .map(|ids| ids.as_array().expect("img_ids").iter().map(|v| v.as_u64().expect("id")).collect());
            let stats = evaluate(&gt, &dets, img_ids.as_deref());
            let want = recorded_stats(&text);
            assert_eq!(want.len(), 12, "{}", name.display());
            let diffs: Vec<f64> = stats.to_array().iter().zip(&want).map(|(g, w)| (g - w).abs()).collect();
            let max = diffs.iter().copied().fold(0.0, f64::max);
            println!("{}: {} detections, max |stat - pycocotools| = {max:e}", name.display(), dets.len());
            assert!(max < 1e-4, "{}: {:?}\n vs pycocotools {want:?}", name.display(), stats.to_array());
            if let Some(summary) = expected["summary"].as_str() {
                assert_eq!(stats.to_string(), summary, "{}", name.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no tests/cases/coco_*/expected_stats*.json");
}

fn image(id: u64) -> Image {
    Image { id, file_name: format!("{id:012}.jpg"), width: 640, height: 480 }
}

fn annotation(id: u64, image_id: u64, bbox: [f64; 4], iscrowd: u8) -> Annotation {
    Annotation { id, image_id, category_id: 1, bbox, area: None, iscrowd }
}

#[test]
fn no_detections_give_zero_and_minus_one_where_an_area_range_has_no_gt() {
    // A small and a medium GT; the only large box is a crowd region, which is no GT to find;
    // category 2 has no GT at all. check_coco.py on this GT and `[]` prints the same.
    let gt = Instances {
        info: Value::Null,
        licenses: vec![],
        images: vec![image(1), image(2)],
        annotations: vec![
            annotation(1, 1, [0.0, 0.0, 10.0, 10.0], 0),
            annotation(2, 2, [0.0, 0.0, 50.0, 50.0], 0),
            annotation(3, 2, [100.0, 100.0, 200.0, 200.0], 1),
        ],
        categories: vec![
            Category { id: 1, name: "person".into(), supercategory: None },
            Category { id: 2, name: "car".into(), supercategory: None },
        ],
    };
    let stats = evaluate(&gt, &[], None);
    assert_eq!(stats.to_array(), [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
}

fn one_category(images: Vec<Image>, annotations: Vec<Annotation>) -> Instances {
    Instances {
        info: Value::Null,
        licenses: vec![],
        images,
        annotations,
        categories: vec![Category { id: 1, name: "person".into(), supercategory: None }],
    }
}

fn detection(bbox: [f64; 4], score: f64) -> Detection {
    Detection { image_id: 1, category_id: 1, bbox, score }
}

#[test]
fn only_the_top_100_detections_of_an_image_and_category_count() {
    let gt = one_category(vec![image(1)], vec![annotation(1, 1, [0.0, 0.0, 10.0, 10.0], 0)]);
    // `n` false positives scored above the one exact hit.
    let with_false_positives = |n: usize| {
        let mut dets: Vec<Detection> =
            (0..n).map(|i| detection([100.0 + i as f64, 100.0, 10.0, 10.0], 0.9 - i as f64 * 1e-3)).collect();
        dets.push(detection([0.0, 0.0, 10.0, 10.0], 0.5));
        evaluate(&gt, &dets, None)
    };
    // 100th: found at every IoU threshold, at precision 1/100 (the envelope carries it to
    // recall 0); AR@1 and AR@10 miss it. check_coco.py on the same boxes gives these figures.
    let s = with_false_positives(99);
    assert!((s.ap - 0.01).abs() < 1e-12 && s.ap_small == s.ap, "{s:?}");
    assert_eq!((s.ar1, s.ar10, s.ar100, s.ar_small), (0.0, 0.0, 1.0, 1.0));
    assert_eq!((s.ap_medium, s.ap_large, s.ar_medium, s.ar_large), (-1.0, -1.0, -1.0, -1.0));
    // 101st: cut.
    let s = with_false_positives(100);
    assert_eq!((s.ap, s.ar100), (0.0, 0.0));
}

#[test]
fn a_crowd_region_absorbs_any_number_of_detections() {
    let gt = one_category(
        vec![image(1)],
        vec![annotation(1, 1, [0.0, 0.0, 10.0, 10.0], 0), annotation(2, 1, [100.0, 100.0, 200.0, 200.0], 1)],
    );
    // Three small boxes inside the crowd region, scored above the hit: IoU with the region is
    // intersection / detection area = 1, so each is matched to it and ignored, none a false
    // positive (with the plain union they would overlap it by 1/400 and count as misses).
    // check_coco.py on the same boxes gives these figures.
    let mut dets: Vec<Detection> =
        (0..3).map(|i| detection([120.0 + 20.0 * i as f64, 120.0, 10.0, 10.0], 0.9 - 0.1 * i as f64)).collect();
    dets.push(detection([0.0, 0.0, 10.0, 10.0], 0.5));
    let s = evaluate(&gt, &dets, None);
    // Precision 1 is tp / (tp + fp + eps) = 1 / (1 + 2^-52) in pycocotools.
    for v in [s.ap, s.ap50, s.ap75, s.ar100] {
        assert!((v - 1.0).abs() < 1e-12, "{s:?}");
    }
}

#[test]
fn image_ids_evaluate_the_subset_like_params_img_ids() {
    let (gt, dets) = seed1();
    let mut ids: Vec<u64> = gt.images.iter().map(|im| im.id).collect();
    ids.sort_unstable();
    let subset: Vec<u64> = ids.iter().step_by(2).copied().collect();
    let on_subset = evaluate(&gt, &dets, Some(&subset));
    assert_ne!(on_subset, evaluate(&gt, &dets, None), "the subset should change the figures");

    // The same as ground truth and detections cut down to those images.
    let cut_gt = Instances {
        images: gt.images.iter().filter(|im| subset.contains(&im.id)).cloned().collect(),
        annotations: gt.annotations.iter().filter(|a| subset.contains(&a.image_id)).cloned().collect(),
        ..gt.clone()
    };
    let cut_dets: Vec<Detection> = dets.iter().filter(|d| subset.contains(&d.image_id)).cloned().collect();
    assert_eq!(on_subset, evaluate(&cut_gt, &cut_dets, None));

    // np.unique: order and repeats do not matter; every image is the default.
    let shuffled: Vec<u64> = subset.iter().rev().chain(&subset[..2]).copied().collect();
    assert_eq!(evaluate(&gt, &dets, Some(&shuffled)), on_subset);
    assert_eq!(evaluate(&gt, &dets, Some(&ids)), evaluate(&gt, &dets, None));
    // No image: no GT anywhere.
    assert_eq!(evaluate(&gt, &dets, Some(&[])).to_array(), [-1.0; 12]);
}

#[test]
fn stats_serialize_under_their_coco_names() {
    let (gt, dets) = seed1();
    let stats: CocoStats = evaluate(&gt, &dets, None);
    let json = serde_json::to_value(stats).expect("serialize");
    let names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];
    assert_eq!(json.as_object().expect("object").len(), 12);
    for (name, value) in names.iter().zip(stats.to_array()) {
        assert_eq!(json[name].as_f64(), Some(value), "{name}");
    }
}

//! `skd-seg bench`: the real step and inference, timed, with torch_bench.py's fields.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out =
        Command::new(env!("CARGO_BIN_EXE_skd-seg")).arg("bench").args(args).arg("--json").output().expect("bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn train_and_infer_print_the_twins_fields() {
    let train = bench(&[
        "--mode",
        "train",
        "--teacher",
        "r18",
        "--size",
        "64",
        "64",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--terms",
        "pi,pa",
    ]);
    for key in ["framework", "mode", "device", "size", "batch", "img_per_s", "step_ms_median", "peak_mem_mb"] {
        assert!(!train[key].is_null(), "{key} missing: {train}");
    }
    assert_eq!((train["framework"].as_str(), train["mode"].as_str()), (Some("skd"), Some("train")));
    assert_eq!(train["logits_hw"], serde_json::json!([9, 9]));
    assert!(train["img_per_s"].as_f64().is_some_and(|v| v > 0.0));
    let infer = bench(&["--mode", "infer", "--size", "64", "128", "--batch", "1", "--steps", "2", "--warmup", "0"]);
    assert_eq!(infer["postprocess"], Value::Bool(true));
    assert_eq!(infer["logits_hw"], serde_json::json!([9, 17]));
}

#[test]
fn data_mode_times_decoding_and_scoring() {
    let dir = tempfile::tempdir().expect("tempdir");
    skd::seg::synth::write_split(dir.path(), "val", 3, (64, 128), 0).expect("synth");
    let v = bench(&["--mode", "data", "--data", dir.path().to_str().expect("utf-8")]);
    assert_eq!((v["images"].as_u64(), v["size"].clone()), (Some(3), serde_json::json!([64, 128])));
}

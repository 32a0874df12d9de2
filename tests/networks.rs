//! Network presets: parameter counts and MACs against the reference, and `skd-seg info`.

use std::process::Command;

use serde_json::Value;
use skd::seg::PspConfig;
use skd::seg::info::ModelInfo;

fn param_counts() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/param_counts.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("param_counts.json")).expect("json")
}

#[test]
fn preset_parameter_counts_equal_the_reference_exactly() {
    let counts = param_counts();
    let want = |key: &str| counts[key]["params"].as_u64().unwrap_or_else(|| panic!("{key}")) as usize;
    let size = (512, 1024);
    let r101 = ModelInfo::new("pspnet-r101", size).expect("r101");
    assert_eq!(r101.params, want("teacher_pspnet_r101_deep_dsn"));
    assert_eq!(r101.params_without_dsn, want("teacher_pspnet_r101_deep_no_dsn"));
    let r18 = ModelInfo::new("pspnet-r18", size).expect("r18");
    assert_eq!(r18.params, want("student_r18_deep_psp128_dsn"));
    assert_eq!(r18.params_without_dsn, want("student_r18_deep_psp128_no_dsn"));
    assert_eq!(
        ModelInfo::new("pspnet-r18-paper", size).expect("paper").params,
        want("paper_r18_1.0_7x7_psp256_no_dsn")
    );
    assert_eq!(ModelInfo::new("pspnet-r18-half", size).expect("half").params, want("paper_r18_0.5_7x7_psp128_no_dsn"));
}

#[test]
fn macs_at_512x1024_equal_the_papers_flops() {
    // spec/skd_reference.md §2: the paper's "FLOPs" are MACs at 512x1024 with the DSN head.
    let g = |preset: &str| {
        let i = ModelInfo::new(preset, (512, 1024)).expect(preset);
        (i.macs as f64 / 1e9, i.macs_without_dsn as f64 / 1e9)
    };
    let close = |got: f64, want: f64| (got - want).abs() < 0.01;
    let (teacher, teacher_no_dsn) = g("pspnet-r101");
    assert!(close(teacher, 574.93) && close(teacher_no_dsn, 535.29), "{teacher} {teacher_no_dsn}");
    assert!(close(g("pspnet-r18").1, 123.34));
    assert!(close(g("pspnet-r18-paper").0, 128.16));
    assert!(close(g("pspnet-r18-half").0, 33.35));
}

#[test]
fn logit_sizes_follow_output_stride_8() {
    let cfg = PspConfig::pspnet_r18();
    assert_eq!(cfg.output_hw(512, 512).expect("512"), (65, 65));
    assert_eq!(cfg.output_hw(1024, 2048).expect("full"), (129, 257));
    assert_eq!(cfg.output_hw(64, 64).expect("64"), (9, 9));
    assert_eq!(cfg.output_hw(128, 128).expect("128"), (17, 17));
}

fn skd_seg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_skd-seg")).args(args).output().expect("run skd-seg")
}

#[test]
fn info_prints_the_exact_counts_as_json_and_as_a_table() {
    let out = skd_seg(&["info", "--model", "pspnet-r101", "--size", "512", "512", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["params"], 70_437_350);
    assert_eq!(v["params_without_dsn"], 65_707_475);
    assert_eq!(v["logits"], serde_json::json!([19, 65, 65]));
    let table = skd_seg(&["info", "--model", "pspnet-r18"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("13068262 (12770515 without the DSN head)"), "{text}");
}

#[test]
fn info_with_an_unknown_preset_suggests_the_nearest_and_exits_2() {
    let out = skd_seg(&["info", "--model", "r18"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"unknown model preset "r18" (did you mean "pspnet-r18"?)"#), "{err}");
}

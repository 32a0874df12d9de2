//! The arrows point one way (STYLE.md): `distill/` is task-agnostic and may use only `nn/`
//! from this crate; `nn/` uses nothing else of it.

use std::path::Path;

/// Every `crate::<module>` that the `.rs` files under `dir` refer to.
fn crate_modules_used(dir: &Path) -> Vec<(String, String)> {
    let mut used = Vec::new();
    for entry in std::fs::read_dir(dir).expect("source dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("source file");
            for (i, _) in text.match_indices("crate::") {
                let module: String = text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                used.push((path.display().to_string(), module));
            }
        }
    }
    used
}

fn assert_only_uses(dir: &str, allowed: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let bad: Vec<_> = crate_modules_used(&root).into_iter().filter(|(_, m)| !allowed.contains(&m.as_str())).collect();
    assert!(bad.is_empty(), "src/{dir} may use only {allowed:?} of this crate, found {bad:?}");
}

#[test]
fn distill_uses_only_nn() {
    assert_only_uses("distill", &["nn"]);
}

#[test]
fn nn_uses_nothing_else_of_the_crate() {
    assert_only_uses("nn", &[]);
}

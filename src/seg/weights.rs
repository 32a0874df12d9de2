//! PSPNet weights: a frozen network (the teacher) or a trainable one (the student) from a file,
//! and the student's deployable file.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::pspnet::{PRESETS, PspConfig, PspNet};
use crate::weights::{self, BnConvention, KeyLayout, LoadMode, LoadReport, StateDict, WeightsError};

/// Where weights come from and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsSource {
    /// A path or an `hf://owner/repo/file` reference.
    pub path: String,
    pub layout: KeyLayout,
    pub bn: BnConvention,
}

impl WeightsSource {
    /// A file in our own (and the released student's) key layout with standard BatchNorm.
    pub fn skd(path: impl Into<String>) -> Self {
        Self { path: path.into(), layout: KeyLayout::Skd, bn: BnConvention::Standard }
    }
}

/// Every parameter and buffer of the network `cfg` describes.
pub fn expected_params(cfg: &PspConfig) -> candle_core::Result<weights::ParamShapes> {
    weights::expected_params(|vb| PspNet::new(cfg, vb))
}

/// The preset whose parameters the file matches exactly, if any.
fn matching_preset(sd: &StateDict) -> Option<&'static str> {
    PRESETS.iter().map(|(name, _)| *name).find(|name| {
        let Ok(cfg) = PspConfig::preset(name) else { return false };
        [cfg.clone(), cfg.without_dsn()].iter().any(|cfg| {
            expected_params(cfg).is_ok_and(|expected| {
                let file: Vec<_> = sd.tensors.iter().filter(|(k, _)| !k.ends_with("num_batches_tracked")).collect();
                file.len() == expected.len()
                    && expected.iter().all(|(k, s)| sd.tensors.get(k).is_some_and(|t| t.dims() == s.as_slice()))
            })
        })
    })
}

/// Reads, converts and checks `src` against `cfg`, naming the preset the file fits on a mismatch.
fn read_checked(cfg: &PspConfig, src: &WeightsSource, mode: LoadMode) -> weights::Result<(StateDict, LoadReport)> {
    check(cfg, weights::read(&src.path)?, src, mode)
}

/// Converts and checks a read state dict against `cfg`.
fn check(
    cfg: &PspConfig,
    sd: StateDict,
    src: &WeightsSource,
    mode: LoadMode,
) -> weights::Result<(StateDict, LoadReport)> {
    let mut sd = sd.convert(src.layout, src.bn)?;
    let expected = expected_params(cfg)?;
    match sd.check(&expected, mode) {
        Ok(report) => Ok((sd, report)),
        Err(WeightsError::Mismatch { path, detail, mut hint }) => {
            if let Some(name) = matching_preset(&sd) {
                hint += &format!("\n  hint: the file fits the preset {name:?}");
            }
            Err(WeightsError::Mismatch { path, detail, hint })
        }
        Err(e) => Err(e),
    }
}

/// A frozen network: plain tensors, no variables, for evaluation or as a teacher.
pub fn load_frozen(cfg: &PspConfig, src: &WeightsSource, device: &Device) -> weights::Result<(PspNet, LoadReport)> {
    frozen(cfg, read_checked(cfg, src, LoadMode::Strict)?, device)
}

fn frozen(
    cfg: &PspConfig,
    (sd, report): (StateDict, LoadReport),
    device: &Device,
) -> weights::Result<(PspNet, LoadReport)> {
    let vb = VarBuilder::from_tensors(sd.into_tensors(device)?, DType::F32, device);
    Ok((PspNet::new(cfg, vb)?, report))
}

/// A trainable network in `varmap`: initialised from `seed`, then (optionally) overwritten from a
/// file — strictly (a student's own weights) or partially (ImageNet initialisation of the backbone).
pub fn load_trainable(
    cfg: &PspConfig,
    src: Option<(&WeightsSource, LoadMode)>,
    varmap: &VarMap,
    device: &Device,
    seed: u64,
) -> weights::Result<(PspNet, Option<LoadReport>)> {
    let net = PspNet::new(cfg, crate::nn::init::seeded_var_builder(varmap, seed, DType::F32, device))?;
    let report = match src {
        None => None,
        Some((src, mode)) => {
            let (sd, report) = read_checked(cfg, src, mode)?;
            sd.load_into(varmap)?;
            Some(report)
        }
    };
    Ok((net, report))
}

/// A frozen network from a checkpoint: its architecture from the file's metadata (our own
/// files) or from `preset` (released files, which carry none).
pub fn load_checkpoint(
    src: &WeightsSource,
    preset: Option<&str>,
    device: &Device,
) -> weights::Result<(PspNet, PspConfig, LoadReport)> {
    // Read once: the metadata names the architecture, the tensors fill it.
    let sd = weights::read(&src.path)?;
    let cfg = match (sd.metadata.get("config").cloned(), preset) {
        (_, Some(name)) => PspConfig::preset(name)?,
        (Some(json), None) => serde_json::from_str(&json).map_err(|e| WeightsError::Corrupt {
            path: src.path.clone(),
            detail: format!("metadata `config` is not a PSPNet config: {e}"),
        })?,
        (None, None) => {
            return Err(WeightsError::Conflict {
                path: src.path.clone(),
                detail: "the file records no network config; name the architecture with --model PRESET".into(),
            });
        }
    };
    let (net, report) = frozen(&cfg, check(&cfg, sd, src, LoadMode::Strict)?, device)?;
    Ok((net, cfg, report))
}

/// Writes a trainable network's state as a deployable safetensors file with its config.
pub fn save(path: &Path, varmap: &VarMap, cfg: &PspConfig, preset: Option<&str>) -> weights::Result<()> {
    let tensors: BTreeMap<_, _> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    };
    let config = serde_json::to_string(cfg).expect("a PspConfig serialises");
    let mut extra = vec![("model".to_string(), "pspnet".to_string()), ("config".to_string(), config)];
    extra.push(("num_classes".to_string(), cfg.num_classes.to_string()));
    if let Some(p) = preset {
        extra.push(("preset".to_string(), p.to_string()));
    }
    weights::save(path, &tensors, weights::skd_metadata(extra))
}

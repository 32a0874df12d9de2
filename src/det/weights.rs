//! Detector checkpoints: the deployable network (no optimiser state, no mimic adapters) with its
//! config and the COCO category ids of its classes in the metadata, so `skd-det eval` and a
//! teacher load need nothing else.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::fcos::{Fcos, FcosConfig};
use crate::weights::{self, LoadMode, WeightsError};

/// The file's network, its config and the category id of each label 1..K.
pub struct Checkpoint {
    pub net: Fcos,
    pub config: FcosConfig,
    pub category_ids: Vec<u64>,
}

/// Writes the detector in `varmap` with `cfg` and its classes' category ids.
pub fn save(path: &Path, varmap: &VarMap, cfg: &FcosConfig, category_ids: &[u64]) -> weights::Result<()> {
    let tensors: BTreeMap<_, _> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    };
    let extra = [
        ("model".to_string(), "fcos".to_string()),
        ("config".to_string(), serde_json::to_string(cfg).expect("an FcosConfig serialises")),
        ("category_ids".to_string(), serde_json::to_string(category_ids).expect("ids serialise")),
    ];
    weights::save(path, &tensors, weights::skd_metadata(extra))
}

/// Reads a detector written by [`save`], every parameter checked against its config.
pub fn load(path: &Path, device: &Device) -> weights::Result<Checkpoint> {
    let mut sd = weights::read_file(path)?;
    let corrupt = |detail: String| WeightsError::Corrupt { path: path.display().to_string(), detail };
    if sd.metadata.get("model").map(String::as_str) != Some("fcos") {
        return Err(corrupt(
            "not an FCOS checkpoint (metadata `model` is not \"fcos\"); write one with `skd-det train`".into(),
        ));
    }
    let field = |key: &str| sd.metadata.get(key).cloned().ok_or_else(|| corrupt(format!("no `{key}` in its metadata")));
    let config: FcosConfig =
        serde_json::from_str(&field("config")?).map_err(|e| corrupt(format!("metadata `config`: {e}")))?;
    let category_ids: Vec<u64> =
        serde_json::from_str(&field("category_ids")?).map_err(|e| corrupt(format!("metadata `category_ids`: {e}")))?;
    if category_ids.len() != config.num_classes {
        return Err(corrupt(format!("{} category ids for {} classes", category_ids.len(), config.num_classes)));
    }
    let expected = weights::expected_params(|vb| Fcos::new(&config, vb))?;
    sd.check(&expected, LoadMode::Strict)?;
    let vb = VarBuilder::from_tensors(sd.into_tensors(device)?, DType::F32, device);
    Ok(Checkpoint { net: Fcos::new(&config, vb)?, config, category_ids })
}

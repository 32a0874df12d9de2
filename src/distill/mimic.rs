//! Feature mimicking, the third mode the authors' FCOS code carried: `mean((A(f_S) − f_T)²)` per
//! level, where `A` is a learnable 1x1 convolution from the student's channels to the teacher's
//! when they differ (the identity when they match). The adapters train with the student and are
//! saved in the training state, but are not part of the deployable student.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::nn::SplitMix64;
use crate::nn::conv::{Conv, ConvSpec};

/// Mimic term: features -> features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MimicConfig {
    pub weight: f64,
    /// Levels to cover; `None` = all.
    pub levels: Option<Vec<usize>>,
}

impl Default for MimicConfig {
    fn default() -> Self {
        Self { weight: 1.0, levels: None }
    }
}

/// The adapters of every feature level.
pub struct Mimic {
    cfg: MimicConfig,
    adapters: Vec<Option<Conv>>,
    varmap: VarMap,
}

impl Mimic {
    /// `channels`: `(student, teacher)` of each feature level. Adapter keys `adapters.{level}.*`.
    pub fn new(cfg: MimicConfig, channels: &[(usize, usize)], device: &Device, seed: u64) -> Result<Self> {
        let varmap = VarMap::new();
        let seed = SplitMix64::derive(&[seed, 0xADA9]).next_u64();
        let vb = crate::nn::init::seeded_var_builder(&varmap, seed, DType::F32, device).pp("adapters");
        let adapters = channels
            .iter()
            .enumerate()
            .map(|(l, &(s, t))| (s != t).then(|| Conv::new(ConvSpec::new(s, t, 1), true, vb.pp(l))).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, adapters, varmap })
    }

    pub fn config(&self) -> &MimicConfig {
        &self.cfg
    }

    /// Every adapter's parameters, by key.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        crate::nn::trainable_vars(&self.varmap)
    }

    /// `mean((A(f_S) − f_T)²)` of one level (the teacher detached).
    pub fn level_loss(&self, level: usize, f_s: &Tensor, f_t: &Tensor) -> Result<Tensor> {
        let adapter = self.adapters.get(level).ok_or_else(|| {
            candle_core::Error::Msg(format!("mimic: no adapter for level {level} ({} levels)", self.adapters.len()))
        })?;
        let f_s = match adapter {
            Some(a) => a.forward(f_s)?,
            None => f_s.clone(),
        };
        if f_s.dims() != f_t.dims() {
            candle_core::bail!("mimic: level {level}: student {:?} vs teacher {:?}", f_s.dims(), f_t.dims());
        }
        (f_s - f_t.detach())?.sqr()?.mean_all()
    }
}

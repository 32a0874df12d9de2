//! What `skd-seg info` reports about a network preset: parameters, output shapes and
//! multiply-accumulates (the paper's "FLOPs" are MACs at 512x1024 including the DSN head).

use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use serde::Serialize;

use super::pspnet::{PspConfig, PspNet};
use super::weights::expected_params;
use crate::nn::is_buffer;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub model: String,
    /// Trainable parameters (BatchNorm statistics excluded).
    pub params: usize,
    /// The same without the DSN head (the inference graph).
    pub params_without_dsn: usize,
    /// Input `[H, W]`.
    pub size: [usize; 2],
    /// `[K, h, w]` of the logits (and the aux logits).
    pub logits: [usize; 3],
    /// `[C, h, w]` of the PSP feature (the pair-wise input).
    pub feature: [usize; 3],
    /// Multiply-accumulates of one image, the DSN head included when there is one.
    pub macs: u64,
    pub macs_without_dsn: u64,
}

/// Trainable parameters of the network `cfg` describes (BatchNorm statistics excluded).
pub fn count_params(cfg: &PspConfig) -> Result<usize> {
    Ok(expected_params(cfg)?.iter().filter(|(k, _)| !is_buffer(k)).map(|(_, s)| s.iter().product::<usize>()).sum())
}

fn macs(cfg: &PspConfig, hw: (usize, usize)) -> Result<u64> {
    // Zero weights: only the geometry matters here.
    let net = PspNet::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))?;
    Ok(net.macs(hw)?.0)
}

impl ModelInfo {
    pub fn new(preset: &str, (h, w): (usize, usize)) -> Result<Self> {
        let cfg = PspConfig::preset(preset)?;
        let (oh, ow) = cfg.output_hw(h, w)?;
        Ok(Self {
            model: preset.to_string(),
            params: count_params(&cfg)?,
            params_without_dsn: count_params(&cfg.without_dsn())?,
            size: [h, w],
            logits: [cfg.num_classes, oh, ow],
            feature: [cfg.psp_out, oh, ow],
            macs: macs(&cfg, (h, w))?,
            macs_without_dsn: macs(&cfg.without_dsn(), (h, w))?,
        })
    }
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |m: u64| m as f64 / 1e9;
        writeln!(f, "model            {}", self.model)?;
        writeln!(f, "parameters       {} ({} without the DSN head)", self.params, self.params_without_dsn)?;
        writeln!(f, "input            {} x {}", self.size[0], self.size[1])?;
        writeln!(f, "logits           [{}, {}, {}]", self.logits[0], self.logits[1], self.logits[2])?;
        writeln!(f, "PSP feature      [{}, {}, {}]", self.feature[0], self.feature[1], self.feature[2])?;
        write!(f, "MACs             {:.2} G ({:.2} G without the DSN head)", g(self.macs), g(self.macs_without_dsn))
    }
}

//! A `Conv2d` built with PyTorch's default initialisation.
//!
//! `nn.Conv2d` draws weight and bias from `U(−1/√fan_in, 1/√fan_in)` (kaiming_uniform with
//! `a = √5`); candle-nn's `conv2d` uses a Kaiming normal instead. Layers whose reference keeps
//! PyTorch's defaults (the discriminator, the self-attention) are built here.

use candle_core::Result;
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder};

/// PyTorch's default uniform bound for a layer with `fan_in` inputs.
pub fn default_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// `nn.Conv2d(c_in, c_out, kernel, ..)` with PyTorch's default init; keys `weight`, `bias`.
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let b = default_bound(c_in / cfg.groups * kernel * kernel);
    let init = Init::Uniform { lo: -b, up: b };
    let weight = vb.get_with_hints((c_out, c_in / cfg.groups, kernel, kernel), "weight", init)?;
    let bias = if bias { Some(vb.get_with_hints(c_out, "bias", init)?) } else { None };
    Ok(Conv2d::new(weight, bias, cfg))
}

//! # skd — structured knowledge distillation for dense prediction, on Candle
//!
//! A reproduction of Liu et al., "Structured Knowledge Distillation for Semantic
//! Segmentation" (CVPR 2019) and its extension to detection. See `ARCHITECTURE.md` for the
//! map of the crate; the arrows point one way:
//!
//! ```text
//! bin/skd-seg, bin/skd-det  ->  seg/, det/ (tasks)  ->  distill/ (DenseOutputs -> Losses)  ->  nn/
//! ```
#![doc = include_str!("../README.md")]

pub mod backbone;
pub mod distill;
pub mod nn;
pub mod seg;
pub mod suggest;
pub mod train;
pub mod weights;

/// The device named `name`: `cpu`, `cuda` or `cuda:N` (the CUDA ones need the `cuda` feature).
pub fn device(name: &str) -> candle_core::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => candle_core::Device::new_cuda(i),
            None => Err(candle_core::Error::Msg(format!("unknown device {other:?}; use cpu, cuda or cuda:N"))),
        },
    }
}

/// Sets `CANDLE_GRAD_DO_NOT_DETACH=1`, which Candle reads once per thread at the first backward
/// and which the WGAN-GP gradient penalty needs (double backward).
///
/// # Safety
/// Call at the start of `main`, before any other thread exists (see [`std::env::set_var`]).
pub unsafe fn enable_double_backward() {
    // SAFETY: the caller guarantees no other thread reads the environment concurrently.
    unsafe { std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1") };
}

//! The segmentation task plugin (PSPNet on Cityscapes).

pub mod bench;
pub mod cityscapes;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod info;
pub mod loss;
pub mod metrics;
pub mod pspnet;
pub mod synth;
pub mod train;
pub mod weights;

pub use loss::{IGNORE_LABEL, SegLoss, cross_entropy_upsampled};
pub use pspnet::{PRESETS, PspConfig, PspNet, PspOutput};
pub use weights::WeightsSource;

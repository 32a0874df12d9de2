//! The segmentation task plugin (PSPNet on Cityscapes).

pub mod info;
pub mod loss;
pub mod pspnet;
pub mod weights;

pub use loss::{IGNORE_LABEL, SegLoss, cross_entropy_upsampled};
pub use pspnet::{PRESETS, PspConfig, PspNet, PspOutput};
pub use weights::WeightsSource;

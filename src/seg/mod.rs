//! The segmentation task plugin (PSPNet on Cityscapes).

pub mod loss;

pub use loss::{IGNORE_LABEL, SegLoss, cross_entropy_upsampled};

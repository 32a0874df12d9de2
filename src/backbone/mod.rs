//! Backbones for dense prediction.

pub mod resnet;

pub use resnet::{Block, ResNet, ResNetConfig, ResNetFeatures, Stem};

//! The detection task plugin (FCOS on COCO-format data).

pub mod coco;
pub mod data;
pub mod fcos;
pub mod fpn;
pub mod loss;
pub mod postprocess;
pub mod synth;
pub mod targets;

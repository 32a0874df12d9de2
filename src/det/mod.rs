//! The detection task plugin (FCOS on COCO-format data).

pub mod coco;
pub mod coco_eval;
pub mod config;
pub mod data;
pub mod eval;
pub mod fcos;
pub mod fpn;
pub mod loss;
pub mod postprocess;
pub mod synth;
pub mod targets;
pub mod train;
pub mod weights;

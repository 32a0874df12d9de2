//! The detection task plugin (FCOS on COCO-format data).

pub mod coco;
pub mod coco_eval;

//! Running a detector over a split: detections in the COCO results format (boxes mapped back to
//! each original image, labels to category ids), and their box AP against the split's ground
//! truth.

use std::sync::Arc;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use super::coco::{Detection, Instances};
use super::coco_eval::{CocoStats, evaluate};
use super::data::{DataError, DetDataset, Loader, scale_xyxy, xyxy_to_coco};
use super::fcos::Fcos;
use super::postprocess::{PostprocessConfig, postprocess};

/// Detections of every image of `dataset` (in its order), at most `limit` images.
pub fn detect(
    net: &Fcos,
    dataset: Arc<DetDataset>,
    category_ids: &[u64],
    cfg: &PostprocessConfig,
    batch: usize,
    device: &Device,
    verbose: bool,
) -> Result<Vec<Detection>, DataError> {
    let progress = if verbose {
        let b = ProgressBar::new(dataset.len() as u64);
        b.set_style(
            ProgressStyle::with_template("detect [{bar:25}] {pos}/{len} {per_sec} ETA {eta}").expect("template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut out = Vec::new();
    for b in Loader::eval(dataset, batch, 2, device.clone()) {
        let b = b?;
        let head = net.forward_t(&b.images, false)?.head;
        let dets = postprocess(&net.bbox_in_pixels(&head)?, &net.config().levels.strides, &b.image_sizes, cfg)?;
        for (i, d) in dets.iter().enumerate() {
            for ((bx, score), label) in d.boxes.iter().zip(&d.scores).zip(&d.labels) {
                let resized = bx.map(|v| v as f32);
                let original = scale_xyxy(resized, b.image_sizes[i], b.original_sizes[i]);
                out.push(Detection {
                    image_id: b.image_ids[i],
                    category_id: category_ids[*label as usize - 1],
                    bbox: xyxy_to_coco(original),
                    score: *score,
                });
            }
        }
        progress.inc(b.image_ids.len() as u64);
    }
    progress.finish_and_clear();
    Ok(out)
}

/// Box AP of `detections` on the images of `dataset` (those it kept) against its ground truth.
pub fn score(gt: &Instances, dataset: &DetDataset, detections: &[Detection]) -> CocoStats {
    let ids: Vec<u64> = dataset.samples.iter().map(|s| s.image_id).collect();
    evaluate(gt, detections, Some(&ids))
}

//! From head outputs to detections (`FCOSPostProcessor`), and class-wise NMS, on the host.
//!
//! Per image and level: the (location, class) pairs with `σ(cls) > 0.05` are candidates (the
//! threshold comes before centerness); the top 1000 by `σ(cls)·σ(ctr)` are decoded to
//! `(x − l, y − t, x + r, y + b)`, scored `sqrt(σ(cls)·σ(ctr))` and clipped to the unpadded image.
//! Then, over all levels: class-wise NMS (the `+1` IoU of FCOS's `ml_nms`, suppress when
//! IoU > 0.6) and the 100 best, where ties with the 100th score are all kept (`kthvalue`).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::loss::HeadOutputs;
use super::targets::Locations;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostprocessConfig {
    /// On `σ(cls)` (`INFERENCE_TH`).
    pub pre_nms_thresh: f64,
    /// Per level and image (`PRE_NMS_TOP_N`).
    pub pre_nms_top_n: usize,
    pub nms_thresh: f64,
    /// `DETECTIONS_PER_IMG`; 0 keeps all.
    pub detections_per_image: usize,
    /// The `+1` IoU of `ml_nms` (as run) instead of torchvision's continuous one.
    pub legacy_iou: bool,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        Self { pre_nms_thresh: 0.05, pre_nms_top_n: 1000, nms_thresh: 0.6, detections_per_image: 100, legacy_iou: true }
    }
}

/// Detections of one image in input pixels, by decreasing score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    /// `(x1, y1, x2, y2)`.
    pub boxes: Vec<[f64; 4]>,
    pub scores: Vec<f64>,
    /// 1..K.
    pub labels: Vec<u32>,
    /// Flat location index over all levels (level offset + `y·W + x`).
    pub locations: Vec<usize>,
}

impl Detections {
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    fn select(&self, keep: &[usize]) -> Self {
        Self {
            boxes: keep.iter().map(|&i| self.boxes[i]).collect(),
            scores: keep.iter().map(|&i| self.scores[i]).collect(),
            labels: keep.iter().map(|&i| self.labels[i]).collect(),
            locations: keep.iter().map(|&i| self.locations[i]).collect(),
        }
    }
}

/// One image's candidates before NMS, and how many passed the threshold on each level (before
/// the top-n cut).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// Level by level, each by decreasing `σ(cls)·σ(ctr)`.
    pub detections: Detections,
    pub per_level: Vec<usize>,
}

fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

/// Indices of `scores` by decreasing value; equal values keep their order.
fn order_desc(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// The candidates of every image. `head.bbox_reg` must be in pixels; `image_sizes` are the
/// unpadded `(h, w)` used for clipping.
pub fn candidates(
    head: &HeadOutputs,
    strides: &[usize],
    image_sizes: &[(usize, usize)],
    cfg: &PostprocessConfig,
) -> Result<Vec<Candidates>> {
    let host = |ts: &[Tensor]| -> Result<Vec<Vec<f32>>> {
        ts.iter().map(|t| t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()).collect()
    };
    let (cls, reg, ctr) = (host(&head.cls_logits)?, host(&head.bbox_reg)?, host(&head.centerness)?);
    let sizes = head.cls_logits.iter().map(|t| Ok((t.dim(2)?, t.dim(3)?))).collect::<Result<Vec<_>>>()?;
    let (n, k) = (head.cls_logits[0].dim(0)?, head.cls_logits[0].dim(1)?);
    if image_sizes.len() != n || strides.len() != sizes.len() {
        candle_core::bail!(
            "postprocess: {n} images and {} levels, but {} image sizes and {} strides",
            sizes.len(),
            image_sizes.len(),
            strides.len()
        );
    }
    let locations = Locations::new(strides, &sizes);
    let offsets = locations.offsets();
    let mut out = Vec::with_capacity(n);
    for (i, &(img_h, img_w)) in image_sizes.iter().enumerate() {
        let mut dets = Detections::default();
        let mut per_level = Vec::with_capacity(sizes.len());
        for (l, &(h, w)) in sizes.iter().enumerate() {
            let hw = h * w;
            let cls = &cls[l][i * k * hw..(i + 1) * k * hw];
            let reg = &reg[l][i * 4 * hw..(i + 1) * 4 * hw];
            let ctr = &ctr[l][i * hw..(i + 1) * hw];
            // Row-major over (location, class), as `nonzero` lists them.
            let mut found: Vec<(usize, usize, f64, f64)> = Vec::new();
            for loc in 0..hw {
                for c in 0..k {
                    let p = sigmoid(cls[c * hw + loc]);
                    if p > cfg.pre_nms_thresh {
                        found.push((loc, c, p, p * sigmoid(ctr[loc])));
                    }
                }
            }
            per_level.push(found.len());
            let q: Vec<f64> = found.iter().map(|f| f.3).collect();
            for &j in order_desc(&q).iter().take(cfg.pre_nms_top_n) {
                let (loc, c, _, q) = found[j];
                let [x, y] = locations.points[offsets[l] + loc];
                let d = [0, 1, 2, 3].map(|r| reg[r * hw + loc] as f64);
                let (max_x, max_y) = ((img_w as f64 - 1.0).max(0.0), (img_h as f64 - 1.0).max(0.0));
                dets.boxes.push([
                    (x - d[0]).clamp(0.0, max_x),
                    (y - d[1]).clamp(0.0, max_y),
                    (x + d[2]).clamp(0.0, max_x),
                    (y + d[3]).clamp(0.0, max_y),
                ]);
                dets.scores.push(q.sqrt());
                dets.labels.push(c as u32 + 1);
                dets.locations.push(offsets[l] + loc);
            }
        }
        out.push(Candidates { detections: dets, per_level });
    }
    Ok(out)
}

/// Class-wise NMS and the `detections_per_image` best of one image's candidates.
pub fn select(candidates: &Detections, cfg: &PostprocessConfig) -> Detections {
    let classes: Vec<i64> = candidates.labels.iter().map(|&l| l as i64).collect();
    let mut keep = nms(&candidates.boxes, &candidates.scores, &classes, cfg.nms_thresh, cfg.legacy_iou);
    if cfg.detections_per_image > 0 && keep.len() > cfg.detections_per_image {
        let mut kept: Vec<f64> = keep.iter().map(|&i| candidates.scores[i]).collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        let kth = kept[cfg.detections_per_image - 1];
        keep.retain(|&i| candidates.scores[i] >= kth);
    }
    candidates.select(&keep)
}

/// Head outputs to the detections of every image.
pub fn postprocess(
    head: &HeadOutputs,
    strides: &[usize],
    image_sizes: &[(usize, usize)],
    cfg: &PostprocessConfig,
) -> Result<Vec<Detections>> {
    Ok(candidates(head, strides, image_sizes, cfg)?.iter().map(|c| select(&c.detections, cfg)).collect())
}

/// IoU of two `(x1, y1, x2, y2)` boxes; `legacy` adds 1 to widths and heights (pixel-inclusive
/// boxes, as `ml_nms` and maskrcnn-benchmark).
pub fn box_iou(a: &[f64; 4], b: &[f64; 4], legacy: bool) -> f64 {
    let one = if legacy { 1.0 } else { 0.0 };
    let iw = (a[2].min(b[2]) - a[0].max(b[0]) + one).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1]) + one).max(0.0);
    let inter = iw * ih;
    let area = |x: &[f64; 4]| (x[2] - x[0] + one) * (x[3] - x[1] + one);
    inter / (area(a) + area(b) - inter)
}

/// Greedy class-wise NMS: in order of decreasing score (stable on ties), a box is kept unless a
/// kept box of its class overlaps it with IoU > `threshold`. Returns the kept indices in that
/// order.
pub fn nms(boxes: &[[f64; 4]], scores: &[f64], classes: &[i64], threshold: f64, legacy: bool) -> Vec<usize> {
    let mut kept_by_class: std::collections::HashMap<i64, Vec<usize>> = std::collections::HashMap::new();
    let mut keep = Vec::new();
    for i in order_desc(scores) {
        let kept = kept_by_class.entry(classes[i]).or_default();
        if kept.iter().all(|&j| box_iou(&boxes[j], &boxes[i], legacy) <= threshold) {
            kept.push(i);
            keep.push(i);
        }
    }
    keep
}

//! COCO box evaluation as pycocotools 2.0.x computes it (`COCOeval(gt, dt, "bbox")`, then
//! `evaluate`, `accumulate`, `summarize`), ported step by step so that the 12 stats agree to the
//! last bit, including where pycocotools' choices are arbitrary.
//!
//! ```text
//! evaluate ─ group boxes by (category, image)
//!   └ per category, in parallel
//!       ├ evaluate_image   per image: sort and cut the detections, IoUs, greedy matching
//!       └ accumulate       per area range and maxDets: precision at 101 recall points, recall
//!   └ summarize            the 12 means over IoU thresholds, recall points and categories
//! ```
//!
//! The facts that move the figures:
//! - Detections get `area = w·h` and `iscrowd = 0` (`COCO.loadRes`). Ground truth uses its
//!   `area` field ([`Annotation::area`]) for the small/medium/large split, and both bounds of an
//!   area range are inclusive: a GT of area exactly 32² is small and medium.
//! - Per image and category only the 100 highest-scored detections count; ties keep file order
//!   (numpy's stable mergesort).
//! - Crowd GT is ignored: a detection matched to it is neither TP nor FP, and it may absorb any
//!   number of detections; its IoU divides by the detection's area, not the union.
//! - A category without GT in an area range has no AP there and is left out of the mean (-1 in
//!   pycocotools; -1 for a stat when no category has GT).
//! - No detections at all is not an error: every stat is 0, or -1 where an area range has no GT,
//!   as FCOS's empty results object gives (`COCO.loadRes` itself fails on an empty list).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use serde::Serialize;

use super::coco::{Annotation, Detection, Instances};

/// `Params.iouThrs`: `np.linspace(.5, 0.95, 10)`.
const T: usize = 10;
/// `Params.recThrs`: `np.linspace(0, 1, 101)`.
const R: usize = 101;
/// `Params.maxDets`; `evaluateImg` keeps the top `maxDets[-1]` of each image and category.
const MAX_DETS: [usize; 3] = [1, 10, 100];
const MAX_DET: usize = MAX_DETS[2];
/// `Params.areaRng` and `areaRngLbl`: `[0, 1e5²]`, `[0, 32²]`, `[32², 96²]`, `[96², 1e5²]`.
const AREA_RANGES: [(&str, f64, f64); 4] =
    [("all", 0.0, 1e10), ("small", 0.0, 1024.0), ("medium", 1024.0, 9216.0), ("large", 9216.0, 1e10)];
const A: usize = AREA_RANGES.len();
const M: usize = MAX_DETS.len();

/// What one stat averages: precision or recall, at one IoU threshold or all, over one area range
/// with at most so many detections per image (`area` and `max_dets` index [`AREA_RANGES`] and
/// [`MAX_DETS`]).
struct Stat {
    precision: bool,
    iou: Option<f64>,
    area: usize,
    max_dets: usize,
}

/// `COCOeval.summarize()._summarizeDets`, in `E.stats` order.
const STATS: [Stat; 12] = [
    Stat { precision: true, iou: None, area: 0, max_dets: 2 },
    Stat { precision: true, iou: Some(0.5), area: 0, max_dets: 2 },
    Stat { precision: true, iou: Some(0.75), area: 0, max_dets: 2 },
    Stat { precision: true, iou: None, area: 1, max_dets: 2 },
    Stat { precision: true, iou: None, area: 2, max_dets: 2 },
    Stat { precision: true, iou: None, area: 3, max_dets: 2 },
    Stat { precision: false, iou: None, area: 0, max_dets: 0 },
    Stat { precision: false, iou: None, area: 0, max_dets: 1 },
    Stat { precision: false, iou: None, area: 0, max_dets: 2 },
    Stat { precision: false, iou: None, area: 1, max_dets: 2 },
    Stat { precision: false, iou: None, area: 2, max_dets: 2 },
    Stat { precision: false, iou: None, area: 3, max_dets: 2 },
];

/// pycocotools' 12 summary stats; -1 where there is no GT in the setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CocoStats {
    /// AP @[IoU 0.50:0.95], the COCO "AP".
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    #[serde(rename = "AP75")]
    pub ap75: f64,
    #[serde(rename = "APs")]
    pub ap_small: f64,
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    #[serde(rename = "APl")]
    pub ap_large: f64,
    #[serde(rename = "AR1")]
    pub ar1: f64,
    #[serde(rename = "AR10")]
    pub ar10: f64,
    #[serde(rename = "AR100")]
    pub ar100: f64,
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

impl CocoStats {
    fn from_array(s: [f64; 12]) -> Self {
        Self {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }

    /// In pycocotools' `E.stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

/// The table `COCOeval.summarize()` prints, line for line (no trailing newline).
impl std::fmt::Display for CocoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let thresholds = iou_thresholds();
        for (i, (stat, value)) in STATS.iter().zip(self.to_array()).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let (title, kind) = if stat.precision { ("Average Precision", "(AP)") } else { ("Average Recall", "(AR)") };
            let iou = match stat.iou {
                Some(t) => format!("{t:.2}"),
                None => format!("{:.2}:{:.2}", thresholds[0], thresholds[T - 1]),
            };
            let area = AREA_RANGES[stat.area].0;
            write!(
                f,
                " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={:>3} ] = {value:.3}",
                MAX_DETS[stat.max_dets]
            )?;
        }
        Ok(())
    }
}

/// `np.linspace(start, stop, N)` to the bit: `i * step + start`, the last point set to `stop`.
/// The values decide ties: the 9th IoU threshold is 0.8999999999999999, and a recall of exactly
/// 0.35 falls short of the recall threshold 0.35000000000000003.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    std::array::from_fn(|i| if i == N - 1 { stop } else { i as f64 * step + start })
}

fn iou_thresholds() -> [f64; T] {
    linspace(0.5, 0.95)
}

fn recall_thresholds() -> [f64; R] {
    linspace(0.0, 1.0)
}

/// Highest score first, as `np.argsort(-scores, kind="mergesort")` with a stable sort; a NaN
/// score goes last, as numpy puts it, and keeps the order total.
fn by_score_descending(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// `maskUtils.iou` for `[x, y, w, h]` boxes (maskApi.c `bbIou`, same operations in the same
/// order): for crowd GT the union is the detection's area, so a detection inside a crowd region
/// scores 1 however large the region. The evaluator's own: its boxes and crowd rule are fixed by
/// pycocotools, not by the network.
fn box_iou(dt: &[f64; 4], gt: &[f64; 4], crowd: bool) -> f64 {
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let intersection = w * h;
    let dt_area = dt[2] * dt[3];
    let union = if crowd { dt_area } else { dt_area + gt[2] * gt[3] - intersection };
    intersection / union
}

/// What a detection counts as at one IoU threshold and area range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    TruePositive,
    FalsePositive,
    /// Matched to ignored GT, or unmatched and outside the area range.
    Ignored,
}

/// `evaluateImg` for one image and category, at every area range.
struct ImageEval {
    /// Scores of the kept detections, highest first.
    scores: Vec<f64>,
    /// Per area range: `[T, D]`, threshold-major.
    outcomes: [Vec<Outcome>; A],
    /// Per area range: GT that is not ignored (crowd or outside the range).
    counted_gts: [usize; A],
}

/// The boxes of one image and category, in file order.
#[derive(Default)]
struct Cell<'a> {
    gts: Vec<&'a Annotation>,
    dts: Vec<&'a Detection>,
}

/// `computeIoU` and `evaluateImg`: each detection, highest score first, takes the unmatched GT it
/// overlaps most at IoU >= threshold, regular GT before ignored GT.
fn evaluate_image(cell: &Cell, iou_thrs: &[f64; T]) -> ImageEval {
    let mut dts = cell.dts.clone();
    dts.sort_by(|a, b| by_score_descending(a.score, b.score));
    // Where pycocotools cuts; matching is greedy by score, so the rest could not change the top
    // 100's outcomes, and `accumulate` cuts again for maxDets 1 and 10.
    dts.truncate(MAX_DET);
    let gts = &cell.gts;
    let g_count = gts.len();
    // [D, G]
    let ious: Vec<f64> = dts.iter().flat_map(|d| gts.iter().map(|g| box_iou(&d.bbox, &g.bbox, g.is_crowd()))).collect();
    let mut counted_gts = [0; A];
    let outcomes = std::array::from_fn(|a| {
        let (_, lo, hi) = AREA_RANGES[a];
        let ignored: Vec<bool> = gts.iter().map(|g| g.is_crowd() || g.area() < lo || g.area() > hi).collect();
        counted_gts[a] = ignored.iter().filter(|&&i| !i).count();
        // Ignored GT last, stable: a detection tries the regular GT first.
        let mut gt_order: Vec<usize> = (0..g_count).collect();
        gt_order.sort_by_key(|&g| ignored[g]);
        let mut outcomes = Vec::with_capacity(T * dts.len());
        for &threshold in iou_thrs {
            let mut gt_taken = vec![false; g_count];
            for (d, dt) in dts.iter().enumerate() {
                // The best GT so far; a match needs IoU >= threshold (capped at 1 - 1e-10 so that
                // a threshold of 1 could still be met).
                let mut best_iou = threshold.min(1.0 - 1e-10);
                let mut best: Option<usize> = None;
                for &g in &gt_order {
                    if gt_taken[g] && !gts[g].is_crowd() {
                        continue;
                    }
                    // Regular GT matched and only ignored GT left: keep the regular match.
                    if best.is_some_and(|b| !ignored[b]) && ignored[g] {
                        break;
                    }
                    let iou = ious[d * g_count + g];
                    if iou < best_iou {
                        continue;
                    }
                    best_iou = iou;
                    best = Some(g);
                }
                if let Some(g) = best {
                    gt_taken[g] = true;
                }
                let dt_area = dt.bbox[2] * dt.bbox[3];
                outcomes.push(match best {
                    Some(g) if ignored[g] => Outcome::Ignored,
                    // pycocotools records a match as the GT's id and reads id 0 as "unmatched".
                    Some(g) if gts[g].id != 0 => Outcome::TruePositive,
                    _ if dt_area < lo || dt_area > hi => Outcome::Ignored,
                    _ => Outcome::FalsePositive,
                });
            }
        }
        outcomes
    });
    ImageEval { scores: dts.iter().map(|d| d.score).collect(), outcomes, counted_gts }
}

/// `accumulate`'s figures for one category, area range and maxDets.
struct Curves {
    /// `[T][R]`: precision at each recall threshold.
    precision: Box<[[f64; R]; T]>,
    /// `[T]`: the recall reached.
    recall: [f64; T],
}

/// `accumulate` for one category, area range and maxDets, or `None` where there is no counted
/// GT (-1 in pycocotools). `evals` are the category's images in image-id order.
fn accumulate(evals: &[ImageEval], area: usize, max_dets: usize, rec_thrs: &[f64; R]) -> Option<Curves> {
    let counted_gts: usize = evals.iter().map(|e| e.counted_gts[area]).sum();
    if counted_gts == 0 {
        return None;
    }
    // (score, image, detection): each image's top `max_dets`, concatenated in image order, then
    // sorted stably by score across images.
    let mut dets: Vec<(f64, usize, usize)> = evals
        .iter()
        .enumerate()
        .flat_map(|(i, e)| e.scores.iter().take(max_dets).enumerate().map(move |(d, &s)| (s, i, d)))
        .collect();
    dets.sort_by(|a, b| by_score_descending(a.0, b.0));
    let mut precision = Box::new([[0.0; R]; T]);
    let mut recall = [0.0; T];
    let mut rc = Vec::with_capacity(dets.len());
    let mut pr = Vec::with_capacity(dets.len());
    for t in 0..T {
        rc.clear();
        pr.clear();
        let (mut tp, mut fp) = (0u64, 0u64);
        // Ignored detections stay in the curve as repeated points, as in pycocotools.
        for &(_, i, d) in &dets {
            match evals[i].outcomes[area][t * evals[i].scores.len() + d] {
                Outcome::TruePositive => tp += 1,
                Outcome::FalsePositive => fp += 1,
                Outcome::Ignored => {}
            }
            let (tp, fp) = (tp as f64, fp as f64);
            rc.push(tp / counted_gts as f64);
            pr.push(tp / (fp + tp + f64::EPSILON));
        }
        recall[t] = rc.last().copied().unwrap_or(0.0);
        // The precision envelope: the best precision at this recall or beyond.
        for i in (1..pr.len()).rev() {
            if pr[i] > pr[i - 1] {
                pr[i - 1] = pr[i];
            }
        }
        for (r, &threshold) in rec_thrs.iter().enumerate() {
            // np.searchsorted(rc, recThrs, side="left"); past the end, precision stays 0.
            let i = rc.partition_point(|&v| v < threshold);
            if i == rc.len() {
                break;
            }
            precision[t][r] = pr[i];
        }
    }
    Some(Curves { precision, recall })
}

/// numpy's float64 sum (`pairwise_sum_DOUBLE`: 8 accumulators up to 128 values, halves above),
/// so that `np.mean` over some 80 000 precision values is reproduced to the bit.
fn numpy_sum(x: &[f64]) -> f64 {
    let n = x.len();
    if n < 8 {
        x.iter().fold(0.0, |s, v| s + v)
    } else if n <= 128 {
        let mut r = [0.0; 8];
        r.copy_from_slice(&x[..8]);
        let body = n - n % 8;
        for block in x[8..body].chunks_exact(8) {
            for (acc, v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for v in &x[body..] {
            sum += v;
        }
        sum
    } else {
        let half = n / 2 - (n / 2) % 8;
        numpy_sum(&x[..half]) + numpy_sum(&x[half..])
    }
}

/// Evaluates `detections` against `gt` as `COCOeval(gt, gt.loadRes(detections), "bbox")` with
/// `params.imgIds = image_ids` (default: every GT image), then `evaluate()`, `accumulate()`,
/// `summarize()`.
///
/// Categories are the GT's. A detection on an image or category outside the evaluation is
/// skipped ([`super::coco::read_detections`] refuses those of a file); an image id without GT
/// counts only its detections. `Some(&[])` evaluates nothing: every stat -1.
pub fn evaluate(gt: &Instances, detections: &[Detection], image_ids: Option<&[u64]>) -> CocoStats {
    let mut images: Vec<u64> = match image_ids {
        Some(ids) => ids.to_vec(),
        None => gt.images.iter().map(|im| im.id).collect(),
    };
    // np.unique
    images.sort_unstable();
    images.dedup();
    let mut categories = gt.category_ids();
    categories.dedup();
    let image_index: HashMap<u64, usize> = images.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let category_index: HashMap<u64, usize> = categories.iter().enumerate().map(|(k, &id)| (id, k)).collect();
    let cell_of =
        |image_id: u64, category_id: u64| Some((*category_index.get(&category_id)?, *image_index.get(&image_id)?));

    // Per category, the images with GT or detections, in image-id order; pycocotools skips the
    // others (`evaluateImg` returns None).
    let mut cells: Vec<BTreeMap<usize, Cell>> = (0..categories.len()).map(|_| BTreeMap::new()).collect();
    for a in &gt.annotations {
        if let Some((k, i)) = cell_of(a.image_id, a.category_id) {
            cells[k].entry(i).or_default().gts.push(a);
        }
    }
    for d in detections {
        if let Some((k, i)) = cell_of(d.image_id, d.category_id) {
            cells[k].entry(i).or_default().dts.push(d);
        }
    }

    let iou_thrs = iou_thresholds();
    let rec_thrs = recall_thresholds();
    // [K][A][M]; each category's images in parallel too, as one category (person) dominates COCO.
    let curves: Vec<Vec<Option<Curves>>> = cells
        .par_iter()
        .map(|cells| {
            let evals: Vec<ImageEval> = cells.par_iter().map(|(_, cell)| evaluate_image(cell, &iou_thrs)).collect();
            (0..A * M).map(|am| accumulate(&evals, am / M, MAX_DETS[am % M], &rec_thrs)).collect()
        })
        .collect();

    // `_summarize`: the mean of the entries > -1 of precision[T, R, K] or recall[T, K] at one area
    // range and maxDets, in numpy's order (threshold, recall point, category) and summation.
    let stats = STATS.map(|stat| {
        let at = |k: usize| curves[k][stat.area * M + stat.max_dets].as_ref();
        let mut values = Vec::new();
        for t in (0..T).filter(|&t| stat.iou.is_none_or(|iou| iou_thrs[t] == iou)) {
            if stat.precision {
                for r in 0..R {
                    values.extend((0..categories.len()).filter_map(|k| at(k).map(|c| c.precision[t][r])));
                }
            } else {
                values.extend((0..categories.len()).filter_map(|k| at(k).map(|c| c.recall[t])));
            }
        }
        if values.is_empty() { -1.0 } else { numpy_sum(&values) / values.len() as f64 }
    });
    CocoStats::from_array(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_numpys_linspace_to_the_bit() {
        // repr(np.linspace(.5, 0.95, 10)) and repr of np.linspace(0, 1, 101)[i] (numpy 2.4.6).
        let iou: [f64; T] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.8999999999999999, 0.95];
        assert_eq!(iou_thresholds(), iou);
        let rec = recall_thresholds();
        for (i, v) in [(7, 0.07), (35, 0.35000000000000003), (57, 0.5700000000000001), (95, 0.9500000000000001)] {
            assert_eq!(rec[i], v, "recThrs[{i}]");
        }
        assert_eq!((rec[0], rec[100]), (0.0, 1.0));
    }

    #[test]
    fn crowd_iou_divides_by_the_detection_area() {
        let region = [0.0, 0.0, 100.0, 100.0];
        let inside = [10.0, 10.0, 20.0, 20.0];
        assert_eq!(box_iou(&inside, &region, true), 1.0);
        assert_eq!(box_iou(&inside, &region, false), 400.0 / 10000.0);
        // Half outside: intersection 10x20 over the detection's 20x20.
        assert_eq!(box_iou(&[90.0, 0.0, 20.0, 20.0], &region, true), 0.5);
        assert_eq!(box_iou(&[100.0, 0.0, 20.0, 20.0], &region, true), 0.0);
    }

    #[test]
    fn numpy_sum_follows_numpys_pairwise_order() {
        // repr(np.sum([1 / (i + 3) for i in range(n)])) for n = 20, 130, 300 (numpy 2.4.6): 8
        // accumulators and a tail, then halving above 128 values; a left-to-right sum gives
        // 2.1908132502172744, 3.963800683627991 and 4.789297397713856.
        for (n, want) in [(20, 2.190813250217275), (130, 3.9638006836279933), (300, 4.789297397713862)] {
            let x: Vec<f64> = (0..n).map(|i| 1.0 / (i + 3) as f64).collect();
            assert_eq!(numpy_sum(&x), want, "n = {n}");
        }
    }
}

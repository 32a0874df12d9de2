//! Semantic-segmentation scores as cityscapesScripts' `evalPixelLevelSemanticLabeling` computes
//! them: one confusion matrix over the whole split, `IoU_c = TP / (TP + FP + FN)`.
//!
//! - Pixels whose ground truth is ignored (train id 255) never count.
//! - A valid pixel **predicted as an ignored id** (e.g. label id 0 or 4) is a miss: a false
//!   negative for its class and nobody's false positive (column 19 of the matrix).
//! - A class with `TP + FP + FN = 0` has no IoU (NaN) and is left out of the mean; a class absent
//!   from the ground truth but predicted gets 0 and counts.

use serde::Serialize;

use super::cityscapes::CLASS_NAMES;

const K: usize = 19;
/// Prediction columns: the 19 classes and "an ignored id".
const COLS: usize = K + 1;

/// Ground truth (rows, 19 classes) x prediction (19 classes + ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    counts: Vec<u64>,
}

impl Default for ConfusionMatrix {
    fn default() -> Self {
        Self { counts: vec![0; K * COLS] }
    }
}

impl ConfusionMatrix {
    /// Adds one image: train ids (255 = ignored) for the ground truth and the prediction.
    pub fn add(&mut self, gt: &[u8], pred: &[u8]) {
        for (&g, &p) in gt.iter().zip(pred) {
            if (g as usize) < K {
                let col = if (p as usize) < K { p as usize } else { K };
                self.counts[g as usize * COLS + col] += 1;
            }
        }
    }

    pub fn merge(mut self, other: &Self) -> Self {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self
    }

    /// Valid (non-ignored ground truth) pixels counted.
    pub fn pixels(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn scores(&self) -> Scores {
        let at = |g: usize, p: usize| self.counts[g * COLS + p];
        let mut class_iou = [None; K];
        let mut class_acc = [None; K];
        let mut tp_total = 0;
        for c in 0..K {
            let tp = at(c, c);
            let gt_c: u64 = (0..COLS).map(|p| at(c, p)).sum();
            let pred_c: u64 = (0..K).map(|g| at(g, c)).sum();
            let denom = gt_c + pred_c - tp;
            if denom > 0 {
                class_iou[c] = Some(tp as f64 / denom as f64);
            }
            if gt_c > 0 {
                class_acc[c] = Some(tp as f64 / gt_c as f64);
            }
            tp_total += tp;
        }
        let mean = |v: &[Option<f64>]| {
            let xs: Vec<f64> = v.iter().flatten().copied().collect();
            if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 }
        };
        let pixels = self.pixels();
        Scores {
            class_iou: CLASS_NAMES.iter().zip(class_iou).map(|(n, v)| (n.to_string(), v)).collect(),
            miou: mean(&class_iou),
            pixel_acc: if pixels > 0 { tp_total as f64 / pixels as f64 } else { f64::NAN },
            mean_acc: mean(&class_acc),
            nan_classes: CLASS_NAMES
                .iter()
                .zip(class_iou)
                .filter(|(_, v)| v.is_none())
                .map(|(n, _)| n.to_string())
                .collect(),
            pixels,
            num_images: 0,
        }
    }
}

/// The figures of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    /// `(class, IoU)` in train-id order; `None` where the class is absent from ground truth and
    /// predictions (NaN in the official evaluator).
    pub class_iou: Vec<(String, Option<f64>)>,
    /// Mean over the classes that have an IoU.
    pub miou: f64,
    pub pixel_acc: f64,
    /// Mean over the classes present in the ground truth of `TP / GT`.
    pub mean_acc: f64,
    pub nan_classes: Vec<String>,
    /// Valid ground-truth pixels.
    pub pixels: u64,
    pub num_images: usize,
}

impl std::fmt::Display for Scores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<16} {:>7}", "class", "IoU %")?;
        for (name, iou) in &self.class_iou {
            match iou {
                Some(v) => writeln!(f, "{name:<16} {:>7.2}", v * 100.0)?,
                None => writeln!(f, "{name:<16} {:>7}", "nan")?,
            }
        }
        writeln!(f, "{:<16} {:>7.2}", "mIoU", self.miou * 100.0)?;
        writeln!(f, "{:<16} {:>7.2}", "pixel acc", self.pixel_acc * 100.0)?;
        write!(
            f,
            "{:<16} {:>7.2}   ({} images, {} valid pixels)",
            "mean acc",
            self.mean_acc * 100.0,
            self.num_images,
            self.pixels
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicted_ignored_ids_are_misses_and_absent_classes_are_left_out() {
        let mut m = ConfusionMatrix::default();
        // GT: road, road, sky, ignored. Pred: road, "ignored id", road, sky.
        m.add(&[0, 0, 10, 255], &[0, 255, 0, 10]);
        let s = m.scores();
        assert_eq!(s.class_iou[0].1, Some(1.0 / 3.0)); // TP 1, FN 1 (miss), FP 1 (sky pixel)
        assert_eq!(s.class_iou[10].1, Some(0.0)); // TP 0, FN 1; the ignored GT pixel is no FP
        assert_eq!(s.nan_classes.len(), 17);
        assert!((s.miou - 1.0 / 6.0).abs() < 1e-12);
        assert_eq!(s.pixels, 3);
    }
}

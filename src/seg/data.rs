//! Training samples as the released code makes them (`dataset/datasets.py`, `CSDataSet`), and
//! a loader that decodes and augments them in parallel ahead of the training step.
//!
//! Per sample: random scale from {0.7, 0.8, ..., 2.1} (bilinear image, nearest label, OpenCV's
//! `cv2.resize` coordinates and rounding), BGR minus the mean, pad bottom/right to the crop
//! (image 0, label 255), random crop, random horizontal flip. Every random choice comes from
//! `SplitMix64::derive([seed, iteration, slot])`, and the sample order from a per-epoch shuffle
//! of `[seed, epoch]`, so a run is reproducible and can resume at any iteration.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cityscapes::{BGR_MEAN, LabelMap, Result, RgbImage, Split, read_sample};
use super::loss::IGNORE_LABEL;
use crate::nn::SplitMix64;
use crate::train::sample_index;

/// The augmentation settings (defaults as run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Crop `[H, W]` (512 x 512 as run).
    pub crop: [usize; 2],
    /// Random scaling from `{0.7, 0.8, ..., 2.1}`.
    pub scale: bool,
    /// Random horizontal flip.
    pub mirror: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { crop: [512, 512], scale: true, mirror: true }
    }
}

/// The scales the released code draws from: `0.7 + randint(0, 14) / 10`.
pub const SCALES: [f64; 15] = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1];

/// One network input: `[3, H, W]` BGR minus the mean, and its `[H, W]` train ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub height: usize,
    pub width: usize,
    /// Channel-major BGR minus the mean, `3 * H * W` values.
    pub image: Vec<f32>,
    pub label: Vec<u8>,
}

/// `cv2.resize(.., fx=f, fy=f)`'s output length: `round(n · f)`.
fn scaled_len(n: usize, f: f64) -> usize {
    ((n as f64 * f).round() as usize).max(1)
}

/// Bilinear resize of an RGB image with OpenCV's half-pixel coordinates (`INTER_LINEAR`),
/// returned as f32 channel-major BGR minus the mean.
pub fn resize_normalize(img: &RgbImage, (oh, ow): (usize, usize)) -> Vec<f32> {
    let (h, w) = (img.height, img.width);
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        (0..n_out)
            .map(|o| {
                let src = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, (src - i0 as f64) as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    let mut out = vec![0f32; 3 * oh * ow];
    for (y, &(y0, y1, fy)) in ty.iter().enumerate() {
        for (x, &(x0, x1, fx)) in tx.iter().enumerate() {
            for c in 0..3 {
                let p = |yy: usize, xx: usize| img.data[(yy * w + xx) * 3 + c] as f32;
                let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                // RGB channel c -> BGR plane 2 - c
                out[(2 - c) * oh * ow + y * ow + x] = top * (1.0 - fy) + bottom * fy - BGR_MEAN[2 - c] as f32;
            }
        }
    }
    out
}

/// Nearest-neighbour resize of a label map (OpenCV `INTER_NEAREST`: `src = floor(dst · in/out)`).
pub fn resize_nearest(label: &LabelMap, (oh, ow): (usize, usize)) -> Vec<u8> {
    let (h, w) = (label.height, label.width);
    let ys: Vec<usize> = (0..oh).map(|y| ((y as f64 * h as f64 / oh as f64).floor() as usize).min(h - 1)).collect();
    let xs: Vec<usize> = (0..ow).map(|x| ((x as f64 * w as f64 / ow as f64).floor() as usize).min(w - 1)).collect();
    ys.iter().flat_map(|&y| xs.iter().map(move |&x| label.data[y * w + x])).collect()
}

/// The training transform of one decoded sample, its random choices drawn from `rng`.
pub fn augment(img: &RgbImage, label: &LabelMap, cfg: &AugmentConfig, rng: &mut SplitMix64) -> Prepared {
    let f = if cfg.scale { SCALES[rng.below(SCALES.len() as u64) as usize] } else { 1.0 };
    let (h, w) = (scaled_len(img.height, f), scaled_len(img.width, f));
    let image = resize_normalize(img, (h, w));
    let lab = resize_nearest(label, (h, w));
    let [ch, cw] = cfg.crop;
    // Pad bottom/right to the crop (image 0 = the mean colour, label ignored), then crop.
    let (ph, pw) = (h.max(ch), w.max(cw));
    let h_off = rng.below((ph - ch + 1) as u64) as usize;
    let w_off = rng.below((pw - cw + 1) as u64) as usize;
    let flip = cfg.mirror && rng.below(2) == 1;
    let mut out =
        Prepared { height: ch, width: cw, image: vec![0f32; 3 * ch * cw], label: vec![IGNORE_LABEL as u8; ch * cw] };
    for y in 0..ch {
        let sy = y + h_off;
        if sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = x + w_off;
            if sx >= w {
                continue;
            }
            let dx = if flip { cw - 1 - x } else { x };
            out.label[y * cw + dx] = lab[sy * w + sx];
            for c in 0..3 {
                out.image[c * ch * cw + y * cw + dx] = image[c * h * w + sy * w + sx];
            }
        }
    }
    out
}

/// The whole image, only normalised (evaluation).
pub fn prepare_eval(img: &RgbImage, label: &LabelMap) -> Prepared {
    Prepared {
        height: img.height,
        width: img.width,
        image: resize_normalize(img, (img.height, img.width)),
        label: label.data.clone(),
    }
}

/// A batch of prepared samples, stacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub iteration: usize,
    /// `[B, 3, H, W]` values.
    pub images: Vec<f32>,
    /// `[B, H, W]` train ids.
    pub labels: Vec<u8>,
    pub shape: [usize; 4],
}

/// Makes the batch of one iteration (decoding and augmenting its samples in parallel).
pub fn make_batch(split: &Split, cfg: &AugmentConfig, seed: u64, batch: usize, iteration: usize) -> Result<Batch> {
    let prepared: Vec<Prepared> = (0..batch)
        .into_par_iter()
        .map(|slot| {
            let sample = &split.samples[sample_index(split.samples.len(), seed, batch, iteration, slot)];
            let (img, label) = read_sample(sample)?;
            let mut rng = SplitMix64::derive(&[seed, iteration as u64, slot as u64]);
            Ok(augment(&img, &label, cfg, &mut rng))
        })
        .collect::<Result<_>>()?;
    let [h, w] = cfg.crop;
    Ok(Batch {
        iteration,
        images: prepared.iter().flat_map(|p| p.image.iter().copied()).collect(),
        labels: prepared.iter().flat_map(|p| p.label.iter().copied()).collect(),
        shape: [batch, 3, h, w],
    })
}

/// Batches for iterations `start..end`, made by a background thread `prefetch` ahead.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
}

impl Loader {
    pub fn new(
        split: Split,
        cfg: AugmentConfig,
        seed: u64,
        batch: usize,
        range: std::ops::Range<usize>,
        prefetch: usize,
    ) -> Self {
        let (tx, rx): (SyncSender<Result<Batch>>, _) = sync_channel(prefetch.max(1));
        std::thread::spawn(move || {
            for it in range {
                let b = make_batch(&split, &cfg, seed, batch, it);
                let failed = b.is_err();
                // A closed channel means the trainer stopped: nothing left to do.
                if tx.send(b).is_err() || failed {
                    break;
                }
            }
        });
        Self { rx }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

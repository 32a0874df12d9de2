//! Evaluation: a network's predictions on a split (whole image as the reference, sliding window,
//! flip, multi-scale), and the scoring of a folder of label-id PNGs made by any model, both
//! into one confusion matrix over the split ([`super::metrics`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cityscapes::{
    DataError, LABEL_TO_TRAIN, NUM_LABEL_IDS, Split, TRAIN_COLORS, TRAIN_TO_LABEL_ID, read_gray, read_label,
    read_sample,
};
use super::data::prepare_eval;
use super::metrics::{ConfusionMatrix, Scores};
use super::pspnet::PspNet;
use crate::nn::resize_bilinear;

/// How the network sees an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InferMode {
    /// The whole image at once (as the reference evaluates).
    Whole,
    /// Overlapping `crop` windows every `stride` pixels, probabilities averaged where they overlap.
    Slide { crop: [usize; 2], stride: [usize; 2] },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferConfig {
    pub mode: InferMode,
    /// Also predict the mirrored image and average.
    pub flip: bool,
    /// Image scales whose predictions are averaged (`[1.0]` as the reference).
    pub scales: Vec<f64>,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self { mode: InferMode::Whole, flip: false, scales: vec![1.0] }
    }
}

impl InferConfig {
    pub fn validate(&self) -> candle_core::Result<()> {
        if self.scales.is_empty() || self.scales.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            candle_core::bail!("eval: scales must be positive, got {:?}", self.scales);
        }
        if let InferMode::Slide { crop, stride } = &self.mode
            && (crop.contains(&0) || stride.contains(&0) || stride[0] > crop[0] || stride[1] > crop[1])
        {
            candle_core::bail!("eval: sliding window needs 0 < stride <= crop, got crop {crop:?}, stride {stride:?}");
        }
        Ok(())
    }
}

/// `[1, K, h, w]` class probabilities of windows covering `x` `[1, 3, h, w]`.
fn slide_probs(net: &PspNet, x: &Tensor, crop: [usize; 2], stride: [usize; 2]) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    // Pad bottom/right with 0 (the mean colour) to at least one window.
    let (ph, pw) = (h.max(crop[0]), w.max(crop[1]));
    let x = x.pad_with_zeros(2, 0, ph - h)?.pad_with_zeros(3, 0, pw - w)?;
    let starts = |len: usize, c: usize, s: usize| -> Vec<usize> {
        let n = (len - c).div_ceil(s) + 1;
        (0..n).map(|i| (i * s).min(len - c)).collect()
    };
    let mut sum: Option<Tensor> = None;
    let mut count = vec![0f32; ph * pw];
    for &y in &starts(ph, crop[0], stride[0]) {
        for &xo in &starts(pw, crop[1], stride[1]) {
            let window = x.narrow(2, y, crop[0])?.narrow(3, xo, crop[1])?;
            let logits = net.forward_t(&window, false)?.logits;
            let probs = candle_nn::ops::softmax(&resize_bilinear(&logits, (crop[0], crop[1]), true)?, 1)?;
            // Place the window's probabilities on the padded canvas.
            let placed = probs.pad_with_zeros(2, y, ph - y - crop[0])?.pad_with_zeros(3, xo, pw - xo - crop[1])?;
            sum = Some(match sum {
                None => placed,
                Some(s) => (s + placed)?,
            });
            for yy in y..y + crop[0] {
                for c in &mut count[yy * pw + xo..yy * pw + xo + crop[1]] {
                    *c += 1.0;
                }
            }
        }
    }
    let count = Tensor::from_vec(count, (1, 1, ph, pw), x.device())?;
    let probs = sum.expect("at least one window").broadcast_div(&count)?;
    probs.narrow(2, 0, h)?.narrow(3, 0, w)
}

/// `[1, K, H, W]` scores of `x` `[1, 3, H, W]` at full resolution: the upsampled logits for the
/// plain whole-image case (as the reference), else averaged probabilities.
fn full_scores(net: &PspNet, x: &Tensor, cfg: &InferConfig) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if cfg.mode == InferMode::Whole && !cfg.flip && cfg.scales == [1.0] {
        return resize_bilinear(&net.forward_t(x, false)?.logits, (h, w), true);
    }
    let mut total: Option<Tensor> = None;
    for &s in &cfg.scales {
        let size = (((h as f64) * s).round().max(1.0) as usize, ((w as f64) * s).round().max(1.0) as usize);
        let xs = resize_bilinear(x, size, true)?;
        let mut views = vec![(xs.clone(), false)];
        if cfg.flip {
            views.push((xs.flip(&[3])?, true));
        }
        for (v, flipped) in views {
            let probs = match &cfg.mode {
                InferMode::Whole => {
                    let logits = net.forward_t(&v, false)?.logits;
                    candle_nn::ops::softmax(&resize_bilinear(&logits, size, true)?, 1)?
                }
                InferMode::Slide { crop, stride } => slide_probs(net, &v, *crop, *stride)?,
            };
            let probs = if flipped { probs.flip(&[3])? } else { probs };
            let probs = resize_bilinear(&probs, (h, w), true)?;
            total = Some(match total {
                None => probs,
                Some(t) => (t + probs)?,
            });
        }
    }
    Ok(total.expect("at least one scale"))
}

/// Train ids `[H * W]` predicted for `x` `[1, 3, H, W]`.
pub fn predict(net: &PspNet, x: &Tensor, cfg: &InferConfig) -> candle_core::Result<Vec<u8>> {
    let scores = full_scores(net, x, cfg)?;
    // [1, K, H, W] -> [H, W]
    Ok(scores.argmax(1)?.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|v| v as u8).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(
        "{dir}: no prediction for {count} of {total} images, e.g. {examples} (expected <name>*.png, holding label ids)"
    )]
    MissingPredictions { dir: String, count: usize, total: usize, examples: String },
    #[error("{dir}: several predictions match {name}: {paths}")]
    AmbiguousPrediction { dir: String, name: String, paths: String },
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Writes a prediction as a label-id PNG in the official evaluator's format
/// (`{dir}/{name}_leftImg8bit.png`) and a colour PNG for people (`{dir}/color/color_{name}.png`,
/// named so that the evaluator's `{name}*.png` search does not find it).
pub fn save_prediction(dir: &Path, name: &str, pred: &[u8], (h, w): (usize, usize)) -> Result<(), DataError> {
    let ids: Vec<u8> = pred.iter().map(|&t| TRAIN_TO_LABEL_ID.get(t as usize).copied().unwrap_or(0)).collect();
    let colors: Vec<u8> =
        pred.iter().flat_map(|&t| TRAIN_COLORS.get(t as usize).copied().unwrap_or([0, 0, 0])).collect();
    let color_dir = dir.join("color");
    std::fs::create_dir_all(&color_dir)
        .map_err(|e| DataError::File { path: color_dir.display().to_string(), detail: e.to_string() })?;
    for (path, data, kind) in [
        (dir.join(format!("{name}_leftImg8bit.png")), ids, image::ExtendedColorType::L8),
        (color_dir.join(format!("color_{name}.png")), colors, image::ExtendedColorType::Rgb8),
    ] {
        image::save_buffer(&path, &data, w as u32, h as u32, kind)
            .map_err(|e| DataError::File { path: path.display().to_string(), detail: e.to_string() })?;
    }
    Ok(())
}

/// Runs `net` over `split` and scores it; optionally saves every prediction. Decoding of the
/// next images overlaps the network's work.
pub fn evaluate(
    net: &PspNet,
    split: &Split,
    cfg: &InferConfig,
    device: &Device,
    save: Option<&Path>,
    show_progress: bool,
) -> Result<Scores, EvalError> {
    cfg.validate()?;
    let bar = if show_progress { progress(split.samples.len(), "eval") } else { ProgressBar::hidden() };
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let samples = split.samples.clone();
    std::thread::spawn(move || {
        for s in samples {
            let item = read_sample(&s).map(|(img, label)| (s.name.clone(), prepare_eval(&img, &label)));
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    let mut matrix = ConfusionMatrix::default();
    for item in rx {
        let (name, p) = item?;
        let x = Tensor::from_vec(p.image, (1, 3, p.height, p.width), device)?;
        let pred = predict(net, &x, cfg)?;
        matrix.add(&p.label, &pred);
        if let Some(dir) = save {
            save_prediction(dir, &name, &pred, (p.height, p.width))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut scores = matrix.scores();
    scores.num_images = split.samples.len();
    Ok(scores)
}

/// Every `*.png` under `dir`, by file name.
fn index_pngs(dir: &Path) -> Result<HashMap<String, Vec<PathBuf>>, DataError> {
    let mut out: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| DataError::File { path: d.display().to_string(), detail: e.to_string() })?;
        for e in entries {
            let path = e.map_err(|e| DataError::File { path: d.display().to_string(), detail: e.to_string() })?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|n| n.ends_with(".png")) {
                out.entry(name.to_string()).or_default().push(path);
            }
        }
    }
    Ok(out)
}

/// Scores a folder of label-id predictions against `split` the way cityscapesScripts'
/// `evalPixelLevelSemanticLabeling` does: the prediction of `{name}` is the one file under
/// `pred_dir` (searched recursively) named `{name}*.png`.
pub fn score_predictions(split: &Split, pred_dir: &Path) -> Result<Scores, EvalError> {
    let index = index_pngs(pred_dir)?;
    let dir = pred_dir.display().to_string();
    let mut found = Vec::with_capacity(split.samples.len());
    let mut missing = Vec::new();
    for s in &split.samples {
        let matches: Vec<&PathBuf> =
            index.iter().filter(|(n, _)| n.starts_with(&s.name)).flat_map(|(_, p)| p).collect();
        match matches.as_slice() {
            [] => missing.push(s.name.clone()),
            [one] => found.push((s, (*one).clone())),
            many => {
                let paths = many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
                return Err(EvalError::AmbiguousPrediction { dir, name: s.name.clone(), paths });
            }
        }
    }
    if !missing.is_empty() {
        let examples = missing.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        return Err(EvalError::MissingPredictions { dir, count: missing.len(), total: split.samples.len(), examples });
    }
    let matrix = found
        .par_iter()
        .map(|(s, pred_path)| -> Result<ConfusionMatrix, DataError> {
            let gt = read_label(s)?;
            let mut pred = read_gray(pred_path)?;
            if (pred.height, pred.width) != (gt.height, gt.width) {
                return Err(DataError::SizeMismatch {
                    image: pred_path.display().to_string(),
                    image_hw: (pred.height as u32, pred.width as u32),
                    label: s.label.display().to_string(),
                    label_hw: (gt.height as u32, gt.width as u32),
                });
            }
            for (i, v) in pred.data.iter_mut().enumerate() {
                if *v as usize >= NUM_LABEL_IDS {
                    return Err(DataError::BadLabel {
                        path: pred_path.display().to_string(),
                        value: *v,
                        y: i / pred.width,
                        x: i % pred.width,
                        what: "label id (0..=33)",
                    });
                }
                // An ignored id predicted on a valid pixel is a miss (255 -> column "ignored").
                *v = LABEL_TO_TRAIN[*v as usize];
            }
            let mut m = ConfusionMatrix::default();
            m.add(&gt.data, &pred.data);
            Ok(m)
        })
        .try_reduce(ConfusionMatrix::default, |a, b| Ok(a.merge(&b)))?;
    let mut scores = matrix.scores();
    scores.num_images = split.samples.len();
    Ok(scores)
}

//! Benchmarks behind `skd-seg bench`: figures measured by running the real code, printed as
//! one JSON line each (the fields of `shared/reference/torch_bench.py` where they apply).

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::cityscapes::{Result, Split, read_sample};
use super::data::prepare_eval;
use super::metrics::ConfusionMatrix;

/// Evaluation's data side: decode image and label, normalise the image, add the label to a
/// confusion matrix; all images of a split, on every core.
#[derive(Debug, Clone, Serialize)]
pub struct DataBench {
    pub framework: &'static str,
    pub mode: &'static str,
    pub images: usize,
    /// `[H, W]` of the first image.
    pub size: [usize; 2],
    pub threads: usize,
    pub seconds: f64,
    pub img_per_s: f64,
}

pub fn data_throughput(split: &Split) -> Result<DataBench> {
    let first = read_sample(&split.samples[0])?.0;
    let start = Instant::now();
    let matrix = split
        .samples
        .par_iter()
        .map(|s| {
            let (img, label) = read_sample(s)?;
            let p = prepare_eval(&img, &label);
            let mut m = ConfusionMatrix::default();
            m.add(&p.label, &label.data);
            Ok(m)
        })
        .try_reduce(ConfusionMatrix::default, |a, b| Ok(a.merge(&b)))?;
    let seconds = start.elapsed().as_secs_f64();
    // Keeps the work observable (and the matrix from being optimised away).
    assert!(matrix.pixels() > 0 || split.samples.is_empty());
    Ok(DataBench {
        framework: "skd",
        mode: "data",
        images: split.samples.len(),
        size: [first.height, first.width],
        threads: rayon::current_num_threads(),
        seconds,
        img_per_s: split.samples.len() as f64 / seconds,
    })
}

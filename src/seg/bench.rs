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

/// What `skd-seg bench --mode train|infer` runs: the twin of `shared/reference/torch_bench.py`.
#[derive(Debug, Clone)]
pub struct StepBenchConfig {
    /// Time the training step (`true`) or inference.
    pub train: bool,
    pub student: String,
    pub teacher: String,
    pub size: (usize, usize),
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Subset of `pi`, `pa`, `ho`.
    pub terms: Vec<String>,
    /// Infer: also upsample to the input size and take the argmax (as the reference evaluates).
    pub postprocess: bool,
    pub device: String,
    pub seed: u64,
}

/// One JSON line with torch_bench.py's fields.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub framework: &'static str,
    pub mode: &'static str,
    pub device: String,
    pub size: [usize; 2],
    pub batch: usize,
    pub img_per_s: f64,
    pub step_ms_median: f64,
    pub peak_mem_mb: f64,
    pub step_ms_min: f64,
    pub steps: usize,
    pub warmup: usize,
    pub terms: Vec<String>,
    pub teacher: Option<String>,
    pub threads: usize,
    pub logits_hw: [usize; 2],
    pub postprocess: Option<bool>,
    pub peak_mem_kind: &'static str,
}

/// The process's peak resident memory in MB (`ru_maxrss`, as torch_bench.py on CPU).
fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0
}

fn frozen(
    cfg: &super::pspnet::PspConfig,
    device: &candle_core::Device,
    seed: u64,
) -> candle_core::Result<super::pspnet::PspNet> {
    let vm = candle_nn::VarMap::new();
    super::pspnet::PspNet::new(cfg, crate::nn::init::seeded_var_builder(&vm, seed, candle_core::DType::F32, device))?;
    let tensors =
        vm.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    super::pspnet::PspNet::new(cfg, candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device))
}

/// Times `cfg.steps` steps after `cfg.warmup` untimed ones.
pub fn step_bench(cfg: &StepBenchConfig) -> std::result::Result<StepBench, super::train::TrainError> {
    use candle_core::{Device, Tensor};

    use super::pspnet::{PspConfig, PspNet};
    use crate::distill::{DistillConfig, Distiller, HolisticConfig, PairWiseConfig, PixelWiseConfig};
    use crate::train::{OptimConfig, Settings, Trainer};

    let device: Device = crate::device(&cfg.device)?;
    let (h, w) = cfg.size;
    let student_cfg = PspConfig::preset(&cfg.student)?;
    let (lh, lw) = student_cfg.output_hw(h, w)?;
    let mut rng = crate::nn::SplitMix64::new(cfg.seed);
    let n = cfg.batch * h * w;
    let image: Vec<f32> =
        (0..3 * n).map(|i| (rng.uniform() * 255.0 - super::cityscapes::BGR_MEAN[(i / (h * w)) % 3]) as f32).collect();
    let images = Tensor::from_vec(image, (cfg.batch, 3, h, w), &device)?;
    let timed = |step: &mut dyn FnMut() -> std::result::Result<(), super::train::TrainError>| {
        for _ in 0..cfg.warmup {
            step()?;
        }
        let mut times = Vec::with_capacity(cfg.steps);
        for _ in 0..cfg.steps {
            let t0 = Instant::now();
            step()?;
            device.synchronize()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok::<_, super::train::TrainError>(times)
    };
    let times = if cfg.train {
        if cfg.batch < 2 {
            return Err(super::config::ConfigError::Invalid(
                "train mode needs --batch >= 2 (the PSP bin-1 BatchNorm)".into(),
            )
            .into());
        }
        let labels: Vec<u8> = (0..n).map(|_| if rng.uniform() < 0.1 { 255 } else { rng.below(19) as u8 }).collect();
        let labels = Tensor::from_vec(labels, (cfg.batch, h, w), &device)?;
        let teacher = frozen(&PspConfig::preset(&cfg.teacher)?, &device, cfg.seed + 1)?;
        let vm = candle_nn::VarMap::new();
        let (student, _) = super::weights::load_trainable(&student_cfg, None, &vm, &device, cfg.seed)?;
        let has = |t: &str| cfg.terms.iter().any(|x| x == t);
        let distill = DistillConfig {
            pixel_wise: has("pi").then(PixelWiseConfig::default),
            pair_wise: has("pa").then(PairWiseConfig::default),
            holistic: has("ho").then(HolisticConfig::default),
            mimic: None,
        };
        let channels = [(student_cfg.psp_out, teacher.config().psp_out)];
        let distiller = Distiller::new(&distill, (student_cfg.num_classes, lh, lw), &channels, &device, cfg.seed)?;
        let optim = OptimConfig { iterations: cfg.warmup + cfg.steps + 1, batch_size: cfg.batch, ..Default::default() };
        let task = super::train::SegTask { loss: super::loss::SegLoss::default() };
        let mut trainer = Trainer::new(
            task,
            (student, vm),
            Some(teacher),
            Some(distiller),
            Settings { optim, seed: cfg.seed, max_skips: usize::MAX },
        )?;
        let batch = super::train::SegBatch { images, labels };
        let mut it = 0;
        timed(&mut || {
            trainer.step(&batch, it)?;
            it += 1;
            Ok(())
        })?
    } else {
        let student: PspNet = frozen(&student_cfg, &device, cfg.seed)?;
        timed(&mut || {
            let logits = student.forward_t(&images, false)?.logits;
            if cfg.postprocess {
                // As the reference evaluates: upsample, argmax, prediction to the host.
                crate::nn::resize_bilinear(&logits, (h, w), true)?.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
            }
            Ok(())
        })?
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    // statistics.median, as the twin: the mean of the middle two for an even count.
    let median = if sorted.len() % 2 == 0 { (sorted[mid - 1] + sorted[mid]) / 2.0 } else { sorted[mid] };
    Ok(StepBench {
        framework: "skd",
        mode: if cfg.train { "train" } else { "infer" },
        device: cfg.device.clone(),
        size: [h, w],
        batch: cfg.batch,
        img_per_s: cfg.batch as f64 / median,
        step_ms_median: median * 1e3,
        peak_mem_mb: peak_rss_mb(),
        step_ms_min: sorted[0] * 1e3,
        steps: cfg.steps,
        warmup: cfg.warmup,
        terms: if cfg.train { cfg.terms.clone() } else { Vec::new() },
        teacher: cfg.train.then(|| cfg.teacher.clone()),
        threads: candle_core::utils::get_num_threads(),
        logits_hw: [lh, lw],
        postprocess: (!cfg.train).then_some(cfg.postprocess),
        peak_mem_kind: "ru_maxrss (process peak RSS)",
    })
}

//! The quick start: a synthetic Cityscapes-layout set, a small teacher, and a smaller student
//! trained without and with structured distillation on the same budget, all evaluated on the
//! same val split. Runs on a fresh clone with no data and no weights.
//!
//! The networks are much smaller than the paper's (see [`DemoRow::network`]) so that the whole
//! run fits in minutes on two CPU cores; the configs are `configs/synthetic_*.json`, embedded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::cityscapes::Split;
use super::config::TrainConfig;
use super::eval::{InferConfig, evaluate};
use super::pspnet::PspConfig;
use super::train::{RunOptions, STUDENT_FILE, TrainError, run};
use super::weights::{WeightsSource, load_checkpoint};

const TEACHER: &str = include_str!("../../configs/synthetic_teacher.json");
const BASELINE: &str = include_str!("../../configs/synthetic_student_baseline.json");
const SKD: &str = include_str!("../../configs/synthetic_student_skd.json");

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the synthetic set is (made if absent).
    pub data: PathBuf,
    /// Where the three runs go.
    pub out: PathBuf,
    /// Multiplies every run's iterations (1.0 = the configs').
    pub budget: f64,
    pub seed: u64,
    pub verbose: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoRow {
    pub name: &'static str,
    /// A short description of the network.
    pub network: String,
    pub params: usize,
    pub iterations: usize,
    pub miou: f64,
    pub train_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub train_images: usize,
    pub val_images: usize,
    pub image_size: [usize; 2],
    pub rows: Vec<DemoRow>,
    pub seconds: f64,
}

fn describe(cfg: &PspConfig) -> String {
    let b = &cfg.backbone;
    let blocks: usize = b.layers.iter().sum();
    format!("ResNet-{} (deep stem) x{}, PSP {}", blocks * 2 + 2, b.width, cfg.psp_out)
}

fn config(json: &str, opts: &DemoOptions, teacher: Option<&Path>) -> Result<TrainConfig, TrainError> {
    let mut cfg: TrainConfig = serde_json::from_str(json)
        .map_err(|e| super::config::ConfigError::Invalid(format!("embedded demo config: {e}")))?;
    cfg.data.root = opts.data.clone();
    cfg.seed = opts.seed;
    cfg.optim.iterations = ((cfg.optim.iterations as f64 * opts.budget).round() as usize).max(1);
    cfg.checkpoint_every = cfg.optim.iterations;
    if let (Some(t), Some(path)) = (cfg.teacher.as_mut(), teacher) {
        t.weights.path = path.display().to_string();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Makes the data if needed, trains the three networks, evaluates them.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoReport, TrainError> {
    let started = Instant::now();
    let say = |m: String| {
        if opts.verbose {
            eprintln!("{m}");
        }
    };
    if !opts.data.join("leftImg8bit").join("train").is_dir() {
        say(format!("making the synthetic Cityscapes-layout set in {} ...", opts.data.display()));
        super::synth::write_split(&opts.data, "train", 300, (128, 256), opts.seed)?;
        super::synth::write_split(&opts.data, "val", 40, (128, 256), opts.seed)?;
    }
    let teacher_dir = opts.out.join("teacher");
    let runs = [
        ("teacher", config(TEACHER, opts, None)?, teacher_dir.clone()),
        ("student (baseline)", config(BASELINE, opts, None)?, opts.out.join("student_baseline")),
        (
            "student + SKD (pi+pa+ho)",
            config(SKD, opts, Some(&teacher_dir.join(STUDENT_FILE)))?,
            opts.out.join("student_skd"),
        ),
    ];
    let val = Split::discover(&opts.data, "val")?;
    let train_images = Split::discover(&opts.data, "train")?.samples.len();
    let mut rows = Vec::new();
    for (name, cfg, dir) in runs {
        say(format!("\n== {name}: {} iterations -> {}", cfg.optim.iterations, dir.display()));
        let t0 = Instant::now();
        run(&cfg, &dir, &RunOptions { verbose: opts.verbose, ..Default::default() })?;
        let train_seconds = t0.elapsed().as_secs_f64();
        let (net, net_cfg, _) =
            load_checkpoint(&WeightsSource::skd(dir.join(STUDENT_FILE).display().to_string()), None, &Device::Cpu)?;
        let scores = evaluate(&net, &val, &InferConfig::default(), &Device::Cpu, None, false)?;
        say(format!("{name}: val mIoU {:.2} ({train_seconds:.0}s of training)", scores.miou * 100.0));
        rows.push(DemoRow {
            name,
            network: describe(&net_cfg),
            params: super::info::count_params(&net_cfg)?,
            iterations: cfg.optim.iterations,
            miou: scores.miou,
            train_seconds,
        });
    }
    let first = super::cityscapes::read_rgb(&val.samples[0].image)?;
    Ok(DemoReport {
        train_images,
        val_images: val.samples.len(),
        image_size: [first.height, first.width],
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "quick start: synthetic Cityscapes-layout scenes ({} train / {} val, {}x{}), CPU, {:.0}s in all",
            self.train_images, self.val_images, self.image_size[0], self.image_size[1], self.seconds
        )?;
        writeln!(f, "networks are far smaller than the paper's (PSPNet-R101 teacher, PSPNet-R18 student)")?;
        writeln!(f, "{:<26} {:<40} {:>9} {:>6} {:>7}", "model", "network", "params", "iters", "mIoU %")?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<26} {:<40} {:>9} {:>6} {:>7.2}",
                r.name,
                r.network,
                r.params,
                r.iterations,
                r.miou * 100.0
            )?;
        }
        Ok(())
    }
}

//! `skd-seg`: semantic segmentation with structured knowledge distillation.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skd::seg::info::ModelInfo;

/// Train and evaluate PSPNet students distilled from a PSPNet teacher (Liu et al., CVPR 2019).
#[derive(Parser)]
#[command(name = "skd-seg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The quick start: synthetic data, a small teacher, a student without and with SKD, one table.
    Demo {
        /// The synthetic Cityscapes-layout set (made if absent).
        #[arg(long, default_value = "datasets/synthetic")]
        data: std::path::PathBuf,
        /// Where the three runs go.
        #[arg(long, default_value = "runs/demo")]
        out: std::path::PathBuf,
        /// Multiplies every run's iterations (e.g. 0.1 for a smoke test, 4 for better numbers).
        #[arg(long, default_value_t = 1.0)]
        budget: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train a student (or a teacher) on Cityscapes or any set in its layout.
    Train {
        #[command(subcommand)]
        dataset: TrainDataset,
    },
    /// Evaluate a checkpoint (mIoU) or score a folder of label-id predictions.
    Eval(Box<EvalArgs>),
    /// Write a synthetic dataset.
    Synth {
        #[command(subcommand)]
        dataset: SynthDataset,
    },
    /// Print a model preset's parameter count, output shapes and multiply-accumulates.
    Info {
        /// The preset: pspnet-r101, pspnet-r18, pspnet-r18-paper or pspnet-r18-half.
        #[arg(long)]
        model: String,
        /// Input height and width.
        #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [512, 1024])]
        size: Vec<usize>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Measure speed, printing one JSON line (the fields of shared/reference/torch_bench.py).
    Bench(Box<BenchArgs>),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// train (the real SKD step), infer (student forward + upsample + argmax) or data
    /// (decoding + confusion matrix over a split).
    #[arg(long, default_value = "train")]
    mode: String,
    #[arg(long, default_value = "pspnet-r18")]
    student: String,
    /// The teacher preset (r101 and r18 are short for pspnet-r101 and pspnet-r18).
    #[arg(long, default_value = "pspnet-r101")]
    teacher: String,
    #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [512, 512])]
    size: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Distillation terms, a comma list of pi, pa, ho ("" = CE only).
    #[arg(long, default_value = "pi,pa,ho")]
    terms: String,
    /// Infer: time the network only (no upsample + argmax).
    #[arg(long)]
    no_postprocess: bool,
    /// cpu, cuda or cuda:N (default: $SKD_DEVICE, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Dataset root for --mode data.
    #[arg(long, default_value = "datasets/cityscapes")]
    data: std::path::PathBuf,
    #[arg(long, default_value = "val")]
    split: String,
    /// One JSON line (as torch_bench.py prints) instead of the indented object.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let show =
        |v: serde_json::Value| if a.json { v.to_string() } else { serde_json::to_string_pretty(&v).expect("json") };
    let line = match a.mode.as_str() {
        "data" => show(serde_json::to_value(skd::seg::bench::data_throughput(
            &skd::seg::cityscapes::Split::discover(&a.data, &a.split)?,
        )?)?),
        "train" | "infer" => {
            let preset = |p: &str| if p.starts_with("pspnet-") { p.to_string() } else { format!("pspnet-{p}") };
            let terms: Vec<String> = a.terms.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect();
            if let Some(bad) = terms.iter().find(|t| !["pi", "pa", "ho"].contains(&t.as_str())) {
                anyhow::bail!("--terms: unknown term {bad:?}; use a comma list of pi, pa, ho");
            }
            let cfg = skd::seg::bench::StepBenchConfig {
                train: a.mode == "train",
                student: preset(&a.student),
                teacher: preset(&a.teacher),
                size: (a.size[0], a.size[1]),
                batch: a.batch,
                steps: a.steps.max(1),
                warmup: a.warmup,
                terms,
                postprocess: !a.no_postprocess,
                device: a.device.clone().or_else(|| std::env::var("SKD_DEVICE").ok()).unwrap_or_else(|| "cpu".into()),
                seed: a.seed,
            };
            show(serde_json::to_value(skd::seg::bench::step_bench(&cfg)?)?)
        }
        other => anyhow::bail!("--mode {other:?}: expected train, infer or data"),
    };
    println!("{line}");
    Ok(())
}

#[derive(Subcommand)]
enum TrainDataset {
    /// Cityscapes layout (leftImg8bit/, gtFine/); defaults = the released protocol.
    Cityscapes(Box<TrainArgs>),
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    run: skd::config::RunArgs,
    /// Evaluate the teacher on N val images before training and print its mIoU.
    #[arg(long, value_name = "N")]
    check_teacher: Option<usize>,
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    use skd::seg::config::TrainConfig;
    use skd::seg::train::{RunOptions, run};
    let (cfg, run_dir, resume) = a.run.resolve("teacher.weights.path", "cityscapes", TrainConfig::load)?;
    if a.run.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if let Some(t) = &cfg.teacher {
        let p = std::path::Path::new(&t.weights.path);
        anyhow::ensure!(
            t.weights.path.starts_with("hf://") || p.is_file(),
            "teacher weights {} not found (teacher.weights.path; pass --teacher FILE)",
            p.display()
        );
    }
    anyhow::ensure!(
        cfg.data.root.is_dir(),
        "dataset root {} not found (data.root; pass --data DIR, or make a synthetic set: skd-seg synth cityscapes --out DIR)",
        cfg.data.root.display()
    );
    let summary = run(&cfg, &run_dir, &RunOptions { resume, check_teacher: a.check_teacher, verbose: true })?;
    summary.print();
    Ok(())
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Report mean IoU (the only metric; required for clarity).
    #[arg(long)]
    miou: bool,
    /// Weights to evaluate (skd safetensors, or a released .pth with --model).
    #[arg(long, conflicts_with = "pred_dir")]
    checkpoint: Option<String>,
    /// Architecture preset, for files that do not record it (released checkpoints).
    #[arg(long)]
    model: Option<String>,
    /// Key layout of the checkpoint: skd, toolbox or imagenet.
    #[arg(long, default_value = "skd")]
    layout: String,
    /// BatchNorm convention of the checkpoint: standard or inplace_abn (released SKD files).
    #[arg(long, default_value = "standard")]
    bn_convention: String,
    /// Dataset root in the Cityscapes layout.
    #[arg(long, default_value = "datasets/cityscapes")]
    data: std::path::PathBuf,
    /// Ground-truth root, when scoring a prediction folder (same as --data).
    #[arg(long, requires = "pred_dir")]
    gt_root: Option<std::path::PathBuf>,
    /// Score the label-id PNGs in this folder instead of running a network.
    #[arg(long)]
    pred_dir: Option<std::path::PathBuf>,
    #[arg(long, default_value = "val")]
    split: String,
    /// whole (as the reference) or slide.
    #[arg(long, default_value = "whole")]
    mode: String,
    /// Sliding-window crop.
    #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [769, 769])]
    crop: Vec<usize>,
    /// Sliding-window stride.
    #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [513, 513])]
    stride: Vec<usize>,
    /// Average with the mirrored image.
    #[arg(long)]
    flip: bool,
    /// Scales to average (e.g. --scales 0.75 1.0 1.25).
    #[arg(long, num_args = 1.., default_values_t = [1.0])]
    scales: Vec<f64>,
    /// Write label-id PNGs (official format) and colour PNGs here.
    #[arg(long)]
    save_pred: Option<std::path::PathBuf>,
    /// cpu, cuda or cuda:N (default: $SKD_DEVICE, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_choice<T: serde::de::DeserializeOwned>(flag: &str, value: &str, choices: &[&str]) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        let hint = skd::suggest::did_you_mean(value, choices.iter().copied());
        anyhow::anyhow!("--{flag} {value:?}{hint}: expected one of {}", choices.join(", "))
    })
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use skd::seg::cityscapes::Split;
    use skd::seg::eval::{InferConfig, InferMode, evaluate, score_predictions};
    anyhow::ensure!(a.miou, "choose the metric: --miou");
    let scores = if let Some(pred_dir) = &a.pred_dir {
        let root = a.gt_root.as_ref().unwrap_or(&a.data);
        score_predictions(&Split::discover(root, &a.split)?, pred_dir)?
    } else {
        let checkpoint = a
            .checkpoint
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("pass --checkpoint FILE (or --pred-dir DIR to score predictions)"))?;
        let src = skd::seg::WeightsSource {
            path: checkpoint.clone(),
            layout: parse_choice("layout", &a.layout, &["skd", "toolbox", "imagenet"])?,
            bn: parse_choice("bn-convention", &a.bn_convention, &["standard", "inplace_abn"])?,
        };
        let device_name = a.device.clone().or_else(|| std::env::var("SKD_DEVICE").ok()).unwrap_or_else(|| "cpu".into());
        let device = skd::device(&device_name)?;
        let (net, _, report) = skd::seg::weights::load_checkpoint(&src, a.model.as_deref(), &device)?;
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        let mode = match a.mode.as_str() {
            "whole" => InferMode::Whole,
            "slide" => InferMode::Slide { crop: [a.crop[0], a.crop[1]], stride: [a.stride[0], a.stride[1]] },
            other => anyhow::bail!("--mode {other:?}: expected whole or slide"),
        };
        let cfg = InferConfig { mode, flip: a.flip, scales: a.scales.clone() };
        let split = Split::discover(&a.data, &a.split)?;
        evaluate(&net, &split, &cfg, &device, a.save_pred.as_deref(), !a.json)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&scores)?);
    } else {
        println!("{scores}");
    }
    Ok(())
}

#[derive(Subcommand)]
enum SynthDataset {
    /// Street scenes in the exact Cityscapes layout (leftImg8bit/, gtFine/ with labelIds).
    Cityscapes {
        /// Output directory (created).
        #[arg(long, default_value = "datasets/synthetic")]
        out: std::path::PathBuf,
        /// Training images.
        #[arg(long, default_value_t = 200)]
        train: usize,
        /// Validation images.
        #[arg(long, default_value_t = 50)]
        val: usize,
        /// Image height and width.
        #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [256, 512])]
        size: Vec<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo { data, out, budget, seed, json } => {
            anyhow::ensure!(budget > 0.0 && budget.is_finite(), "--budget must be positive, got {budget}");
            let opts = skd::seg::demo::DemoOptions { data, out, budget, seed, verbose: true };
            let report = skd::seg::demo::run_demo(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("\n{report}");
            }
            Ok(())
        }
        Command::Train { dataset: TrainDataset::Cityscapes(args) } => train(*args),
        Command::Eval(args) => eval(*args),
        Command::Synth { dataset: SynthDataset::Cityscapes { out, train, val, size, seed } } => {
            let start = std::time::Instant::now();
            for (split, n) in [("train", train), ("val", val)] {
                skd::seg::synth::write_split(&out, split, n, (size[0], size[1]), seed)?;
            }
            eprintln!(
                "wrote {train} train + {val} val images of {}x{} to {} in {:.1}s",
                size[0],
                size[1],
                out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Info { model, size, json } => {
            let info = ModelInfo::new(&model, (size[0], size[1]))?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{info}");
            }
            Ok(())
        }
        Command::Bench(args) => bench(*args),
    }
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    if let Err(e) = unsafe { skd::init_process() } {
        eprintln!("skd: cannot set up the process: {e}");
        return ExitCode::from(2);
    }
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skd-seg: {e:#}");
            ExitCode::from(2)
        }
    }
}

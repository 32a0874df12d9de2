//! `skd-det`: FCOS object detection with structured knowledge distillation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

/// Train and evaluate FCOS students distilled through the shared loss module.
#[derive(Parser)]
#[command(name = "skd-det", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an FCOS student (or teacher) on a COCO-format dataset.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
    /// Score a detections file, or run a checkpoint on a split (COCO box AP).
    Eval(Box<EvalArgs>),
    /// Write a synthetic dataset.
    Synth {
        #[command(subcommand)]
        dataset: SynthDataset,
    },
}

#[derive(Subcommand)]
enum TrainModel {
    /// FCOS; defaults = fcos_R_50_FPN_1x's schedule with the authors' distillation recipe.
    Fcos(Box<skd::config::RunArgs>),
}

fn train(a: skd::config::RunArgs) -> anyhow::Result<()> {
    use skd::det::config::TrainConfig;
    use skd::det::train::{RunOptions, run};
    let (cfg, run_dir, resume) = a.resolve("teacher.weights", "fcos", TrainConfig::load)?;
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if let Some(t) = cfg.teacher.as_ref().filter(|_| cfg.distill.is_active()) {
        anyhow::ensure!(
            t.weights.is_file(),
            "teacher checkpoint {} not found (teacher.weights; pass --teacher FILE, or train one first)",
            t.weights.display()
        );
    }
    anyhow::ensure!(
        cfg.data.root.is_dir(),
        "dataset root {} not found (data.root; pass --data DIR, or make a synthetic set: skd-det synth coco --out DIR)",
        cfg.data.root.display()
    );
    let summary = run(&cfg, &run_dir, &RunOptions { resume, verbose: true })?;
    summary.print();
    Ok(())
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The ground truth (a COCO instances JSON).
    #[arg(long)]
    annotations: PathBuf,
    /// Score this detections file (COCO results format).
    #[arg(long, conflicts_with = "checkpoint", required_unless_present = "checkpoint")]
    detections: Option<PathBuf>,
    /// Run this detector checkpoint on the images of --annotations.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The images of --annotations (with --checkpoint).
    #[arg(long, requires = "checkpoint")]
    images: Option<PathBuf>,
    /// Where --checkpoint writes its detections (COCO results format; default detections.json
    /// beside the checkpoint).
    #[arg(long, requires = "checkpoint")]
    out: Option<PathBuf>,
    /// Shorter side the images are resized to (with --checkpoint).
    #[arg(long, default_value_t = 800)]
    min_size: usize,
    #[arg(long, default_value_t = 1333)]
    max_size: usize,
    /// cpu, cuda or cuda:N (default: $SKD_DEVICE, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Print the 12 stats as one JSON object instead of pycocotools' table.
    #[arg(long)]
    json: bool,
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    use skd::det::coco::{Instances, read_detections, write_json};
    let gt = Instances::read(&a.annotations)?;
    let (stats, count) = match (&a.detections, &a.checkpoint) {
        (Some(path), _) => {
            let dets = read_detections(path, &gt)?;
            (skd::det::coco_eval::evaluate(&gt, &dets, None), dets.len())
        }
        (None, Some(ckpt)) => {
            let device =
                skd::device(&a.device.clone().or_else(|| std::env::var("SKD_DEVICE").ok()).unwrap_or("cpu".into()))?;
            let c = skd::det::weights::load(ckpt, &device)?;
            let images = a.images.clone().ok_or_else(|| anyhow::anyhow!("--checkpoint needs --images DIR"))?;
            let input =
                skd::det::data::InputConfig { min_size: a.min_size, max_size: a.max_size, ..Default::default() };
            let ds = skd::det::data::DetDataset::open(&a.annotations, &images, false, input)?;
            anyhow::ensure!(
                ds.category_ids == c.category_ids,
                "{}: the checkpoint's classes (category ids {:?}) are not those of {} ({:?})",
                ckpt.display(),
                c.category_ids,
                a.annotations.display(),
                ds.category_ids
            );
            let ds = Arc::new(ds);
            let post = skd::det::postprocess::PostprocessConfig::default();
            let dets = skd::det::eval::detect(&c.net, ds.clone(), &c.category_ids, &post, 1, &device, true)?;
            let out = a.out.clone().unwrap_or_else(|| ckpt.with_file_name("detections.json"));
            write_json(&out, &dets)?;
            eprintln!("wrote {} detections to {}", dets.len(), out.display());
            (skd::det::eval::score(&gt, &ds, &dets), dets.len())
        }
        (None, None) => anyhow::bail!("pass --detections FILE or --checkpoint FILE"),
    };
    if a.json {
        println!("{}", serde_json::json!({ "detections": count, "stats": stats, "summary": stats.to_array() }));
    } else {
        println!("{stats}");
    }
    Ok(())
}

#[derive(Subcommand)]
enum SynthDataset {
    /// Shapes on textured backgrounds in the COCO layout (annotations/instances_{train,val}.json).
    Coco {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        train_images: usize,
        #[arg(long, default_value_t = 16)]
        val_images: usize,
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 384)]
        height: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn synth(d: SynthDataset) -> anyhow::Result<()> {
    let SynthDataset::Coco { out, train_images, val_images, width, height, seed } = d;
    let cfg = skd::det::synth::SynthConfig { train_images, val_images, width, height, seed };
    let summary = skd::det::synth::write_dataset(Path::new(&out), &cfg)?;
    println!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    if let Err(e) = unsafe { skd::init_process() } {
        eprintln!("skd: cannot set up the process: {e}");
        return ExitCode::from(2);
    }
    let result = match Cli::parse().command {
        Command::Train { model: TrainModel::Fcos(a) } => train(*a),
        Command::Eval(a) => eval(*a),
        Command::Synth { dataset } => synth(dataset),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

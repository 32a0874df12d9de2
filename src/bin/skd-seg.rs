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
    /// Train a student on Cityscapes (or the synthetic Cityscapes-layout set).
    Train,
    /// Evaluate a checkpoint (mIoU) or score a folder of predictions.
    Eval,
    /// Write a synthetic dataset in the Cityscapes layout.
    Synth,
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
    /// Time the training step or inference.
    Bench,
}

fn run(command: Command) -> anyhow::Result<()> {
    let (name, issue) = match command {
        Command::Info { model, size, json } => {
            let info = ModelInfo::new(&model, (size[0], size[1]))?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{info}");
            }
            return Ok(());
        }
        Command::Train => ("train", 5),
        Command::Eval => ("eval", 4),
        Command::Synth => ("synth", 4),
        Command::Bench => ("bench", 7),
    };
    anyhow::bail!("{name}: not implemented yet (tracked in issue #{issue})")
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { skd::enable_double_backward() };
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skd-seg: {e:#}");
            ExitCode::from(2)
        }
    }
}

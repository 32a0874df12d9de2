//! `skd-det`: FCOS object detection with structured knowledge distillation.

use std::process::ExitCode;

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
    Train,
    /// Score a detections file, or run a checkpoint on a split (COCO box AP).
    Eval,
    /// Write a synthetic COCO-format dataset.
    Synth,
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    if let Err(e) = unsafe { skd::init_process() } {
        eprintln!("skd: cannot set up the process: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Train => "train",
        Command::Eval => "eval",
        Command::Synth => "synth",
    };
    eprintln!("skd-det {name}: not implemented yet (tracked in issue #6)");
    ExitCode::from(2)
}

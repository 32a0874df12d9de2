//! The training loop every task shares: steps, the JSONL log, the progress bar, checkpoints and
//! periodic validation. A task supplies its batches, how to save its deployable student, and
//! how to validate.
//!
//! ```text
//! for it in start..total: batch -> Trainer::step -> train.jsonl (every log_every, skips)
//!   checkpoint_due -> state.safetensors (+ config) and the student file (both atomic)
//!   val due (every val_every, and at the end) -> validate -> train.jsonl
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::log::{JsonlLog, rss_mb};
use super::state::{checkpoint_due, load_state, save_state};
use super::{Task, Trainer, all_finite};

pub const LOG_FILE: &str = "train.jsonl";

/// A file of the run could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct RunIoError {
    pub path: String,
    pub source: std::io::Error,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RunIoError + '_ {
    move |source| RunIoError { path: path.display().to_string(), source }
}

/// Creates `run_dir` and, for a new run, writes the resolved `config` into it
/// (`config.json`, which `--resume` reads back). Returns the config as JSON, for the state file.
pub fn start_run_dir(run_dir: &Path, config: &impl serde::Serialize, resume: bool) -> Result<String, RunIoError> {
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    let resolved = serde_json::to_string_pretty(config).expect("config serialises");
    if !resume {
        let path = run_dir.join(crate::config::CONFIG_FILE);
        std::fs::write(&path, &resolved).map_err(io(&path))?;
    }
    Ok(resolved)
}

/// When the loop logs, checkpoints and validates.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// First iteration (0, or where a resumed run stopped).
    pub start: usize,
    pub total: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    /// 0 = only at the end.
    pub val_every: usize,
    /// The run's resolved config (JSON), stored in the state file.
    pub config: String,
    /// Progress bar and messages on stderr.
    pub verbose: bool,
}

/// What a validation reports: fields for the log line and a text for people.
pub struct Validation {
    pub fields: serde_json::Value,
    pub text: String,
}

fn bar(len: u64, start: u64, verbose: bool) -> ProgressBar {
    if !verbose {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("train [{bar:25}] {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_position(start);
    b
}

/// What a finished run reports; `V` is the task's validation scores.
#[derive(Debug, Clone)]
pub struct RunSummary<V> {
    pub run_dir: PathBuf,
    pub iterations_done: usize,
    pub skipped_steps: usize,
    /// The last validation, if there is a val split.
    pub val: Option<V>,
    pub seconds: f64,
}

impl<V: std::fmt::Display> RunSummary<V> {
    /// The closing lines of a training command: the run on stderr, its last validation on stdout.
    pub fn print(&self) {
        eprintln!(
            "done: {} iterations in {:.0}s ({} skipped) -> {}",
            self.iterations_done,
            self.seconds,
            self.skipped_steps,
            self.run_dir.display()
        );
        if let Some(v) = &self.val {
            println!("{v}");
        }
    }
}

/// Where a run starts: with `resume`, `trainer` restored from `run_dir`'s state and the
/// iterations that state had finished; otherwise 0.
pub fn resume_point<T, E>(trainer: &mut Trainer<T>, run_dir: &Path, resume: bool, verbose: bool) -> Result<usize, E>
where
    T: Task,
    E: From<candle_core::Error> + From<crate::weights::WeightsError>,
{
    if !resume {
        return Ok(0);
    }
    let (tensors, done) = load_state(run_dir)?;
    trainer.restore(&tensors)?;
    if verbose {
        eprintln!("resumed {} at iteration {done}", run_dir.display());
    }
    Ok(done)
}

/// Runs iterations `settings.start..settings.total` over `batches`; returns the number of
/// skipped steps. `save_student` writes the deployable student; `validate` runs when due.
pub fn run_loop<T, E>(
    trainer: &mut Trainer<T>,
    batches: impl Iterator<Item = Result<T::Batch, E>>,
    run_dir: &Path,
    settings: &LoopSettings,
    save_student: impl Fn(&Trainer<T>) -> Result<(), E>,
    mut validate: impl FnMut(&Trainer<T>) -> Result<Option<Validation>, E>,
) -> Result<usize, E>
where
    T: Task,
    E: From<candle_core::Error> + From<crate::weights::WeightsError> + From<RunIoError>,
{
    let started = Instant::now();
    let LoopSettings { start, total, .. } = *settings;
    let log_path = run_dir.join(LOG_FILE);
    let mut log = JsonlLog::append(&log_path).map_err(io(&log_path))?;
    let progress = bar(total as u64, start as u64, settings.verbose);
    let mut skipped = 0;
    for (it, batch) in (start..total).zip(batches) {
        let batch = batch?;
        let step_start = Instant::now();
        let report = trainer.step(&batch, it)?;
        let done = it + 1;
        if report.skipped.is_some() {
            skipped += 1;
        }
        if report.skipped.is_some() || done % settings.log_every.max(1) == 0 || done == total {
            let mut line = json!({
                "iteration": done,
                "lr": report.lr,
                "total": report.total,
                "critic_loss": report.critic_loss,
                "skipped": report.skipped,
                "step_s": step_start.elapsed().as_secs_f64(),
                "elapsed_s": started.elapsed().as_secs_f64(),
                "rss_mb": rss_mb(),
            });
            for (name, v) in &report.losses {
                line[*name] = json!(v);
            }
            log.write(&line).map_err(io(&log_path))?;
            let terms: Vec<String> = report.losses.iter().map(|(n, v)| format!("{n} {v:.3}")).collect();
            progress.set_message(terms.join(" "));
            if settings.verbose && progress.is_hidden() {
                // No terminal to draw the bar on (a log file, CI): one line per logged step.
                eprintln!(
                    "iteration {done}/{total}: {} lr {:.2e} ({:.2}s/it)",
                    terms.join(" "),
                    report.lr,
                    step_start.elapsed().as_secs_f64()
                );
            }
            if let Some(why) = &report.skipped {
                progress.suspend(|| eprintln!("warning: iteration {done}: skipped the update ({why})"));
            }
        }
        progress.inc(1);
        if checkpoint_due(done, settings.checkpoint_every, total) {
            let state = trainer.state_tensors();
            if all_finite(state.iter().map(|(_, t)| t))? {
                save_state(run_dir, state, done, &settings.config)?;
                save_student(trainer)?;
            } else {
                // Keep the last good checkpoint: an update can overflow without a non-finite loss.
                progress.suspend(|| eprintln!("warning: iteration {done}: non-finite weights, checkpoint not written"));
                log.write(&json!({ "iteration": done, "checkpoint_skipped": "non-finite weights" }))
                    .map_err(io(&log_path))?;
            }
        }
        let val_due = done == total || (settings.val_every > 0 && done.is_multiple_of(settings.val_every));
        if val_due && let Some(v) = progress.suspend(|| validate(trainer))? {
            let mut line = v.fields;
            line["iteration"] = json!(done);
            log.write(&line).map_err(io(&log_path))?;
            if settings.verbose {
                progress.suspend(|| eprintln!("val at iteration {done}: {}", v.text));
            }
        }
    }
    progress.finish_and_clear();
    Ok(skipped)
}

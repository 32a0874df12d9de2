//! `skd-seg train cityscapes`: the segmentation task plugged into the generic trainer, with its
//! data, checkpoints, logs and periodic validation.
//!
//! ```text
//! run(cfg, run_dir)
//!   config.json (resolved) -> teacher (frozen, from file) -> student (VarMap, ImageNet init)
//!   -> Distiller -> Trainer; --resume: state.safetensors -> Trainer::restore
//!   Loader(iterations start..end) -> Trainer::step -> train.jsonl, progress bar
//!   every checkpoint_every: state.safetensors + student.safetensors; every val_every: mIoU
//! ```

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use candle_nn::VarMap;
use serde_json::json;

use super::cityscapes::{DataError, Split};
use super::config::{ConfigError, TrainConfig};
use super::data::Loader;
use super::eval::{EvalError, InferConfig, evaluate};
use super::loss::SegLoss;
use super::metrics::Scores;
use super::pspnet::{PspNet, PspOutput};
use super::weights::{load_frozen, load_trainable, save};
use crate::distill::{Distiller, Losses};
use crate::train::run::{LoopSettings, RunIoError, RunSummary, Validation, resume_point, run_loop, start_run_dir};
use crate::train::{DenseNet, Settings, Task, Trainer};
use crate::weights::{LoadMode, WeightsError};

impl DenseNet for PspNet {
    type Output = PspOutput;

    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<PspOutput> {
        PspNet::forward_t(self, images, train)
    }

    fn dense(out: &PspOutput) -> crate::distill::DenseOutputs {
        out.dense()
    }

    /// Without the DSN head, whose logits distillation never reads.
    fn teacher_dense(&self, images: &Tensor) -> candle_core::Result<crate::distill::DenseOutputs> {
        Ok(self.forward_without_dsn(images, false)?.dense())
    }

    fn reseed(&self, seed: u64) {
        self.set_dropout_seed(seed);
    }
}

/// A batch on the device: `[B, 3, H, W]` images and `[B, H, W]` train ids.
pub struct SegBatch {
    pub images: Tensor,
    pub labels: Tensor,
}

pub struct SegTask {
    pub loss: SegLoss,
}

impl Task for SegTask {
    type Batch = SegBatch;
    type Net = PspNet;

    fn images<'a>(&self, batch: &'a SegBatch) -> &'a Tensor {
        &batch.images
    }

    fn task_loss(&self, out: &PspOutput, batch: &SegBatch) -> candle_core::Result<Losses> {
        self.loss.losses(&out.logits, out.aux_logits.as_ref(), &batch.labels)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] RunIoError),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in `run_dir` from its last state.
    pub resume: bool,
    /// Evaluate the loaded teacher on this many val images before training.
    pub check_teacher: Option<usize>,
    /// Draw progress bars and print tables.
    pub verbose: bool,
}

pub const STUDENT_FILE: &str = "student.safetensors";

/// The val split, limited to the first `limit` images; `None` when the dataset has none.
fn val_split(cfg: &TrainConfig, limit: Option<usize>) -> Result<Option<Split>, TrainError> {
    match Split::discover(&cfg.data.root, &cfg.data.val_split) {
        Ok(mut s) => {
            if let Some(n) = limit {
                s.samples.truncate(n.max(1));
            }
            Ok(Some(s))
        }
        Err(DataError::EmptySplit { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Trains as `cfg` says, in `run_dir` (created; with `opts.resume`, continued).
pub fn run(cfg: &TrainConfig, run_dir: &Path, opts: &RunOptions) -> Result<RunSummary<Scores>, TrainError> {
    let started = Instant::now();
    cfg.validate()?;
    let resolved = start_run_dir(run_dir, cfg, opts.resume)?;
    let say = |msg: String| {
        if opts.verbose {
            eprintln!("{msg}");
        }
    };
    let device = crate::device(&cfg.device)?;
    let train_split = match &cfg.data.train_list {
        Some(list) => Split::from_list(&cfg.data.root, list, &cfg.data.train_split)?,
        None => Split::discover(&cfg.data.root, &cfg.data.train_split)?,
    };
    let val = val_split(cfg, cfg.val_images)?;
    say(format!(
        "data: {} train images in {}, {} val images",
        train_split.samples.len(),
        cfg.data.root.display(),
        val.as_ref().map_or(0, |v| v.samples.len())
    ));

    let student_cfg = cfg.student.model.resolve()?;
    let teacher = match &cfg.teacher {
        None => None,
        Some(t) => {
            let (net, report) = load_frozen(&t.model.resolve()?, &t.weights.source(), &device)?;
            say(format!("teacher: {} ({report})", t.weights.path));
            for w in &report.warnings {
                eprintln!("warning: teacher: {w}");
            }
            Some(net)
        }
    };
    if let (Some(n), Some(t)) = (opts.check_teacher, &teacher) {
        let split =
            val_split(cfg, Some(n))?.ok_or_else(|| ConfigError::Invalid("--check-teacher needs a val split".into()))?;
        let scores = evaluate(t, &split, &InferConfig::default(), &device, None, opts.verbose)?;
        say(format!("teacher check on {} val images: mIoU {:.2}\n{scores}", split.samples.len(), scores.miou * 100.0));
    }
    let varmap = VarMap::new();
    let init = cfg.student.init.as_ref().map(|w| (w.source(), LoadMode::Partial));
    let (student, report) =
        load_trainable(&student_cfg, init.as_ref().map(|(s, m)| (s, *m)), &varmap, &device, cfg.seed)?;
    if let Some(r) = report {
        say(format!("student init: {r}"));
    }
    let distiller = if cfg.distill.is_active() {
        let [ch, cw] = cfg.data.augment.crop;
        let (oh, ow) = student_cfg.output_hw(ch, cw)?;
        let teacher_channels = teacher.as_ref().map_or(student_cfg.psp_out, |t| t.config().psp_out);
        let channels = [(student_cfg.psp_out, teacher_channels)];
        Some(Distiller::new(&cfg.distill, (student_cfg.num_classes, oh, ow), &channels, &device, cfg.seed)?)
    } else {
        None
    };
    let task = SegTask { loss: SegLoss { aux_weight: cfg.aux_weight, ..Default::default() } };
    let settings = Settings { optim: cfg.optim.clone(), seed: cfg.seed, max_skips: cfg.max_skips };
    let mut trainer = Trainer::new(task, (student, varmap), teacher, distiller, settings)?;

    let start = resume_point::<_, TrainError>(&mut trainer, run_dir, opts.resume, opts.verbose)?;
    let total = cfg.optim.iterations;
    let batch = cfg.optim.batch_size;
    let [ch, cw] = cfg.data.augment.crop;
    let loader = Loader::new(train_split, cfg.data.augment.clone(), cfg.seed, batch, start..total, cfg.data.prefetch);
    let batches = loader.map(|b| -> Result<SegBatch, TrainError> {
        let b = b?;
        let images = Tensor::from_vec(b.images, (batch, 3, ch, cw), &device)?;
        let labels = Tensor::from_vec(b.labels, (batch, ch, cw), &device)?;
        Ok(SegBatch { images, labels })
    });
    let settings = LoopSettings {
        start,
        total,
        log_every: cfg.log_every,
        checkpoint_every: cfg.checkpoint_every,
        val_every: cfg.val_every,
        config: resolved,
        verbose: opts.verbose,
    };
    let save_student = |t: &Trainer<SegTask>| -> Result<(), TrainError> {
        Ok(save(&run_dir.join(STUDENT_FILE), &t.student_vars, &student_cfg, cfg.student.model.preset())?)
    };
    let mut last_val = None;
    let validate = |t: &Trainer<SegTask>| -> Result<Option<Validation>, TrainError> {
        let Some(v) = &val else { return Ok(None) };
        let scores = evaluate(&t.student, v, &InferConfig::default(), &device, None, false)?;
        let mut fields = json!({ "val_miou": scores.miou, "val_pixel_acc": scores.pixel_acc });
        fields["val_class_iou"] = json!(scores.class_iou);
        let text = format!("mIoU {:.2}\n{scores}", scores.miou * 100.0);
        last_val = Some(scores);
        Ok(Some(Validation { fields, text }))
    };
    let skipped = run_loop(&mut trainer, batches, run_dir, &settings, save_student, validate)?;
    Ok(RunSummary {
        run_dir: run_dir.to_path_buf(),
        iterations_done: total,
        skipped_steps: skipped,
        val: last_val,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A teacher's dense outputs, its DSN head left out, are the full forward's bit for bit.
    #[test]
    fn teacher_dense_leaves_out_only_the_dsn_head() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let net = PspNet::new(
            &super::super::pspnet::PspConfig::pspnet_r18(),
            crate::nn::init::seeded_var_builder(&vm, 7, DType::F32, &dev),
        )?;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 40, 48), &dev)?;
        let full = net.forward_t(&x, false)?;
        assert!(full.aux_logits.is_some(), "the preset has a DSN head");
        let (want, got) = (full.dense(), net.teacher_dense(&x)?);
        let bits = |ts: &[Tensor]| -> candle_core::Result<Vec<Vec<u32>>> {
            ts.iter().map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())).collect()
        };
        assert_eq!(bits(&got.logits)?, bits(&want.logits)?);
        assert_eq!(bits(&got.features)?, bits(&want.features)?);
        assert!(net.forward_without_dsn(&x, false)?.aux_logits.is_none());
        Ok(())
    }
}

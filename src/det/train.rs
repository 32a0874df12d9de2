//! `skd-det train fcos`: FCOS as a task of the shared trainer, distilled through the same
//! `Distiller` as segmentation.
//!
//! ```text
//! run(cfg, run_dir)
//!   DetDataset (train, val) -> teacher (frozen checkpoint) -> student (VarMap, seeded init)
//!   -> Distiller (pixel-wise on the class logits, pair-wise on P3..P7, mimic) -> Trainer
//!   Loader -> Trainer::step (FCOS losses + distillation) -> train.jsonl;
//!   checkpoints: state.safetensors + student.safetensors (no adapters); val: COCO box AP
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use super::coco::Instances;
use super::coco_eval::CocoStats;
use super::config::{ConfigError, TrainConfig};
use super::data::{DataError, DetBatch, DetDataset, Loader};
use super::eval::{detect, score};
use super::fcos::{Fcos, FcosOutput};
use super::loss::{LossConfig, fcos_losses};
use super::targets::{Levels, Locations, TargetConfig, compute_targets};
use super::weights;
use crate::distill::{Distiller, Losses, PixelWiseLoss};
use crate::train::run::{LoopSettings, RunIoError, RunSummary, Validation, resume_point, run_loop, start_run_dir};
use crate::train::{DenseNet, Settings, Task, Trainer};
use crate::weights::WeightsError;

impl DenseNet for Fcos {
    type Output = FcosOutput;

    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<FcosOutput> {
        Fcos::forward_t(self, images, train)
    }

    fn dense(out: &FcosOutput) -> crate::distill::DenseOutputs {
        out.dense()
    }

    /// Nothing random inside FCOS.
    fn reseed(&self, _seed: u64) {}

    fn is_frozen(&self, key: &str) -> bool {
        self.config().is_frozen(key)
    }
}

/// The FCOS losses against targets assigned on the fly.
pub struct FcosTask {
    pub levels: Levels,
    pub targets: TargetConfig,
    pub loss: LossConfig,
}

impl Task for FcosTask {
    type Batch = DetBatch;
    type Net = Fcos;

    fn images<'a>(&self, batch: &'a DetBatch) -> &'a Tensor {
        &batch.images
    }

    fn task_loss(&self, out: &FcosOutput, batch: &DetBatch) -> candle_core::Result<Losses> {
        let sizes =
            out.head.cls_logits.iter().map(|t| Ok((t.dim(2)?, t.dim(3)?))).collect::<candle_core::Result<Vec<_>>>()?;
        let locations = Locations::new(&self.levels.strides, &sizes);
        let targets: Vec<_> =
            batch.gt.iter().map(|gt| compute_targets(&locations, &self.levels, gt, &self.targets)).collect();
        Ok(fcos_losses(&out.head, &targets, &self.loss)?.into_losses())
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
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] RunIoError),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in `run_dir` from its last state.
    pub resume: bool,
    /// Progress bars and messages on stderr.
    pub verbose: bool,
}

pub const STUDENT_FILE: &str = "student.safetensors";

/// Trains as `cfg` says, in `run_dir` (created; with `opts.resume`, continued).
pub fn run(cfg: &TrainConfig, run_dir: &Path, opts: &RunOptions) -> Result<RunSummary<CocoStats>, TrainError> {
    let started = Instant::now();
    cfg.validate()?;
    let resolved = start_run_dir(run_dir, cfg, opts.resume)?;
    let say = |msg: String| {
        if opts.verbose {
            eprintln!("{msg}");
        }
    };
    let device = crate::device(&cfg.device)?;
    let (annotations, images) = cfg.data.paths(&cfg.data.train);
    let train = Arc::new(DetDataset::open(&annotations, &images, true, cfg.data.input.clone())?);
    say(format!("train: {}", train.report));
    for w in train.report.warnings() {
        eprintln!("warning: {w}");
    }
    let val = match &cfg.data.val {
        None => None,
        Some(split) => {
            let (annotations, images) = cfg.data.paths(split);
            let mut ds = DetDataset::open(&annotations, &images, false, cfg.data.input.clone())?;
            if let Some(n) = cfg.val_images {
                ds.samples.truncate(n);
            }
            say(format!("val: {} images from {}", ds.samples.len(), annotations.display()));
            Some((Instances::read(&annotations).map_err(DataError::from)?, Arc::new(ds)))
        }
    };
    let category_ids = train.category_ids.clone();
    let student_cfg = cfg.student.resolve(category_ids.len())?;

    let teacher = match &cfg.teacher {
        Some(t) if cfg.distill.is_active() => {
            let ckpt = weights::load(&t.weights, &device)?;
            if ckpt.category_ids != category_ids {
                return Err(ConfigError::Invalid(format!(
                    "{}: the teacher's classes (category ids {:?}) are not the dataset's ({:?})",
                    t.weights.display(),
                    ckpt.category_ids,
                    category_ids
                ))
                .into());
            }
            say(format!("teacher: {}", t.weights.display()));
            Some(ckpt.net)
        }
        _ => None,
    };
    let varmap = VarMap::new();
    let vb = crate::nn::init::seeded_var_builder(&varmap, cfg.seed, DType::F32, &device);
    let student = Fcos::new(&student_cfg, vb)?;
    let mut distill = cfg.distill.clone();
    if let Some(p) = distill.pixel_wise.as_mut()
        && student_cfg.num_classes == 1
        && p.loss != PixelWiseLoss::Mse
    {
        // A softmax over one class is constant: the single-class variant (reference §6.3).
        say("distill.pixel_wise: one class, so the MSE on the logits".into());
        p.loss = PixelWiseLoss::Mse;
    }
    let distiller = match &teacher {
        Some(t) => {
            let channels = vec![(student_cfg.channels, t.config().channels); student_cfg.levels.strides.len()];
            // The holistic term is refused by validate(); its logit size is unused.
            Some(Distiller::new(&distill, (student_cfg.num_classes, 1, 1), &channels, &device, cfg.seed)?)
        }
        None => None,
    };
    let task = FcosTask { levels: student_cfg.levels.clone(), targets: cfg.targets, loss: cfg.loss };
    let settings = Settings { optim: cfg.optim.clone(), seed: cfg.seed, max_skips: cfg.max_skips };
    let mut trainer = Trainer::new(task, (student, varmap), teacher, distiller, settings)?;

    let start = resume_point::<_, TrainError>(&mut trainer, run_dir, opts.resume, opts.verbose)?;
    let total = cfg.optim.iterations;
    let loader = Loader::train(train, cfg.seed, cfg.optim.batch_size, start..total, cfg.data.prefetch, device.clone());
    let loop_settings = LoopSettings {
        start,
        total,
        log_every: cfg.log_every,
        checkpoint_every: cfg.checkpoint_every,
        val_every: cfg.val_every,
        config: resolved,
        verbose: opts.verbose,
    };
    let save_student = |t: &Trainer<FcosTask>| -> Result<(), TrainError> {
        Ok(weights::save(&run_dir.join(STUDENT_FILE), &t.student_vars, &student_cfg, &category_ids)?)
    };
    let mut last_val = None;
    let validate = |t: &Trainer<FcosTask>| -> Result<Option<Validation>, TrainError> {
        let Some((gt, ds)) = &val else { return Ok(None) };
        let dets = detect(&t.student, ds.clone(), &category_ids, &cfg.postprocess, 1, &device, false)?;
        let stats = score(gt, ds, &dets);
        let fields = json!({ "val_ap": stats.ap, "val_ap50": stats.ap50, "val_stats": stats.to_array() });
        let text =
            format!("box AP {:.1}, AP50 {:.1} ({} detections)", stats.ap * 100.0, stats.ap50 * 100.0, dets.len());
        last_val = Some(stats);
        Ok(Some(Validation { fields, text }))
    };
    let skipped = run_loop(
        &mut trainer,
        loader.map(|b| b.map_err(TrainError::from)),
        run_dir,
        &loop_settings,
        save_student,
        validate,
    )?;
    Ok(RunSummary {
        run_dir: run_dir.to_path_buf(),
        iterations_done: total,
        skipped_steps: skipped,
        val: last_val,
        seconds: started.elapsed().as_secs_f64(),
    })
}

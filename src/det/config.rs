//! The detection training configuration (`skd-det train fcos`). `Default` is the official
//! `fcos_R_50_FPN_1x` schedule with the authors' FCOS distillation recipe: pixel-wise on the class
//! logits and pair-wise on every FPN level (full graph), both with weight 1.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::data::InputConfig;
use super::fcos::FcosConfig;
use super::loss::LossConfig;
use super::postprocess::PostprocessConfig;
use super::targets::TargetConfig;
pub use crate::config::ConfigError;
use crate::distill::{DistillConfig, PairWiseConfig, PixelWiseConfig, PixelWiseLoss};
use crate::train::{LrSchedule, OptimConfig};

/// A detector: a preset name or a full config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Preset(String),
    Config(FcosConfig),
}

impl ModelSpec {
    /// The config, with `num_classes` set to the dataset's.
    pub fn resolve(&self, num_classes: usize) -> candle_core::Result<FcosConfig> {
        let mut cfg = match self {
            ModelSpec::Preset(name) => FcosConfig::preset(name)?,
            ModelSpec::Config(cfg) => cfg.clone(),
        };
        cfg.num_classes = num_classes;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn preset(&self) -> Option<&str> {
        match self {
            ModelSpec::Preset(name) => Some(name),
            ModelSpec::Config(_) => None,
        }
    }
}

/// A split: its annotations file and its image folder, relative to `root` unless absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitPaths {
    pub annotations: PathBuf,
    pub images: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset root in the COCO layout.
    pub root: PathBuf,
    pub train: SplitPaths,
    /// `None`: no validation.
    pub val: Option<SplitPaths>,
    pub input: InputConfig,
    /// Batches prepared ahead of the step.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("datasets/coco"),
            train: SplitPaths {
                annotations: "annotations/instances_train2017.json".into(),
                images: "train2017".into(),
            },
            val: Some(SplitPaths {
                annotations: "annotations/instances_val2017.json".into(),
                images: "val2017".into(),
            }),
            input: InputConfig::default(),
            prefetch: 4,
        }
    }
}

impl DataConfig {
    /// `(annotations, images)` of a split, joined to the root.
    pub fn paths(&self, split: &SplitPaths) -> (PathBuf, PathBuf) {
        (self.root.join(&split.annotations), self.root.join(&split.images))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub model: ModelSpec,
    /// A detector checkpoint written by `skd-det train` (`student.safetensors`).
    pub weights: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    /// The network being trained (`num_classes` comes from the dataset).
    pub student: ModelSpec,
    /// The frozen teacher; required when a distillation term is on.
    pub teacher: Option<TeacherConfig>,
    pub distill: DistillConfig,
    pub targets: TargetConfig,
    pub loss: LossConfig,
    pub postprocess: PostprocessConfig,
    pub optim: OptimConfig,
    pub seed: u64,
    /// Write the training state every this many iterations (and at the end).
    pub checkpoint_every: usize,
    pub log_every: usize,
    /// Evaluate (COCO box AP) on the val split every this many iterations (0 = only at the end).
    pub val_every: usize,
    /// Evaluate on at most this many val images (`None` = all).
    pub val_images: Option<usize>,
    pub max_skips: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
}

/// The authors' FCOS recipe (issue #27 of the SKD repository): `CriterionKD` on the class logits
/// and `CriterionSDcos_no` (full graph) on every FPN level, both entering the loss with weight 1.
pub fn fcos_distill_recipe() -> DistillConfig {
    DistillConfig {
        pixel_wise: Some(PixelWiseConfig {
            weight: 1.0,
            loss: PixelWiseLoss::KlMean { temperature: 1.0 },
            levels: None,
        }),
        pair_wise: Some(PairWiseConfig { weight: 1.0, scale: None, ..Default::default() }),
        holistic: None,
        mimic: None,
    }
}

impl Default for TrainConfig {
    /// `fcos_R_50_FPN_1x` as run on 8 GPUs (batch 16), with the FCOS distillation recipe.
    fn default() -> Self {
        Self {
            data: DataConfig::default(),
            student: ModelSpec::Preset("fcos-r18".into()),
            teacher: Some(TeacherConfig {
                model: ModelSpec::Preset("fcos-r50".into()),
                weights: "runs/fcos_r50_teacher/student.safetensors".into(),
            }),
            distill: fcos_distill_recipe(),
            targets: TargetConfig::default(),
            loss: LossConfig::default(),
            postprocess: PostprocessConfig::default(),
            optim: OptimConfig {
                iterations: 90_000,
                batch_size: 16,
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 1e-4,
                schedule: LrSchedule::WarmupMultiStep {
                    warmup_iterations: 500,
                    warmup_factor: 1.0 / 3.0,
                    milestones: vec![60_000, 80_000],
                    gamma: 0.1,
                },
                bias_lr_factor: 2.0,
                bias_weight_decay: Some(0.0),
            },
            seed: 0,
            checkpoint_every: 2500,
            log_every: 20,
            val_every: 0,
            val_images: None,
            max_skips: 10,
            device: "cpu".into(),
        }
    }
}

impl TrainConfig {
    /// The config from a JSON file (or the defaults) with overrides applied, validated.
    pub fn load(file: Option<&std::path::Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let cfg: Self = crate::config::load(file, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything that can be checked without reading data or weights.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |e: candle_core::Error| ConfigError::Invalid(e.to_string());
        crate::config::check_training(&self.optim, &self.distill, self.teacher.is_some(), &self.device)?;
        self.data.input.check().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // The class count is the dataset's; any positive one checks the rest.
        let student = self.student.resolve(1).map_err(bad)?;
        if let Some(t) = &self.teacher {
            let teacher = t.model.resolve(1).map_err(bad)?;
            if teacher.levels != student.levels {
                return Err(ConfigError::Invalid("teacher and student must predict on the same levels".into()));
            }
        }
        if self.distill.holistic.is_some() {
            return Err(ConfigError::Invalid(
                "distill.holistic: the critic needs one fixed logit size, and detection inputs vary in size; it is not \
                 available for FCOS (the authors' FCOS recipe has no holistic term)"
                    .into(),
            ));
        }
        if !(self.targets.center_sampling_radius.is_finite() && self.targets.center_sampling_radius >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "targets.center_sampling_radius must be >= 0, got {}",
                self.targets.center_sampling_radius
            )));
        }
        Ok(())
    }
}

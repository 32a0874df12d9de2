//! The segmentation training configuration: JSON files in `configs/`, every field typed,
//! unknown keys rejected, `Default` = the released protocol; `--set a.b=value` overrides.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::data::AugmentConfig;
use super::pspnet::PspConfig;
use super::weights::WeightsSource;
pub use crate::config::{ConfigError, apply_override};
use crate::distill::DistillConfig;
use crate::train::OptimConfig;
use crate::weights::{BnConvention, KeyLayout};

/// A network: a preset name or a full config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Preset(String),
    Config(PspConfig),
}

impl ModelSpec {
    pub fn resolve(&self) -> candle_core::Result<PspConfig> {
        match self {
            ModelSpec::Preset(name) => PspConfig::preset(name),
            ModelSpec::Config(cfg) => {
                cfg.validate()?;
                Ok(cfg.clone())
            }
        }
    }

    /// The preset's name, if it is one.
    pub fn preset(&self) -> Option<&str> {
        match self {
            ModelSpec::Preset(name) => Some(name),
            ModelSpec::Config(_) => None,
        }
    }
}

/// A weights file and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsSpec {
    pub path: String,
    #[serde(default)]
    pub layout: KeyLayout,
    #[serde(default)]
    pub bn: BnConvention,
}

impl WeightsSpec {
    pub fn source(&self) -> WeightsSource {
        WeightsSource { path: self.path.clone(), layout: self.layout, bn: self.bn }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset root in the Cityscapes layout.
    pub root: PathBuf,
    pub train_split: String,
    pub val_split: String,
    /// A list file of `image label` lines (the reference's `train.lst`) instead of the layout.
    pub train_list: Option<PathBuf>,
    pub augment: AugmentConfig,
    /// Batches prepared ahead of the step.
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("datasets/cityscapes"),
            train_split: "train".into(),
            val_split: "val".into(),
            train_list: None,
            augment: AugmentConfig::default(),
            prefetch: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    pub model: ModelSpec,
    /// Initial weights, loaded partially (ImageNet backbone) — `None` = random init.
    #[serde(default)]
    pub init: Option<WeightsSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    pub model: ModelSpec,
    pub weights: WeightsSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: DataConfig,
    pub student: StudentConfig,
    /// The frozen teacher; required when any distillation term is on.
    pub teacher: Option<TeacherConfig>,
    pub distill: DistillConfig,
    pub optim: OptimConfig,
    /// Weight of the deep-supervision (DSN) loss.
    pub aux_weight: f64,
    pub seed: u64,
    /// Write the training state every this many iterations (and at the end).
    pub checkpoint_every: usize,
    /// Log (and print) every this many iterations.
    pub log_every: usize,
    /// Evaluate on the val split every this many iterations (0 = only at the end).
    pub val_every: usize,
    /// Evaluate on at most this many val images (`None` = all).
    pub val_images: Option<usize>,
    /// Non-finite steps in a row that stop the run.
    pub max_skips: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
}

impl Default for TrainConfig {
    /// The released protocol (`run_train_val.sh`): R18 student from CSAIL ImageNet weights,
    /// frozen R101 teacher (InPlace-ABN checkpoint), all three terms, 40k iterations.
    fn default() -> Self {
        Self {
            data: DataConfig::default(),
            student: StudentConfig {
                model: ModelSpec::Preset("pspnet-r18".into()),
                init: Some(WeightsSpec {
                    path: "weights/resnet18-imagenet.pth".into(),
                    layout: KeyLayout::Imagenet,
                    bn: BnConvention::Standard,
                }),
            },
            teacher: Some(TeacherConfig {
                model: ModelSpec::Preset("pspnet-r101".into()),
                weights: WeightsSpec {
                    path: "weights/CS_scenes_38413_0.7832174615268139.pth".into(),
                    layout: KeyLayout::Skd,
                    bn: BnConvention::InplaceAbn,
                },
            }),
            distill: DistillConfig::default(),
            optim: OptimConfig::default(),
            aux_weight: 0.4,
            seed: 0,
            checkpoint_every: 2000,
            log_every: 10,
            val_every: 4000,
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
        let student = self.student.model.resolve().map_err(bad)?;
        if let Some(t) = &self.teacher {
            let teacher = t.model.resolve().map_err(bad)?;
            if teacher.num_classes != student.num_classes {
                return Err(ConfigError::Invalid(format!(
                    "teacher has {} classes, student {}",
                    teacher.num_classes, student.num_classes
                )));
            }
        }
        if self.optim.batch_size < 2 {
            return Err(ConfigError::Invalid(format!(
                "optim.batch_size {} < 2: training BatchNorm (the PSP bin-1 branch) needs at least 2",
                self.optim.batch_size
            )));
        }
        if !(self.aux_weight.is_finite() && self.aux_weight >= 0.0) {
            return Err(ConfigError::Invalid(format!("aux_weight must be finite and >= 0, got {}", self.aux_weight)));
        }
        let [ch, cw] = self.data.augment.crop;
        if ch < 32 || cw < 32 {
            return Err(ConfigError::Invalid(format!("data.augment.crop {ch}x{cw}: both sides must be at least 32")));
        }
        if self.distill.holistic.is_some() {
            let (oh, ow) = student.output_hw(ch, cw).map_err(bad)?;
            crate::distill::holistic::critic_depth(oh, ow).map_err(|e| {
                ConfigError::Invalid(format!(
                    "data.augment.crop {ch}x{cw} gives {oh}x{ow} logits: {e} (a crop of at least 128)"
                ))
            })?;
        }
        Ok(())
    }
}

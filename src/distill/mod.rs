//! The shared distillation module: pixel-wise, pair-wise and holistic terms over
//! [`DenseOutputs`], knowing nothing of the task that produced them.
//!
//! A task plugin (segmentation, detection, ...) hands the [`Distiller`] one `DenseOutputs` for
//! the student and one for the teacher; each term covers the levels it is configured for.
//!
//! ```text
//! Distiller::student_losses(s, t)  -> Losses { pixel_wise, pair_wise, holistic }
//!     pixel_wise: logits[l]   -> pixel_wise_loss   (per level, summed)
//!     pair_wise:  features[l] -> pair_wise_loss    (per level, summed)
//!     holistic:   logits[level] -> −λ_d · mean D(z_S)
//!     mimic:      features[l]   -> mean((A_l(f_S) − f_T)²)  (per level, summed; A_l = 1x1 adapter)
//! Distiller::critic_loss(s.detach(), t) -> CriticLoss   (WGAN-GP or hinge; None without holistic)
//! ```

pub mod holistic;
pub mod mimic;
pub mod pair_wise;
pub mod pixel_wise;

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

pub use holistic::{Adversarial, CriticLoss, Discriminator, Holistic, HolisticConfig};
pub use mimic::{Mimic, MimicConfig};
pub use pair_wise::{NodePool, pair_wise_loss};
pub use pixel_wise::{PixelWiseLoss, pixel_wise_loss};

/// What a dense-prediction network exposes to distillation, one entry per output level.
#[derive(Debug, Clone)]
pub struct DenseOutputs {
    /// `[B, K, H_l, W_l]` score maps (segmentation: one level; FCOS: P3..P7).
    pub logits: Vec<Tensor>,
    /// `[B, C_l, H_l, W_l]` features (segmentation: the PSP output; FCOS: the FPN levels).
    pub features: Vec<Tensor>,
}

impl DenseOutputs {
    /// The same tensors cut from the graph (what the critic trains on).
    pub fn detach(&self) -> Self {
        Self {
            logits: self.logits.iter().map(Tensor::detach).collect(),
            features: self.features.iter().map(Tensor::detach).collect(),
        }
    }
}

/// Named, weighted loss terms; the optimiser minimises [`Losses::total`].
#[derive(Debug, Clone, Default)]
pub struct Losses(Vec<(&'static str, Tensor)>);

impl Losses {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: &'static str, loss: Tensor) {
        self.0.push((name, loss));
    }

    pub fn extend(&mut self, other: Losses) {
        self.0.extend(other.0);
    }

    pub fn iter(&self) -> impl Iterator<Item = &(&'static str, Tensor)> {
        self.0.iter()
    }

    /// The sum of all terms (a scalar); an error when there is none.
    pub fn total(&self) -> Result<Tensor> {
        let mut terms = self.0.iter().map(|(_, t)| t);
        let first = terms.next().ok_or_else(|| candle_core::Error::Msg("no loss terms to sum".into()))?;
        terms.try_fold(first.clone(), |acc, t| acc + t)
    }

    /// Each term's value on the host, for logs.
    pub fn values(&self) -> Result<Vec<(&'static str, f32)>> {
        self.0.iter().map(|(n, t)| Ok((*n, t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?))).collect()
    }
}

/// Pixel-wise term: logits -> logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PixelWiseConfig {
    /// λ_pi (10 as run).
    pub weight: f64,
    pub loss: PixelWiseLoss,
    /// Levels to cover; `None` = all.
    pub levels: Option<Vec<usize>>,
}

impl Default for PixelWiseConfig {
    fn default() -> Self {
        Self { weight: 10.0, loss: PixelWiseLoss::CrossEntropy, levels: None }
    }
}

/// Pair-wise term: features -> features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairWiseConfig {
    /// λ_pa (0.5 as run by `run_train_val.sh`; the paper says 10).
    pub weight: f64,
    pub pool: NodePool,
    /// Node scale β: kernel = `int(β·H')`; `None` = the full graph, one node per pixel.
    pub scale: Option<f64>,
    /// Levels to cover; `None` = all.
    pub levels: Option<Vec<usize>>,
}

impl Default for PairWiseConfig {
    fn default() -> Self {
        Self { weight: 0.5, pool: NodePool::Max, scale: Some(0.5), levels: None }
    }
}

/// Which terms are on and how; `Default` is the released protocol (all three).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    pub pixel_wise: Option<PixelWiseConfig>,
    pub pair_wise: Option<PairWiseConfig>,
    pub holistic: Option<HolisticConfig>,
    /// Feature mimicking (not in the released segmentation code).
    pub mimic: Option<MimicConfig>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            pixel_wise: Some(PixelWiseConfig::default()),
            pair_wise: Some(PairWiseConfig::default()),
            holistic: Some(HolisticConfig::default()),
            mimic: None,
        }
    }
}

impl DistillConfig {
    /// No distillation: the student learns from labels alone.
    pub fn none() -> Self {
        Self { pixel_wise: None, pair_wise: None, holistic: None, mimic: None }
    }

    /// Whether any term is on (a teacher is needed).
    pub fn is_active(&self) -> bool {
        self.pixel_wise.is_some() || self.pair_wise.is_some() || self.holistic.is_some() || self.mimic.is_some()
    }

    /// Checks the values that do not depend on the networks.
    pub fn validate(&self) -> Result<()> {
        let weight_ok = |name: &str, w: f64| {
            if w.is_finite() && w >= 0.0 {
                Ok(())
            } else {
                candle_core::bail!("distill.{name}.weight must be finite and >= 0, got {w}")
            }
        };
        if let Some(c) = &self.pixel_wise {
            weight_ok("pixel_wise", c.weight)?;
        }
        if let Some(c) = &self.pair_wise {
            weight_ok("pair_wise", c.weight)?;
            if let Some(s) = c.scale
                && !(s > 0.0 && s <= 1.0)
            {
                candle_core::bail!("distill.pair_wise.scale must be in (0, 1], got {s}");
            }
        }
        if let Some(c) = &self.holistic {
            weight_ok("holistic", c.weight)?;
            if c.conv_dim < 8 {
                candle_core::bail!("distill.holistic.conv_dim must be at least 8, got {}", c.conv_dim);
            }
        }
        if let Some(c) = &self.mimic {
            weight_ok("mimic", c.weight)?;
        }
        Ok(())
    }
}

/// The configured terms, ready to compute.
pub struct Distiller {
    pixel_wise: Option<PixelWiseConfig>,
    pair_wise: Option<PairWiseConfig>,
    holistic: Option<Holistic>,
    mimic: Option<Mimic>,
}

/// The levels a term covers, checked against the number the networks produce.
fn selected_levels(term: &str, levels: &Option<Vec<usize>>, available: usize) -> Result<Vec<usize>> {
    match levels {
        None => Ok((0..available).collect()),
        Some(ls) => {
            if let Some(&bad) = ls.iter().find(|&&l| l >= available) {
                candle_core::bail!("distill.{term}.levels: level {bad} does not exist (the outputs have {available})");
            }
            Ok(ls.clone())
        }
    }
}

/// `Σ_l term(l)` over `levels`; `None` when there are none.
fn sum_levels(levels: &[usize], term: impl Fn(usize) -> Result<Tensor>) -> Result<Option<Tensor>> {
    levels.iter().try_fold(None, |acc: Option<Tensor>, &l| {
        let t = term(l)?;
        Ok(Some(match acc {
            None => t,
            Some(a) => (a + t)?,
        }))
    })
}

fn check_levels(what: &str, s: &[Tensor], t: &[Tensor]) -> Result<()> {
    if s.len() != t.len() {
        candle_core::bail!("distill: the student has {} {what} levels, the teacher {}", s.len(), t.len());
    }
    Ok(())
}

impl Distiller {
    /// Builds the terms of `cfg`. `logits` is the `[K, H, W]` of the holistic level's score map
    /// (needed to size the critic; ignored without the holistic term); `feature_channels` the
    /// `(student, teacher)` channels of each feature level (needed to size the mimic adapters;
    /// ignored without the mimic term). `seed` keys the critic's and the adapters' random streams.
    pub fn new(
        cfg: &DistillConfig,
        logits: (usize, usize, usize),
        feature_channels: &[(usize, usize)],
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let holistic = cfg.holistic.map(|h| Holistic::new(h, logits, device, seed)).transpose()?;
        let mimic = cfg.mimic.clone().map(|m| Mimic::new(m, feature_channels, device, seed)).transpose()?;
        Ok(Self { pixel_wise: cfg.pixel_wise.clone(), pair_wise: cfg.pair_wise.clone(), holistic, mimic })
    }

    /// The holistic term (critic), when configured.
    pub fn holistic(&self) -> Option<&Holistic> {
        self.holistic.as_ref()
    }

    /// The mimic term (adapters, trained with the student), when configured.
    pub fn mimic(&self) -> Option<&Mimic> {
        self.mimic.as_ref()
    }

    /// The student's weighted distillation terms.
    pub fn student_losses(&self, s: &DenseOutputs, t: &DenseOutputs) -> Result<Losses> {
        check_levels("logit", &s.logits, &t.logits)?;
        check_levels("feature", &s.features, &t.features)?;
        let mut losses = Losses::new();
        if let Some(c) = &self.pixel_wise {
            let levels = selected_levels("pixel_wise", &c.levels, s.logits.len())?;
            if let Some(total) = sum_levels(&levels, |l| pixel_wise_loss(&s.logits[l], &t.logits[l], c.loss))? {
                losses.push("pixel_wise", (total * c.weight)?);
            }
        }
        if let Some(c) = &self.pair_wise {
            let levels = selected_levels("pair_wise", &c.levels, s.features.len())?;
            if let Some(total) =
                sum_levels(&levels, |l| pair_wise_loss(&s.features[l], &t.features[l], c.pool, c.scale))?
            {
                losses.push("pair_wise", (total * c.weight)?);
            }
        }
        if let Some(h) = &self.holistic {
            let l = h.config().level;
            selected_levels("holistic", &Some(vec![l]), s.logits.len())?;
            losses.push("holistic", h.student_loss(&s.logits[l])?);
        }
        if let Some(m) = &self.mimic {
            let levels = selected_levels("mimic", &m.config().levels, s.features.len())?;
            if let Some(total) = sum_levels(&levels, |l| m.level_loss(l, &s.features[l], &t.features[l]))? {
                losses.push("mimic", (total * m.config().weight)?);
            }
        }
        Ok(losses)
    }

    /// The critic's loss on the student's outputs from before the student's update; `None`
    /// without the holistic term.
    pub fn critic_loss(&self, s_detached: &DenseOutputs, t: &DenseOutputs) -> Result<Option<CriticLoss>> {
        let Some(h) = &self.holistic else { return Ok(None) };
        check_levels("logit", &s_detached.logits, &t.logits)?;
        let l = h.config().level;
        selected_levels("holistic", &Some(vec![l]), s_detached.logits.len())?;
        h.critic_loss(&s_detached.logits[l], &t.logits[l]).map(Some)
    }
}

//! Holistic distillation: a critic tells the teacher's score maps from the student's, and the
//! student learns to fool it (paper Eq. 3–4; `networks/sagan_models.py`, `CriterionAdv*`).
//!
//! The critic is the released SAGAN-style discriminator on raw logits: BatchNorm on the input
//! (always batch statistics), spectral-norm 4x4/s2/p1 convolutions of width `d, 2d, 4d, 8d` with
//! LeakyReLU(0.1), self-attention after the last two of them, and a final 4x4 valid conv to one
//! channel.
//!
//! **Depth rule.** The released code builds its 4th conv only for 65x65 logits (and fails
//! otherwise). Here the depth follows the logit size: `depth = min(4, max{d : ⌊min(H,W)/2^d⌋ ≥ 4})`,
//! so that the last conv sees at least 4x4. 64..127 px gives the released depth 4; 16..31 px
//! (a 128 px synthetic crop gives 17x17) gives depth 2. Depth below 2 is refused, as the two
//! attention blocks need two convs. Keys stay `l1..l{depth}`, `attn1`, `attn2`, `last`.
//!
//! Losses, with λ_d the term's weight:
//! - student: `−λ_d · mean D(z_S)` (WGAN and hinge alike);
//! - critic, WGAN-GP (as run): `λ_d · (−mean D(z_T) + mean D(z_S)) + λ_d · λ_gp · GP`, with
//!   `GP = mean_b (‖∇_x D(x̂_b)‖₂ − 1)²` at `x̂ = α z_T + (1 − α) z_S`, `α ~ U[0, 1)` per sample;
//! - critic, hinge: `λ_d · (mean relu(1 − D(z_T)) + mean relu(1 + D(z_S)))`.
//!
//! The gradient penalty differentiates a gradient: Candle does this only on a thread that saw
//! `CANDLE_GRAD_DO_NOT_DETACH=1` at its first backward; the inner backward runs through
//! `nn::double_backward` ([`double_backward_enabled`] checks; the binaries set it up at start).

use std::sync::Mutex;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::nn::batch_norm::pytorch_config;
use crate::nn::conv::{Conv, ConvSpec};
use crate::nn::{SelfAttention, SpectralNormConv2d, SplitMix64};

const LRELU_SLOPE: f64 = 0.1;

/// The critic's objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Adversarial {
    /// As run: Wasserstein loss with a gradient penalty of weight `gp_weight` (λ_gp = 10).
    WganGp { gp_weight: f64 },
    /// The documented fallback (issue #21 of the released repository).
    Hinge,
}

impl Default for Adversarial {
    fn default() -> Self {
        Self::WganGp { gp_weight: 10.0 }
    }
}

/// Number of stride-2 convolutions for `h x w` logits (the depth rule above).
pub fn critic_depth(h: usize, w: usize) -> Result<usize> {
    let side = h.min(w);
    let depth = (0..=4).rev().find(|&d| side >> d >= 4).unwrap_or(0);
    if depth < 2 {
        candle_core::bail!("holistic: the critic needs logits of at least 16x16, got {h}x{w}");
    }
    Ok(depth)
}

/// The SAGAN-style critic.
#[derive(Debug)]
pub struct Discriminator {
    preprocess_additional: BatchNorm,
    convs: Vec<SpectralNormConv2d>,
    attn1: SelfAttention,
    attn2: SelfAttention,
    last: Conv,
}

impl Discriminator {
    /// A critic for `[B, in_channels, h, w]` logits with base width `conv_dim` (64 as run).
    pub fn new(in_channels: usize, conv_dim: usize, (h, w): (usize, usize), vb: VarBuilder) -> Result<Self> {
        let depth = critic_depth(h, w)?;
        // Candle's BatchNorm, not the fused one: the penalty differentiates through it twice.
        let preprocess_additional =
            candle_nn::batch_norm(in_channels, pytorch_config(), vb.pp("preprocess_additional"))?;
        let width = |i: usize| conv_dim << i; // d, 2d, 4d, 8d
        let convs = (0..depth)
            .map(|i| {
                let c_in = if i == 0 { in_channels } else { width(i - 1) };
                SpectralNormConv2d::new(c_in, width(i), 4, 2, 1, vb.pp(format!("l{}", i + 1)).pp("0"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            preprocess_additional,
            convs,
            attn1: SelfAttention::new(width(depth - 2), vb.pp("attn1"))?,
            attn2: SelfAttention::new(width(depth - 1), vb.pp("attn2"))?,
            last: Conv::new(ConvSpec::new(width(depth - 1), 1, 4), true, vb.pp("last").pp("0"))?,
        })
    }

    /// The spectral-norm layers, `l1..`, in order.
    pub fn spectral_convs(&self) -> &[SpectralNormConv2d] {
        &self.convs
    }
}

impl Module for Discriminator {
    /// `[B, K, H, W] -> [B, 1, H_o, W_o]`. Every call normalises with its own batch statistics,
    /// updates the running ones and advances each spectral norm one step, as the released code
    /// (which keeps D in train mode) does.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.preprocess_additional.forward_t(x, true)?;
        let depth = self.convs.len();
        for (i, conv) in self.convs.iter().enumerate() {
            x = candle_nn::ops::leaky_relu(&conv.forward(&x)?, LRELU_SLOPE)?;
            if i == depth - 2 {
                x = self.attn1.forward(&x)?;
            } else if i == depth - 1 {
                x = self.attn2.forward(&x)?;
            }
        }
        self.last.forward(&x)
    }
}

/// The student's adversarial loss before weighting: `−mean D(z_S)`.
pub fn generator_adv_loss(d_out_s: &Tensor) -> Result<Tensor> {
    d_out_s.mean_all()?.neg()
}

/// The critic's adversarial loss before weighting (no gradient penalty).
pub fn critic_adv_loss(d_out_s: &Tensor, d_out_t: &Tensor, adversarial: Adversarial) -> Result<Tensor> {
    match adversarial {
        Adversarial::WganGp { .. } => d_out_s.mean_all()? - d_out_t.mean_all()?,
        Adversarial::Hinge => {
            let real = (1.0 - d_out_t)?.relu()?.mean_all()?;
            let fake = (1.0 + d_out_s)?.relu()?.mean_all()?;
            real + fake
        }
    }
}

/// The gradient penalty and what it saw.
#[derive(Debug)]
pub struct GradientPenalty {
    /// `mean_b (‖∇_x D(x̂_b)‖₂ − 1)²`, differentiable with respect to the critic's parameters.
    pub gp: Tensor,
    /// `D(x̂)`.
    pub d_out_interp: Tensor,
    /// `‖∇_x D(x̂_b)‖₂` per sample, `[B]`.
    pub grad_norm: Tensor,
}

/// Whether the gradient penalty's double backward is available (see `nn::double_backward`).
pub fn double_backward_enabled() -> Result<bool> {
    crate::nn::double_backward::enabled()
}

/// The WGAN-GP penalty at `x̂ = α z_T + (1 − α) z_S` (both detached), `alpha` of shape `[B]`.
pub fn gradient_penalty(critic: &Discriminator, z_t: &Tensor, z_s: &Tensor, alpha: &Tensor) -> Result<GradientPenalty> {
    if !double_backward_enabled()? {
        candle_core::bail!(
            "holistic: the WGAN-GP gradient penalty needs double backward; call skd::init_process() first \
             thing in main (the skd binaries do) or set CANDLE_GRAD_DO_NOT_DETACH=1, or use the hinge critic"
        );
    }
    let b = z_t.dim(0)?;
    // [B] -> [B, 1, 1, 1], broadcast over K, H, W
    let alpha = alpha.reshape((b, 1, 1, 1))?.to_dtype(z_t.dtype())?;
    let x_hat = (z_t.detach().broadcast_mul(&alpha)? + z_s.detach().broadcast_mul(&(1.0 - alpha)?)?)?;
    let x_hat = Var::from_tensor(&x_hat)?;
    let d_out_interp = critic.forward(&x_hat)?;
    let grads = crate::nn::double_backward::backward_with_graph(&d_out_interp.sum_all()?)?;
    let g = grads
        .get(&x_hat)
        .ok_or_else(|| candle_core::Error::Msg("holistic: the critic's output does not depend on its input".into()))?;
    // [B, K, H, W] -> [B, K*H*W] -> [B]
    let grad_norm = g.reshape((b, ()))?.sqr()?.sum(1)?.sqrt()?;
    let gp = (&grad_norm - 1.0)?.sqr()?.mean_all()?;
    Ok(GradientPenalty { gp, d_out_interp, grad_norm })
}

/// Everything one critic step computes, in the released call order D(T), D(S), D(x̂).
#[derive(Debug)]
pub struct CriticLoss {
    pub d_out_t: Tensor,
    pub d_out_s: Tensor,
    /// The adversarial part before weighting.
    pub adv: Tensor,
    /// WGAN-GP only.
    pub penalty: Option<GradientPenalty>,
    /// The weighted total to minimise.
    pub loss: Tensor,
}

/// The holistic term's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HolisticConfig {
    /// λ_d, on the student's term and on the critic's loss alike (0.1 as run).
    pub weight: f64,
    pub adversarial: Adversarial,
    /// The critic's base width (64 as run).
    pub conv_dim: usize,
    /// The logit level the critic judges (the only one for segmentation).
    pub level: usize,
    /// Learning rate of the critic's optimiser (4e-4 as run).
    pub lr: f64,
}

impl Default for HolisticConfig {
    fn default() -> Self {
        Self { weight: 0.1, adversarial: Adversarial::default(), conv_dim: 64, level: 0, lr: 4e-4 }
    }
}

/// The holistic term: the critic, its own parameters, and the stream its `α` come from.
pub struct Holistic {
    cfg: HolisticConfig,
    critic: Discriminator,
    varmap: VarMap,
    rng: Mutex<SplitMix64>,
}

impl Holistic {
    /// A fresh critic for logits of `[K, H, W]` (the configured level's).
    pub fn new(cfg: HolisticConfig, logits: (usize, usize, usize), device: &Device, seed: u64) -> Result<Self> {
        if !(cfg.weight.is_finite() && cfg.weight >= 0.0) {
            candle_core::bail!("holistic: weight must be finite and >= 0, got {}", cfg.weight);
        }
        if let Adversarial::WganGp { gp_weight } = cfg.adversarial
            && !(gp_weight.is_finite() && gp_weight >= 0.0)
        {
            candle_core::bail!("holistic: gp_weight must be finite and >= 0, got {gp_weight}");
        }
        let varmap = VarMap::new();
        // The critic's weights from the seed; its α stream from the same seed, re-keyed per step.
        let vb = crate::nn::init::seeded_var_builder(
            &varmap,
            SplitMix64::derive(&[seed, 0xC817]).next_u64(),
            DType::F32,
            device,
        );
        let critic = Discriminator::new(logits.0, cfg.conv_dim, (logits.1, logits.2), vb)?;
        Ok(Self { cfg, critic, varmap, rng: Mutex::new(SplitMix64::new(seed)) })
    }

    pub fn config(&self) -> &HolisticConfig {
        &self.cfg
    }

    pub fn critic(&self) -> &Discriminator {
        &self.critic
    }

    /// All the critic's state (parameters and buffers), by checkpoint key.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The critic's trainable parameters, by key (buffers left out).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        crate::nn::trainable_vars(&self.varmap)
    }

    /// Re-keys the `α` stream (e.g. from `(seed, iteration)` for resumable runs).
    pub fn set_seed(&self, seed: u64) {
        *self.rng.lock().expect("holistic rng lock") = SplitMix64::new(seed);
    }

    /// The student's weighted term `−λ_d · mean D(z_S)`; gradients flow through the critic
    /// into `z_s`.
    pub fn student_loss(&self, z_s: &Tensor) -> Result<Tensor> {
        generator_adv_loss(&self.critic.forward(z_s)?)? * self.cfg.weight
    }

    /// The critic's loss on detached logits, drawing `α` from the term's stream.
    pub fn critic_loss(&self, z_s: &Tensor, z_t: &Tensor) -> Result<CriticLoss> {
        let b = z_s.dim(0)?;
        let alpha: Vec<f32> = {
            let mut rng = self.rng.lock().expect("holistic rng lock");
            (0..b).map(|_| rng.uniform() as f32).collect()
        };
        self.critic_loss_with_alpha(z_s, z_t, &Tensor::from_vec(alpha, b, z_s.device())?)
    }

    /// The critic's loss with given interpolation weights `alpha` `[B]` (ignored for hinge).
    pub fn critic_loss_with_alpha(&self, z_s: &Tensor, z_t: &Tensor, alpha: &Tensor) -> Result<CriticLoss> {
        if z_s.dims() != z_t.dims() {
            candle_core::bail!("holistic: student logits {:?} and teacher logits {:?} differ", z_s.dims(), z_t.dims());
        }
        let (z_s, z_t) = (z_s.detach(), z_t.detach());
        let d_out_t = self.critic.forward(&z_t)?;
        let d_out_s = self.critic.forward(&z_s)?;
        let adv = critic_adv_loss(&d_out_s, &d_out_t, self.cfg.adversarial)?;
        let (loss, penalty) = match self.cfg.adversarial {
            Adversarial::WganGp { gp_weight } => {
                let p = gradient_penalty(&self.critic, &z_t, &z_s, alpha)?;
                let loss = ((&adv * self.cfg.weight)? + (&p.gp * (self.cfg.weight * gp_weight))?)?;
                (loss, Some(p))
            }
            Adversarial::Hinge => ((&adv * self.cfg.weight)?, None),
        };
        Ok(CriticLoss { d_out_t, d_out_s, adv, penalty, loss })
    }

    /// The critic's gradients for `loss`, checked to reach every trainable parameter: a silently
    /// missing gradient is how a broken double backward shows (DESIGN.md §4).
    pub fn critic_grads(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let grads = loss.backward()?;
        let missing: Vec<String> =
            self.trainable_vars().into_iter().filter(|(_, v)| grads.get(v).is_none()).map(|(k, _)| k).collect();
        if !missing.is_empty() {
            candle_core::bail!("holistic: no gradient reached critic parameters {}", missing.join(", "));
        }
        Ok(grads)
    }
}

/// The critic's output size for `h x w` logits.
pub fn critic_output_hw(h: usize, w: usize) -> Result<(usize, usize)> {
    let depth = critic_depth(h, w)?;
    Ok(((h >> depth) - 3, (w >> depth) - 3))
}

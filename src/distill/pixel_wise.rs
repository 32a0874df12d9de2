//! Pixel-wise distillation: the student's class distribution at every pixel is taught by the
//! teacher's (paper Eq. 1; `CriterionPixelWise` in the released code).
//!
//! Logits are `[B, K, H', W']` at the networks' own resolution (1/8 for PSPNet); no mask.

use candle_core::{Result, Tensor};
use candle_nn::ops::log_softmax;
use serde::{Deserialize, Serialize};

/// Which pixel-wise loss; the default is the one the released code runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PixelWiseLoss {
    /// As run: `Σ_{b,h,w} Σ_k −p_T · log p_S / (H'W')`, summed over the batch (not divided by
    /// B), T = 1. Equal to KL(p_T‖p_S) plus the teacher's entropy; same gradient as KL.
    #[default]
    CrossEntropy,
    /// `T² · Σ KL(p_T‖p_S) / (B·H'·W')` with `p = softmax(z / T)` (Hinton et al.).
    Kl { temperature: f64 },
    /// The same divided by K as well: PyTorch's `KLDivLoss` with its default `mean`
    /// reduction, as the authors' FCOS code (`CriterionKD`) runs it.
    KlMean { temperature: f64 },
    /// `mean((z_S − z_T)²)` over all `B·K·H'·W'` entries: for single-class logits, where a
    /// softmax over one class is constant and carries no signal.
    Mse,
}

fn check_shapes(z_s: &Tensor, z_t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    if z_s.dims() != z_t.dims() {
        candle_core::bail!("pixel-wise: student logits {:?} and teacher logits {:?} differ", z_s.dims(), z_t.dims());
    }
    z_s.dims4()
}

/// The pixel-wise loss of `z_s` taught by `z_t` (the teacher is detached).
pub fn pixel_wise_loss(z_s: &Tensor, z_t: &Tensor, loss: PixelWiseLoss) -> Result<Tensor> {
    let (b, k, h, w) = check_shapes(z_s, z_t)?;
    let z_t = z_t.detach();
    match loss {
        PixelWiseLoss::CrossEntropy | PixelWiseLoss::Kl { .. } | PixelWiseLoss::KlMean { .. } if k == 1 => {
            candle_core::bail!(
                "pixel-wise: a softmax over one class is constant; use {{\"kind\": \"mse\"}} for single-class logits"
            )
        }
        PixelWiseLoss::CrossEntropy => {
            let p_t = candle_nn::ops::softmax(&z_t, 1)?;
            let ce = (p_t * log_softmax(z_s, 1)?)?.sum_all()?.neg()?;
            ce / (h * w) as f64
        }
        PixelWiseLoss::KlMean { temperature } => {
            pixel_wise_loss(z_s, &z_t, PixelWiseLoss::Kl { temperature })? / k as f64
        }
        PixelWiseLoss::Kl { temperature } => {
            if temperature <= 0.0 || !temperature.is_finite() {
                candle_core::bail!("pixel-wise: temperature must be positive, got {temperature}");
            }
            let log_p_s = log_softmax(&(z_s / temperature)?, 1)?;
            let log_p_t = log_softmax(&(z_t / temperature)?, 1)?;
            let kl = (log_p_t.exp()? * (log_p_t - log_p_s)?)?.sum_all()?;
            kl * (temperature * temperature / (b * h * w) as f64)
        }
        PixelWiseLoss::Mse => (z_s - z_t)?.sqr()?.mean_all(),
    }
}

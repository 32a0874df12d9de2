//! The segmentation task loss as run (`CriterionDSN`): cross-entropy over the labelled
//! pixels after bilinear (`align_corners = true`) upsampling of the logits to the label size,
//! for the main head plus 0.4 × the deep-supervision (DSN) head on layer3.

use candle_core::{Result, Tensor};

use crate::distill::Losses;
use crate::nn::cross_entropy::cross_entropy;
use crate::nn::resize_bilinear;

/// The label of pixels that carry no class (Cityscapes' void, crop padding).
pub const IGNORE_LABEL: u32 = 255;

/// Mean cross-entropy of `logits` `[B, K, h, w]` against `labels` `[B, H, W]` (integer ids;
/// `ignore` excluded) after upsampling to `H x W`. All pixels ignored gives 0, not NaN.
pub fn cross_entropy_upsampled(logits: &Tensor, labels: &Tensor, ignore: u32) -> Result<Tensor> {
    let (b, _, _, _) = logits.dims4()?;
    let (lb, h, w) = labels.dims3()?;
    if lb != b {
        candle_core::bail!("cross-entropy: {b} logit maps but {lb} label maps");
    }
    cross_entropy(&resize_bilinear(logits, (h, w), true)?, labels, ignore)
}

/// `CriterionDSN`: `ce` = CE(main) and `ce_aux` = `aux_weight` · CE(aux).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegLoss {
    pub aux_weight: f64,
    pub ignore: u32,
}

impl Default for SegLoss {
    fn default() -> Self {
        Self { aux_weight: 0.4, ignore: IGNORE_LABEL }
    }
}

impl SegLoss {
    pub fn losses(&self, logits: &Tensor, aux_logits: Option<&Tensor>, labels: &Tensor) -> Result<Losses> {
        let mut losses = Losses::new();
        losses.push("ce", cross_entropy_upsampled(logits, labels, self.ignore)?);
        if let Some(aux) = aux_logits {
            losses.push("ce_aux", (cross_entropy_upsampled(aux, labels, self.ignore)? * self.aux_weight)?);
        }
        Ok(losses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn all_ignored_labels_give_zero_loss_and_zero_grad() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 19, 5, 5), &dev)?)?;
        let labels = Tensor::full(255u32, (2, 17, 17), &dev)?;
        let loss = cross_entropy_upsampled(&logits, &labels, IGNORE_LABEL)?;
        assert_eq!(loss.to_scalar::<f32>()?, 0.0);
        let g = loss.backward()?;
        let g = g.get(&logits).expect("grad").abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(g, 0.0);
        Ok(())
    }
}

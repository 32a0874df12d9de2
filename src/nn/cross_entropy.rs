//! Mean softmax cross-entropy over a map's pixels, one label ignored, as one op on the CPU.
//!
//! Candle's `log_softmax` + `gather` + masked mean is about ten passes over the upsampled
//! logits forward (`[B, K, H, W]`, the full image size) and more than twenty backward,
//! allocations included, nearly all on one thread (in a 128² training step its forward ops
//! alone were 15% of the main thread's samples, `perf`). Here the forward is one parallel
//! pass (per pixel: max, log-sum-exp, the label's term) and the backward one more
//! (`(softmax − onehot) / count` per pixel). Same formula as Candle's
//! (`x − max − ln Σ exp(x − max)`); the sums over pixels are taken in f64. First-order only:
//! nothing differentiates a task loss twice. Elsewhere (CUDA, other dtypes) Candle's ops run.

use super::cpu_f32;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use candle_nn::ops::log_softmax;
use rayon::prelude::*;

/// Pixels per parallel task.
const CHUNK: usize = 4096;

/// Mean cross-entropy of `logits` `[B, K, H, W]` against `labels` `[B, H, W]` (integer class
/// ids), pixels labelled `ignore` left out; 0 when every pixel is ignored.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, ignore: u32) -> Result<Tensor> {
    let (b, k, h, w) = logits.dims4()?;
    if labels.dims() != [b, h, w] {
        candle_core::bail!("cross-entropy: logits {:?} but labels {:?}", logits.dims(), labels.dims());
    }
    let labels = labels.to_dtype(DType::U32)?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op2(&labels.contiguous()?, CrossEntropy { ignore, classes: k });
    }
    let log_p = log_softmax(logits, 1)?;
    let valid = labels.ne(ignore)?;
    // Ignored pixels gather class 0 and are masked out below. [B, H, W] -> [B, 1, H, W]
    let safe = valid.where_cond(&labels, &labels.zeros_like()?)?.unsqueeze(1)?;
    let picked = log_p.gather(&safe, 1)?.squeeze(1)?;
    let valid = valid.to_dtype(log_p.dtype())?;
    let count = valid.sum_all()?.maximum(1.0)?;
    (picked * valid)?.sum_all()?.neg()?.div(&count)
}

/// `(logits, labels) -> −Σ log softmax(logits)[label] / max(count, 1)` over the valid pixels.
struct CrossEntropy {
    ignore: u32,
    classes: usize,
}

/// The op's inputs: logits, labels (checked), pixels per map.
type Inputs<'a> = (&'a [f32], &'a [u32], usize);

impl CrossEntropy {
    fn inputs<'a>(&self, s1: &'a CpuStorage, l1: &Layout, s2: &'a CpuStorage, l2: &Layout) -> Result<Inputs<'a>> {
        let logits = cpu_f32(s1, l1, "cross-entropy")?;
        let (CpuStorage::U32(labels), Some((start, end))) = (s2, l2.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: labels must be contiguous u32")
        };
        let labels = &labels[start..end];
        if let Some(&bad) = labels.par_iter().find_first(|&&l| l != self.ignore && l as usize >= self.classes) {
            candle_core::bail!(
                "cross-entropy: label {bad} is not one of {} classes (nor ignored, {})",
                self.classes,
                self.ignore
            )
        }
        Ok((logits, labels, labels.len() / l1.dims()[0]))
    }

    /// Where pixel `q`'s logit of class 0 lies (its others follow `plane` apart), the max of
    /// its logits and `Σ exp(x − max)`, leaving each `exp(x − max)` in `exps` (one per class):
    /// Candle's `log_softmax` in the same order.
    fn column(&self, logits: &[f32], q: usize, plane: usize, exps: &mut [f32]) -> (usize, f32, f32) {
        let at = q / plane * self.classes * plane + q % plane;
        let max = (0..self.classes).map(|k| logits[at + k * plane]).fold(f32::NEG_INFINITY, f32::max);
        exps.iter_mut().enumerate().for_each(|(k, e)| *e = (logits[at + k * plane] - max).exp());
        (at, max, exps.iter().sum())
    }

    /// Valid pixels, at least 1.
    fn count(&self, labels: &[u32]) -> f64 {
        (labels.par_iter().filter(|&&l| l != self.ignore).count() as f64).max(1.0)
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, labels, plane) = self.inputs(s1, l1, s2, l2)?;
        let picked: f64 = labels
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(i, chunk)| {
                let mut exps = vec![0f32; self.classes];
                let valid = chunk.iter().enumerate().filter(|&(_, &l)| l != self.ignore);
                valid
                    .map(|(j, &l)| {
                        let (at, max, sum) = self.column(logits, i * CHUNK + j, plane, &mut exps);
                        ((logits[at + l as usize * plane] - max) - sum.ln()) as f64
                    })
                    .sum::<f64>()
            })
            .sum();
        let loss = (-picked / self.count(labels)) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let op = CrossEntropyGrad { loss: CrossEntropy { ignore: self.ignore, classes: self.classes }, scale };
        Ok((Some(logits.apply_op2_no_bwd(labels, &op)?), None))
    }
}

/// `(logits, labels) -> scale · (softmax − onehot(label)) / count`, 0 at ignored pixels.
struct CrossEntropyGrad {
    loss: CrossEntropy,
    scale: f32,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ce = &self.loss;
        let (logits, labels, plane) = ce.inputs(s1, l1, s2, l2)?;
        let per_pixel = (self.scale as f64 / ce.count(labels)) as f32;
        // One image's class planes per task, written pixel by pixel down the classes; each
        // `exp(x − max)` is taken once, for the sum and the softmax (taking it twice per logit
        // was most of this pass).
        let mut grad = vec![0f32; logits.len()];
        grad.par_chunks_mut(ce.classes * plane).enumerate().for_each(|(n, image)| {
            let mut exps = vec![0f32; ce.classes];
            for s in 0..plane {
                let label = labels[n * plane + s];
                if label == ce.ignore {
                    continue;
                }
                let (_, _, sum) = ce.column(logits, n * plane + s, plane, &mut exps);
                for (k, &e) in exps.iter().enumerate() {
                    let onehot = if k == label as usize { 1.0 } else { 0.0 };
                    image[k * plane + s] = (e / sum - onehot) * per_pixel;
                }
            }
        });
        Ok((CpuStorage::F32(grad), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Loss and logit gradient equal Candle's composition (the fallback) to rounding, with
    /// ignored pixels, on a non-contiguous view; all pixels ignored gives 0; a label outside the
    /// classes is an error naming it.
    #[test]
    fn equals_candles_log_softmax_and_gather() -> Result<()> {
        let dev = Device::Cpu;
        let (b, k, h, w) = (2, 5, 37, 61);
        let values: Vec<f32> = (0..b * k * h * w).map(|i| ((i * 7919) % 2003) as f32 / 200.0 - 5.0).collect();
        let base = Var::from_vec(values, (b, k, w, h), &dev)?;
        let logits = base.transpose(2, 3)?;
        let labels: Vec<u32> = (0..b * h * w).map(|i| if i % 7 == 3 { 255 } else { (i * 31 % k) as u32 }).collect();
        let labels = Tensor::from_vec(labels, (b, h, w), &dev)?;
        let fused = cross_entropy(&logits, &labels, 255)?;
        let log_p = log_softmax(&logits, 1)?;
        let valid = labels.ne(255u32)?;
        let safe = valid.where_cond(&labels, &labels.zeros_like()?)?.unsqueeze(1)?;
        let picked = log_p.gather(&safe, 1)?.squeeze(1)?;
        let valid = valid.to_dtype(DType::F32)?;
        let reference = (picked * &valid)?.sum_all()?.neg()?.div(&valid.sum_all()?.maximum(1.0)?)?;
        let (f, r) = (fused.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((f - r).abs() <= 1e-5 * r.abs(), "loss {f} vs {r}");
        let (gf, gr) = ((fused * 3.0)?.backward()?, (reference * 3.0)?.backward()?);
        let (gf, gr) = (gf.get(&base).expect("gradient"), gr.get(&base).expect("gradient"));
        let diff = (gf - gr)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-8, "gradient differs by {diff}");

        let all_ignored = Tensor::full(255u32, (b, h, w), &dev)?;
        assert_eq!(cross_entropy(&logits, &all_ignored, 255)?.to_scalar::<f32>()?, 0.0);
        let bad = Tensor::full(7u32, (b, h, w), &dev)?;
        let err = cross_entropy(&logits, &bad, 255).unwrap_err().to_string();
        assert!(err.contains("label 7") && err.contains("5 classes"), "{err}");
        Ok(())
    }
}

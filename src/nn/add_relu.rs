//! `relu(a + b)`, the end of a residual block, as one op on the CPU.
//!
//! Candle's `(a + b).relu()` is two passes forward, the ReLU's serial; backward, the ReLU alone
//! allocates a zero tensor to compare against, a mask, its f32 copy and the product, the mask
//! and the copy on one thread. Here the forward is one parallel pass and the backward one more (the gradient masked
//! where the output is positive, handed to both summands). The mask follows PyTorch's
//! `threshold_backward` (no gradient where the sum is exactly 0; Candle's passes it). The
//! backward is first-order only, like the fused BatchNorm's: the residual networks are never
//! differentiated twice. Elsewhere (CUDA, other dtypes) Candle's ops run.

use super::{cpu_f32, par_collect};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Floats per parallel task.
const CHUNK: usize = 1 << 14;

/// `relu(a + b)` for two tensors of the same shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 && a.shape() == b.shape()) {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// `(a, b) -> relu(a + b)`.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        zip_map((s1, l1), (s2, l2), |a, b| (a + b).max(0.0))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = y.apply_op2_no_bwd(&grad.contiguous()?, &PositiveGrad)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// `(y, g) -> g where y > 0, else 0`.
struct PositiveGrad;

impl CustomOp2 for PositiveGrad {
    fn name(&self) -> &'static str {
        "add-relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        zip_map((s1, l1), (s2, l2), |y, g| if y > 0.0 { g } else { 0.0 })
    }
}

/// `f(a, b)` value by value over two f32 inputs of the same shape, in parallel chunks.
fn zip_map(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (cpu_f32(s1, l1, "add-relu")?, cpu_f32(s2, l2, "add-relu")?);
    let out = par_collect(a.len(), CHUNK, |i| {
        let (a, b) = (&a[i * CHUNK..(i * CHUNK + CHUNK).min(a.len())], &b[i * CHUNK..]);
        a.iter().zip(b).map(|(&x, &y)| f(x, y))
    });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward bit-identical to Candle's `(a + b).relu()`, gradients of both summands equal to
    /// Candle's where no sum is exactly 0, on non-contiguous views spanning several parallel
    /// chunks; PyTorch's rule where one is.
    #[test]
    fn equals_candles_add_then_relu() -> Result<()> {
        let dev = Device::Cpu;
        // 7 x 7025: three chunks and a part.
        let (rows, cols) = (7, 3 * CHUNK / 7 + 3);
        let values = |len: usize, salt: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.0 - 1.0 + 1e-4).collect()
        };
        let a_var = Var::from_vec(values((cols + 1) * rows, 1), (cols + 1, rows), &dev)?;
        let b_var = Var::from_vec(values(rows * (cols + 1), 2), (rows, cols + 1), &dev)?;
        let a = a_var.narrow(0, 0, cols)?.t()?;
        let b = b_var.narrow(1, 0, cols)?;
        assert!(!a.is_contiguous() && !b.is_contiguous());
        let weights = Tensor::from_vec(values(rows * cols, 3), (rows, cols), &dev)?;
        let fused = add_relu(&a, &b)?;
        let plain = (&a + &b)?.relu()?;
        assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, plain.flatten_all()?.to_vec1::<f32>()?);
        let fused_grads = (fused * &weights)?.sum_all()?.backward()?;
        let plain_grads = (plain * &weights)?.sum_all()?.backward()?;
        for v in [&a_var, &b_var] {
            let (f, p) = (fused_grads.get(v).expect("fused gradient"), plain_grads.get(v).expect("gradient"));
            assert_eq!(f.flatten_all()?.to_vec1::<f32>()?, p.flatten_all()?.to_vec1::<f32>()?);
        }
        // Where the sum is exactly 0 no gradient passes (PyTorch's rule; Candle's ReLU passes it).
        let x = Var::new(&[1f32, -1.0, 2.0, 0.5], &dev)?;
        let y = Tensor::new(&[-1f32, 1.0, -3.0, 0.5], &dev)?;
        let grads = add_relu(x.as_tensor(), &y)?.sum_all()?.backward()?;
        assert_eq!(grads.get(&x).expect("gradient").to_vec1::<f32>()?, [0.0, 0.0, 0.0, 1.0]);
        Ok(())
    }
}

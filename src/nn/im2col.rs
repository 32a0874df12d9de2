//! Convolution on the CPU as im2col + one matrix product, with col2im as the adjoint.
//!
//! Candle's CPU `conv2d` runs about 3.5x slower than the matrix product it amounts to, and its
//! input gradient is a naive `conv_transpose2d` (about 5x the forward). Here the whole batch's
//! patches become one `[B·Ho·Wo, C·k·k]` matrix, so the forward, the input gradient
//! (`grad · W`, then col2im) and the weight gradient (`colsᵀ · grad`) are each one large GEMM.
//! [`Im2Col`] and [`Col2Im`] are linear and each other's adjoint, so every derivative is built
//! from them and matmuls.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a square-kernel convolution's patches, for a `[B, C, H, W]` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patches {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
}

impl Patches {
    pub fn out_hw(&self) -> (usize, usize) {
        let span = self.dilation * (self.kernel - 1) + 1;
        let one = |n: usize| (n + 2 * self.padding).saturating_sub(span) / self.stride + 1;
        (one(self.h), one(self.w))
    }

    fn row_len(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// The input pixel `(iy, ix)` patch entry `(ky, kx)` of output `(oy, ox)` reads, if inside.
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky * self.dilation).checked_sub(self.padding)?;
        let ix = (ox * self.stride + kx * self.dilation).checked_sub(self.padding)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: needs a contiguous input") };
    Ok(&data[start..end])
}

/// `[B, C, H, W]` -> `[B, Ho·Wo, C·k·k]`, row `oy·Wo + ox` holding the patch in `(c, ky, kx)`
/// order (the order of a `[C_out, C, k, k]` weight's rows).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col(pub Patches);

/// The adjoint of [`Im2Col`]: `[B, Ho·Wo, C·k·k]` -> `[B, C, H, W]`, overlapping patches summed.
#[derive(Debug, Clone, Copy)]
pub struct Col2Im(pub Patches);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let x = f32_slice(storage, layout, "im2col")?;
        let b = layout.dims()[0];
        let (oh, ow) = p.out_hw();
        let (k, row) = (p.kernel, p.row_len());
        let plane = p.h * p.w;
        let mut out = vec![0f32; b * oh * ow * row];
        out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
            let (n, pos) = (r / (oh * ow), r % (oh * ow));
            let (oy, ox) = (pos / ow, pos % ow);
            let image = &x[n * p.channels * plane..(n + 1) * p.channels * plane];
            for c in 0..p.channels {
                for ky in 0..k {
                    for kx in 0..k {
                        if let Some((iy, ix)) = p.source(oy, ox, ky, kx) {
                            dst[(c * k + ky) * k + kx] = image[c * plane + iy * p.w + ix];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, oh * ow, row))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let cols = f32_slice(storage, layout, "col2im")?;
        let b = layout.dims()[0];
        let (oh, ow) = p.out_hw();
        let (k, row) = (p.kernel, p.row_len());
        let plane = p.h * p.w;
        let mut out = vec![0f32; b * p.channels * plane];
        // One (image, channel) plane per task: every write of a task stays in its plane.
        out.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
            let (n, c) = (i / p.channels, i % p.channels);
            for oy in 0..oh {
                for ox in 0..ow {
                    let src = &cols[(n * oh * ow + oy * ow + ox) * row + c * k * k..][..k * k];
                    for ky in 0..k {
                        for kx in 0..k {
                            if let Some((iy, ix)) = p.source(oy, ox, ky, kx) {
                                dst[iy * p.w + ix] += src[ky * k + kx];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, p.channels, p.h, p.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// `conv2d(x, weight)` (no bias) for f32 on the CPU: `x` `[B, C, H, W]`, `weight`
/// `[C_out, C, k, k]`. The patch matrix lives only inside each pass: the backward builds it again
/// from `x` rather than keeping it (nine times the input for a 3x3 kernel) from the forward.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, c_w, k, k2) = weight.dims4()?;
    if c_w != c || k != k2 {
        candle_core::bail!("conv2d: input {:?} and weight {:?} do not fit", x.dims(), weight.dims());
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, ConvOp { stride, padding, dilation })
}

#[derive(Debug, Clone, Copy)]
struct ConvOp {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl ConvOp {
    fn patches(&self, x: &Tensor, weight: &Tensor) -> Result<Patches> {
        let (_, c, h, w) = x.dims4()?;
        Ok(Patches {
            kernel: weight.dim(2)?,
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            channels: c,
            h,
            w,
        })
    }

    /// `[B·Ho·Wo, C·k·k]`: the patches of `x` (its pixels for a plain 1x1 convolution).
    fn cols(&self, x: &Tensor, p: &Patches) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if p.kernel == 1 && p.stride == 1 && p.padding == 0 {
            return x.permute((0, 2, 3, 1))?.reshape((b * h * w, c));
        }
        let (oh, ow) = p.out_hw();
        x.apply_op1(Im2Col(*p))?.reshape((b * oh * ow, p.row_len()))
    }

    fn forward(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let p = self.patches(x, weight)?;
        let (b, c_out) = (x.dim(0)?, weight.dim(0)?);
        let (oh, ow) = p.out_hw();
        let y = self.cols(x, &p)?.matmul(&weight.reshape((c_out, p.row_len()))?.t()?)?;
        y.reshape((b, oh * ow, c_out))?.transpose(1, 2)?.contiguous()?.reshape((b, c_out, oh, ow))
    }
}

fn cpu_tensor(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<Tensor> {
    Tensor::from_slice(f32_slice(storage, layout, op)?, layout.shape(), &candle_core::Device::Cpu)
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(&cpu_tensor(s1, l1, "conv2d")?, &cpu_tensor(s2, l2, "conv2d")?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    /// `∂W = gᵀ · cols(x)`, `∂x = col2im(g · W)`, with `g` the output gradient as
    /// `[B·Ho·Wo, C_out]`: two GEMMs, built from differentiable ops.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let p = self.patches(x, weight)?;
        let (b, c, h, w) = x.dims4()?;
        let c_out = weight.dim(0)?;
        let (oh, ow) = p.out_hw();
        let g = grad.permute((0, 2, 3, 1))?.reshape((b * oh * ow, c_out))?;
        let grad_w = g.t()?.matmul(&self.cols(x, &p)?)?.reshape(weight.shape())?;
        let grad_cols = g.matmul(&weight.reshape((c_out, p.row_len()))?)?;
        let grad_x = if p.kernel == 1 && p.stride == 1 && p.padding == 0 {
            grad_cols.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?
        } else {
            grad_cols.reshape((b, oh * ow, p.row_len()))?.apply_op1(Col2Im(p))?
        };
        Ok((Some(grad_x), Some(grad_w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// Forward and both gradients equal Candle's own convolution (which also checks the
    /// gradients: its backward is tested upstream), for every geometry the networks use.
    #[test]
    fn equals_candles_conv2d_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // (C, C_out, k, stride, padding, dilation, H, W)
        let cases = [
            (3, 4, 3, 1, 1, 1, 9, 9),
            (3, 4, 3, 2, 1, 1, 10, 12),
            (4, 5, 1, 1, 0, 1, 6, 7),
            (4, 5, 1, 2, 0, 1, 8, 8),
            (3, 2, 7, 2, 3, 1, 14, 14),
            (2, 3, 3, 1, 2, 2, 9, 11),
            (2, 3, 3, 1, 4, 4, 9, 9),
        ];
        for (i, &(c, c_out, k, s, p, d, h, w)) in cases.iter().enumerate() {
            let x = Var::from_tensor(&Tensor::from_vec(values(2 * c * h * w, i), (2, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::from_vec(values(c_out * c * k * k, i + 50), (c_out, c, k, k), &dev)?)?;
            let ours = conv2d(&x, &wt, s, p, d)?;
            let theirs = x.conv2d(&wt, p, s, d, 1)?;
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            let r = Tensor::from_vec(values(ours.elem_count(), i + 99), ours.shape(), &dev)?;
            let g_ours = (&ours * &r)?.sum_all()?.backward()?;
            let g_theirs = (&theirs * &r)?.sum_all()?.backward()?;
            let max_diff =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            assert!(max_diff(&ours, &theirs)? < 1e-4, "case {i}: forward");
            for (name, v) in [("x", &x), ("w", &wt)] {
                let diff = max_diff(g_ours.get(v).expect("ours"), g_theirs.get(v).expect("theirs"))?;
                assert!(diff < 1e-3, "case {i}: gradient of {name} differs by {diff}");
            }
        }
        Ok(())
    }
}

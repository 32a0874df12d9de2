//! Resampling as separable matrices: bilinear resize and adaptive / windowed average pooling.
//!
//! Candle's `upsample_bilinear2d` has no backward and adaptive pooling does not exist, so every
//! resampling here is `y = A_h · x · A_wᵀ` with a per-axis matrix built on the host. On the CPU
//! (f32) that is one op (`Resample`) over the matrices' few nonzero taps, whose gradient
//! `A_hᵀ · ∂y · A_w` is the same op with the matrices transposed (so it differentiates any number
//! of times) and which, unlike a matmul's backward, computes no gradient for the fixed matrices;
//! elsewhere it is two matmuls, differentiable (twice) on every device. Both reproduce
//! PyTorch's coordinates exactly:
//! - bilinear, `align_corners = true`: `src = dst · (in − 1) / (out − 1)` (0 when `out == 1`);
//! - bilinear, `align_corners = false`: `src = max((dst + 0.5) · in / out − 0.5, 0)`, no antialias;
//! - adaptive average pooling: bin `i` of `b` covers `[floor(i·L/b), ceil((i+1)·L/b))`;
//! - average pooling (padding 0, ceil mode): window `i` covers `[i·s, min(i·s + k, L))` and is
//!   divided by the number of elements inside the map, as `F.avg_pool2d(.., ceil_mode=True)` does.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A `[out, in]` matrix that maps one axis of length `in` to `out` samples, by its nonzero taps:
/// row `o` is `Σ w · x[i]` over `rows[o]`'s `(i, w)`, each `i` once.
#[derive(Debug, Clone)]
struct AxisMatrix {
    rows: Vec<Vec<(usize, f32)>>,
    n_in: usize,
}

impl AxisMatrix {
    /// From taps that may name an input twice (a clamped bilinear edge): those are summed.
    fn new(taps: Vec<Vec<(usize, f64)>>, n_in: usize) -> Self {
        let rows = taps
            .into_iter()
            .map(|taps| {
                let mut row: Vec<(usize, f32)> = Vec::with_capacity(taps.len());
                for (i, w) in taps {
                    match row.iter_mut().find(|(j, _)| *j == i) {
                        Some((_, sum)) => *sum += w as f32,
                        None => row.push((i, w as f32)),
                    }
                }
                row
            })
            .collect();
        Self { rows, n_in }
    }

    fn transpose(&self) -> Self {
        let mut rows = vec![Vec::new(); self.n_in];
        for (o, row) in self.rows.iter().enumerate() {
            for &(i, w) in row {
                rows[i].push((o, w));
            }
        }
        Self { rows, n_in: self.rows.len() }
    }

    fn dense(&self, dev: &candle_core::Device) -> Result<Tensor> {
        let mut m = vec![0f32; self.rows.len() * self.n_in];
        for (o, row) in self.rows.iter().enumerate() {
            for &(i, w) in row {
                m[o * self.n_in + i] = w;
            }
        }
        Tensor::from_vec(m, (self.rows.len(), self.n_in), dev)
    }
}

/// `[B, C, H, W] -> [B, C, OH, OW]`: `y = A_h · x · A_wᵀ` per plane, the matrices fixed.
#[derive(Debug, Clone)]
struct Resample {
    a_h: Arc<AxisMatrix>,
    a_w: Arc<AxisMatrix>,
}

impl CustomOp1 for Resample {
    fn name(&self) -> &'static str {
        "resample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32(storage, layout, "resample")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (self.a_h.rows.len(), self.a_w.rows.len());
        let mut y = vec![0f32; b * c * oh * ow];
        y.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(y, x)| {
            // Along the rows first (`[H, OW]`), then down the columns.
            let mut rows = vec![0f32; h * ow];
            for (x, out) in x.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
                for (v, taps) in out.iter_mut().zip(&self.a_w.rows) {
                    *v = taps.iter().map(|&(i, a)| a * x[i]).sum();
                }
            }
            for (out, taps) in y.chunks_exact_mut(ow).zip(&self.a_h.rows) {
                for &(i, a) in taps {
                    out.iter_mut().zip(&rows[i * ow..][..ow]).for_each(|(v, &r)| *v += a * r);
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    /// `∂x = A_hᵀ · ∂y · A_w`: this op with the matrices transposed.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = Resample { a_h: Arc::new(self.a_h.transpose()), a_w: Arc::new(self.a_w.transpose()) };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

/// Bilinear interpolation taps for one axis, in PyTorch's coordinates.
fn bilinear_taps(n_in: usize, n_out: usize, align_corners: bool) -> Vec<Vec<(usize, f64)>> {
    (0..n_out)
        .map(|o| {
            let src = if align_corners {
                if n_out > 1 { o as f64 * (n_in as f64 - 1.0) / (n_out as f64 - 1.0) } else { 0.0 }
            } else {
                ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let frac = src - i0 as f64;
            vec![(i0, 1.0 - frac), (i1, frac)]
        })
        .collect()
}

/// Uniform-average taps over the windows `[start, end)`.
fn window_taps(windows: impl Iterator<Item = (usize, usize)>) -> Vec<Vec<(usize, f64)>> {
    windows
        .map(|(s, e)| {
            let w = 1.0 / (e - s) as f64;
            (s..e).map(|i| (i, w)).collect()
        })
        .collect()
}

/// `[B, C, H, W] -> [B, C, OH, OW]` through `a_h: [OH, H]` and `a_w: [OW, W]`.
fn separable(x: &Tensor, a_h: AxisMatrix, a_w: AxisMatrix) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Resample { a_h: Arc::new(a_h), a_w: Arc::new(a_w) });
    }
    separable_matmuls(x, &a_h, &a_w)
}

/// [`separable`] as two matmuls, on any device and dtype.
fn separable_matmuls(x: &Tensor, a_h: &AxisMatrix, a_w: &AxisMatrix) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let a_h = a_h.dense(x.device())?.to_dtype(x.dtype())?;
    let a_w = a_w.dense(x.device())?.to_dtype(x.dtype())?;
    // [B, C, H, W] x [W, OW] -> [B, C, H, OW]
    let y = x.broadcast_matmul(&a_w.t()?)?;
    // [OH, H] x [B, C, H, OW] -> [B, C, OH, OW]
    a_h.broadcast_left((b, c))?.contiguous()?.matmul(&y.contiguous()?)
}

/// Bilinear resize of `[B, C, H, W]` to `size = (OH, OW)`, up or down, with PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=..)` coordinates.
pub fn resize_bilinear(x: &Tensor, size: (usize, usize), align_corners: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == size {
        return Ok(x.clone());
    }
    if h == 0 || w == 0 || size.0 == 0 || size.1 == 0 {
        candle_core::bail!("resize_bilinear: cannot resize {h}x{w} to {}x{}", size.0, size.1);
    }
    let a_h = AxisMatrix::new(bilinear_taps(h, size.0, align_corners), h);
    let a_w = AxisMatrix::new(bilinear_taps(w, size.1, align_corners), w);
    separable(x, a_h, a_w)
}

/// PyTorch's adaptive average pooling of `[B, C, H, W]` to `bins = (BH, BW)`.
pub fn adaptive_avg_pool2d(x: &Tensor, bins: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if bins.0 == 0 || bins.1 == 0 || bins.0 > h || bins.1 > w {
        candle_core::bail!("adaptive_avg_pool2d: {}x{} bins on a {h}x{w} map", bins.0, bins.1);
    }
    let edges = |len: usize, b: usize| (0..b).map(move |i| (i * len / b, ((i + 1) * len).div_ceil(b)));
    let a_h = AxisMatrix::new(window_taps(edges(h, bins.0)), h);
    let a_w = AxisMatrix::new(window_taps(edges(w, bins.1)), w);
    separable(x, a_h, a_w)
}

/// Average pooling with padding 0 and `ceil_mode = true` (the paper's node aggregation).
pub fn avg_pool2d_ceil(x: &Tensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let oh = super::pool::pool_out_size(h, kernel.0, stride.0, 0, true)?;
    let ow = super::pool::pool_out_size(w, kernel.1, stride.1, 0, true)?;
    let windows = |n: usize, k: usize, s: usize, len: usize| (0..n).map(move |i| (i * s, (i * s + k).min(len)));
    let a_h = AxisMatrix::new(window_taps(windows(oh, kernel.0, stride.0, h)), h);
    let a_w = AxisMatrix::new(window_taps(windows(ow, kernel.1, stride.1, w)), w);
    separable(x, a_h, a_w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The CPU op equals the two matmuls it stands for, in value, gradient and the gradient's
    /// gradient, for each kind of matrix (bilinear up and down in both coordinate modes, adaptive
    /// and ceil-mode windows); the matrices get no gradient.
    #[test]
    fn cpu_op_equals_the_matmuls() -> Result<()> {
        let dev = Device::Cpu;
        let (h, w) = (7, 9);
        let cases: Vec<(&str, AxisMatrix, AxisMatrix)> = vec![
            (
                "up, corners",
                AxisMatrix::new(bilinear_taps(h, 17, true), h),
                AxisMatrix::new(bilinear_taps(w, 20, true), w),
            ),
            ("down", AxisMatrix::new(bilinear_taps(h, 3, false), h), AxisMatrix::new(bilinear_taps(w, 4, false), w)),
            (
                "adaptive",
                AxisMatrix::new(window_taps((0..3).map(|i| (i * h / 3, ((i + 1) * h).div_ceil(3)))), h),
                AxisMatrix::new(window_taps((0..6).map(|i| (i * w / 6, ((i + 1) * w).div_ceil(6)))), w),
            ),
            (
                "ceil windows",
                AxisMatrix::new(window_taps((0..3).map(|i| (i * 3, (i * 3 + 3).min(h)))), h),
                AxisMatrix::new(window_taps((0..5).map(|i| (i * 2, (i * 2 + 3).min(w)))), w),
            ),
        ];
        for (name, a_h, a_w) in cases {
            let x =
                Var::from_tensor(&Tensor::arange(0f32, (2 * 3 * h * w) as f32, &dev)?.sin()?.reshape((2, 3, h, w))?)?;
            let op = x.as_tensor().apply_op1(Resample { a_h: Arc::new(a_h.clone()), a_w: Arc::new(a_w.clone()) })?;
            let mm = separable_matmuls(x.as_tensor(), &a_h, &a_w)?;
            let r = Tensor::arange(0f32, op.elem_count() as f32, &dev)?.cos()?.reshape(op.shape())?;
            let max_diff =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            assert!(max_diff(&op, &mm)? < 1e-5, "{name}: forward");
            // ∂x of <y², r>, then of <∂x², 1> (second order, as the WGAN-GP penalty differentiates).
            let grads = |y: &Tensor| -> Result<(Tensor, Tensor)> {
                let g = (y.sqr()? * &r)?.sum_all()?.backward()?.remove(x.as_tensor()).expect("gradient");
                let gg = g.sqr()?.sum_all()?.backward()?.remove(x.as_tensor());
                Ok((g, gg.expect("second-order gradient")))
            };
            let ((g_op, gg_op), (g_mm, gg_mm)) = (grads(&op)?, grads(&mm)?);
            assert!(max_diff(&g_op, &g_mm)? < 1e-4, "{name}: gradient");
            assert!(max_diff(&gg_op, &gg_mm)? < 1e-4, "{name}: second-order gradient");
        }
        Ok(())
    }

    #[test]
    fn align_corners_false_downscale_matches_pytorch_coordinates() -> Result<()> {
        // F.interpolate(torch.arange(4.).view(1,1,1,4), size=(1,2), mode="bilinear",
        // align_corners=False) == [[0.5, 2.5]]
        let x = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        let y = resize_bilinear(&x, (1, 2), false)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0.5, 2.5]);
        Ok(())
    }

    #[test]
    fn identity_size_is_a_no_op() -> Result<()> {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((1, 1, 2, 3))?;
        let y = resize_bilinear(&x, (2, 3), true)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

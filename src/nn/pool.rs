//! Max pooling with any kernel, stride, padding and PyTorch's `ceil_mode`, with a backward.
//!
//! Candle's `max_pool2d_with_stride` has a backward only when kernel == stride and takes no
//! padding; the ResNet stem needs 3x3/s2/p1/ceil and the pair-wise term needs kernel = stride
//! with a ceil-mode partial last window. Here every window is laid out along a last axis
//! (`[B, C, OH, OW, K]`), the maximum is taken with `argmax` + `gather`, and `gather`'s backward
//! sends the whole gradient to the **first** maximal element of each window in row-major
//! order, exactly as PyTorch's kernel does (candle's `max` would copy it to every tied element).
//! Padding is `-inf`, so it never wins. On the CPU (f32) one pass does it instead (the views
//! and their stacking cost 12% of an inference), with the same first-maximum rule backward
//! (first-order only).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

/// Output length of PyTorch max/avg pooling (dilation 1), including the ceil-mode rule that
/// drops a last window starting inside the right padding.
pub fn pool_out_size(len: usize, kernel: usize, stride: usize, padding: usize, ceil_mode: bool) -> Result<usize> {
    if kernel == 0 || stride == 0 {
        candle_core::bail!("pooling needs kernel and stride >= 1, got kernel {kernel}, stride {stride}");
    }
    if 2 * padding > kernel {
        candle_core::bail!("pooling padding {padding} must be at most half the kernel {kernel}");
    }
    let span = len + 2 * padding;
    if span < kernel {
        candle_core::bail!("pooling kernel {kernel} is larger than the padded input {span}");
    }
    let num = span - kernel;
    let mut out = if ceil_mode { num.div_ceil(stride) + 1 } else { num / stride + 1 };
    if ceil_mode && (out - 1) * stride >= len + padding {
        out -= 1;
    }
    Ok(out)
}

/// Per output row and per output column, the input rows or columns its window covers.
type Windows = (Vec<std::ops::Range<usize>>, Vec<std::ops::Range<usize>>);

/// `nn.MaxPool2d(kernel, stride, padding, ceil_mode=..)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    ceil_mode: bool,
}

impl MaxPool2d {
    pub fn new(kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize), ceil_mode: bool) -> Self {
        Self { kernel, stride, padding, ceil_mode }
    }

    /// Output `(OH, OW)` for an `h x w` input.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        Ok((
            pool_out_size(h, self.kernel.0, self.stride.0, self.padding.0, self.ceil_mode)?,
            pool_out_size(w, self.kernel.1, self.stride.1, self.padding.1, self.ceil_mode)?,
        ))
    }
}

/// Pads `x` along `dim` with `before` and `after` entries of `-inf`.
fn pad_neg_inf(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let mut dims = x.dims().to_vec();
    if before > 0 {
        dims[dim] = before;
        parts.push(Tensor::full(f32::NEG_INFINITY, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if after > 0 {
        dims[dim] = after;
        parts.push(Tensor::full(f32::NEG_INFINITY, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    Tensor::cat(&parts, dim)
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            return x.contiguous()?.apply_op1(*self);
        }
        self.forward_views(x)
    }
}

impl MaxPool2d {
    /// Candle's ops: the windows as strided views, `argmax` + `gather` (any device).
    fn forward_views(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (oh, ow) = self.output_hw(h, w)?;
        let ((kh, kw), (sh, sw), (ph, pw)) = (self.kernel, self.stride, self.padding);
        // Enough rows/cols for every window and for the strided views below.
        let hp = (ph + h).max(sh * oh + kh - 1);
        let wp = (pw + w).max(sw * ow + kw - 1);
        let xp = pad_neg_inf(x, 2, ph, hp - ph - h)?;
        let xp = pad_neg_inf(&xp, 3, pw, wp - pw - w)?;
        let windows = if (kh, kw) == (sh, sw) {
            // Non-overlapping windows: a reshape. [B, C, OH*KH, OW*KW] -> [B, C, OH, OW, KH*KW]
            xp.narrow(2, 0, oh * kh)?
                .narrow(3, 0, ow * kw)?
                .reshape((b, c, oh, kh, ow, kw))?
                .permute((0, 1, 2, 4, 3, 5))?
                .reshape((b, c, oh, ow, kh * kw))?
        } else {
            // One strided view per kernel offset (dy, dx), row-major: [B, C, OH, OW] each.
            let mut views = Vec::with_capacity(kh * kw);
            for dy in 0..kh {
                for dx in 0..kw {
                    // [B, C, OH*SH, OW*SW] -> [B, C, OH, SH, OW, SW] -> element 0 of each stride
                    let v = xp
                        .narrow(2, dy, oh * sh)?
                        .narrow(3, dx, ow * sw)?
                        .reshape((b, c, oh, sh, ow, sw))?
                        .narrow(3, 0, 1)?
                        .narrow(5, 0, 1)?
                        .reshape((b, c, oh, ow))?;
                    views.push(v);
                }
            }
            Tensor::stack(&views, 4)?
        };
        let first_max = windows.argmax_keepdim(D::Minus1)?;
        windows.contiguous()?.gather(&first_max, D::Minus1)?.squeeze(D::Minus1)
    }

    /// One `H x W` plane's (`w` wide) window maxima into `out` (`OH x OW`, the windows as
    /// [`Self::windows`] gives them): first every input row's maxima over the windows' columns
    /// (into `rows`), then every window's over its rows. The values
    /// [`Self::for_each_window`]'s first maxima have (a maximum is one in any order, though a
    /// zero maximum may come out with the other sign; NaN is passed over alike, and a window of
    /// NaN only stays NaN), with no branch per value: the stem's pool in a 256x512 inference
    /// took 11.5 ms window by window, 4.4–5.3 ms so.
    fn max_plane(x: &[f32], w: usize, (ys, xs): &Windows, out: &mut [f32], rows: &mut Vec<f32>) {
        let ow = xs.len();
        rows.clear();
        rows.resize(x.len() / w * ow, 0.0);
        for (src, dst) in x.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
            for (d, cols) in dst.iter_mut().zip(xs) {
                *d = match src[cols.clone()] {
                    // The stem's windows: three columns, unrolled.
                    [a, b, c] => a.max(b).max(c),
                    ref window => window[1..].iter().fold(window[0], |m, &v| m.max(v)),
                };
            }
        }
        for (dst, window_rows) in out.chunks_exact_mut(ow).zip(ys) {
            dst.copy_from_slice(&rows[window_rows.start * ow..][..ow]);
            for row in rows[(window_rows.start + 1) * ow..window_rows.end * ow].chunks_exact(ow) {
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = d.max(v);
                }
            }
        }
    }

    /// The input rows and columns each output row and column's window covers, clipped to an
    /// `h x w` input.
    fn windows(&self, h: usize, w: usize) -> Result<Windows> {
        let (oh, ow) = self.output_hw(h, w)?;
        let span = |o: usize, k: usize, s: usize, p: usize, n: usize| {
            (o * s).saturating_sub(p)..(o * s + k).saturating_sub(p).min(n)
        };
        let ((kh, kw), (sh, sw), (ph, pw)) = (self.kernel, self.stride, self.padding);
        Ok(((0..oh).map(|o| span(o, kh, sh, ph, h)).collect(), (0..ow).map(|o| span(o, kw, sw, pw, w)).collect()))
    }

    /// For one `H x W` plane, calls `f(output index, input index of the window's first maximum)`
    /// for every window.
    fn for_each_window(&self, x: &[f32], (h, w): (usize, usize), mut f: impl FnMut(usize, usize)) -> Result<()> {
        let (rows, cols) = self.windows(h, w)?;
        for (oy, ys) in rows.iter().enumerate() {
            for (ox, xs) in cols.iter().enumerate() {
                let (mut best, mut at) = (f32::NEG_INFINITY, ys.start * w + xs.start);
                for iy in ys.clone() {
                    for ix in xs.clone() {
                        if x[iy * w + ix] > best {
                            (best, at) = (x[iy * w + ix], iy * w + ix);
                        }
                    }
                }
                f(oy * cols.len() + ox, at);
            }
        }
        Ok(())
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32(storage, layout, "max-pool")?;
        let &[b, c, h, w] = layout.dims() else {
            candle_core::bail!("max-pool: expects [B, C, H, W], got {:?}", layout.dims())
        };
        let windows = self.windows(h, w)?;
        let (oh, ow) = (windows.0.len(), windows.1.len());
        let mut y = vec![0f32; b * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each_init(Vec::new, |rows, (dst, plane)| Self::max_plane(plane, w, &windows, dst, rows));
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad(*self))?))
    }
}

/// `(x, ∂y) -> ∂x`: each window's gradient to its first maximum.
struct MaxPoolGrad(MaxPool2d);

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool2d-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (super::cpu_f32(s1, l1, "max-pool")?, super::cpu_f32(s2, l2, "max-pool")?);
        let &[_, _, h, w] = l1.dims() else {
            candle_core::bail!("max-pool: expects [B, C, H, W], got {:?}", l1.dims())
        };
        let (oh, ow) = self.0.output_hw(h, w)?;
        let mut dx = vec![0f32; x.len()];
        let planes = dx.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(grad.par_chunks(oh * ow));
        planes.try_for_each(|((dst, plane), g)| self.0.for_each_window(plane, (h, w), |o, at| dst[at] += g[o]))?;
        Ok((CpuStorage::F32(dx), Shape::from(l1.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn out_size_follows_pytorch_ceil_rule() -> Result<()> {
        assert_eq!(pool_out_size(65, 32, 32, 0, true)?, 3);
        assert_eq!(pool_out_size(64, 32, 32, 0, true)?, 2);
        assert_eq!(pool_out_size(34, 3, 2, 1, true)?, 18);
        assert_eq!(pool_out_size(33, 3, 2, 1, true)?, 17);
        // 256 -> 129 after the stem conv; the pool gives 65 (a 512 crop's 65x65 logits).
        assert_eq!(pool_out_size(256, 3, 2, 1, true)?, 129);
        assert!(pool_out_size(2, 3, 1, 0, true).is_err());
        Ok(())
    }

    /// The one-pass CPU op equals the views path, forward and backward, ties included, for the
    /// stem's 3x3/s2/p1 (ceil and floor) and the pair-wise term's ceil-mode kernel = stride.
    #[test]
    fn cpu_op_equals_the_views_path() -> Result<()> {
        let dev = Device::Cpu;
        // Few distinct values: many ties.
        let values: Vec<f32> = (0..2 * 3 * 11 * 9).map(|i| ((i * 37 % 11) as f32 / 2.0).floor()).collect();
        let x = Var::from_tensor(&Tensor::from_vec(values, (2, 3, 11, 9), &dev)?)?;
        for pool in [
            MaxPool2d::new((3, 3), (2, 2), (1, 1), true),
            MaxPool2d::new((3, 3), (2, 2), (1, 1), false),
            MaxPool2d::new((4, 4), (4, 4), (0, 0), true),
            MaxPool2d::new((2, 3), (2, 3), (1, 1), true),
        ] {
            let ours = pool.forward(&x)?;
            let theirs = pool.forward_views(&x)?;
            assert_eq!(ours.flatten_all()?.to_vec1::<f32>()?, theirs.flatten_all()?.to_vec1::<f32>()?, "{pool:?}");
            let r = Tensor::arange(0f32, ours.elem_count() as f32, &dev)?.reshape(ours.shape())?;
            let g_ours = (&ours * &r)?.sum_all()?.backward()?;
            let g_theirs = (&theirs * &r)?.sum_all()?.backward()?;
            let (a, b) = (g_ours.get(&x).expect("ours"), g_theirs.get(&x).expect("theirs"));
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?, "{pool:?}");
        }
        Ok(())
    }

    /// The forward's row-then-column maxima equal the values at the first maxima the backward
    /// finds, with NaN among the values (passed over, and kept where a window has only NaN).
    #[test]
    fn forward_maxima_are_the_first_maxima_values() -> Result<()> {
        let (h, w) = (7, 10);
        let mut x: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 11) as f32 / 2.0).floor() - 2.0).collect();
        for i in [0, 1, 10, 11, 23, 45, 68] {
            x[i] = f32::NAN;
        }
        for pool in [MaxPool2d::new((3, 3), (2, 2), (1, 1), true), MaxPool2d::new((2, 2), (2, 2), (0, 0), true)] {
            let (oh, ow) = pool.output_hw(h, w)?;
            let mut got = vec![0f32; oh * ow];
            MaxPool2d::max_plane(&x, w, &pool.windows(h, w)?, &mut got, &mut Vec::new());
            let mut want = vec![0f32; oh * ow];
            pool.for_each_window(&x, (h, w), |o, at| want[o] = x[at])?;
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{pool:?}"
            );
            assert!(got[0].is_nan(), "{pool:?}: the all-NaN window (x[0, 1, 10, 11])");
        }
        Ok(())
    }

    #[test]
    fn tied_maxima_send_the_gradient_to_the_first_only() -> Result<()> {
        // A window of equal values (ReLU zeros): torch.max_pool2d's backward credits the first.
        let x = Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?)?;
        let y = MaxPool2d::new((2, 2), (2, 2), (0, 0), true).forward(&x)?;
        let g = y.sum_all()?.backward()?;
        let gx = g.get(&x).expect("grad").flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(gx, vec![1.0, 0.0, 0.0, 0.0]);
        Ok(())
    }
}

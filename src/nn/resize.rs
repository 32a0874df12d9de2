//! Resampling as separable matrices: bilinear resize and adaptive / windowed average pooling.
//!
//! Candle's `upsample_bilinear2d` has no backward and adaptive pooling does not exist, so every
//! resampling here is `y = A_h · x · A_wᵀ` with a per-axis matrix built on the host. Matmul is
//! differentiable (twice), runs on every device, and reproduces PyTorch's coordinates exactly:
//! - bilinear, `align_corners = true`: `src = dst · (in − 1) / (out − 1)` (0 when `out == 1`);
//! - bilinear, `align_corners = false`: `src = max((dst + 0.5) · in / out − 0.5, 0)`, no antialias;
//! - adaptive average pooling: bin `i` of `b` covers `[floor(i·L/b), ceil((i+1)·L/b))`;
//! - average pooling (padding 0, ceil mode): window `i` covers `[i·s, min(i·s + k, L))` and is
//!   divided by the number of elements inside the map, as `F.avg_pool2d(.., ceil_mode=True)` does.

use candle_core::{Device, Result, Tensor};

/// A `[out, in]` matrix that maps one axis of length `in` to `out` samples.
fn axis_matrix(rows: Vec<Vec<(usize, f64)>>, n_in: usize, dev: &Device) -> Result<Tensor> {
    let n_out = rows.len();
    let mut m = vec![0f32; n_out * n_in];
    for (o, taps) in rows.iter().enumerate() {
        for &(i, w) in taps {
            m[o * n_in + i] += w as f32;
        }
    }
    Tensor::from_vec(m, (n_out, n_in), dev)
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
fn separable(x: &Tensor, a_h: &Tensor, a_w: &Tensor) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let a_h = a_h.to_dtype(x.dtype())?;
    let a_w = a_w.to_dtype(x.dtype())?;
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
    let dev = x.device();
    let a_h = axis_matrix(bilinear_taps(h, size.0, align_corners), h, dev)?;
    let a_w = axis_matrix(bilinear_taps(w, size.1, align_corners), w, dev)?;
    separable(x, &a_h, &a_w)
}

/// PyTorch's adaptive average pooling of `[B, C, H, W]` to `bins = (BH, BW)`.
pub fn adaptive_avg_pool2d(x: &Tensor, bins: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if bins.0 == 0 || bins.1 == 0 || bins.0 > h || bins.1 > w {
        candle_core::bail!("adaptive_avg_pool2d: {}x{} bins on a {h}x{w} map", bins.0, bins.1);
    }
    let edges = |len: usize, b: usize| (0..b).map(move |i| (i * len / b, ((i + 1) * len).div_ceil(b)));
    let dev = x.device();
    let a_h = axis_matrix(window_taps(edges(h, bins.0)), h, dev)?;
    let a_w = axis_matrix(window_taps(edges(w, bins.1)), w, dev)?;
    separable(x, &a_h, &a_w)
}

/// Average pooling with padding 0 and `ceil_mode = true` (the paper's node aggregation).
pub fn avg_pool2d_ceil(x: &Tensor, kernel: (usize, usize), stride: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let oh = super::pool::pool_out_size(h, kernel.0, stride.0, 0, true)?;
    let ow = super::pool::pool_out_size(w, kernel.1, stride.1, 0, true)?;
    let windows = |n: usize, k: usize, s: usize, len: usize| (0..n).map(move |i| (i * s, (i * s + k).min(len)));
    let dev = x.device();
    let a_h = axis_matrix(window_taps(windows(oh, kernel.0, stride.0, h)), h, dev)?;
    let a_w = axis_matrix(window_taps(windows(ow, kernel.1, stride.1, w)), w, dev)?;
    separable(x, &a_h, &a_w)
}

#[cfg(test)]
mod tests {
    use super::*;

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

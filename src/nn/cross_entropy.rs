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
//!
//! Both passes take 16 pixels at a time (a class's logits of adjacent pixels lie adjacent), with
//! `exp` and `ln` as polynomials in the lanes, within 1 ulp of libm's scalar ones. On the
//! `[2, 19, 128, 128]` logits of a 128² step (medians of 40 calls, three alternated runs against
//! the pixel-by-pixel version with libm): forward 2.9–3.4 → 0.62–0.75 ms, backward with Candle's
//! gradient bookkeeping 3.7–4.3 → 1.3–1.6 ms. Each pass keeps its portable and AVX-512 entry
//! points apart (as `sgemm`'s kernels do): one generic AVX-512 wrapper around a closure left the
//! loops unvectorised (forward 1.1–1.5 ms against 0.76–0.83, three alternated runs).

use super::cpu_f32;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use candle_nn::ops::log_softmax;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// Pixels of one image a task takes: `(image, first pixel, pixels)`.
type Span = (usize, usize, usize);

impl CrossEntropy {
    fn inputs<'a>(&self, s1: &'a CpuStorage, l1: &Layout, s2: &'a CpuStorage, l2: &Layout) -> Result<Inputs<'a>> {
        let logits = cpu_f32(s1, l1, "cross-entropy")?;
        let (CpuStorage::U32(labels), Some((start, end))) = (s2, l2.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: labels must be contiguous u32")
        };
        let labels = &labels[start..end];
        // One sequential pass: a map's labels are few (one per pixel), and waking the pool for them
        // took longer than the pass.
        if let Some(&bad) = labels.iter().find(|&&l| l != self.ignore && l as usize >= self.classes) {
            candle_core::bail!(
                "cross-entropy: label {bad} is not one of {} classes (nor ignored, {})",
                self.classes,
                self.ignore
            )
        }
        Ok((logits, labels, labels.len() / l1.dims()[0]))
    }

    /// The tasks: each image's pixels in runs of [`CHUNK`].
    fn spans(images: usize, plane: usize) -> Vec<Span> {
        (0..images).flat_map(|n| (0..plane).step_by(CHUNK).map(move |s| (n, s, CHUNK.min(plane - s)))).collect()
    }

    /// Valid pixels, at least 1.
    fn count(&self, labels: &[u32]) -> f64 {
        (labels.iter().filter(|&&l| l != self.ignore).count() as f64).max(1.0)
    }

    /// `Σ (x[label] − max − ln Σ exp(x − max))` over the valid pixels of `span`.
    fn picked(&self, logits: &[f32], labels: &[u32], plane: usize, span: Span) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 is present.
            return unsafe { self.picked_avx512(logits, labels, plane, span) };
        }
        self.picked_lanes(logits, labels, plane, span)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn picked_avx512(&self, logits: &[f32], labels: &[u32], plane: usize, span: Span) -> f64 {
        self.picked_lanes(logits, labels, plane, span)
    }

    #[inline(always)]
    fn picked_lanes(&self, logits: &[f32], labels: &[u32], plane: usize, (n, first, pixels): Span) -> f64 {
        let image = &logits[n * self.classes * plane..][..self.classes * plane];
        let labels = &labels[n * plane..][..plane];
        let mut exps = vec![[0f32; LANES]; self.classes];
        let mut total = 0f64;
        for s in (first..first + pixels).step_by(LANES) {
            let len = LANES.min(first + pixels - s);
            let (max, mut log_sum) = softmax_lanes(image, plane, s, len, &mut exps);
            ln_lanes(&mut log_sum);
            for l in 0..len {
                let label = labels[s + l];
                if label != self.ignore {
                    total += ((image[label as usize * plane + s + l] - max[l]) - log_sum[l]) as f64;
                }
            }
        }
        total
    }
}

/// Pixels per vector block: the lanes of the exponentials, sums and logarithms.
const LANES: usize = 16;

/// Pixels `s..s + len` (`len ≤ LANES`) of one image's class planes (`plane` apart in `image`):
/// per lane the max over the classes and `Σ exp(x − max)`, each class's `exp(x − max)` left in
/// `exps` (lanes past `len` hold those of zeros). Candle's `log_softmax` in the same order.
#[inline(always)]
fn softmax_lanes(
    image: &[f32],
    plane: usize,
    s: usize,
    len: usize,
    exps: &mut [[f32; LANES]],
) -> ([f32; LANES], [f32; LANES]) {
    let mut max = [f32::NEG_INFINITY; LANES];
    for (k, x) in exps.iter_mut().enumerate() {
        let row = &image[k * plane + s..][..len];
        // A whole block as one fixed-size copy (a vector load); the last one padded.
        match <&[f32; LANES]>::try_from(row) {
            Ok(row) => *x = *row,
            Err(_) => {
                x.fill(0.0);
                x[..len].copy_from_slice(row);
            }
        }
        for l in 0..LANES {
            max[l] = max[l].max(x[l]);
        }
    }
    let mut sum = [0f32; LANES];
    for e in exps.iter_mut() {
        for l in 0..LANES {
            e[l] -= max[l];
        }
        exp_lanes(e);
        for l in 0..LANES {
            sum[l] += e[l];
        }
    }
    (max, sum)
}

/// `exp(x)` in 16 lanes, for the `x ≤ 0` of a softmax: `2^n · p(r)` with `x = n · ln 2 + r`,
/// `|r| ≤ ln 2 / 2` (Cody–Waite) and Cephes' `expf` polynomial; within 1 ulp of libm's `expf`
/// (the test). Below −87.3 (where `expf` turns subnormal, 1e-38 of the pixel's largest term,
/// 1) it gives `exp(−87.3)`.
#[inline(always)]
fn exp_lanes(x: &mut [f32; LANES]) {
    // Plain loops over the lanes: `array::map` is not inlined into the AVX-512 callers.
    for x in x.iter_mut() {
        let v = x.max(-87.3);
        // Round to nearest by the 1.5 · 2²³ trick (no rounding instruction before SSE4.1).
        // The rounded value's low bits are n itself: 2^n is built from them without a float to
        // integer conversion (which would not vectorise).
        const ROUND: f32 = 12_582_912.0;
        let t = v * std::f32::consts::LOG2_E + ROUND;
        let n = t - ROUND;
        let r = (v - n * 0.693_359_4) - n * -2.121_944_4e-4;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        // 2^n for the n ≥ −126 that v ≥ −87.3 gives.
        *x = y * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    }
}

/// `ln(x)` in 16 lanes for the sums `x ≥ 1` of a softmax: `x = m · 2^e` with `m` in
/// `[√½, √2)`, `ln m = 2 atanh((m − 1) / (m + 1))` to its fifth term; within 1 ulp of libm's
/// `logf` (the test).
#[inline(always)]
fn ln_lanes(x: &mut [f32; LANES]) {
    for x in x.iter_mut() {
        let bits = x.to_bits();
        let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
        let e = ((bits >> 23) & 0xff) as i32 - 127;
        let high = m > std::f32::consts::SQRT_2;
        let (m, e) = if high { (m * 0.5, e + 1) } else { (m, e) };
        let t = (m - 1.0) / (m + 1.0);
        let t2 = t * t;
        let series = 1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0))));
        *x = e as f32 * std::f32::consts::LN_2 + 2.0 * t * series;
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (logits, labels, plane) = self.inputs(s1, l1, s2, l2)?;
        let spans = Self::spans(l1.dims()[0], plane);
        let picked: f64 = spans.into_par_iter().map(|span| self.picked(logits, labels, plane, span)).sum();
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

impl CrossEntropyGrad {
    /// The gradient of `span`'s pixels into `out` (its run of each class plane, in class order).
    fn write(
        &self,
        logits: &[f32],
        labels: &[u32],
        plane: usize,
        span: Span,
        per_pixel: f32,
        out: Vec<&mut [MaybeUninit<f32>]>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 is present.
            return unsafe { self.write_avx512(logits, labels, plane, span, per_pixel, out) };
        }
        self.write_lanes(logits, labels, plane, span, per_pixel, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn write_avx512(
        &self,
        logits: &[f32],
        labels: &[u32],
        plane: usize,
        span: Span,
        per_pixel: f32,
        out: Vec<&mut [MaybeUninit<f32>]>,
    ) {
        self.write_lanes(logits, labels, plane, span, per_pixel, out)
    }

    #[inline(always)]
    fn write_lanes(
        &self,
        logits: &[f32],
        labels: &[u32],
        plane: usize,
        (n, first, pixels): Span,
        per_pixel: f32,
        mut out: Vec<&mut [MaybeUninit<f32>]>,
    ) {
        let ce = &self.loss;
        let image = &logits[n * ce.classes * plane..][..ce.classes * plane];
        let labels = &labels[n * plane..][..plane];
        let mut exps = vec![[0f32; LANES]; ce.classes];
        for s in (first..first + pixels).step_by(LANES) {
            let len = LANES.min(first + pixels - s);
            let (_, sum) = softmax_lanes(image, plane, s, len, &mut exps);
            let mut label = [ce.ignore; LANES];
            label[..len].copy_from_slice(&labels[s..s + len]);
            for (k, (e, dst)) in exps.iter().zip(out.iter_mut()).enumerate() {
                let mut values = [0f32; LANES];
                for l in 0..LANES {
                    let onehot = if label[l] as usize == k { 1.0 } else { 0.0 };
                    values[l] = if label[l] == ce.ignore { 0.0 } else { (e[l] / sum[l] - onehot) * per_pixel };
                }
                for (d, &v) in dst[s - first..][..len].iter_mut().zip(&values) {
                    d.write(v);
                }
            }
        }
    }
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ce = &self.loss;
        let (logits, labels, plane) = ce.inputs(s1, l1, s2, l2)?;
        let per_pixel = (self.scale as f64 / ce.count(labels)) as f32;
        let images = l1.dims()[0];
        let spans = CrossEntropy::spans(images, plane);
        // Each task writes its run of pixels in every class plane of its image; every value is
        // written (0 at ignored pixels), so the output starts uninitialised.
        let mut grad = Vec::with_capacity(logits.len());
        let runs_per_image = spans.len() / images.max(1);
        let mut outs: Vec<Vec<&mut [MaybeUninit<f32>]>> =
            spans.iter().map(|_| Vec::with_capacity(ce.classes)).collect();
        for (i, class_plane) in grad.spare_capacity_mut()[..logits.len()].chunks_mut(plane.max(1)).enumerate() {
            let n = i / ce.classes;
            for (j, run) in class_plane.chunks_mut(CHUNK).enumerate() {
                outs[n * runs_per_image + j].push(run);
            }
        }
        spans.into_par_iter().zip(outs).for_each(|(span, out)| self.write(logits, labels, plane, span, per_pixel, out));
        // SAFETY: the spans cover every pixel of every image, and each wrote its run of every
        // class plane in full.
        unsafe { grad.set_len(logits.len()) };
        Ok((CpuStorage::F32(grad), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The lane exponential and logarithm stay within 1 ulp of libm's over the range a softmax
    /// gives them (exponents of x ≤ 0, down to −87.3; logarithms of sums from 1 to ~1e6).
    #[test]
    fn lane_exp_and_ln_are_within_an_ulp_of_libm() {
        let ulps = |got: f32, want: f32| (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
        let mut worst = (0, 0);
        for i in 0..200_000 {
            let x: [f32; LANES] = std::array::from_fn(|l| -87.3 * ((i * LANES + l) as f32 / (200_000 * LANES) as f32));
            let mut got = x;
            exp_lanes(&mut got);
            for (got, &x) in got.into_iter().zip(&x) {
                worst.0 = worst.0.max(ulps(got, x.exp()));
            }
            let y: [f32; LANES] = std::array::from_fn(|l| 1.0 + ((i * LANES + l) as f32).powf(1.2) * 0.3);
            let mut got = y;
            ln_lanes(&mut got);
            for (got, &y) in got.into_iter().zip(&y) {
                worst.1 = worst.1.max(ulps(got, y.ln()));
            }
        }
        assert!(worst.0 <= 1 && worst.1 <= 1, "exp {} ulp, ln {} ulp", worst.0, worst.1);
    }

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

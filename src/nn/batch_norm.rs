//! `nn.BatchNorm2d` with the activation that follows it fused, for the CPU.
//!
//! Candle's training-mode BatchNorm is about ten element-wise passes forward (a transposed copy,
//! two means, subtract, square, divide, scale, shift, a transpose back that the next convolution
//! copies again) and more backward. Here a normalisation is three passes over the map forward
//! (per-channel mean, variance, then the normalised, scaled, shifted and activated output) and
//! two backward (per-channel sums of the gradient, then the input gradient). Elsewhere (CUDA,
//! other dtypes) Candle's own BatchNorm runs. The fused backward is first-order only: a network
//! differentiated twice (the critic) uses Candle's.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, ModuleT, Result, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, VarBuilder};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

/// What follows the normalisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// `max(z, 0) + slope · min(z, 0)` with `slope > 0`.
    LeakyRelu(f32),
}

impl Activation {
    fn apply(self, z: f32) -> f32 {
        match self {
            Self::Identity => z,
            Self::Relu => z.max(0.0),
            Self::LeakyRelu(slope) => {
                if z > 0.0 {
                    z
                } else {
                    slope * z
                }
            }
        }
    }

    /// The derivative where the output is not positive (1 above: every activation here keeps
    /// the sign, so the output tells the side); one select per value, which vectorises.
    fn derivative_below_zero(self) -> f32 {
        match self {
            Self::Identity => 1.0,
            Self::Relu => 0.0,
            Self::LeakyRelu(slope) => slope,
        }
    }

    fn on_tensor(self, z: Tensor) -> Result<Tensor> {
        match self {
            Self::Identity => Ok(z),
            Self::Relu => z.relu(),
            Self::LeakyRelu(slope) => candle_nn::ops::leaky_relu(&z, slope as f64),
        }
    }
}

/// `nn.BatchNorm2d`'s defaults: eps 1e-5, momentum 0.1, affine.
pub fn pytorch_config() -> BatchNormConfig {
    BatchNormConfig { eps: 1e-5, remove_mean: true, affine: true, momentum: 0.1 }
}

/// `nn.BatchNorm2d(channels)` ([`pytorch_config`]); keys `weight`, `bias`,
/// `running_mean`, `running_var`. Training mode normalises with the batch's statistics (biased
/// variance) and moves the running ones towards them (unbiased variance), as PyTorch does.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    inner: candle_nn::BatchNorm,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::batch_norm(channels, pytorch_config(), vb)?;
        // The running statistics are variables of the VarMap: these share their storage.
        let running_mean = Var::from_tensor(inner.running_mean())?;
        let running_var = Var::from_tensor(inner.running_var())?;
        Ok(Self { inner, running_mean, running_var })
    }

    /// `act(BN(x))` for `x` `[B, C, H, W]`.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4) {
            return act.on_tensor(self.inner.forward_t(x, train)?);
        }
        let (weight, bias) = self.inner.weight_and_bias().expect("affine");
        let stats = if train { ChannelStats::default() } else { self.running_stats()? };
        let op = Normalize { batch_stats: train, eps: self.inner.eps(), act, stats: Arc::new(Mutex::new(stats)) };
        let stats = op.stats.clone();
        let y = x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
        if train {
            let s = stats.lock().expect("statistics");
            let (b, _, h, w) = x.dims4()?;
            let n = (b * h * w) as f64;
            let m = self.inner.momentum();
            let dev = x.device();
            let mean = Tensor::from_slice(&s.mean, s.mean.len(), dev)?;
            let var = Tensor::from_slice(&s.var, s.var.len(), dev)?;
            self.running_mean.set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
            let unbiased = m * n / (n - 1.0).max(1.0);
            self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * unbiased)?)?)?;
        }
        Ok(y)
    }

    /// The running statistics, as eval mode normalises with them.
    fn running_stats(&self) -> Result<ChannelStats> {
        let mean = self.running_mean.as_tensor().to_vec1::<f32>()?;
        let var = self.running_var.as_tensor().to_vec1::<f32>()?;
        let eps = self.inner.eps() as f32;
        Ok(ChannelStats { mean, invstd: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(), var })
    }

    /// `act(BN(·))` in eval mode as a per-channel map ([`ChannelAffine`]) for a frozen
    /// BatchNorm (weight and bias no variables) on the CPU; `None` otherwise.
    pub fn frozen_affine(&self, act: Activation) -> Result<Option<ChannelAffine>> {
        let (weight, bias) = self.inner.weight_and_bias().expect("affine");
        if !(weight.device().is_cpu() && weight.dtype() == DType::F32) || weight.track_op() || bias.track_op() {
            return Ok(None);
        }
        let stats = self.running_stats()?;
        let (weight, bias) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        let (scale, shift) =
            (0..weight.len()).map(|ch| scale_shift(weight[ch], bias[ch], stats.mean[ch], stats.invstd[ch])).unzip();
        Ok(Some(ChannelAffine::new(scale, shift, act)))
    }
}

/// The scale and shift that normalise a channel: `γ · (x − μ) · invstd + β = x · scale + shift`.
fn scale_shift(weight: f32, bias: f32, mean: f32, invstd: f32) -> (f32, f32) {
    let scale = weight * invstd;
    (scale, bias - mean * scale)
}

/// An eval-mode BatchNorm and its activation as a map per channel: channel `c`'s values `v`
/// become `act(v · scale[c] + shift[c])`, as [`BatchNorm::forward_act`] computes them.
#[derive(Debug, Clone)]
pub struct ChannelAffine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    act: Activation,
}

impl ChannelAffine {
    /// `x · scale[c] + shift[c]`, then `act`.
    pub fn new(scale: Vec<f32>, shift: Vec<f32>, act: Activation) -> Self {
        assert_eq!(scale.len(), shift.len(), "ChannelAffine: a scale and a shift per channel");
        Self { scale, shift, act }
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Maps `values`, all of channel `c`, in place.
    pub fn apply(&self, c: usize, values: &mut [f32]) {
        let (scale, shift) = (self.scale[c], self.shift[c]);
        // The activation chosen outside the loop, so that each loop vectorises.
        match self.act {
            Activation::Identity => values.iter_mut().for_each(|v| *v = Activation::Identity.apply(*v * scale + shift)),
            Activation::Relu => values.iter_mut().for_each(|v| *v = Activation::Relu.apply(*v * scale + shift)),
            act @ Activation::LeakyRelu(_) => values.iter_mut().for_each(|v| *v = act.apply(*v * scale + shift)),
        }
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, Activation::Identity)
    }
}

/// Per-channel mean, `1/√(var + eps)` and (biased) variance.
#[derive(Debug, Default, Clone)]
struct ChannelStats {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    var: Vec<f32>,
}

/// An op's three inputs as f32 slices, and the first's `[B, C, H·W]`.
fn inputs<'a>(args: [(&'a CpuStorage, &Layout); 3]) -> Result<([&'a [f32]; 3], [usize; 3])> {
    let &[b, c, h, w] = args[0].1.dims() else {
        candle_core::bail!("batch-norm: expects [B, C, H, W], got {:?}", args[0].1.dims())
    };
    let slice = |(storage, layout): (&'a CpuStorage, &Layout)| super::cpu_f32(storage, layout, "batch-norm");
    Ok(([slice(args[0])?, slice(args[1])?, slice(args[2])?], [b, c, h * w]))
}

/// Lanes of the sums below: independent f32 chains, one 16-wide vector register each.
const LANES: usize = 16;
/// Values summed in f32 lanes before their block's total joins the f64 sum (16 per lane).
const BLOCK: usize = 16 * LANES;

/// `Σ f(i)` for `i < n`, `K` sums at once: within blocks of [`BLOCK`] values in [`LANES`]
/// interleaved f32 partial sums, which vectorise (the f64 lanes before did not), the blocks'
/// totals in f64, so that a long plane loses no more than a short one.
fn lane_sums<const K: usize>(n: usize, f: impl Fn(usize) -> [f32; K]) -> [f64; K] {
    let mut total = [0f64; K];
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let whole = len / LANES * LANES;
        let mut lanes = [[0f32; LANES]; K];
        for i in (start..start + whole).step_by(LANES) {
            for l in 0..LANES {
                for (lane, v) in lanes.iter_mut().zip(f(i + l)) {
                    lane[l] += v;
                }
            }
        }
        for k in 0..K {
            let rest: f32 = (start + whole..start + len).map(|i| f(i)[k]).sum();
            total[k] += lanes[k].iter().map(|&v| v as f64).sum::<f64>() + rest as f64;
        }
    }
    total
}

/// The planes of a `[B, C, H·W]` map being written, grouped by channel: entry `ch` holds its
/// `B` planes in image order.
fn channel_planes<T>(map: &mut [T], channels: usize, plane: usize) -> Vec<Vec<&mut [T]>> {
    let mut by_channel: Vec<Vec<&mut [T]>> = (0..channels).map(|_| Vec::new()).collect();
    if plane == 0 {
        return by_channel;
    }
    for (i, p) in map.chunks_exact_mut(plane).enumerate() {
        by_channel[i % channels].push(p);
    }
    by_channel
}

/// The `(image, channel)` planes of channel `c` in a contiguous `[B, C, H·W]` map.
fn planes(x: &[f32], channels: usize, plane: usize, c: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(plane).skip(c).step_by(channels)
}

/// `(x, γ, β) -> act(γ · (x − μ) / σ + β)`, with `μ, σ` the batch's (computed here and left in
/// `stats`) or given in `stats`.
#[derive(Debug)]
struct Normalize {
    batch_stats: bool,
    eps: f64,
    act: Activation,
    stats: Arc<Mutex<ChannelStats>>,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ([x, weight, bias], [b, c, plane]) = inputs([(s1, l1), (s2, l2), (s3, l3)])?;
        let mut stats = self.stats.lock().expect("statistics");
        let given = &*stats;
        let n = (b * plane) as f64;
        let mut y = Vec::with_capacity(x.len());
        // A channel's statistics and its output in one task, its planes still in cache.
        let batch: Vec<(f32, f32, f32)> = channel_planes(&mut y.spare_capacity_mut()[..x.len()], c, plane)
            .into_par_iter()
            .enumerate()
            .map(|(ch, out)| {
                let (mean, var, invstd) = if self.batch_stats {
                    let mean = planes(x, c, plane, ch).map(|p| lane_sums(plane, |i| [p[i]])[0]).sum::<f64>() / n;
                    let centre = mean as f32;
                    let squares = |p: &[f32]| lane_sums(plane, |i| [(p[i] - centre).powi(2)])[0];
                    let var = planes(x, c, plane, ch).map(squares).sum::<f64>() / n;
                    (mean as f32, var as f32, (1.0 / (var as f32 as f64 + self.eps).sqrt()) as f32)
                } else {
                    (given.mean[ch], given.var[ch], given.invstd[ch])
                };
                let (scale, shift) = scale_shift(weight[ch], bias[ch], mean, invstd);
                for (dst, src) in out.into_iter().zip(planes(x, c, plane, ch)) {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        d.write(self.act.apply(v * scale + shift));
                    }
                }
                (mean, var, invstd)
            })
            .collect();
        // SAFETY: every plane of `y` was written above (`channel_planes` covers them all).
        unsafe { y.set_len(x.len()) };
        if self.batch_stats {
            let (mean, (var, invstd)) = batch.into_iter().map(|(m, v, s)| (m, (v, s))).unzip();
            *stats = ChannelStats { mean, invstd, var };
        }
        Ok((CpuStorage::F32(y), Shape::from(l1.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("statistics").clone();
        let op = NormalizeGrad {
            batch_stats: self.batch_stats,
            act: self.act,
            weight: weight.to_vec1::<f32>()?,
            stats,
            sums: Arc::new(Mutex::new(GradSums::default())),
        };
        let sums = op.sums.clone();
        let dx = x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &grad.contiguous()?, &op)?;
        let s = sums.lock().expect("sums");
        let dev = x.device();
        let dw = Tensor::from_slice(&s.grad_x_hat, s.grad_x_hat.len(), dev)?;
        let db = Tensor::from_slice(&s.grad, s.grad.len(), dev)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// One channel of [`NormalizeGrad`]: its statistics, the activation's slope below zero and
/// `γ · invstd`.
struct ChannelGrad {
    mean: f32,
    invstd: f32,
    below: f32,
    scale: f32,
}

impl ChannelGrad {
    /// The gradient before the activation: `∂y` where `y > 0`, else the slope below zero times
    /// it (one select per value, which vectorises).
    fn before(&self, g: f32, y: f32) -> f32 {
        if y > 0.0 { g } else { g * self.below }
    }

    /// A value's terms of the two sums, `g` and `g · x̂`.
    fn terms(&self, x: f32, y: f32, g: f32) -> [f32; 2] {
        let g = self.before(g, y);
        [g, g * (x - self.mean) * self.invstd]
    }

    /// `(Σ g, Σ g · x̂)` from their f64 totals, and their means over `batch` values when the
    /// batch statistics depend on `x` (else zero).
    fn means(sums: (f64, f64), batch: Option<f32>) -> ((f32, f32), (f32, f32)) {
        let sums = (sums.0 as f32, sums.1 as f32);
        (sums, batch.map_or((0.0, 0.0), |n| (sums.0 / n, sums.1 / n)))
    }

    /// A value's input gradient, given the means of [`ChannelGrad::means`].
    fn input_grad(&self, x: f32, y: f32, g: f32, (g_mean, gx_mean): (f32, f32)) -> f32 {
        self.scale * (self.before(g, y) - g_mean - (x - self.mean) * self.invstd * gx_mean)
    }

    /// [`NormalizeGrad`]'s two passes over one channel's planes (`maps`: its `x`, `y` and `∂y`
    /// planes), writing `∂x` to `out`; `batch` is the count of values per channel when the
    /// batch statistics depend on `x` (training mode). Returns `(Σ g, Σ g · x̂)`.
    fn run(&self, maps: &[Vec<&[f32]>; 3], out: &mut [&mut [MaybeUninit<f32>]], batch: Option<f32>) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 is present.
            return unsafe { self.avx512(maps, out, batch) };
        }
        self.portable(maps, out, batch)
    }

    fn portable(
        &self,
        [xs, ys, gs]: &[Vec<&[f32]>; 3],
        out: &mut [&mut [MaybeUninit<f32>]],
        batch: Option<f32>,
    ) -> (f32, f32) {
        let mut sums = (0f64, 0f64);
        for ((x, y), g) in xs.iter().zip(ys).zip(gs) {
            let [g, gx] = lane_sums(x.len(), |j| self.terms(x[j], y[j], g[j]));
            sums = (sums.0 + g, sums.1 + gx);
        }
        let (sums, means) = Self::means(sums, batch);
        for (dst, ((x, y), g)) in out.iter_mut().zip(xs.iter().zip(ys).zip(gs)) {
            for (((d, &x), &y), &g) in dst.iter_mut().zip(*x).zip(*y).zip(*g) {
                d.write(self.input_grad(x, y, g, means));
            }
        }
        sums
    }

    /// [`ChannelGrad::portable`] on AVX-512, 16 values a step (a 128² training step's 29
    /// normalisation gradients took 6.2 ms with the portable code, 2.9–3.2 with this; temporary
    /// timers). Every value is computed as the portable
    /// code computes it, in the same order (the sums in 16 f32 lanes over blocks of [`BLOCK`]
    /// values, a block's tail alone, its lanes' totals added in f64: [`lane_sums`]; no fused
    /// multiply-adds), so the two give the same bits: a first version with its own rounding
    /// moved the quick start's teacher from 27.84 to 24.06 mIoU.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(
        &self,
        [xs, ys, gs]: &[Vec<&[f32]>; 3],
        out: &mut [&mut [MaybeUninit<f32>]],
        batch: Option<f32>,
    ) -> (f32, f32) {
        use std::arch::x86_64::*;
        let [mean_v, invstd_v, below_v] = [self.mean, self.invstd, self.below].map(|v| _mm512_set1_ps(v));
        let zero = _mm512_setzero_ps();
        // 16 values from `at`: g, the gradient before the activation (∂y where y > 0, else the
        // slope below zero times it), and x − μ.
        let load = |plane: usize, at: usize| {
            // SAFETY: the caller's loop keeps `at + 16` inside the planes (all of one length).
            unsafe {
                let [x, y, g] = [xs, ys, gs].map(|m| _mm512_loadu_ps(m[plane].as_ptr().add(at)));
                let g = _mm512_mask_mul_ps(g, _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(y, zero), g, below_v);
                (g, _mm512_sub_ps(x, mean_v))
            }
        };
        let mut sums = (0f64, 0f64);
        for (plane, ((x, y), g)) in xs.iter().zip(ys).zip(gs).enumerate() {
            for block in (0..x.len()).step_by(BLOCK) {
                let len = BLOCK.min(x.len() - block);
                let whole = block + len / 16 * 16;
                let (mut g_lanes, mut gx_lanes) = (zero, zero);
                for at in (block..whole).step_by(16) {
                    let (g, centred) = load(plane, at);
                    g_lanes = _mm512_add_ps(g_lanes, g);
                    gx_lanes = _mm512_add_ps(gx_lanes, _mm512_mul_ps(_mm512_mul_ps(g, centred), invstd_v));
                }
                let mut rest = [-0f32; 2];
                for j in whole..block + len {
                    let [g, gx] = self.terms(x[j], y[j], g[j]);
                    rest = [rest[0] + g, rest[1] + gx];
                }
                let mut lanes = [[0f32; 16]; 2];
                // SAFETY: 16 floats each.
                unsafe {
                    _mm512_storeu_ps(lanes[0].as_mut_ptr(), g_lanes);
                    _mm512_storeu_ps(lanes[1].as_mut_ptr(), gx_lanes);
                }
                let total = |lanes: &[f32; 16]| lanes.iter().map(|&v| v as f64).sum::<f64>();
                sums.0 += total(&lanes[0]) + rest[0] as f64;
                sums.1 += total(&lanes[1]) + rest[1] as f64;
            }
        }
        let (sums, means) = Self::means(sums, batch);
        let [g_mean_v, gx_mean_v, scale_v] = [means.0, means.1, self.scale].map(|v| _mm512_set1_ps(v));
        for (plane, dst) in out.iter_mut().enumerate() {
            let whole = dst.len() / 16 * 16;
            for at in (0..whole).step_by(16) {
                let (g, centred) = load(plane, at);
                let centred = _mm512_mul_ps(_mm512_mul_ps(centred, invstd_v), gx_mean_v);
                let d = _mm512_mul_ps(scale_v, _mm512_sub_ps(_mm512_sub_ps(g, g_mean_v), centred));
                // SAFETY: 16 values inside the plane.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(at).cast(), d) };
            }
            for j in whole..dst.len() {
                dst[j].write(self.input_grad(xs[plane][j], ys[plane][j], gs[plane][j], means));
            }
        }
        sums
    }
}

/// Per channel: `Σ g` (the shift's gradient) and `Σ g · x̂` (the scale's), `g` the gradient
/// before the activation.
#[derive(Debug, Default)]
struct GradSums {
    grad: Vec<f32>,
    grad_x_hat: Vec<f32>,
}

/// `(x, y, ∂y) -> ∂x`, leaving the parameters' gradients in `sums`.
#[derive(Debug)]
struct NormalizeGrad {
    batch_stats: bool,
    act: Activation,
    weight: Vec<f32>,
    stats: ChannelStats,
    sums: Arc<Mutex<GradSums>>,
}

impl CustomOp3 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ([x, y, grad], [b, c, plane]) = inputs([(s1, l1), (s2, l2), (s3, l3)])?;
        let ChannelStats { mean, invstd, .. } = &self.stats;
        let batch = self.batch_stats.then_some((b * plane) as f32);
        let below = self.act.derivative_below_zero();
        let mut dx = Vec::with_capacity(x.len());
        // A channel's sums and its input gradient in one task, its planes still in cache for the
        // second pass (before, each pass went over the whole map: the planes were out of L2 by
        // the second).
        let sums: Vec<(f32, f32)> = channel_planes(&mut dx.spare_capacity_mut()[..x.len()], c, plane)
            .into_par_iter()
            .enumerate()
            .map(|(ch, mut out)| {
                let maps = [x, y, grad].map(|m| planes(m, c, plane, ch).collect::<Vec<_>>());
                let channel =
                    ChannelGrad { mean: mean[ch], invstd: invstd[ch], below, scale: self.weight[ch] * invstd[ch] };
                channel.run(&maps, &mut out, batch)
            })
            .collect();
        // SAFETY: every plane of `dx` was written above (`channel_planes` covers them all).
        unsafe { dx.set_len(x.len()) };
        let (sum_g, sum_gx) = sums.into_iter().unzip();
        *self.sums.lock().expect("sums") = GradSums { grad: sum_g, grad_x_hat: sum_gx };
        Ok((CpuStorage::F32(dx), Shape::from(l1.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// Forward, every gradient and the running statistics equal Candle's BatchNorm followed by
    /// the activation, in both modes.
    #[test]
    fn equals_candles_batch_norm_and_activation() -> Result<()> {
        let dev = Device::Cpu;
        for act in [Activation::Identity, Activation::Relu, Activation::LeakyRelu(0.01)] {
            for train in [true, false] {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
                let ours = BatchNorm::new(3, vb.clone())?;
                let theirs = candle_nn::batch_norm(3, pytorch_config(), vb)?;
                // Non-trivial parameters and statistics.
                for (name, values) in [
                    ("weight", [0.5f32, -1.5, 2.0]),
                    ("bias", [0.1, 0.2, -0.3]),
                    ("running_mean", [0.3, -0.2, 0.1]),
                    ("running_var", [0.5, 2.0, 1.5]),
                ] {
                    vm.data().lock().unwrap()[name].set(&Tensor::new(&values, &dev)?)?;
                }
                let values: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
                let x = Var::from_tensor(&Tensor::from_vec(values, (2, 3, 4, 5), &dev)?)?;
                let r = Tensor::arange(0f32, 120.0, &dev)?.reshape((2, 3, 4, 5))?.affine(0.05, -2.0)?.sin()?;
                let theirs_y = act.on_tensor(theirs.forward_t(&x, train)?)?;
                let stats_theirs = (theirs.running_mean().to_vec1::<f32>()?, theirs.running_var().to_vec1::<f32>()?);
                // Both share the VarMap's statistics: put them back before ours runs.
                vm.data().lock().unwrap()["running_mean"].set(&Tensor::new(&[0.3f32, -0.2, 0.1], &dev)?)?;
                vm.data().lock().unwrap()["running_var"].set(&Tensor::new(&[0.5f32, 2.0, 1.5], &dev)?)?;
                let ours_y = ours.forward_act(&x, train, act)?;
                let stats_ours =
                    (ours.running_mean.as_tensor().to_vec1::<f32>()?, ours.running_var.as_tensor().to_vec1::<f32>()?);
                let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
                };
                assert!(max_diff(&ours_y, &theirs_y)? < 1e-5, "{act:?} train {train}: forward");
                for (a, b) in stats_ours.0.iter().chain(&stats_ours.1).zip(stats_theirs.0.iter().chain(&stats_theirs.1))
                {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{act:?} train {train}: running statistics {stats_ours:?} vs {stats_theirs:?}"
                    );
                }
                let g_ours = (&ours_y * &r)?.sum_all()?.backward()?;
                let g_theirs = (&theirs_y * &r)?.sum_all()?.backward()?;
                let (w, b) = ours.inner.weight_and_bias().expect("affine");
                for (name, t) in [("x", x.as_tensor()), ("weight", w), ("bias", b)] {
                    let diff = max_diff(g_ours.get(t).expect("ours"), g_theirs.get(t).expect("theirs"))?;
                    assert!(diff < 1e-4, "{act:?} train {train}: gradient of {name} differs by {diff}");
                }
            }
        }
        Ok(())
    }

    fn as_planes(out: &mut [Vec<MaybeUninit<f32>>]) -> Vec<&mut [MaybeUninit<f32>]> {
        out.iter_mut().map(Vec::as_mut_slice).collect()
    }

    /// The AVX-512 channel gradient gives the portable one's bits (the test above checks that
    /// against Candle's where the CPU lacks AVX-512), on planes shorter than, as long as and
    /// past a vector and a block, in both modes and for every activation's slope.
    #[test]
    fn channel_gradient_on_avx512_equals_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            let value = |i: usize, salt: usize| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0;
            for (k, len) in [5, 16, 289, 300, 1000].into_iter().enumerate() {
                let maps: [Vec<Vec<f32>>; 3] = std::array::from_fn(|m| {
                    (0..2).map(|b| (0..len).map(|i| value(i, 3 * k + m + b)).collect()).collect()
                });
                let maps = maps.each_ref().map(|planes| planes.iter().map(Vec::as_slice).collect::<Vec<_>>());
                for below in [1.0, 0.0, 0.01] {
                    for batch in [Some(2.0 * len as f32), None] {
                        let channel = ChannelGrad { mean: 0.1, invstd: 1.7, below, scale: -0.8 };
                        let mut outs = [(); 2].map(|_| vec![vec![MaybeUninit::new(0f32); len]; 2]);
                        let [portable, native] = &mut outs;
                        let want = channel.portable(&maps, &mut as_planes(portable), batch);
                        // SAFETY: AVX-512 is present.
                        let got = unsafe { channel.avx512(&maps, &mut as_planes(native), batch) };
                        let case = format!("length {len}, slope {below}, batch {batch:?}");
                        assert!(
                            (got.0 - want.0).abs() <= 1e-4 && (got.1 - want.1).abs() <= 1e-4,
                            "{case}: {got:?} vs {want:?}"
                        );
                        for (a, b) in native.iter().flatten().zip(portable.iter().flatten()) {
                            // SAFETY: both passes wrote every value.
                            let (a, b) = unsafe { (a.assume_init(), b.assume_init()) };
                            assert_eq!(a.to_bits(), b.to_bits(), "{case}: ∂x {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
}

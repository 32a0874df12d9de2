//! Convolution on the CPU as one matrix product per pass over the whole batch, the patch matrix
//! never stored.
//!
//! Candle's CPU `conv2d` runs about 3.5x slower than the matrix product it amounts to, and its
//! input gradient is a naive `conv_transpose2d` (about 5x the forward). Here the batch's patches
//! are a `[C·k·k, B·Ho·Wo]` matrix (`Taps`) that [`sgemm`] packs block by block straight from
//! the images, so the forward `W · cols` and the weight gradient `g · colsᵀ` are one product
//! each; the input gradient `col2im(Wᵀ · g)` is, for stride 1, itself a convolution (of `g` with
//! the flipped kernel), and a product plus col2im per image otherwise. The three ops are linear
//! in each argument and each other's adjoints, so every derivative (the second ones of the
//! WGAN-GP penalty included) is one of them again.
//!
//! 3x3 stride-1 convolutions with at least 128² channel pairs (64² for the weight gradient) take
//! [`winograd`]'s tiles instead, in all three ops (the same functions, fewer multiplications).

use super::batch_norm::ChannelAffine;
use super::cpu_f32;
use super::double_backward::operand;
use super::sgemm::{Dest, Lines, Mat, PackedRows, RowFinish, pack_strided, sgemm, sgemm_new};
use super::winograd;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

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

    fn rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// For kernel offset `k` along a side of length `n` with `out` outputs: the outputs whose
    /// tap lies inside (`lo..hi`), and the input index of output 0 (may be negative).
    fn span(&self, k: usize, n: usize, out: usize) -> (usize, usize, isize) {
        let first = (k * self.dilation) as isize - self.padding as isize;
        let s = self.stride as isize;
        let lo = if first >= 0 { 0 } else { (-first + s - 1) / s };
        let hi = if first >= n as isize { 0 } else { (n as isize - 1 - first) / s + 1 };
        (lo as usize, (hi as usize).clamp(lo as usize, out), first)
    }

    /// The input index of output `o`'s tap at offset `k` along a side (`span`'s `first`).
    fn at(&self, first: isize, o: usize) -> usize {
        (first + (o * self.stride) as isize) as usize
    }

    /// The adjoint of the patch matrix (`[C·k·k, Ho·Wo]`, row `(c, ky, kx)`): summed into one
    /// image, overlapping taps added.
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
        let (oh, ow) = self.out_hw();
        let k = self.kernel;
        // One channel plane per task: every write of a task stays in its plane.
        image.par_chunks_mut(self.h * self.w).enumerate().for_each(|(c, plane)| {
            plane.fill(0.0);
            for ky in 0..k {
                let (y_lo, y_hi, y0) = self.span(ky, self.h, oh);
                for kx in 0..k {
                    let (x_lo, x_hi, x0) = self.span(kx, self.w, ow);
                    let row = &cols[((c * k + ky) * k + kx) * oh * ow..][..oh * ow];
                    for oy in y_lo..y_hi {
                        let dst = &mut plane[self.at(y0, oy) * self.w..][..self.w];
                        for ox in x_lo..x_hi {
                            dst[self.at(x0, ox)] += row[oy * ow + ox];
                        }
                    }
                }
            }
        });
    }
}

/// A batch's patch matrix (`[C·k·k, B·Ho·Wo]`: tap `(c, ky, kx)` by output position
/// `(n, oy, ox)`, 0 in the padding) as a GEMM operand, packed straight from the images. Its
/// lines are the output positions (the forward's B) or the taps (the weight gradient's A).
struct Taps<'a> {
    p: Patches,
    images: &'a [f32],
    taps_are_lines: bool,
}

/// What a position or a tap contributes to the input an entry of the patch matrix reads: an
/// offset into the batch of images, a row and a column. Entry `(tap, position)` reads
/// `images[offset]` at the sums when the row and column fall inside the image, else it is 0.
#[derive(Debug, Clone, Copy)]
struct Reach {
    offset: i32,
    y: i32,
    x: i32,
}

impl Reach {
    /// A lane past an operand's last line: its row lies outside any image.
    const NONE: Self = Self { offset: 0, y: -(1 << 30), x: 0 };
}

impl<'a> Taps<'a> {
    /// The patches of `images` (`[B, C, H, W]` as `p` says); offsets into them are `i32`, as
    /// the vector gathers take them.
    fn new(p: Patches, images: &'a [f32], taps_are_lines: bool) -> Result<Self> {
        if i32::try_from(images.len()).is_err() {
            candle_core::bail!(
                "conv2d: an input of {} values is more than the CPU convolution indexes (2^31)",
                images.len()
            );
        }
        Ok(Self { p, images, taps_are_lines })
    }

    fn positions_total(&self) -> usize {
        let (oh, ow) = self.p.out_hw();
        self.images.len() / (self.p.channels * self.p.h * self.p.w) * oh * ow
    }

    /// Output positions `first..first + count`, `(n, oy, ox)` counted along (no division per
    /// position): the image's offset and the corner of the position's window.
    fn positions(&self, first: usize, count: usize) -> Vec<Reach> {
        let p = &self.p;
        let (oh, ow) = p.out_hw();
        let image_len = p.channels * p.h * p.w;
        let (mut n, r) = (first / (oh * ow), first % (oh * ow));
        let (mut oy, mut ox) = (r / ow, r % ow);
        (0..count)
            .map(|_| {
                let (y, x) = (oy * p.stride, ox * p.stride);
                let reach = Reach { offset: (n * image_len + y * p.w + x) as i32, y: y as i32, x: x as i32 };
                ox += 1;
                if ox == ow {
                    (oy, ox) = (oy + 1, 0);
                    if oy == oh {
                        (n, oy) = (n + 1, 0);
                    }
                }
                reach
            })
            .collect()
    }

    /// Taps `first..first + count`: the channel's offset and the tap's place in the window,
    /// the padding subtracted.
    fn taps(&self, first: usize, count: usize) -> Vec<Reach> {
        let p = &self.p;
        let k = p.kernel;
        (first..first + count)
            .map(|t| {
                let (c, ky, kx) = (t / (k * k), t / k % k, t % k);
                let y = (ky * p.dilation) as i32 - p.padding as i32;
                let x = (kx * p.dilation) as i32 - p.padding as i32;
                Reach { offset: (c * p.h * p.w) as i32 + y * p.w as i32 + x, y, x }
            })
            .collect()
    }
}

impl Lines for Taps<'_> {
    /// Every value by the same rule ([`Reach`]), one panel row at a time: on AVX-512 a masked
    /// gather or load per 16 lanes. Copying row runs instead (a branch, clamps and a short copy
    /// per run of 17 positions) took 1.3 ns per value forward and 1.8 for the weight gradient,
    /// 12–18% of the worker threads' time in a 128² training step; with gathers 0.65 and 0.55,
    /// and forward 0.4 with loads for adjacent lanes (per step 156–177 → 72–78 → 44–55 ms of
    /// thread time forward, 71 → 19–23 for the weight gradient).
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        let (n_taps, n_positions) = (self.p.rows(), self.positions_total());
        let (n_lines, depth) = if self.taps_are_lines { (n_taps, n_positions) } else { (n_positions, n_taps) };
        // The gathers read where these say: they must stay inside the patch matrix.
        assert!(line0 + lines <= n_lines && depth0 + kc <= depth, "Taps::pack outside the patch matrix");
        let (line_reach, depth_reach) = if self.taps_are_lines {
            (self.taps(line0, lines), self.positions(depth0, kc))
        } else {
            (self.positions(line0, lines), self.taps(depth0, kc))
        };
        let panels = lines.div_ceil(width);
        for (lanes, panel) in line_reach.chunks(width).zip(dst[..panels * width * kc].chunks_exact_mut(width * kc)) {
            fill_panel(self.images, (self.p.h, self.p.w), lanes, &depth_reach, panel);
        }
    }
}

/// One packed panel: `panel[p · width + l]` is the patch entry of lane `l` (a line) at step `p`
/// (a depth), 0 in the padding and past the last lane.
fn fill_panel(images: &[f32], hw: (usize, usize), lanes: &[Reach], steps: &[Reach], panel: &mut [f32]) {
    if steps.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        match panel.len() / steps.len() {
            // SAFETY: AVX-512 is present; `Taps::pack` checked that every lane and step lies
            // inside the patch matrix, so each entry inside the image reads inside `images`.
            16 => return unsafe { fill_panel_avx512::<1>(images, hw, lanes, steps, panel) },
            32 => return unsafe { fill_panel_avx512::<2>(images, hw, lanes, steps, panel) },
            _ => {}
        }
    }
    fill_panel_portable(images, hw, lanes, steps, panel)
}

fn fill_panel_portable(images: &[f32], (h, w): (usize, usize), lanes: &[Reach], steps: &[Reach], panel: &mut [f32]) {
    let width = panel.len() / steps.len();
    for (row, step) in panel.chunks_exact_mut(width).zip(steps) {
        for (l, v) in row.iter_mut().enumerate() {
            let lane = lanes.get(l).unwrap_or(&Reach::NONE);
            // Unsigned, a negative row or column is outside too.
            let inside = ((lane.y + step.y) as u32) < h as u32 && ((lane.x + step.x) as u32) < w as u32;
            *v = if inside { images[(lane.offset + step.offset) as usize] } else { 0.0 };
        }
    }
}

/// [`fill_panel_portable`] for rows of `16 · G` lanes: per row and 16 lanes, two unsigned
/// compares for the mask and one masked gather, or one masked load where the lanes' offsets
/// are adjacent.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_panel_avx512<const G: usize>(
    images: &[f32],
    (h, w): (usize, usize),
    lanes: &[Reach],
    steps: &[Reach],
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    let lane = |i: usize| lanes.get(i).unwrap_or(&Reach::NONE);
    let vector = |g: usize, f: fn(&Reach) -> i32| {
        let v: [i32; 16] = std::array::from_fn(|l| f(lane(16 * g + l)));
        // SAFETY: 16 i32s.
        unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
    };
    let offset: [__m512i; G] = std::array::from_fn(|g| vector(g, |r| r.offset));
    let y: [__m512i; G] = std::array::from_fn(|g| vector(g, |r| r.y));
    let x: [__m512i; G] = std::array::from_fn(|g| vector(g, |r| r.x));
    // Lanes whose offsets run on by one (16 positions of one image in a convolution whose output
    // is as wide as its input, the 3x3 ones with padding = dilation and the 1x1 ones) read as one
    // masked load instead of a gather.
    let first: [i32; G] = std::array::from_fn(|g| lane(16 * g).offset);
    let adjacent: [bool; G] = std::array::from_fn(|g| (0..16).all(|l| lane(16 * g + l).offset == first[g] + l as i32));
    let (h, w) = (_mm512_set1_epi32(h as i32), _mm512_set1_epi32(w as i32));
    for (row, step) in panel.chunks_exact_mut(16 * G).zip(steps) {
        let (so, sy, sx) = (_mm512_set1_epi32(step.offset), _mm512_set1_epi32(step.y), _mm512_set1_epi32(step.x));
        for g in 0..G {
            let inside = _mm512_mask_cmplt_epu32_mask(
                _mm512_cmplt_epu32_mask(_mm512_add_epi32(y[g], sy), h),
                _mm512_add_epi32(x[g], sx),
                w,
            );
            // SAFETY: the caller's: lanes inside the image read inside `images`; the others
            // are masked off and read nothing (a masked load does not touch them either).
            unsafe {
                let v = if adjacent[g] {
                    _mm512_maskz_loadu_ps(inside, images.as_ptr().wrapping_offset((first[g] + step.offset) as isize))
                } else {
                    _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        inside,
                        _mm512_add_epi32(offset[g], so),
                        images.as_ptr(),
                    )
                };
                _mm512_storeu_ps(row.as_mut_ptr().add(16 * g), v);
            }
        }
    }
}

/// A batch of maps `[B, M, S]` as `M` lines over the depth `B·S` (each map's images side by
/// side): entry `(m, (n, s))` at `data[(n · M + m) · S + s]`.
struct BatchMaps<'a> {
    data: &'a [f32],
    maps: usize,
    size: usize,
}

impl Lines for BatchMaps<'_> {
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        let (maps, size) = (self.maps, self.size);
        let start = |m: usize, d: usize| (d / size * maps + m) * size + d % size;
        pack_strided(self.data, size, start, (line0, lines, depth0, kc, width), dst);
    }
}

/// A kernel `[C_out, C, k, k]` flipped in both spatial axes with its channel axes swapped, as
/// the `C` lines over depth `C_out·k·k` of the input gradient's convolution, packed straight
/// from the kernel: entry `(c, (o, j))` is `w[o][c][k·k − 1 − j]`.
struct FlippedKernel<'a> {
    weight: &'a [f32],
    channels: usize,
    taps: usize,
}

impl Lines for FlippedKernel<'_> {
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        let (channels, kk) = (self.channels, self.taps);
        let start = |c: usize, d: usize| (d / kk * channels + c) * kk + kk - 1 - d % kk;
        pack_strided(self.weight, kk, start, (line0, lines, depth0, kc, width), dst);
    }
}

/// `y = W · cols(x)` for a batch `x` `[B, C, H, W]` and the kernel as `C_out` lines over the
/// depth `C·k·k`: one product over the whole batch (`[C_out, B·Ho·Wo]`), stored as `y`
/// `[B, C_out, Ho, Wo]`.
fn convolve(
    p: Patches,
    x: &[f32],
    weight: &impl Lines,
    c_out: usize,
    after: Option<&ChannelAffine>,
) -> Result<Vec<f32>> {
    let (oh, ow) = p.out_hw();
    let b = x.len() / (p.channels * p.h * p.w);
    let cols = Taps::new(p, x, false)?;
    let finish = after.map(|after| move |c: usize, run: &mut [f32]| after.apply(c, run));
    let finish = finish.as_ref().map(|f| f as &RowFinish<'_>);
    Ok(sgemm_new(c_out, b * oh * ow, p.rows(), weight, &cols, |y| Dest::batched_uninit(y, c_out, oh * ow), finish))
}

/// `conv2d(x, weight)` (no bias) for f32 on the CPU: `x` `[B, C, H, W]`, `weight`
/// `[C_out, C, k, k]`. Only `x` and the weight are kept for the backward, which reads the patches
/// from `x` again (a patch matrix is nine times the input for a 3x3 kernel).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    conv2d_with(x, weight, stride, padding, dilation, None, None)
}

fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    packed: Option<Arc<PreparedWeight>>,
    after: Option<Arc<ChannelAffine>>,
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (_, c_w, k, k2) = weight.dims4()?;
    if c_w != c || k != k2 {
        candle_core::bail!("conv2d: input {:?} and weight {:?} do not fit", x.dims(), weight.dims());
    }
    let p = Patches { kernel: k, stride, padding, dilation, channels: c, h, w };
    let kept = (x.track_op() && packed.is_none()).then(OnceLock::new);
    apply(x, weight, Conv { p, packed, after, kept })
}

/// A frozen weight prepared once for its CPU forwards: packed as the product's A, or (3x3,
/// stride 1) transformed for [`winograd`].
#[derive(Debug)]
pub enum PreparedWeight {
    Packed(PackedRows),
    Winograd(winograd::Kernel),
}

/// `weight` `[C_out, C, k, k]` (f32, CPU) prepared once for [`conv2d_prepacked`] with `stride`.
pub fn pack_weight(weight: &Tensor, stride: usize) -> Result<PreparedWeight> {
    let (c_out, c, k, _) = weight.dims4()?;
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else { candle_core::bail!("pack_weight: CPU tensors only") };
    let data = cpu_f32(storage, layout, "pack_weight")?;
    Ok(if winograd::applies(k, stride, c, c_out) {
        PreparedWeight::Winograd(winograd::Kernel::new(data, c_out, c))
    } else {
        PreparedWeight::Packed(PackedRows::new(&Mat::rows(data, c * k * k), c_out, c * k * k))
    })
}

/// [`conv2d`] with the weight's packed copy ([`pack_weight`]), for a weight used in many
/// forwards (a frozen network's): the products read the copy instead of packing the weight.
pub fn conv2d_prepacked(
    x: &Tensor,
    weight: &Tensor,
    packed: &Arc<PreparedWeight>,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    conv2d_with(x, weight, stride, padding, dilation, Some(packed.clone()), None)
}

/// [`conv2d_prepacked`] with a frozen eval-mode BatchNorm and its activation ([`ChannelAffine`])
/// applied to each output channel as the product finishes it: no pass of their own. No
/// gradient flows through it: `x` must not need one (a frozen network's activations).
pub fn conv2d_prepacked_then(
    x: &Tensor,
    weight: &Tensor,
    packed: &Arc<PreparedWeight>,
    (stride, padding, dilation): (usize, usize, usize),
    after: ChannelAffine,
) -> Result<Tensor> {
    if x.track_op() || weight.track_op() || after.channels() != weight.dim(0)? {
        candle_core::bail!("conv2d_prepacked_then: for a frozen convolution of {} channels", after.channels());
    }
    conv2d_with(x, weight, stride, padding, dilation, Some(packed.clone()), Some(Arc::new(after)))
}

/// `(x, W) -> y`: the convolution, with W's packed copy when it has one, and a map per output
/// channel after it when it has one (then without a backward).
#[derive(Debug)]
struct Conv {
    p: Patches,
    packed: Option<Arc<PreparedWeight>>,
    after: Option<Arc<ChannelAffine>>,
    /// Where `x` needs a gradient, the kernel's Winograd transform, kept from the forward for
    /// the input gradient's products (which read it flipped): one transform of a trainable
    /// kernel per step instead of two, and the second was a write of a copy as large.
    kept: Option<OnceLock<Arc<winograd::Kernel>>>,
}

/// `(g, W) -> ∂x`: the input gradient for output gradient `g` (a transposed convolution), with
/// the kernel's Winograd transform when the forward kept it.
#[derive(Debug, Clone)]
struct GradInput(Patches, Option<Arc<winograd::Kernel>>);

/// `(x, g) -> ∂W`: the weight gradient for input `x` and output gradient `g`.
#[derive(Debug, Clone, Copy)]
struct GradWeight(Patches);

/// `op(a, b)`, differentiable.
fn apply(a: &Tensor, b: &Tensor, op: impl CustomOp2 + Send + Sync + 'static) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, op)
}

/// A gradient for `arg` only where the graph needs one: the image a network starts from and
/// frozen weights get none (the stem's input gradient alone is a full convolution).
fn needed(arg: &Tensor, gradient: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    arg.track_op().then(gradient).transpose()
}

/// The gradients of an op's two arguments where the graph needs them ([`needed`]), each
/// `op(x, y)` of forward arguments, computed side by side on the thread pool: the two products'
/// parts fill each other's waits (a product's last parts leave a thread idle). 128² training
/// steps alternated with and without in one process: paired median 0.96 (quartiles 0.90–1.02,
/// 29 pairs). The arguments are taken as this thread's backward reads them ([`operand`])
/// before the products leave it: the pool's threads need not keep the graph of gradients where
/// this one does (the WGAN-GP penalty's).
fn both_needed<P, Q>(
    (a, (a_x, a_y), a_op): (&Tensor, (&Tensor, &Tensor), P),
    (b, (b_x, b_y), b_op): (&Tensor, (&Tensor, &Tensor), Q),
) -> Result<(Option<Tensor>, Option<Tensor>)>
where
    P: CustomOp2 + Send + Sync + 'static,
    Q: CustomOp2 + Send + Sync + 'static,
{
    let (a_x, a_y, b_x, b_y) = (operand(a_x), operand(a_y), operand(b_x), operand(b_y));
    let (grad_a, grad_b) =
        rayon::join(|| needed(a, || apply(&a_x, &a_y, a_op)), || needed(b, || apply(&b_x, &b_y, b_op)));
    Ok((grad_a?, grad_b?))
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.p;
        let (x, weight) = (cpu_f32(s1, l1, "conv2d")?, cpu_f32(s2, l2, "conv2d")?);
        let (b, c_out) = (l1.dims()[0], l2.dims()[0]);
        let (oh, ow) = p.out_hw();
        let weight = Mat::rows(weight, p.rows());
        let after = self.after.as_deref();
        let y = match self.packed.as_deref() {
            Some(PreparedWeight::Winograd(kernel)) => winograd::convolve(p, x, kernel, after),
            Some(PreparedWeight::Packed(packed)) => convolve(p, x, packed, c_out, after)?,
            None if winograd::applies(p.kernel, p.stride, p.channels, c_out) => {
                let kernel = Arc::new(winograd::Kernel::new(weight.data, c_out, p.channels));
                let y = winograd::convolve(p, x, &kernel, after);
                if let Some(kept) = &self.kept {
                    // Set by the op's one forward (a second would transform the same kernel).
                    let _ = kept.set(kernel);
                }
                y
            }
            None => convolve(p, x, &weight, c_out, after)?,
        };
        Ok((CpuStorage::F32(y), Shape::from((b, c_out, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.after.is_some() {
            candle_core::bail!("conv2d with a channel map after it has no backward (frozen networks only)")
        }
        let kernel = self.kept.as_ref().and_then(|kept| kept.get().cloned());
        both_needed((x, (grad, weight), GradInput(self.p, kernel)), (weight, (x, grad), GradWeight(self.p)))
    }
}

impl GradInput {
    /// For stride 1 the input gradient is itself a convolution: of `g` with the kernel flipped
    /// and its channel axes swapped, padded by `d·(k − 1) − padding`, same dilation.
    fn as_convolution(&self, c_out: usize) -> Option<Patches> {
        let p = self.0;
        let padding = (p.dilation * (p.kernel - 1)).checked_sub(p.padding)?;
        let (oh, ow) = p.out_hw();
        (p.stride == 1).then_some(Patches { channels: c_out, h: oh, w: ow, padding, ..p })
    }
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "conv2d-im2col-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let (grad, weight) = (cpu_f32(s1, l1, "conv2d grad")?, cpu_f32(s2, l2, "conv2d grad")?);
        let (b, c_out) = (l1.dims()[0], l2.dims()[0]);
        let (oh, ow) = p.out_hw();
        let (k, image_len) = (p.kernel, p.channels * p.h * p.w);
        let dx = match self.as_convolution(c_out) {
            Some(flipped) if winograd::applies(flipped.kernel, flipped.stride, c_out, p.channels) => match &self.1 {
                Some(kernel) => winograd::convolve_flipped(flipped, grad, kernel),
                None => winograd::convolve_flipped(flipped, grad, &winograd::Kernel::new(weight, c_out, p.channels)),
            },
            Some(flipped) => {
                convolve(flipped, grad, &FlippedKernel { weight, channels: p.channels, taps: k * k }, p.channels, None)?
            }
            None => {
                let mut dx = vec![0f32; b * image_len];
                let mut cols = vec![0f32; p.rows() * oh * ow];
                let w_t = Mat::columns(weight, p.rows());
                for (g, image) in grad.chunks_exact(c_out * oh * ow).zip(dx.chunks_exact_mut(image_len)) {
                    sgemm(p.rows(), oh * ow, c_out, &w_t, &Mat::columns(g, oh * ow), Dest::rows(&mut cols, oh * ow));
                    p.col2im(&cols, image);
                }
                dx
            }
        };
        Ok((CpuStorage::F32(dx), Shape::from((b, p.channels, p.h, p.w))))
    }

    /// `⟨col2im(Wᵀ·g), r⟩`: `∂g = conv(r, W)`, `∂W = g · cols(r)ᵀ`.
    fn bwd(
        &self,
        grad: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        r: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let conv = Conv { p: self.0, packed: None, after: None, kept: None };
        both_needed((grad, (r, weight), conv), (weight, (r, grad), GradWeight(self.0)))
    }
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "conv2d-im2col-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let (x, grad) = (cpu_f32(s1, l1, "conv2d grad")?, cpu_f32(s2, l2, "conv2d grad")?);
        let c_out = l2.dims()[1];
        let (oh, ow) = p.out_hw();
        // `∂W = g · cols(x)ᵀ` as one product over the whole batch: both operands run along the
        // depth B·Ho·Wo, `g` read in place, the patches packed across taps straight from the
        // images, and `∂W` written as it is stored.
        if winograd::applies_to_weight_gradient(p.kernel, p.stride, p.channels, c_out) {
            let dw = winograd::weight_gradient(p, x, grad, c_out);
            return Ok((CpuStorage::F32(dw), Shape::from((c_out, p.channels, p.kernel, p.kernel))));
        }
        let b = x.len() / (p.channels * p.h * p.w);
        let g = BatchMaps { data: grad, maps: c_out, size: oh * ow };
        let cols = Taps::new(p, x, true)?;
        let dw = sgemm_new(c_out, p.rows(), b * oh * ow, &g, &cols, |dw| Dest::rows_uninit(dw, p.rows()), None);
        Ok((CpuStorage::F32(dw), Shape::from((c_out, p.channels, p.kernel, p.kernel))))
    }

    /// `⟨g·cols(x)ᵀ, R⟩`: `∂x = col2im(Rᵀ·g)`, `∂g = conv(x, R)`.
    fn bwd(&self, x: &Tensor, grad: &Tensor, _res: &Tensor, r: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let conv = Conv { p: self.0, packed: None, after: None, kept: None };
        both_needed((x, (grad, r), GradInput(self.0, None)), (grad, (x, r), conv))
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
            // Several depth blocks, panels and a threaded split of the products.
            (40, 24, 3, 1, 1, 1, 20, 21),
            // Enough channel pairs for Winograd's tiles, the forward and the input gradient.
            (256, 256, 3, 1, 2, 2, 6, 7),
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

    /// Packing the patches straight from the images equals cutting panels from the patch
    /// matrix written out naively, for every start and length of the lines and depth, both
    /// orientations, on geometries with padding, stride, dilation and a batch.
    #[test]
    fn taps_pack_like_the_patch_matrix() {
        // (C, k, stride, padding, dilation, H, W), batch 2.
        for (i, &(c, k, s, pad, d, h, w)) in [
            (2, 3, 1, 1, 1, 5, 6),
            (2, 3, 2, 1, 1, 7, 6),
            (1, 3, 1, 2, 2, 5, 7),
            (3, 1, 1, 0, 1, 3, 4),
            (2, 1, 2, 0, 1, 5, 5),
            // More taps than a 32-lane panel holds.
            (5, 3, 1, 1, 1, 4, 5),
        ]
        .iter()
        .enumerate()
        {
            let p = Patches { kernel: k, stride: s, padding: pad, dilation: d, channels: c, h, w };
            let (oh, ow) = p.out_hw();
            let images = values(2 * c * h * w, i);
            let positions = 2 * oh * ow;
            let naive = |tap: usize, pos: usize| -> f32 {
                let (ch, ky, kx) = (tap / (k * k), tap / k % k, tap % k);
                let (n, oy, ox) = (pos / (oh * ow), pos / ow % oh, pos % ow);
                let iy = (oy * s + ky * d) as isize - pad as isize;
                let ix = (ox * s + kx * d) as isize - pad as isize;
                let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                if inside { images[((n * c + ch) * h + iy as usize) * w + ix as usize] } else { 0.0 }
            };
            for taps_are_lines in [false, true] {
                let taps = Taps::new(p, &images, taps_are_lines).unwrap();
                let (n_lines, depth) = if taps_are_lines { (p.rows(), positions) } else { (positions, p.rows()) };
                for line0 in 0..n_lines {
                    for lines in [1, 3, n_lines - line0] {
                        let lines = lines.min(n_lines - line0);
                        let depths = [(0, depth), (depth / 2, depth - depth / 2), (depth - 1, 1)];
                        // Width 4 runs the portable kernel; 16 and 32 the AVX-512 one where the CPU has it.
                        for ((depth0, kc), width) in depths.into_iter().flat_map(|d| [4, 16, 32].map(|w| (d, w))) {
                            let mut dst = vec![f32::NAN; lines.div_ceil(width) * width * kc];
                            taps.pack(line0, lines, depth0, kc, width, &mut dst);
                            for (j, &v) in dst.iter().enumerate() {
                                let (panel, pp, l) = (j / (width * kc), j / width % kc, j % width);
                                let line = panel * width + l;
                                let want = if line >= lines {
                                    0.0
                                } else if taps_are_lines {
                                    naive(line0 + line, depth0 + pp)
                                } else {
                                    naive(depth0 + pp, line0 + line)
                                };
                                assert_eq!(
                                    v, want,
                                    "case {i} taps_are_lines {taps_are_lines} line0 {line0} lines {lines} depth0 {depth0} width {width}: entry {j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Second derivatives (what the WGAN-GP penalty differentiates): for `L = ⟨conv(x, W), r⟩`,
    /// the gradient of `⟨∂L/∂x, s⟩` with respect to `W` and `r`, and of `⟨∂L/∂W, S⟩` with
    /// respect to `x` and `r`, equal the first-order quantities of Candle's convolution they
    /// amount to (all maps are bilinear).
    #[test]
    fn second_derivatives_equal_candles_first_order_ones() -> Result<()> {
        let dev = Device::Cpu;
        for (i, &(c, c_out, k, s, p, d, h, w)) in
            [(3, 4, 3, 2, 1, 1, 10, 12), (2, 3, 1, 1, 0, 1, 5, 6), (2, 2, 3, 1, 2, 2, 9, 9)].iter().enumerate()
        {
            let var = |n: usize, salt: usize, shape: &[usize]| {
                Var::from_tensor(&Tensor::from_vec(values(n, salt), shape, &dev)?)
            };
            let x = var(2 * c * h * w, i, &[2, c, h, w])?;
            let wt = var(c_out * c * k * k, i + 10, &[c_out, c, k, k])?;
            let (oh, ow) = Patches { kernel: k, stride: s, padding: p, dilation: d, channels: c, h, w }.out_hw();
            let r = var(2 * c_out * oh * ow, i + 20, &[2, c_out, oh, ow])?;
            let probe_x = Tensor::from_vec(values(2 * c * h * w, i + 30), (2, c, h, w), &dev)?;
            let probe_w = Tensor::from_vec(values(c_out * c * k * k, i + 40), (c_out, c, k, k), &dev)?;
            let first = (conv2d(&x, &wt, s, p, d)? * r.as_tensor())?.sum_all()?.backward()?;
            let gx = first.get(&x).expect("∂x");
            let gw = first.get(&wt).expect("∂W");
            let of_gx = (gx * &probe_x)?.sum_all()?.backward()?;
            let of_gw = (gw * &probe_w)?.sum_all()?.backward()?;
            // Candle's first-order answers: ⟨∂L/∂x, s⟩ = ⟨conv(s, W), r⟩ and ⟨∂L/∂W, S⟩ = ⟨conv(x, S), r⟩.
            let px = Var::from_tensor(&probe_x)?;
            let pw = Var::from_tensor(&probe_w)?;
            let ref_gx = (px.conv2d(&wt, p, s, d, 1)? * r.as_tensor())?.sum_all()?.backward()?;
            let ref_gw = (x.conv2d(&pw, p, s, d, 1)? * r.as_tensor())?.sum_all()?.backward()?;
            let max_diff =
                |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
            let checks = [
                ("d<gx,s>/dW", of_gx.get(&wt), ref_gx.get(&wt).cloned()),
                ("d<gx,s>/dr", of_gx.get(&r), Some(px.conv2d(&wt, p, s, d, 1)?)),
                ("d<gW,S>/dx", of_gw.get(&x), ref_gw.get(&x).cloned()),
                ("d<gW,S>/dr", of_gw.get(&r), Some(x.conv2d(&pw, p, s, d, 1)?)),
            ];
            for (name, ours, theirs) in checks {
                let diff = max_diff(ours.expect(name), &theirs.expect(name))?;
                assert!(diff < 1e-3, "case {i}: {name} differs by {diff}");
            }
        }
        Ok(())
    }
}

//! 3x3 stride-1 convolutions (any padding and dilation) by Winograd's minimal filtering
//! F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each
//! 2x2 block of outputs ("tile") from its 4x4 block of inputs with 16 multiplications per
//! channel pair instead of 36. The 16 multiplications of all tiles and channels are 16 matrix
//! products (`M_e = U_e · V_e`, one per position `e` of the 4x4 transformed tile), so the work
//! of a 3x3 convolution drops 2.25x before the transforms, which cost a few additions per value.
//!
//! With dilation `d` a tile's outputs are `d` apart and its inputs `d` apart, so a tile stays
//! inside one of the `d x d` interleaved grids a dilated convolution never mixes; the tiles along
//! a side are enumerated grid by grid, none past the output.
//!
//! The input gradient of a stride-1 convolution is itself a convolution (of the output gradient
//! with the kernel flipped and its channel axes swapped, `im2col`'s `GradInput`), so it comes
//! here too, reading the kernel's transform flipped (`Kernel::flipped`). The weight gradient is
//! `∂U_e = Ŷ_e · V_eᵀ` summed over the tiles (`Ŷ` the output gradient's transform, the adjoint
//! of the output transform), then `∂W = Gᵀ ∂U G`; its transforms put the channels in the lanes,
//! so that both operands lie with their lines side by side. Either way the ops compute the
//! functions `im2col`'s compute (their adjoint structure, hence every derivative, is unchanged),
//! rounded differently: F(2x2, 3x3)'s transforms use only 0, ±1 and ±½.
//!
//! The kernel's transform costs as much as a pass over a tile of every channel pair, so a frozen
//! kernel is transformed once (`im2col::PreparedWeight`), and a trainable one once per step:
//! the forward keeps its transform for the input gradient (`im2col`'s `Conv`).

use super::batch_norm::ChannelAffine;
use super::im2col::Patches;
use super::sgemm::{Mat, PackedRows, Transposed, sgemm_serial};
#[cfg(target_arch = "x86_64")]
use super::sgemm::{lanes_below, transpose16};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Whether a convolution is one these tiles compute, and compute faster than `im2col`'s
/// product: 3x3, stride 1, with at least 128² channel pairs. With fewer the transforms (a few
/// additions per input, output and kernel value) cost about what the multiplications save
/// (`examples/conv_rate.rs`: 64->64 at 64x64 1.7–2.8 ms in tiles against 1.5–1.8). The 128²
/// against 256² (three rounds of the 128² training step and of the 256x512 inference, each
/// alternated): 214.5–230.4 ms against 223.7–232.8, and 130.8–143.3 against 132.7–145.2.
pub fn applies(kernel: usize, stride: usize, c_in: usize, c_out: usize) -> bool {
    kernel == 3 && stride == 1 && c_in * c_out >= 128 * 128
}

/// [`applies`] for the weight gradient, which pays from 64² channel pairs: its transforms (the
/// channels in the lanes) cost less, and `im2col`'s product for it packs patches, the costly
/// operand. Eight pairs of 128² steps alternated with the threshold at 128²: paired median
/// 0.972 (0.913–1.010); the 512² step with the critic 2.65–2.90 s against 2.90–2.91, peak
/// 1777–1809 MB against 1844–1856. (The input gradient from 64² pairs: slower, 209.1–220.8 ms
/// against 214.6–224.9.)
pub fn applies_to_weight_gradient(kernel: usize, stride: usize, c_in: usize, c_out: usize) -> bool {
    kernel == 3 && stride == 1 && c_in * c_out >= 64 * 64
}

/// Whether the AVX-512 kernels run: where the CPU has them, unless a test asks for the portable
/// ones (which compute the same values, rounded alike but for the order of a few additions).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    #[cfg(test)]
    if tests::PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Positions of the transformed 4x4 tile.
const E: usize = 16;
/// Floats the transformed tiles of one chunk of tiles may take (inputs and products): chunks
/// small enough to stay in the last-level cache, large enough to make wide products (the 128²
/// training step alternated with budgets of 1 Mi and 256 Ki floats: 224.7–226.3 ms against
/// 233.1–239.4 and 243.0–252.1).
const CHUNK_BUDGET: usize = 4 << 20;

/// `Bᵀ d` for a column of four inputs.
fn input_1d(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// `G g` for a column of three kernel taps.
fn kernel_1d(g: [f32; 3]) -> [f32; 4] {
    [g[0], 0.5 * (g[0] + g[1] + g[2]), 0.5 * (g[0] - g[1] + g[2]), g[2]]
}

/// `Aᵀ m`: two outputs from four products.
fn output_1d(m: [f32; 4]) -> [f32; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// `A y`, the adjoint of [`output_1d`]: four product gradients from two output gradients.
fn output_adjoint_1d(y: [f32; 2]) -> [f32; 4] {
    [y[0], y[0] + y[1], y[0] - y[1], -y[1]]
}

/// `Gᵀ u`, the adjoint of [`kernel_1d`]: three tap gradients from four.
fn kernel_adjoint_1d(u: [f32; 4]) -> [f32; 3] {
    let mid = 0.5 * (u[1] + u[2]);
    [u[0] + mid, 0.5 * (u[1] - u[2]), mid + u[3]]
}

/// `f` along both axes of an `R x R` block (row-major) giving `S x S`: `F X Fᵀ`.
fn both_axes<const R: usize, const S: usize>(x: [[f32; R]; R], f: impl Fn([f32; R]) -> [f32; S]) -> [[f32; S]; S] {
    // Columns first: `cols[j]` is `f` of input column j.
    let cols: [[f32; S]; R] = std::array::from_fn(|j| f(std::array::from_fn(|i| x[i][j])));
    std::array::from_fn(|i| f(std::array::from_fn(|j| cols[j][i])))
}

/// The tiles of a batch's outputs: along each side the first output of every tile (its second
/// lies `d` further, if inside), grid by grid.
struct Tiling {
    p: Patches,
    out: (usize, usize),
    ys: Vec<usize>,
    xs: Vec<usize>,
    images: usize,
}

impl Tiling {
    fn new(p: Patches, images: usize) -> Self {
        let out = p.out_hw();
        let d = p.dilation;
        let starts = |n: usize| (0..d.min(n)).flat_map(|r| (r..n).step_by(2 * d)).collect::<Vec<_>>();
        Self { p, out, ys: starts(out.0), xs: starts(out.1), images }
    }

    fn total(&self) -> usize {
        self.images * self.ys.len() * self.xs.len()
    }

    /// Tile `t`'s image and first output `(b, y0, x0)`: tiles run along tile rows, row by row,
    /// image by image.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let (tx, ty) = (self.xs.len(), self.ys.len());
        (t / (tx * ty), self.ys[t / tx % ty], self.xs[t % tx])
    }

    /// The input index of tap `j` (0..4) of the tile starting at output `o`, if inside `n`.
    fn input(&self, o: usize, j: usize, n: usize) -> Option<usize> {
        (o + j * self.p.dilation).checked_sub(self.p.padding).filter(|&i| i < n)
    }

    /// Along a side of `n` inputs, its length padded so that every tile's taps lie inside it:
    /// `padding` zeros before the inputs, zeros after.
    fn padded(&self, starts: &[usize], n: usize) -> usize {
        let last = starts.iter().max().map_or(0, |&s| s + 3 * self.p.dilation + 1);
        last.max(self.p.padding + n)
    }

    /// `V` of tiles `first..first + count` of `images` (`[B, C, H, W]`): `[16][C][count]`.
    /// Each task copies a channel's planes of the chunk's images into planes padded so that
    /// every tile's taps lie inside them (zero outside the image), the rows the chunk's tiles
    /// read; then the tiles go 16 at a time, whichever tile row or image each is in (by tile
    /// row, 9 tiles of a 17x17 map filled 9 of the 16 lanes).
    fn transform_input(&self, images: &[f32], first: usize, count: usize, v: &mut [MaybeUninit<f32>]) {
        let (c_in, h, w) = (self.p.channels, self.p.h, self.p.w);
        let (d, pad) = (self.p.dilation, self.p.padding);
        let (ph, pw) = (self.padded(&self.ys, h), self.padded(&self.xs, w));
        let b0 = self.tile(first).0;
        let images_read = self.tile(first + count - 1).0 + 1 - b0;
        // Per image of the chunk, the padded rows its tiles read; per tile, its first tap.
        let mut rows = vec![(usize::MAX, 0); images_read];
        let corners: Vec<usize> = (first..first + count)
            .map(|t| {
                let (b, y0, x0) = self.tile(t);
                let read = &mut rows[b - b0];
                *read = (read.0.min(y0), read.1.max(y0 + 3 * d + 1));
                ((b - b0) * ph + y0) * pw + x0
            })
            .collect();
        let v = SharedOut(v.as_mut_ptr().cast());
        (0..c_in).into_par_iter().for_each_init(
            // Zero where no input lands (the padding), for every channel of the task.
            || vec![0f32; images_read * ph * pw],
            |planes, c| {
                let v = &v;
                for (k, &(top, bottom)) in rows.iter().enumerate() {
                    let image = &images[((b0 + k) * c_in + c) * h * w..][..h * w];
                    for y in top.max(pad)..bottom.min(pad + h) {
                        planes[(k * ph + y) * pw + pad..][..w].copy_from_slice(&image[(y - pad) * w..][..w]);
                    }
                }
                // SAFETY: entries (e, c, 0..count) of `[16][C][count]`: this task's alone; every
                // tile's taps lie inside the padded planes (`padded`).
                unsafe { input_tiles(planes, d * pw, &corners, d, v.0.add(c * count), c_in * count) };
            },
        );
    }

    /// Writes the outputs of tiles `first..first + count` from their products `m`
    /// (`[16][C_out][count]`) into `y` (`[B, C_out, Ho, Wo]`), `after` applied to each.
    fn transform_output(
        &self,
        m: &[f32],
        c_out: usize,
        first: usize,
        count: usize,
        y: &SharedOut,
        after: Option<&ChannelAffine>,
    ) {
        let (oh, ow) = self.out;
        let d = self.p.dilation;
        let plane = c_out * count;
        // Per tile: where its first output lies in channel 0's map, and which of its four
        // outputs (row-major) lie inside the map. The tiles go 16 at a time, across tile rows.
        let tiles: Vec<(usize, [bool; 4])> = (first..first + count)
            .map(|t| {
                let (b, y0, x0) = self.tile(t);
                let inside = std::array::from_fn(|i| y0 + i / 2 * d < oh && x0 + i % 2 * d < ow);
                (b * c_out * oh * ow + y0 * ow + x0, inside)
            })
            .collect();
        let offsets: [usize; 4] = std::array::from_fn(|i| i / 2 * d * ow + i % 2 * d);
        (0..c_out).into_par_iter().for_each(|o| {
            for (g, group) in tiles.chunks(16).enumerate() {
                let mut values = output_tiles(&m[o * count + 16 * g..], plane, group.len());
                if let Some(after) = after {
                    values.iter_mut().for_each(|v| after.apply(o, &mut v[..group.len()]));
                }
                for (k, &(corner, inside)) in group.iter().enumerate() {
                    let corner = corner + o * oh * ow;
                    for i in (0..4).filter(|&i| inside[i]) {
                        // SAFETY: output (b, o, y, x) belongs to this tile alone.
                        unsafe { y.0.add(corner + offsets[i]).write(values[i][k]) };
                    }
                }
            }
        });
    }
}

/// A buffer that parallel tasks write disjoint entries of.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint entries (see each use).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// A kernel `[C_out, C, 3, 3]` transformed, `U_e` (`C_out x C`) for each of the 16 positions,
/// each packed as a product's A.
#[derive(Debug)]
pub struct Kernel {
    u: Box<[PackedRows]>,
    c_out: usize,
    c_in: usize,
}

impl Kernel {
    /// `U_e[o][c] = (G w[o][c] Gᵀ)_e`.
    pub fn new(weight: &[f32], c_out: usize, c_in: usize) -> Self {
        let u = PackedRows::many(c_out, c_in, |line0, p, runs| {
            let base = (line0 * c_in + p) * 9;
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512 is present; the runs' lines are output channels of the kernel.
                return unsafe { kernel_lines_avx512(&weight[base..], c_in * 9, runs) };
            }
            for i in 0..runs[0].len() {
                let w = |t: usize| weight[base + i * c_in * 9 + t];
                let g: [[f32; 3]; 3] = std::array::from_fn(|ky| std::array::from_fn(|kx| w(ky * 3 + kx)));
                for (run, &value) in runs.iter_mut().zip(both_axes(g, kernel_1d).iter().flatten()) {
                    run[i] = value;
                }
            }
        });
        Self { u: u.into(), c_out, c_in }
    }

    /// The transformed matrix at position `e` of the input gradient's kernel (this one flipped
    /// in both spatial axes, its channel axes swapped): `U_e` of this kernel transposed, at the
    /// position mirrored. Reversing a kernel's three taps swaps the first and last of `G g`
    /// (`kernel_1d`) and keeps the middle two, exactly (`g0 + g2` is added either way), so the
    /// flipped kernel's `U[a][b]` is this one's `U[σa][σb]`, `σ` swapping 0 and 3.
    fn flipped(&self, e: usize) -> Transposed<'_> {
        let mirror = |i: usize| if i == 0 || i == 3 { 3 - i } else { i };
        Transposed(&self.u[mirror(e / 4) * 4 + mirror(e % 4)])
    }
}

/// The transformed kernel of up to 16 output channels at one input channel, in the lanes: the
/// taps of line `i` at `weight[i · line_stride..][..9]`, `U_e` of line `i` to `runs[e][i]`; the
/// next input channel's taps follow them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_lines_avx512(weight: &[f32], line_stride: usize, runs: &mut [&mut [f32]; E]) {
    use std::arch::x86_64::*;
    let n = runs[0].len();
    // The lines' taps a few depth steps on: the panel's lines are as many streams through the
    // kernel (a row of it apart), more than the hardware follows (the first gather waited on
    // memory for half the function's time).
    for i in 0..n {
        // A prefetch never faults, wherever it points.
        _mm_prefetch::<_MM_HINT_T0>(weight.as_ptr().wrapping_add(i * line_stride + 16 * 9).cast());
    }
    let mask = lanes_below(n);
    let lines: [i32; 16] = std::array::from_fn(|i| (i * line_stride) as i32);
    // SAFETY: 16 i32s.
    let lines = unsafe { _mm512_loadu_si512(lines.as_ptr().cast()) };
    assert!(n == 0 || (n - 1) * line_stride + 9 <= weight.len(), "kernel_lines_avx512: lines past the kernel");
    // SAFETY: lanes below `n` read inside `weight` (asserted); the others are masked off.
    let g: [[__m512; 3]; 3] = std::array::from_fn(|ky| {
        std::array::from_fn(|kx| unsafe {
            let at = _mm512_add_epi32(lines, _mm512_set1_epi32((ky * 3 + kx) as i32));
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, at, weight.as_ptr())
        })
    });
    let half = _mm512_set1_ps(0.5);
    let kernel = |f: [__m512; 3]| {
        let (outer, sum) = (_mm512_add_ps(f[0], f[2]), f[1]);
        [f[0], _mm512_mul_ps(half, _mm512_add_ps(outer, sum)), _mm512_mul_ps(half, _mm512_sub_ps(outer, sum)), f[2]]
    };
    let cols: [[__m512; 4]; 3] = std::array::from_fn(|kx| kernel(std::array::from_fn(|ky| g[ky][kx])));
    for i in 0..4 {
        for (j, v) in kernel(std::array::from_fn(|kx| cols[kx][i])).into_iter().enumerate() {
            // SAFETY: `runs[e]` holds `n` floats; lanes past `n` are not written.
            unsafe { _mm512_mask_storeu_ps(runs[i * 4 + j].as_mut_ptr(), mask, v) };
        }
    }
}

/// `y = conv(x, w)` for a batch `x` (`[B, C, H, W]` as `p` says) and a transformed kernel:
/// `[B, C_out, Ho, Wo]`, `after` applied to each output channel.
pub fn convolve(p: Patches, x: &[f32], kernel: &Kernel, after: Option<&ChannelAffine>) -> Vec<f32> {
    convolve_in_chunks(p, x, kernel, false, after, chunk(p.channels + kernel.c_out))
}

/// The input gradient's convolution (`im2col`'s `GradInput`) of `g` (`[B, C_out, Ho, Wo]` as
/// `p` says) with `kernel` flipped and its channel axes swapped (`Kernel::flipped`):
/// `[B, C, H, W]`.
pub fn convolve_flipped(p: Patches, g: &[f32], kernel: &Kernel) -> Vec<f32> {
    convolve_in_chunks(p, g, kernel, true, None, chunk(kernel.c_in + kernel.c_out))
}

/// Tiles per chunk for products with `lines` channels in and out.
fn chunk(lines: usize) -> usize {
    (CHUNK_BUDGET / (E * lines)).max(32) / 32 * 32
}

/// [`convolve`] (or with `flipped` [`convolve_flipped`]), `chunk` tiles at a time.
fn convolve_in_chunks(
    p: Patches,
    x: &[f32],
    kernel: &Kernel,
    flipped: bool,
    after: Option<&ChannelAffine>,
    chunk: usize,
) -> Vec<f32> {
    let (c_in, c_out) = if flipped { (kernel.c_out, kernel.c_in) } else { (kernel.c_in, kernel.c_out) };
    assert!(
        p.kernel == 3 && p.stride == 1 && c_in == p.channels,
        "winograd: {p:?} with a {}x{} kernel (flipped: {flipped})",
        kernel.c_out,
        kernel.c_in
    );
    let images = x.len() / (c_in * p.h * p.w);
    let tiling = Tiling::new(p, images);
    let (oh, ow) = tiling.out;
    let mut y = Vec::<f32>::with_capacity(images * c_out * oh * ow);
    let out = SharedOut(y.as_mut_ptr());
    let total = tiling.total();
    let chunk = chunk.min(total).max(1);
    let (mut v, mut m) = (unwritten(E * c_in * chunk), unwritten(E * c_out * chunk));
    for first in (0..total).step_by(chunk) {
        let count = chunk.min(total - first);
        let (v, m) = (&mut v[..E * c_in * count], &mut m[..E * c_out * count]);
        tiling.transform_input(x, first, count, v);
        // SAFETY: the transform wrote every entry of the chunk's `V`.
        let v = unsafe { written(v) };
        m.par_chunks_mut(c_out * count).zip(v.par_chunks(c_in * count)).enumerate().for_each(|(e, (m, v))| {
            let v = Mat::columns(v, count);
            if flipped {
                sgemm_serial(c_out, count, c_in, &kernel.flipped(e), &v, m, count, false);
            } else {
                sgemm_serial(c_out, count, c_in, &kernel.u[e], &v, m, count, false);
            }
        });
        // SAFETY: each product wrote its `c_out x count` entries of `M`, all of them.
        tiling.transform_output(unsafe { written(m) }, c_out, first, count, &out, after);
    }
    // SAFETY: the tiles cover every output position, each written once above.
    unsafe { y.set_len(images * c_out * oh * ow) };
    y
}

/// `∂W` (`[C_out, C, 3, 3]`) of the convolution of `x` (`[B, C, H, W]` as `p` says) for the
/// output gradient `grad` (`[B, C_out, Ho, Wo]`): `∂U_e = Ŷ_e · V_eᵀ` summed over the tiles
/// (16 products as deep as the tiles), then `∂W = Gᵀ ∂U G`. Here the transforms put the
/// channels in the lanes, so that both operands lie with their lines (channels) side by side.
pub fn weight_gradient(p: Patches, x: &[f32], grad: &[f32], c_out: usize) -> Vec<f32> {
    weight_gradient_in_chunks(p, x, grad, c_out, chunk(p.channels + c_out))
}

/// [`weight_gradient`], `chunk` tiles at a time.
fn weight_gradient_in_chunks(p: Patches, x: &[f32], grad: &[f32], c_out: usize, chunk: usize) -> Vec<f32> {
    assert!(p.kernel == 3 && p.stride == 1, "winograd: {p:?}");
    let c_in = p.channels;
    let images = x.len() / (c_in * p.h * p.w);
    let tiling = Tiling::new(p, images);
    let total = tiling.total();
    if total == 0 {
        return vec![0.0; c_out * c_in * 9];
    }
    let chunk = chunk.min(total);
    let (oh, ow) = tiling.out;
    // Channels last, so that a tap of 16 channels is one load (gathers across the channels'
    // maps took 3.5% of a 128² training step).
    let (x, grad) = (channels_last(x, c_in, p.h * p.w), channels_last(grad, c_out, oh * ow));
    let (mut v, mut yhat) = (unwritten(E * chunk * c_in), unwritten(E * chunk * c_out));
    let mut du = unwritten(E * c_out * c_in);
    for (i, first) in (0..total).step_by(chunk).enumerate() {
        let count = chunk.min(total - first);
        let (v, yhat) = (&mut v[..E * count * c_in], &mut yhat[..E * count * c_out]);
        tiling.transform_by_channels(&x, c_in, first, count, v, false);
        tiling.transform_by_channels(&grad, c_out, first, count, yhat, true);
        // SAFETY: the transforms wrote every entry of the chunk's `V` and `Ŷ`; the first chunk's
        // products write all of `∂U`, later ones add to it.
        let (v, yhat) = unsafe { (written(v), written(yhat)) };
        du.par_chunks_mut(c_out * c_in).zip(yhat.par_chunks(count * c_out).zip(v.par_chunks(count * c_in))).for_each(
            |(du, (yhat, v))| {
                let (a, b) = (Mat::columns(yhat, c_out), Mat::columns(v, c_in));
                sgemm_serial(c_out, c_in, count, &a, &b, du, c_in, i > 0);
            },
        );
    }
    // SAFETY: as above: the first chunk wrote all of `∂U`.
    let du = unsafe { written(&du) };
    let plane = c_out * c_in;
    let mut dw = unwritten(plane * 9);
    dw.par_chunks_mut(9 * 16).enumerate().for_each(|(group, dw)| {
        let k0 = 16 * group;
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: AVX-512 is present; the group's pairs lie inside every plane of `∂U`.
            return unsafe { kernel_adjoint_avx512(&du[k0..], plane, dw) };
        }
        for (k, dw) in (k0..).zip(dw.chunks_exact_mut(9)) {
            let du: [[f32; 4]; 4] = std::array::from_fn(|a| std::array::from_fn(|b| du[(a * 4 + b) * plane + k]));
            for (d, &value) in dw.iter_mut().zip(both_axes(du, kernel_adjoint_1d).iter().flatten()) {
                d.write(value);
            }
        }
    });
    // SAFETY: every entry written just now; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { std::mem::transmute::<Vec<MaybeUninit<f32>>, Vec<f32>>(dw) }
}

/// `maps` (`[B, C, P]`) with the channels last: `[B, P, C]`, 16 positions by 16 channels at a
/// time transposed in registers on AVX-512.
fn channels_last(maps: &[f32], channels: usize, plane: usize) -> Vec<f32> {
    if maps.is_empty() {
        return Vec::new();
    }
    let mut out = unwritten(maps.len());
    let image = channels * plane;
    // Tasks of 16 positions of an image, all channels: contiguous in the output.
    out.par_chunks_mut(image).enumerate().for_each(|(b, out)| {
        let maps = &maps[b * image..][..image];
        out.par_chunks_mut(16 * channels).enumerate().for_each(|(g, out)| {
            let p0 = 16 * g;
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                // SAFETY: AVX-512 is present; positions `p0..` of every channel lie inside `maps`.
                return unsafe { channels_last_avx512(maps, channels, plane, p0, out) };
            }
            for (k, out) in out.chunks_exact_mut(channels).enumerate() {
                for (c, o) in out.iter_mut().enumerate() {
                    o.write(maps[c * plane + p0 + k]);
                }
            }
        });
    });
    // SAFETY: every position's channels were written; same layout.
    unsafe { std::mem::transmute::<Vec<MaybeUninit<f32>>, Vec<f32>>(out) }
}

/// [`channels_last`] of positions `p0..p0 + 16` (fewer at the end) of one image, to `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn channels_last_avx512(maps: &[f32], channels: usize, plane: usize, p0: usize, out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let positions = out.len() / channels;
    let read = lanes_below(positions);
    for c0 in (0..channels).step_by(16) {
        let n = 16.min(channels - c0);
        // SAFETY: the rows of channels below `n`, `positions` values each, lie inside `maps`.
        let rows: [__m512; 16] = std::array::from_fn(|i| unsafe {
            if i < n {
                _mm512_maskz_loadu_ps(read, maps.as_ptr().add((c0 + i) * plane + p0))
            } else {
                _mm512_setzero_ps()
            }
        });
        let store = lanes_below(n);
        for (k, column) in transpose16(rows).into_iter().take(positions).enumerate() {
            // SAFETY: channels `c0..c0 + n` of position `k`, inside `out`.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(k * channels + c0).cast(), store, column) };
        }
    }
}

/// Memory for `n` values that a pass writes in full before anything reads them (zeroing it
/// first was 1–3% of a 128² training step).
fn unwritten(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut values = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { values.set_len(n) };
    values
}

/// `values` as the floats a pass wrote.
///
/// # Safety
/// Every entry must have been written.
unsafe fn written(values: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: the caller's; same layout.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) }
}

impl Tiling {
    /// The transform of tiles `first..first + count`, `[16][count][channels]`, channels side by
    /// side: of the input `maps` (channels last, `[B, H, W, C]`, `V`), or with `of_output` of the
    /// output gradient (`[B, Ho, Wo, C_out]`, `Ŷ`, outputs past the edge taken as 0).
    fn transform_by_channels(
        &self,
        maps: &[f32],
        channels: usize,
        first: usize,
        count: usize,
        out: &mut [MaybeUninit<f32>],
        of_output: bool,
    ) {
        let (h, w) = if of_output { self.out } else { (self.p.h, self.p.w) };
        let d = self.p.dilation;
        let shared = SharedOut(out.as_mut_ptr().cast());
        (0..count).into_par_iter().with_min_len(8).for_each(|k| {
            let shared = &shared;
            let (b, y0, x0) = self.tile(first + k);
            let image = &maps[b * channels * h * w..][..channels * h * w];
            // The tile's taps as positions in the map, `None` outside it: 4 output gradient taps
            // (2x2) or 16 input taps (4x4), row-major.
            let side = if of_output { 2 } else { 4 };
            let tap = |along: usize, o: usize, n: usize| {
                if of_output { Some(o + along * d).filter(|&i| i < n) } else { self.input(o, along, n) }
            };
            let taps: [Option<usize>; E] =
                std::array::from_fn(|j| Some(tap(j / side, y0, h)? * w + tap(j % side, x0, w)?));
            // SAFETY: entries (e, k, all channels) of `[16][count][channels]`: this task's alone.
            unsafe {
                let at = shared.0.add(k * channels);
                by_channels(image, &taps[..side * side], channels, at, count * channels);
            }
        });
    }
}

/// The transform of one tile with the channels in the lanes: `taps` (16 input taps, or 4 output
/// gradient taps, row-major) as positions in `image` (channels last); the transformed tile's
/// entry `e` of channel `c` to `out[e · e_stride + c]`.
///
/// # Safety
/// `out` must be valid for those writes; the taps lie inside the image.
unsafe fn by_channels(image: &[f32], taps: &[Option<usize>], channels: usize, out: *mut f32, e_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512 is present; the caller's guarantees.
        return unsafe { by_channels_avx512(image, taps, channels, out, e_stride) };
    }
    for c in 0..channels {
        let tap = |j: usize| taps[j].map_or(0.0, |at| image[at * channels + c]);
        let t = if taps.len() == 16 {
            both_axes(std::array::from_fn(|i| std::array::from_fn(|j| tap(i * 4 + j))), input_1d)
        } else {
            both_axes(std::array::from_fn(|a| std::array::from_fn(|b| tap(a * 2 + b))), output_adjoint_1d)
        };
        for (e, &value) in t.iter().flatten().enumerate() {
            // SAFETY: the caller's.
            unsafe { out.add(e * e_stride + c).write(value) };
        }
    }
}

/// [`by_channels`] with 16 channels in the lanes: a load per tap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn by_channels_avx512(image: &[f32], taps: &[Option<usize>], channels: usize, out: *mut f32, e_stride: usize) {
    use std::arch::x86_64::*;
    for c0 in (0..channels).step_by(16) {
        let n = 16.min(channels - c0);
        let mask = lanes_below(n);
        // SAFETY: the caller's: each tap of the channels below `n` lies inside `image`.
        let tap = |j: usize| match taps[j] {
            Some(at) => unsafe { _mm512_maskz_loadu_ps(mask, image.as_ptr().add(at * channels + c0)) },
            None => _mm512_setzero_ps(),
        };
        let t: [__m512; 16] = if taps.len() == 16 {
            let input = |f: [__m512; 4]| {
                [
                    _mm512_sub_ps(f[0], f[2]),
                    _mm512_add_ps(f[1], f[2]),
                    _mm512_sub_ps(f[2], f[1]),
                    _mm512_sub_ps(f[1], f[3]),
                ]
            };
            let tile: [[__m512; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| tap(i * 4 + j)));
            let cols: [[__m512; 4]; 4] = std::array::from_fn(|j| input(std::array::from_fn(|i| tile[i][j])));
            let rows: [[__m512; 4]; 4] = std::array::from_fn(|i| input(std::array::from_fn(|j| cols[j][i])));
            std::array::from_fn(|e| rows[e / 4][e % 4])
        } else {
            let zero = _mm512_setzero_ps();
            let adjoint = |f: [__m512; 2]| {
                [f[0], _mm512_add_ps(f[0], f[1]), _mm512_sub_ps(f[0], f[1]), _mm512_sub_ps(zero, f[1])]
            };
            let g: [[__m512; 2]; 2] = std::array::from_fn(|a| std::array::from_fn(|b| tap(a * 2 + b)));
            let cols: [[__m512; 4]; 2] = std::array::from_fn(|b| adjoint([g[0][b], g[1][b]]));
            let rows: [[__m512; 4]; 4] = std::array::from_fn(|i| adjoint([cols[0][i], cols[1][i]]));
            std::array::from_fn(|e| rows[e / 4][e % 4])
        };
        for (e, v) in t.into_iter().enumerate() {
            // SAFETY: the caller's; lanes past `n` are not written.
            unsafe { _mm512_mask_storeu_ps(out.add(e * e_stride + c0), mask, v) };
        }
    }
}

/// `∂W = Gᵀ ∂U G` of (at most) 16 channel pairs in the lanes: `∂U_e` of pair `l` at
/// `du[e · plane + l]`, its nine taps to `dw[9l..9l + 9]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_adjoint_avx512(du: &[f32], plane: usize, dw: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let n = dw.len() / 9;
    assert!(n <= 16 && 15 * plane + n <= du.len(), "kernel_adjoint_avx512: pairs past ∂U");
    let mask = lanes_below(n);
    // SAFETY: lanes below `n` lie inside `du` (asserted); the others are masked off.
    let u: [[__m512; 4]; 4] = std::array::from_fn(|a| {
        std::array::from_fn(|b| unsafe { _mm512_maskz_loadu_ps(mask, du.as_ptr().add((a * 4 + b) * plane)) })
    });
    let half = _mm512_set1_ps(0.5);
    let adjoint = |u: [__m512; 4]| {
        let mid = _mm512_mul_ps(half, _mm512_add_ps(u[1], u[2]));
        [_mm512_add_ps(u[0], mid), _mm512_mul_ps(half, _mm512_sub_ps(u[1], u[2])), _mm512_add_ps(mid, u[3])]
    };
    let cols: [[__m512; 3]; 4] = std::array::from_fn(|b| adjoint(std::array::from_fn(|a| u[a][b])));
    let mut taps = [[0f32; 16]; 9];
    for i in 0..3 {
        for (j, v) in adjoint(std::array::from_fn(|b| cols[b][i])).into_iter().enumerate() {
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(taps[i * 3 + j].as_mut_ptr(), v) };
        }
    }
    for (l, dw) in dw.chunks_exact_mut(9).enumerate() {
        for (t, d) in dw.iter_mut().enumerate() {
            d.write(taps[t][l]);
        }
    }
}

/// The input transform of tiles from `data`, tile `k`'s tap `(i, j)` at
/// `data[corners[k] + i · row_step + j · d]`: `V_e` of tile `k` to `out[e · e_stride + k]`.
///
/// # Safety
/// `out` must be valid for those writes; every tap lies inside `data`.
unsafe fn input_tiles(data: &[f32], row_step: usize, corners: &[usize], d: usize, out: *mut f32, e_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512 is present; the caller's guarantees.
        return unsafe { input_tiles_avx512(data, row_step, corners, d, out, e_stride) };
    }
    for (k, &corner) in corners.iter().enumerate() {
        let tile: [[f32; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| data[corner + i * row_step + j * d]));
        for (e, &value) in both_axes(tile, input_1d).iter().flatten().enumerate() {
            // SAFETY: the caller's.
            unsafe { out.add(e * e_stride + k).write(value) };
        }
    }
}

/// Lanes `l < n` of 16 (`n` the offsets given), and the offsets in them (0 past `n`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn lanes(offsets: &[usize]) -> (u16, std::arch::x86_64::__m512i) {
    let lanes: [i32; 16] = std::array::from_fn(|l| offsets.get(l).map_or(0, |&x| x as i32));
    // SAFETY: 16 i32s.
    let lanes = unsafe { std::arch::x86_64::_mm512_loadu_si512(lanes.as_ptr().cast()) };
    (lanes_below(offsets.len()), lanes)
}

/// [`input_tiles`] with 16 tiles in the lanes: a gather per tap, the transform on vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_tiles_avx512(
    data: &[f32],
    row_step: usize,
    corners: &[usize],
    d: usize,
    out: *mut f32,
    e_stride: usize,
) {
    use std::arch::x86_64::*;
    for (g, corners) in corners.chunks(16).enumerate() {
        let (mask, corners) = lanes(corners);
        // SAFETY: the caller's: every lane's taps lie inside `data`; lanes past `n` masked.
        let tile: [[__m512; 4]; 4] = std::array::from_fn(|i| {
            std::array::from_fn(|j| unsafe {
                let at = _mm512_add_epi32(corners, _mm512_set1_epi32((i * row_step + j * d) as i32));
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, at, data.as_ptr())
            })
        });
        let column = |f: [__m512; 4]| {
            [_mm512_sub_ps(f[0], f[2]), _mm512_add_ps(f[1], f[2]), _mm512_sub_ps(f[2], f[1]), _mm512_sub_ps(f[1], f[3])]
        };
        let cols: [[__m512; 4]; 4] = std::array::from_fn(|j| column(std::array::from_fn(|i| tile[i][j])));
        let transformed: [[__m512; 4]; 4] = std::array::from_fn(|i| column(std::array::from_fn(|j| cols[j][i])));
        for (e, &v) in transformed.iter().flatten().enumerate() {
            // SAFETY: the caller's; lanes past `n` are not written.
            unsafe { _mm512_mask_storeu_ps(out.add(e * e_stride + 16 * g), mask, v) };
        }
    }
}

/// The outputs of `n` (at most 16) tiles from their products (`M_e` of tile `k` at
/// `m[e · e_stride + k]`): `[y00, y01, y10, y11]`, each a lane per tile.
fn output_tiles(m: &[f32], e_stride: usize, n: usize) -> [[f32; 16]; 4] {
    assert!(n <= 16 && (n == 0 || 15 * e_stride + n <= m.len()), "output_tiles: products past the chunk");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512 is present; the reads lie inside `m` (asserted).
        return unsafe { output_tiles_avx512(m, e_stride, n) };
    }
    let mut values = [[0f32; 16]; 4];
    for k in 0..n {
        let products: [[f32; 4]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| m[(i * 4 + j) * e_stride + k]));
        for (v, &value) in values.iter_mut().zip(both_axes(products, output_1d).iter().flatten()) {
            v[k] = value;
        }
    }
    values
}

/// [`output_tiles`] with the tiles in the lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_tiles_avx512(m: &[f32], e_stride: usize, n: usize) -> [[f32; 16]; 4] {
    use std::arch::x86_64::*;
    let mask = lanes_below(n);
    // SAFETY: the caller's: lanes below `n` lie inside `m`.
    let p: [[__m512; 4]; 4] = std::array::from_fn(|i| {
        std::array::from_fn(|j| unsafe { _mm512_maskz_loadu_ps(mask, m.as_ptr().add((i * 4 + j) * e_stride)) })
    });
    let output = |f: [__m512; 4]| {
        [_mm512_add_ps(_mm512_add_ps(f[0], f[1]), f[2]), _mm512_sub_ps(_mm512_sub_ps(f[1], f[2]), f[3])]
    };
    let cols: [[__m512; 2]; 4] = std::array::from_fn(|j| output(std::array::from_fn(|i| p[i][j])));
    let mut values = [[0f32; 16]; 4];
    for a in 0..2 {
        for (b, v) in output(std::array::from_fn(|j| cols[j][a])).into_iter().enumerate() {
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(values[a * 2 + b].as_mut_ptr(), v) };
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::super::batch_norm::Activation;
    use super::super::sgemm::{Dest, sgemm_new};
    use super::*;

    /// Set while a test runs the portable kernels ([`avx512`]); other tests running meanwhile
    /// take them too, and get the same values up to rounding.
    pub(super) static PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// `f` once with the AVX-512 kernels (where the CPU has them) and once with the portable ones.
    fn both_kernels(f: impl Fn(&str)) {
        // One such test at a time, so that each half runs the kernels it names.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for portable in [false, true] {
            PORTABLE.store(portable, std::sync::atomic::Ordering::Relaxed);
            f(if portable { "portable" } else { "native" });
        }
        PORTABLE.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// Every multiply-add of the convolution written out, `x[b][c][oy + d·ky − p][ox + d·kx − p]`
    /// times tap `(ky, kx)` of `w[o][c]` into `y[b][o][oy][ox]`: `f(x index, (o, c, tap) index,
    /// y index)` for each whose input lies inside the image.
    fn each_product(p: Patches, images: usize, c_out: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = p.out_hw();
        for (b, o, c) in (0..images).flat_map(|b| (0..c_out).flat_map(move |o| (0..p.channels).map(move |c| (b, o, c))))
        {
            for (oy, ox, ky, kx) in
                (0..oh).flat_map(|oy| (0..ow).flat_map(move |ox| (0..9).map(move |t| (oy, ox, t / 3, t % 3))))
            {
                let iy = (oy + ky * p.dilation).checked_sub(p.padding).filter(|&i| i < p.h);
                let ix = (ox + kx * p.dilation).checked_sub(p.padding).filter(|&i| i < p.w);
                if let (Some(iy), Some(ix)) = (iy, ix) {
                    let x = ((b * p.channels + c) * p.h + iy) * p.w + ix;
                    f(x, ((o * p.channels + c) * 3 + ky) * 3 + kx, ((b * c_out + o) * oh + oy) * ow + ox);
                }
            }
        }
    }

    /// The convolution written out: `y[b][o][oy][ox] = Σ w[o][c][ky][kx] · x[b][c][oy + d·ky − p][ox + d·kx − p]`.
    fn direct(p: Patches, x: &[f32], w: &[f32], c_out: usize) -> Vec<f32> {
        let (oh, ow) = p.out_hw();
        let images = x.len() / (p.channels * p.h * p.w);
        let mut y = vec![0f64; images * c_out * oh * ow];
        each_product(p, images, c_out, |xi, wi, yi| y[yi] += (x[xi] * w[wi]) as f64);
        y.into_iter().map(|v| v as f32).collect()
    }

    /// The weight gradient written out: `∂W[o][c][ky][kx] = Σ g[b][o][oy][ox] · x[b][c][oy + d·ky − p][ox + d·kx − p]`.
    fn direct_weight_gradient(p: Patches, x: &[f32], g: &[f32], c_out: usize) -> Vec<f32> {
        let images = x.len() / (p.channels * p.h * p.w);
        let mut dw = vec![0f64; c_out * p.channels * 9];
        each_product(p, images, c_out, |xi, wi, yi| dw[wi] += (x[xi] * g[yi]) as f64);
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// The largest difference between two results.
    fn off_by(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len(), "results of different sizes");
        got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    }

    /// The largest magnitude of a result.
    fn largest(values: &[f32]) -> f32 {
        values.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    /// (C, C_out, padding, dilation, H, W): every padding and dilation the networks use and more
    /// (no padding, more padding than dilation, odd and even sides, sides shorter than the
    /// dilation's grids).
    const GEOMETRIES: [(usize, usize, usize, usize, usize, usize); 5] =
        [(3, 4, 1, 1, 9, 9), (5, 3, 0, 1, 8, 7), (4, 6, 2, 2, 9, 11), (2, 3, 4, 4, 9, 10), (3, 2, 4, 4, 3, 5)];

    /// Every geometry of [`GEOMETRIES`] and more, one chunk and many
    /// (a chunk that ends inside a tile row and inside an image), against the convolution
    /// written out; the flipped kernel against flipping by hand; the channel map applied.
    #[test]
    fn equals_the_convolution_written_out() {
        both_kernels(|kernels| {
            // Several panels of lines and depth blocks of the products too.
            for (i, &(c, c_out, padding, dilation, h, w)) in
                GEOMETRIES.iter().chain(&[(17, 19, 2, 1, 6, 13)]).enumerate()
            {
                let p = Patches { kernel: 3, stride: 1, padding, dilation, channels: c, h, w };
                let x = values(2 * c * h * w, i);
                let weight = values(c_out * c * 9, i + 50);
                let want = direct(p, &x, &weight, c_out);
                let scale = largest(&want);
                let kernel = Kernel::new(&weight, c_out, c);
                for chunk in [7, 32, usize::MAX] {
                    let got = convolve_in_chunks(p, &x, &kernel, false, None, chunk);
                    let diff = off_by(&got, &want);
                    assert!(diff <= 1e-5 * scale, "{kernels}: case {i} chunk {chunk}: off by {diff} (scale {scale})");
                }
                // The input gradient's kernel: channels swapped, taps reversed.
                let flipped: Vec<f32> = (0..c * c_out * 9)
                    .map(|j| {
                        let (ci, o, t) = (j / (c_out * 9), j / 9 % c_out, j % 9);
                        weight[(o * c + ci) * 9 + 8 - t]
                    })
                    .collect();
                let q = Patches { channels: c_out, ..p };
                let g = values(2 * c_out * h * w, i + 7);
                let want = direct(q, &g, &flipped, c);
                let got = convolve_flipped(q, &g, &kernel);
                let diff = off_by(&got, &want);
                assert!(diff <= 1e-5 * largest(&want), "{kernels}: case {i} flipped: off by {diff}");
            }
            let p = Patches { kernel: 3, stride: 1, padding: 1, dilation: 1, channels: 3, h: 7, w: 6 };
            let (x, weight) = (values(2 * 3 * 42, 1), values(4 * 3 * 9, 2));
            let after = ChannelAffine::new(vec![0.5, -1.0, 2.0, 1.5], vec![0.1, 0.2, -0.3, 0.0], Activation::Relu);
            let mut want = direct(p, &x, &weight, 4);
            want.chunks_mut(42).enumerate().for_each(|(i, map)| after.apply(i % 4, map));
            let got = convolve(p, &x, &Kernel::new(&weight, 4, 3), Some(&after));
            let diff = off_by(&got, &want);
            assert!(diff <= 1e-5, "{kernels}: with the channel map: off by {diff}");
        });
    }

    /// The weight gradient in tiles equals the one written out, on the same geometries, in one
    /// chunk and in many (later chunks add to what the first wrote), for channel counts below,
    /// at and past a vector's 16 lanes.
    #[test]
    fn weight_gradient_equals_the_one_written_out() {
        both_kernels(|kernels| {
            // Channels at and past a vector's 16 lanes too.
            let more = [(17, 16, 2, 1, 6, 13), (33, 19, 1, 1, 5, 4)];
            for (i, &(c, c_out, padding, dilation, h, w)) in GEOMETRIES.iter().chain(&more).enumerate() {
                let p = Patches { kernel: 3, stride: 1, padding, dilation, channels: c, h, w };
                let (oh, ow) = p.out_hw();
                let x = values(2 * c * h * w, i);
                let g = values(2 * c_out * oh * ow, i + 30);
                let want = direct_weight_gradient(p, &x, &g, c_out);
                let scale = largest(&want);
                for chunk in [7, 32, usize::MAX] {
                    let got = weight_gradient_in_chunks(p, &x, &g, c_out, chunk);
                    let diff = off_by(&got, &want);
                    assert!(diff <= 1e-5 * scale, "{kernels}: case {i} chunk {chunk}: off by {diff} (scale {scale})");
                }
            }
        });
    }

    /// The 16 matrices packed at once equal each transformed matrix packed alone; read flipped,
    /// they equal the flipped kernel's, transformed (exactly, up to the rounding of the 16-lane
    /// transform: that is what [`Kernel::flipped`] relies on).
    #[test]
    fn kernel_packs_like_its_matrices() {
        both_kernels(|kernels| {
            // Depth past a product's block, which panels of 14 lines straddle.
            let (c_out, c) = (19, 300);
            let weight = values(c_out * c * 9, 3);
            let kernel = Kernel::new(&weight, c_out, c);
            for flipped in [false, true] {
                let (lines, depth) = if flipped { (c, c_out) } else { (c_out, c) };
                let identity: Vec<f32> =
                    (0..depth * depth).map(|i| if i / depth == i % depth { 1.0 } else { 0.0 }).collect();
                for e in 0..E {
                    let (i, j) = (e / 4, e % 4);
                    let want: Vec<f32> = (0..lines * depth)
                        .map(|k| {
                            let (l, p) = (k / depth, k % depth);
                            let (o, ci) = if flipped { (p, l) } else { (l, p) };
                            let w = &weight[(o * c + ci) * 9..][..9];
                            let g: [[f32; 3]; 3] = std::array::from_fn(|ky| {
                                std::array::from_fn(
                                    |kx| if flipped { w[(2 - ky) * 3 + 2 - kx] } else { w[ky * 3 + kx] },
                                )
                            });
                            both_axes(g, kernel_1d)[i][j]
                        })
                        .collect();
                    // `U_e · I`: the packed matrix read back through a product.
                    let identity = Mat::rows(&identity, depth);
                    let got = if flipped {
                        sgemm_new(
                            lines,
                            depth,
                            depth,
                            &kernel.flipped(e),
                            &identity,
                            |d| Dest::rows_uninit(d, depth),
                            None,
                        )
                    } else {
                        sgemm_new(lines, depth, depth, &kernel.u[e], &identity, |d| Dest::rows_uninit(d, depth), None)
                    };
                    // The vector transform adds `g0 + g2` first: rounding apart, nothing else.
                    let diff = off_by(&got, &want);
                    assert!(diff <= 1e-6, "{kernels}: flipped {flipped} e {e}: off by {diff}");
                }
            }
        });
    }
}

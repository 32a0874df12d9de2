//! Single-precision matrix product for the CPU convolution, BLIS-style: `C (+)= A · Bᵀ` with
//! both operands given as [`Lines`] (`m x k` and `n x k`), which the product packs block by
//! block. A strided matrix is one kind of operand; a convolution's patches are another
//! (`im2col::Taps`), packed straight from the image, so no patch matrix is ever stored.
//!
//! Candle's CPU matmul (the `gemm` crate on stable Rust) uses AVX2 kernels: about 40 GFLOP/s on
//! two cores here. The micro-kernel here is 14x32 on AVX-512 (`examples/sgemm_rate.rs`: 195–233
//! GFLOP/s on 1024³ as the machine's speed drifts; PyTorch's matmul 1.0–1.45x this in the same
//! minutes); CPUs without AVX-512 run a portable one.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Micro-tile: 14 rows by 32 columns (two 16-lane registers), 28 accumulators: with the two B
/// loads and a broadcast, 31 of the 32 vector registers (a 128² training step 3–7% faster than
/// with 12 rows, alternating runs).
const MR: usize = 14;
const NR: usize = 32;
/// Depth of a packed block: a 14x256 slice of A (14 KiB) stays in L1 across the B panels.
const KC: usize = 256;
/// Rows of A packed at once (224 KiB) and columns of B (1 MiB), sized for a 2 MiB L2.
const MC: usize = 16 * MR;
const NC: usize = 32 * NR;
/// Parts a product is split into per thread (see `sgemm_with`).
const PARTS_PER_THREAD: usize = 4;

/// An operand as `lines x depth`: A's lines are its rows, B's its columns.
pub trait Lines: Sync {
    /// Lines `line0..line0 + lines` over depth `depth0..depth0 + kc`, as depth-major panels of
    /// `width` lines: panel `q` starts at `dst[q · width · kc]` and holds, at offset
    /// `p · width + l`, entry `(line0 + q · width + l, depth0 + p)`; zero past `lines`.
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]);

    /// The whole operand already packed as the product's A ([`PackedRows`]), if it is.
    fn packed_rows(&self) -> Option<&PackedRows> {
        None
    }
}

/// An `m x k` operand packed once as a product's A (panels of `MR` lines, depth block by depth
/// block, as the product packs A itself), for a matrix used in many products: a frozen
/// network's kernel is packed once instead of in every forward.
pub struct PackedRows {
    panels: Vec<CacheLine>,
    lines: usize,
    depth: usize,
}

impl PackedRows {
    pub fn new(operand: &impl Lines, lines: usize, depth: usize) -> Self {
        // Its own memory, at its size (not one of the thread's spare buffers, which may be larger).
        let mut panels = PanelBuf(vec![CacheLine([0.0; 16]); (lines.div_ceil(MR) * MR * depth).div_ceil(16)]);
        pack_all_into(operand, lines, depth, MR, panels.as_mut_slice());
        Self { panels: std::mem::take(&mut panels.0), lines, depth }
    }

    /// `N` operands of `lines x depth` computed from one source in one pass (a transformed
    /// kernel's 16 matrices), packed as [`PackedRows::new`] packs one: `fill(line0, p, runs)`
    /// writes entry `(line0 + i, p)` of operand `e` to `runs[e][i]`, for the (at most `MR`)
    /// lines of one panel. Panels are filled in parallel, each down the whole depth.
    pub fn many<const N: usize>(
        lines: usize,
        depth: usize,
        fill: impl Fn(usize, usize, &mut [&mut [f32]; N]) + Sync,
    ) -> [Self; N] {
        let padded = lines.div_ceil(MR) * MR;
        let size = (padded * depth).div_ceil(16);
        let mut all: [Vec<CacheLine>; N] = std::array::from_fn(|_| Vec::with_capacity(size));
        let starts: [SharedPtr; N] = std::array::from_fn(|e| SharedPtr(all[e].as_mut_ptr().cast()));
        (0..padded / MR).into_par_iter().for_each(|q| {
            let n = MR.min(lines - q * MR);
            for p in 0..depth {
                let at = panel_offset(padded, depth, q * MR, p);
                // SAFETY: panel `q`'s entries at depth `p` lie inside each buffer's capacity and
                // belong to this task alone.
                let mut runs: [&mut [f32]; N] =
                    std::array::from_fn(|e| unsafe { std::slice::from_raw_parts_mut(starts[e].0.add(at), MR) });
                for run in &mut runs {
                    run[n..].fill(0.0);
                    *run = &mut std::mem::take(run)[..n];
                }
                fill(q * MR, p, &mut runs);
            }
        });
        all.map(|mut panels| {
            // SAFETY: every entry of `padded x depth` was written above; what rounds it up to
            // whole cache lines is zeroed here.
            unsafe {
                let tail = size * 16 - padded * depth;
                std::ptr::write_bytes(panels.as_mut_ptr().cast::<f32>().add(padded * depth), 0, tail);
                panels.set_len(size);
            }
            Self { panels, lines, depth }
        })
    }

    /// Lines rounded up to whole panels, as [`pack_all`] lays them.
    fn padded_lines(&self) -> usize {
        self.lines.div_ceil(MR) * MR
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `CacheLine` is 16 f32s with no padding (repr(C), 64 bytes).
        unsafe { std::slice::from_raw_parts(self.panels.as_ptr().cast(), self.panels.len() * 16) }
    }
}

impl std::fmt::Debug for PackedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedRows({}x{})", self.lines, self.depth)
    }
}

/// Where A packed whole (`padded` lines in panels of `MR`, depth block by depth block, as
/// [`pack_all`] lays it) keeps entry `(line, p)`.
fn panel_offset(padded: usize, depth: usize, line: usize, p: usize) -> usize {
    let block = p / KC * KC;
    block * padded + line / MR * MR * KC.min(depth - block) + (p - block) * MR + line % MR
}

/// The packed copy is itself an operand: a product takes it as A as it is; packing it (as B, or
/// a product's other uses) reads the entries back from the panels.
impl Lines for PackedRows {
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        let (panels, padded) = (self.as_slice(), self.padded_lines());
        for (j, out) in dst[..lines.div_ceil(width) * width * kc].iter_mut().enumerate() {
            let (line, p) = (line0 + j / (width * kc) * width + j % width, depth0 + j / width % kc);
            *out = if line < line0 + lines { panels[panel_offset(padded, self.depth, line, p)] } else { 0.0 };
        }
    }

    fn packed_rows(&self) -> Option<&PackedRows> {
        Some(self)
    }
}

/// A packed `m x k` operand read as its transpose, `k x m`: entry `(l, p)` is the packed one's
/// `(p, l)`. The input gradient's transformed kernel is the forward's, transposed
/// (`winograd::convolve_flipped`): packing it from the forward's panels reads what is already
/// in memory, where transforming the kernel again read the kernel and wrote a copy as large.
pub struct Transposed<'a>(pub &'a PackedRows);

impl Lines for Transposed<'_> {
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        let inner = self.0;
        assert!(
            line0 + lines <= inner.depth && depth0 + kc <= inner.lines,
            "Transposed: lines {line0}+{lines} at depth {depth0}+{kc} of a {}x{} operand",
            inner.depth,
            inner.lines
        );
        let dst = &mut dst[..lines.div_ceil(width) * width * kc];
        #[cfg(target_arch = "x86_64")]
        if width <= 16 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 is present; the entries read lie inside the panels (asserted bounds).
            return unsafe { transposed_avx512(inner, line0, lines, depth0, width, dst) };
        }
        transposed_portable(inner, line0, lines, depth0, width, dst)
    }
}

/// [`Transposed`]'s pack, entry by entry.
fn transposed_portable(inner: &PackedRows, line0: usize, lines: usize, depth0: usize, width: usize, dst: &mut [f32]) {
    let (panels, padded) = (inner.as_slice(), inner.padded_lines());
    let kc = dst.len() / (lines.div_ceil(width) * width);
    for (j, out) in dst.iter_mut().enumerate() {
        let (line, p) = (line0 + j / (width * kc) * width + j % width, depth0 + j / width % kc);
        *out = if line < line0 + lines { panels[panel_offset(padded, inner.depth, p, line)] } else { 0.0 };
    }
}

/// [`Transposed`]'s pack on AVX-512 for panels of at most 16 lines, block by block: the
/// packed operand keeps, for each of its depths (here a line), its panel's `MR` lines (here
/// depths) side by side, so a block of a panel's lines by one of its panels is `MR` loads,
/// transposed in registers (16x16, four rounds of shuffles), then stored a depth step a row.
/// Gathering the lines one depth step at a time took twice the kernel's transform.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transposed_avx512(
    inner: &PackedRows,
    line0: usize,
    lines: usize,
    depth0: usize,
    width: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (panels, padded) = (inner.as_slice(), inner.padded_lines());
    let kc = dst.len() / (lines.div_ceil(width) * width);
    let store = lanes_below(width);
    // The packed operand's lines `depth0..depth0 + kc` panel by panel, and within each of its
    // panels this block's panels in turn: the reads run down the packed operand's panels in
    // order (block by panel, they jumped a panel for every block and waited on memory).
    for first in (depth0 / MR * MR..depth0 + kc).step_by(MR) {
        for (q, panel) in dst.chunks_exact_mut(width * kc).enumerate() {
            let n = (lines - q * width).min(width);
            // Row `i`: this panel's line `i` (the packed operand's depth), across its panel's lines.
            let rows: [__m512; 16] = std::array::from_fn(|i| {
                if i >= n {
                    return _mm512_setzero_ps();
                }
                let at = panel_offset(padded, inner.depth, first, line0 + q * width + i);
                // SAFETY: a panel row of `MR` entries inside the panels.
                unsafe { _mm512_maskz_loadu_ps((1 << MR) - 1, panels.as_ptr().add(at)) }
            });
            let columns = transpose16(rows);
            for (j, column) in columns.iter().enumerate().take(MR) {
                let line = first + j;
                if (depth0..depth0 + kc).contains(&line) {
                    // SAFETY: depth step `line − depth0` of the panel: `width` floats inside it.
                    unsafe { _mm512_mask_storeu_ps(panel.as_mut_ptr().add((line - depth0) * width), store, *column) };
                }
            }
        }
    }
}

/// The mask of the first `n` of 16 lanes (all of them from 16 on).
#[cfg(target_arch = "x86_64")]
pub(super) fn lanes_below(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

/// The transpose of 16 rows of 16 lanes: column `j` of the result holds lane `j` of every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(a: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved within 128-bit lanes, then pairs of pairs: `u[4g + j]` holds
    // columns j, j + 4, j + 8, j + 12 of rows 4g..4g + 4, one 128-bit lane each.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (a[i / 2 * 2], a[i / 2 * 2 + 1]);
        if i % 2 == 0 { _mm512_unpacklo_ps(x, y) } else { _mm512_unpackhi_ps(x, y) }
    });
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, j) = (i / 4, i % 4);
        let (x, y) = (_mm512_castps_pd(t[4 * g + j / 2]), _mm512_castps_pd(t[4 * g + j / 2 + 2]));
        _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(x, y) } else { _mm512_unpackhi_pd(x, y) })
    });
    // Then the 128-bit lanes of the four row groups gathered: two rounds of lane shuffles.
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[j], u[4 + j]);
        let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + j], u[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[j + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
        out[j + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[j + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
    }
    out
}

/// A strided matrix of lines: entry `(l, p)` is `data[l · ls + p · ps]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub ls: usize,
    pub ps: usize,
}

impl<'a> Mat<'a> {
    /// The rows of a row-major matrix with `cols` columns, as lines.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self { data, ls: cols, ps: 1 }
    }

    /// The columns of a row-major matrix with `cols` columns, as lines.
    pub fn columns(data: &'a [f32], cols: usize) -> Self {
        Self { data, ls: 1, ps: cols }
    }
}

impl Lines for Mat<'_> {
    fn pack(&self, line0: usize, lines: usize, depth0: usize, kc: usize, width: usize, dst: &mut [f32]) {
        pack_strided(self.data, self.ls, |l, p| l * self.ls + p * self.ps, (line0, lines, depth0, kc, width), dst);
    }
}

/// [`Lines::pack`] for an operand whose lines lie `line_stride` apart at every depth: entry
/// `(l + i, p)` is `data[start(l, p) + i · line_stride]`. Adjacent lines (`line_stride` 1) are
/// copied a depth step at a time across all panels, one contiguous copy per step; strided lines
/// go panel row by panel row as gathers on AVX-512 ([`strided_lines_avx512`]), else one line
/// at a time down the depth. `start` is called once per depth step (the kernels' and the
/// maps' divide).
pub(crate) fn pack_strided(
    data: &[f32],
    line_stride: usize,
    start: impl Fn(usize, usize) -> usize,
    (line0, lines, depth0, kc, width): (usize, usize, usize, usize, usize),
    dst: &mut [f32],
) {
    if lines == 0 || kc == 0 {
        return;
    }
    let panels = lines.div_ceil(width);
    let dst = &mut dst[..panels * width * kc];
    if !lines.is_multiple_of(width) {
        dst[(panels - 1) * width * kc..].fill(0.0);
    }
    let starts = (depth0..depth0 + kc).map(|p| start(line0, p));
    if line_stride == 1 {
        for (p, s) in starts.enumerate() {
            for (q, part) in data[s..s + lines].chunks(width).enumerate() {
                dst[(q * kc + p) * width..][..part.len()].copy_from_slice(part);
            }
        }
        return;
    }
    let starts: Vec<usize> = starts.collect();
    // The gathers read at `start + i · line_stride` for lines `i < lines`: all of it inside `data`.
    let last = starts.iter().max().map_or(0, |s| s + (lines - 1) * line_stride);
    assert!(last < data.len(), "pack_strided: lines past the operand's end");
    #[cfg(target_arch = "x86_64")]
    if width <= 32 && i32::try_from(data.len()).is_ok() && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 is present; every index read is below `last` (asserted), and fits i32.
        return unsafe { strided_lines_avx512(data, line_stride, &starts, lines, width, dst) };
    }
    strided_lines_portable(data, line_stride, &starts, lines, width, dst)
}

/// [`pack_strided`]'s strided lines, one line at a time down the depth (the source's order for
/// a matrix row or a map), written `width` apart.
fn strided_lines_portable(
    data: &[f32],
    line_stride: usize,
    starts: &[usize],
    lines: usize,
    width: usize,
    dst: &mut [f32],
) {
    for (q, panel) in dst.chunks_exact_mut(width * starts.len()).enumerate() {
        for i in 0..width.min(lines - q * width) {
            let shift = (q * width + i) * line_stride;
            for (v, &s) in panel[i..].iter_mut().step_by(width).zip(starts) {
                *v = data[s + shift];
            }
        }
    }
}

/// [`strided_lines_portable`] on AVX-512 for panels of at most 32 lines: a panel row is one or
/// two masked gathers (the lines past the last written as 0).
/// For a 512x4608 kernel's rows 0.31–0.42 ns per value against 0.57–0.71 for the line-by-line
/// order it replaced (which copied runs of adjacent steps; `examples/pack_rate.rs`, two runs
/// each); in a 128²
/// training step (the student's kernels forward and flipped, the output gradients of the
/// weight gradients: 34 M values) 63–70 ms of thread time became 39–43.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn strided_lines_avx512(
    data: &[f32],
    line_stride: usize,
    starts: &[usize],
    lines: usize,
    width: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let kc = starts.len();
    let lanes = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(line_stride as i32),
    );
    let step16 = _mm512_set1_epi32((16 * line_stride) as i32);
    for (q, panel) in dst.chunks_exact_mut(width * kc).enumerate() {
        let n = lines - q * width;
        // Lines of the panel in each 16-lane half: stored, and of them read (the rest 0).
        let (store, read) = (
            [lanes_below(width), lanes_below(width.saturating_sub(16))],
            [lanes_below(n.min(width)), lanes_below(n.min(width).saturating_sub(16))],
        );
        for (row, &s) in panel.chunks_exact_mut(width).zip(starts) {
            let base = _mm512_add_epi32(lanes, _mm512_set1_epi32((s + q * width * line_stride) as i32));
            // SAFETY: the caller's: read lanes are inside `data`, stored lanes inside the row.
            unsafe {
                let lo = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), read[0], base, data.as_ptr());
                _mm512_mask_storeu_ps(row.as_mut_ptr(), store[0], lo);
                if width > 16 {
                    let hi = _mm512_mask_i32gather_ps::<4>(
                        _mm512_setzero_ps(),
                        read[1],
                        _mm512_add_epi32(base, step16),
                        data.as_ptr(),
                    );
                    _mm512_mask_storeu_ps(row.as_mut_ptr().add(16), store[1], hi);
                }
            }
        }
    }
}

/// Where the product `C` (`m x n`) goes: entry `(i, j)` at
/// `data[(j / block) · block_stride + i · ldc + j % block]`. Plain rows have one block; a
/// product over a batch's positions lands as `[B, m, positions]` with no copy afterwards.
/// The product only ever writes finished values into `data`, so it may start uninitialised.
pub struct Dest<'a> {
    data: &'a mut [MaybeUninit<f32>],
    ldc: usize,
    block: usize,
    block_stride: usize,
    finish: Option<&'a RowFinish<'a>>,
}

/// What a product does to a finished run of `C`'s row `i` (`f(i, run)`), as each part of the
/// product completes, while the part is still in cache.
pub type RowFinish<'f> = dyn Fn(usize, &mut [f32]) + Sync + 'f;

impl std::fmt::Debug for Dest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dest({} values, ldc {}, block {}/{}, finish {})",
            self.data.len(),
            self.ldc,
            self.block,
            self.block_stride,
            self.finish.is_some()
        )
    }
}

impl<'a> Dest<'a> {
    /// A row-major `C` with row stride `ldc`.
    pub fn rows(data: &'a mut [f32], ldc: usize) -> Self {
        Self::rows_uninit(as_uninit(data), ldc)
    }

    /// `C`'s columns as `(image, position)` pairs, stored `[B, m, positions]`.
    pub fn batched(data: &'a mut [f32], m: usize, positions: usize) -> Self {
        Self::batched_uninit(as_uninit(data), m, positions)
    }

    /// [`Dest::rows`] over memory not yet written.
    pub fn rows_uninit(data: &'a mut [MaybeUninit<f32>], ldc: usize) -> Self {
        Self { data, ldc, block: usize::MAX, block_stride: 0, finish: None }
    }

    /// [`Dest::batched`] over memory not yet written.
    pub fn batched_uninit(data: &'a mut [MaybeUninit<f32>], m: usize, positions: usize) -> Self {
        Self { data, ldc: positions, block: positions, block_stride: m * positions, finish: None }
    }

    /// This `C` with `finish` applied to every row's values once they are final.
    fn then(self, finish: &'a RowFinish<'a>) -> Self {
        Self { finish: Some(finish), ..self }
    }

    /// Where the product writes.
    fn out(&mut self) -> Out {
        Out { ptr: self.data.as_mut_ptr().cast(), ldc: self.ldc, block: self.block, block_stride: self.block_stride }
    }

    /// Whether an `m x n` `C` fills `data[..m · n]` with no gaps.
    fn is_dense(&self, m: usize, n: usize) -> bool {
        if self.block >= n {
            self.ldc == n
        } else {
            self.ldc == self.block && self.block_stride == m * self.block && n.is_multiple_of(self.block)
        }
    }
}

fn as_uninit(data: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the product writes only initialised values (see `Dest`), so `data`
    // stays initialised.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), data.len()) }
}

/// `C[i][j] = Σ_p a(i, p) · b(j, p)` for `a` `m x k`, `b` `n x k`, `C` `m x n` where `c` says.
pub fn sgemm(m: usize, n: usize, k: usize, a: &impl Lines, b: &impl Lines, c: Dest) {
    sgemm_with(best_tile(), m, n, k, a, b, c)
}

/// The product as a new vector of `m · n` floats laid out as `dest` says (it must cover them
/// all, as [`Dest::rows_uninit`] with `ldc = n` and [`Dest::batched_uninit`] do): every entry is
/// written once, none zeroed first (a serial pass as long as the product's output otherwise);
/// `finish`, if given, applied to the values once they are final (`Dest::then`).
pub fn sgemm_new(
    m: usize,
    n: usize,
    k: usize,
    a: &impl Lines,
    b: &impl Lines,
    dest: impl for<'b> FnOnce(&'b mut [MaybeUninit<f32>]) -> Dest<'b>,
    finish: Option<&RowFinish<'_>>,
) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    let spare = &mut c.spare_capacity_mut()[..m * n];
    let at = spare.as_ptr();
    let dest = dest(spare);
    let mut dest = match finish {
        Some(finish) => dest.then(finish),
        None => dest,
    };
    let covers = std::ptr::eq(dest.data.as_ptr(), at) && dest.data.len() == m * n && dest.is_dense(m, n);
    assert!(covers, "sgemm_new: C must cover its {m}x{n} entries");
    if k == 0 {
        dest.data.fill(MaybeUninit::new(0.0));
        if let Some(finish) = dest.finish {
            // SAFETY: `C` covers its `m x n` entries (asserted), all written just now.
            unsafe { dest.out().finish(0..m, 0..n, finish) };
        }
    } else {
        sgemm(m, n, k, a, b, dest);
    }
    // SAFETY: `dest` was the first `m · n` entries of `c`'s buffer with no gaps (asserted), and
    // the product wrote every entry of `C` (its first depth block stores, later ones add), or
    // the fill above did.
    unsafe { c.set_len(m * n) };
    c
}

/// `C (+)= A · Bᵀ` (`add`: onto what `C`, row-major with row stride `ldc`, holds, which an
/// earlier product must have written; else `C` may start unwritten) on the calling thread
/// alone, A as [`PackedRows`] when it is one: for callers that run many small products side by
/// side (a split and a shared packing would cost more than they save).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &impl Lines,
    b: &impl Lines,
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    add: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * ldc + n <= c.len(), "sgemm_serial: C ({m}x{n}, ldc {ldc}) out of bounds");
    if k == 0 {
        if !add {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(MaybeUninit::new(0.0)));
        }
        return;
    }
    let out = Out { ptr: c.as_mut_ptr().cast(), ldc, block: usize::MAX, block_stride: 0 };
    let a_side = match a.packed_rows() {
        Some(p) => {
            assert!((p.lines, p.depth) == (m, k), "sgemm_serial: A packed as {}x{}, used as {m}x{k}", p.lines, p.depth);
            Side::Packed { panels: p.as_slice(), padded_lines: p.padded_lines() }
        }
        None => Side::Lazy(a),
    };
    // SAFETY: C holds the `m x n` tiles (asserted); this thread alone writes them.
    unsafe { blocked(best_tile(), 0..m, 0..n, k, &a_side, &Side::Lazy(b), (out, add)) }
}

/// A micro-kernel: `C[..rows, ..cols] (+)= A_panel · B_panelᵀ` over depth `kc` (see [`tile_avx512`]).
type Tile = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, (usize, usize), bool);

fn best_tile() -> Tile {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return tile_avx512;
    }
    tile_portable
}

/// Packed panels, aligned to cache lines so that no 16-lane load of a B panel straddles two.
/// Their memory is kept for reuse on the thread that dropped them (see [`PanelBuf::take`]).
struct PanelBuf(Vec<CacheLine>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

/// How many dropped buffers a thread keeps: the shared operand, a part's scratch and one spare.
const SPARES: usize = 3;

thread_local! {
    static SPARE_BUFS: std::cell::RefCell<Vec<Vec<CacheLine>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PanelBuf {
    /// At least `len` floats, their values left over from earlier use: every panel is packed
    /// whole (padding included) before a micro-kernel reads it. Reusing this thread's dropped
    /// buffers spares fresh pages (a page fault and a clear for every 4 KiB, which cost more
    /// than the packing on the 10 MB operands of 128² training).
    fn take(len: usize) -> Self {
        let lines = len.div_ceil(16);
        if lines == 0 {
            return Self(Vec::new());
        }
        let reused = SPARE_BUFS.with_borrow_mut(|spares| {
            let fits = spares.iter().enumerate().filter(|(_, b)| b.len() >= lines).min_by_key(|(_, b)| b.len());
            let i = fits.map(|(i, _)| i)?;
            Some(spares.swap_remove(i))
        });
        Self(reused.unwrap_or_else(|| vec![CacheLine([0.0; 16]); lines]))
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `CacheLine` is 16 f32s with no padding (repr(C), 64 bytes).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 16) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 16) }
    }
}

impl Drop for PanelBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.is_empty() {
            return;
        }
        // `try_with`: a thread being torn down frees the buffer instead.
        let _ = SPARE_BUFS.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            spares.push(buf);
            if spares.len() > SPARES {
                // The smallest goes: the large ones are what is costly to fault in again.
                if let Some(i) = spares.iter().enumerate().min_by_key(|(_, b)| b.len()).map(|(i, _)| i) {
                    spares.swap_remove(i);
                }
            }
        });
    }
}

/// A buffer's start, for tasks that write disjoint parts of it.
struct SharedPtr(*mut f32);
// SAFETY: see each use: the tasks write disjoint entries.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

/// `C` as a raw pointer that threads write disjoint tiles of (laid out as [`Dest`] says).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ldc: usize,
    block: usize,
    block_stride: usize,
}
// SAFETY: every thread writes only its own rows or columns of `C`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Entry `(i, j)`; the caller keeps it inside `C`.
    unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        unsafe { self.ptr.add(j / self.block * self.block_stride + i * self.ldc + j % self.block) }
    }

    /// `finish` on the runs of `C[rows, cols]` that lie contiguous (a row within a block).
    /// The caller owns that region, written in full.
    unsafe fn finish(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, finish: &RowFinish<'_>) {
        for i in rows {
            let mut j = cols.start;
            while j < cols.end {
                let run = (self.block - j % self.block).min(cols.end - j);
                // SAFETY: the caller's: the run lies inside its region of C, initialised.
                finish(i, unsafe { std::slice::from_raw_parts_mut(self.at(i, j), run) });
                j += run;
            }
        }
    }
}

/// One operand's packed blocks: all of it packed once up front (shared by the threads), or
/// packed block by block by each thread as it goes.
enum Side<'a, L> {
    Packed { panels: &'a [f32], padded_lines: usize },
    Lazy(&'a L),
}

impl<L: Lines> Side<'_, L> {
    /// Lines `line0..line0 + lines` over depth `pc..pc + kc` as `width`-line panels, from the
    /// packed copy or packed into `scratch`.
    fn block<'s>(
        &'s self,
        line0: usize,
        lines: usize,
        pc: usize,
        kc: usize,
        width: usize,
        scratch: &'s mut [f32],
    ) -> &'s [f32] {
        match self {
            Self::Packed { panels, padded_lines } => &panels[pc * padded_lines + line0 * kc..],
            Self::Lazy(operand) => {
                operand.pack(line0, lines, pc, kc, width, scratch);
                scratch
            }
        }
    }
}

/// All of `operand` (`lines x k`) as `width`-line panels, depth block by depth block: block
/// `pc` starts at `pc · padded_lines`, its panel `q` at `q · width · kc` within it.
fn pack_all(operand: &impl Lines, lines: usize, k: usize, width: usize) -> (PanelBuf, usize) {
    let padded_lines = lines.div_ceil(width) * width;
    let mut packed = PanelBuf::take(padded_lines * k);
    pack_all_into(operand, lines, k, width, packed.as_mut_slice());
    (packed, padded_lines)
}

/// [`pack_all`] into `dst` (at least `lines` rounded up to `width`, times `k` floats).
fn pack_all_into(operand: &impl Lines, lines: usize, k: usize, width: usize, dst: &mut [f32]) {
    let padded_lines = lines.div_ceil(width) * width;
    // Each depth block in as many runs of whole panels as there are threads.
    let per_run = padded_lines.div_ceil(width).div_ceil(rayon::current_num_threads()) * width;
    let mut runs = Vec::new();
    let mut rest = dst;
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        for l in (0..lines).step_by(per_run) {
            let (run, tail) = rest.split_at_mut(per_run.min(padded_lines - l) * kc);
            runs.push((pc, kc, l, run));
            rest = tail;
        }
    }
    runs.into_par_iter().for_each(|(pc, kc, l, run)| operand.pack(l, per_run.min(lines - l), pc, kc, width, run));
}

fn sgemm_with<A: Lines, B: Lines>(tile: Tile, m: usize, n: usize, k: usize, a: &A, b: &B, mut c: Dest) {
    if m == 0 || n == 0 {
        return;
    }
    let Dest { ldc, block, block_stride, finish, .. } = c;
    let last = (n - 1) / block * block_stride + (m - 1) * ldc + (n - 1) % block;
    assert!(last < c.data.len(), "sgemm: C ({m}x{n}, {ldc}/{block}/{block_stride}) out of bounds");
    let out = c.out();
    // A few parts per thread, taken as threads come free: a core that another process or a
    // page fault slows down then holds up the product by a small part rather than half of it.
    // Below ~64³ multiply-adds a split costs more than it saves.
    let parts = if m * n * k < 1 << 18 { 1 } else { PARTS_PER_THREAD * rayon::current_num_threads() };
    // Split the dimension with more micro-tiles; the other operand is packed once, shared.
    let (tiles_m, tiles_n) = (m.div_ceil(MR), n.div_ceil(NR));
    let split_n = tiles_n >= tiles_m;
    let tiles = if split_n { tiles_n } else { tiles_m };
    let parts = parts.min(tiles);
    let prepacked = a.packed_rows();
    if let Some(p) = prepacked {
        assert!((p.lines, p.depth) == (m, k), "sgemm: A packed as {}x{}, used as {m}x{k}", p.lines, p.depth);
    }
    let prepacked = prepacked.map(|p| (p.as_slice(), p.padded_lines()));
    let (packed, padded_lines) = match (split_n, &prepacked) {
        (true, Some(_)) => (PanelBuf(Vec::new()), 0),
        (true, None) => pack_all(a, m, k, MR),
        (false, _) => pack_all(b, n, k, NR),
    };
    (0..parts).into_par_iter().for_each(|part| {
        // Tiles spread evenly (37 in 8 parts: 5 and 4, not seven of 5 and one of 2).
        let (first, end) = (part * tiles / parts, (part + 1) * tiles / parts);
        if first >= end {
            return;
        }
        // SAFETY: parts cover disjoint tile ranges of C, inside the bounds checked above.
        unsafe {
            let a_side = |own| match prepacked {
                Some((panels, padded_lines)) => Side::Packed { panels, padded_lines },
                None => own,
            };
            let (rows, cols) = if split_n {
                let (rows, cols) = (0..m, first * NR..(end * NR).min(n));
                let a = a_side(Side::Packed { panels: packed.as_slice(), padded_lines });
                blocked(tile, rows.clone(), cols.clone(), k, &a, &Side::Lazy(b), (out, false));
                (rows, cols)
            } else {
                let (rows, cols) = (first * MR..(end * MR).min(m), 0..n);
                let b: Side<B> = Side::Packed { panels: packed.as_slice(), padded_lines };
                blocked(tile, rows.clone(), cols.clone(), k, &a_side(Side::Lazy(a)), &b, (out, false));
                (rows, cols)
            };
            if let Some(finish) = finish {
                out.finish(rows, cols, finish);
            }
        }
    });
}

/// The sequential BLIS loop nest over `C[rows, cols]`: B blocks `KC x NC`, A blocks `MC x KC`,
/// micro-tiles; onto what `C` holds with `add_to_c`.
unsafe fn blocked<A: Lines, B: Lines>(
    tile: Tile,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k: usize,
    a: &Side<A>,
    b: &Side<B>,
    (c, add_to_c): (Out, bool),
) {
    // Scratch for the lazily packed side, no larger than its biggest block.
    let scratch = |lazy: bool, block: usize, lines: usize, width: usize| {
        PanelBuf::take(if lazy { block.min(lines.div_ceil(width) * width) * KC.min(k) } else { 0 })
    };
    let mut a_scratch = scratch(matches!(a, Side::Lazy(_)), MC, rows.len(), MR);
    let mut b_scratch = scratch(matches!(b, Side::Lazy(_)), NC, cols.len(), NR);
    for jc in cols.clone().step_by(NC) {
        let nc = NC.min(cols.end - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let b_block = b.block(jc, nc, pc, kc, NR, b_scratch.as_mut_slice());
            // Later depth blocks add to what the first one wrote.
            let add = add_to_c || pc > 0;
            for ic in rows.clone().step_by(MC) {
                let mc = MC.min(rows.end - ic);
                let a_block = a.block(ic, mc, pc, kc, MR, a_scratch.as_mut_slice());
                // An A micro-panel (14 KiB) stays in L1 while B's panels stream past it from L2
                // (prefetched by the micro-kernel); 1–9% faster than the other order, both
                // prefetching (interleaved in one process).
                for ir in (0..mc).step_by(MR) {
                    for jr in (0..nc).step_by(NR) {
                        let (i, j, extent) = (ic + ir, jc + jr, (MR.min(mc - ir), NR.min(nc - jr)));
                        // SAFETY: the tile lies inside C (the caller's bounds), the panels inside
                        // the packed blocks.
                        unsafe {
                            let (a, b) = (a_block.as_ptr().add(ir * kc), b_block.as_ptr().add(jr * kc));
                            if j % c.block + extent.1 <= c.block {
                                tile(kc, a, b, c.at(i, j), c.ldc, extent, add);
                            } else {
                                // Across blocks of C: computed aside, then stored block by block.
                                let mut full = [0f32; MR * NR];
                                tile(kc, a, b, full.as_mut_ptr(), NR, (MR, NR), false);
                                let mut col = 0;
                                while col < extent.1 {
                                    let cols = (c.block - (j + col) % c.block).min(extent.1 - col);
                                    store(&full[col..], c.at(i, j + col), c.ldc, (extent.0, cols), add);
                                    col += cols;
                                }
                            }
                        };
                    }
                }
            }
        }
    }
}

/// Writes a finished tile (`full`, row-major with row stride `NR`) into `C[..rows, ..cols]`.
unsafe fn store(full: &[f32], c: *mut f32, ldc: usize, (rows, cols): (usize, usize), add: bool) {
    for i in 0..rows {
        for (j, &v) in full[i * NR..][..cols].iter().enumerate() {
            // SAFETY: the caller passes the tile's valid extent inside C; C is read only where
            // an earlier depth block wrote it (`add`).
            unsafe {
                let dst = c.add(i * ldc + j);
                dst.write(if add { dst.read() + v } else { v });
            }
        }
    }
}

/// The micro-kernel without SIMD intrinsics (what the compiler makes of it).
unsafe fn tile_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    extent: (usize, usize),
    add: bool,
) {
    // SAFETY: the packed panels hold `kc · MR` and `kc · NR` values.
    let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * MR), std::slice::from_raw_parts(b, kc * NR)) };
    let mut full = [0f32; MR * NR];
    for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &ai) in full.chunks_exact_mut(NR).zip(a) {
            for (acc, &bj) in row.iter_mut().zip(b) {
                *acc += ai * bj;
            }
        }
    }
    unsafe { store(&full, c, ldc, extent, add) }
}

/// The AVX-512 micro-kernel: per depth step, two 16-lane loads of the B panel, fourteen
/// broadcasts of the A panel, 28 fused multiply-adds into registers. The rows of `C` it ends on
/// and the panels `PREFETCH` steps ahead are prefetched (with the loop order of `blocked`, 8–16%
/// on the networks' shapes, measured interleaved in one process against neither). A tile at the
/// edge of `C` computes only the rows and the 16-column halves it has, to the next of 4, 8 or
/// 14 rows: 64 channels are 4 panels of 14 and one of 8, 128 are 9 and one of 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    extent: (usize, usize),
    add: bool,
) {
    use std::arch::x86_64::*;
    let (rows, cols) = extent;
    for i in 0..rows {
        // SAFETY: a prefetch never faults; the rows lie inside C.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + cols - 1).cast());
        }
    }
    // SAFETY: as the caller's.
    unsafe {
        match (rows, cols <= 16) {
            (..=4, true) => tile_avx512_rows::<4, 1>(kc, a, b, c, ldc, extent, add),
            (..=4, false) => tile_avx512_rows::<4, 2>(kc, a, b, c, ldc, extent, add),
            (..=8, true) => tile_avx512_rows::<8, 1>(kc, a, b, c, ldc, extent, add),
            (..=8, false) => tile_avx512_rows::<8, 2>(kc, a, b, c, ldc, extent, add),
            (_, true) => tile_avx512_rows::<MR, 1>(kc, a, b, c, ldc, extent, add),
            (_, false) => tile_avx512_rows::<MR, 2>(kc, a, b, c, ldc, extent, add),
        }
    }
}

/// [`tile_avx512`] on the first `R` rows of the panels and `V` 16-column halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512_rows<const R: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    add: bool,
) {
    use std::arch::x86_64::*;
    /// Depth steps ahead to prefetch (1 KiB of B, 448 bytes of A).
    const PREFETCH: usize = 8;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..kc {
        unsafe {
            // Past the panel's end these name the next panel (or nothing): a prefetch never
            // faults.
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PREFETCH) * NR + 16 * v).cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((p + PREFETCH) * MR).cast());
            let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(p * NR + 16 * v)));
            let a = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i));
                for (acc, &bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(ai, bv, *acc);
                }
            }
        }
    }
    if R == MR && V == 2 && rows == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            unsafe {
                let dst = c.add(i * ldc);
                let (mut lo, mut hi) = (row[0], row[V - 1]);
                if add {
                    lo = _mm512_add_ps(lo, _mm512_loadu_ps(dst));
                    hi = _mm512_add_ps(hi, _mm512_loadu_ps(dst.add(16)));
                }
                _mm512_storeu_ps(dst, lo);
                _mm512_storeu_ps(dst.add(16), hi);
            }
        }
        return;
    }
    let mut full = [0f32; MR * NR];
    for (i, row) in acc.iter().enumerate() {
        for (v, &acc) in row.iter().enumerate() {
            unsafe { _mm512_storeu_ps(full.as_mut_ptr().add(i * NR + 16 * v), acc) };
        }
    }
    unsafe { store(&full, c, ldc, (rows, cols), add) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// A packed operand read transposed, in blocks that start and end inside its panels and
    /// depth blocks, by each pack this CPU runs: the entries of the matrix transposed, zero
    /// past the last line.
    #[test]
    fn transposed_packs_the_transpose() {
        let (m, k) = (31, 300);
        let data = values(m * k, 5);
        let packed = PackedRows::new(&Mat::rows(&data, k), m, k);
        type Pack = fn(&PackedRows, usize, usize, usize, usize, &mut [f32]);
        let mut packs: Vec<(&str, Pack)> = vec![("portable", transposed_portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 is present; the test's blocks lie inside the operand.
            packs.push(("avx512", |inner, line0, lines, depth0, width, dst| unsafe {
                transposed_avx512(inner, line0, lines, depth0, width, dst)
            }));
        }
        for (name, pack) in packs {
            for (line0, lines, depth0, kc) in
                [(0usize, 300usize, 0usize, 31usize), (250, 20, 3, 25), (5, 9, 13, 1), (17, 283, 1, 30)]
            {
                let mut dst = vec![f32::NAN; lines.div_ceil(MR) * MR * kc];
                pack(&packed, line0, lines, depth0, MR, &mut dst);
                for (j, &got) in dst.iter().enumerate() {
                    let (l, p) = (j / (MR * kc) * MR + j % MR, j / MR % kc);
                    let want = if l < lines { data[(depth0 + p) * k + line0 + l] } else { 0.0 };
                    assert_eq!(got, want, "{name}: block {line0}+{lines} at {depth0}+{kc}, line {l} depth {p}");
                }
            }
        }
    }

    /// Every micro-kernel this CPU runs against a naive product, on shapes with partial tiles,
    /// several depth, row and column blocks, both line layouts, a row stride wider than the row,
    /// `C` in blocks of columns (narrower and wider than a tile, with gaps between them), last
    /// panels of 1, 4, 5, 8, 12 and 13 rows (each row count's kernel and its edges); entries
    /// outside `C` stay as they were. The products run one after another on the same threads,
    /// so each reuses packing buffers holding the previous one's values.
    #[test]
    fn equals_a_naive_product() {
        let mut tiles: Vec<(&str, Tile)> = vec![("portable", tile_portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            tiles.push(("avx512", tile_avx512));
        }
        for (name, tile) in tiles {
            for &(m, n, k) in &[
                (1, 1, 1),
                (12, 32, 7),
                (13, 33, 300),
                (70, 1100, 520),
                (200, 40, 9),
                (5, 3000, 64),
                (22, 47, 19),
                (18, 16, 33),
            ] {
                for (a_cols, b_cols) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (av, bv) = (values(m * k, 1), values(k * n, 2));
                    let a = if a_cols { Mat::columns(&av, m) } else { Mat::rows(&av, k) };
                    let b = if b_cols { Mat::columns(&bv, n) } else { Mat::rows(&bv, k) };
                    let at = |l: usize, p: usize, x: &Mat| x.data[l * x.ls + p * x.ps] as f64;
                    // (ldc, block, block_stride): plain rows, then blocks of 5 and 37 columns.
                    for (ldc, block, block_stride) in [(n + 3, usize::MAX, 0), (5, 5, 5 * m + 2), (40, 37, 40 * m + 1)]
                    {
                        let index = |i: usize, j: usize| j / block * block_stride + i * ldc + j % block;
                        let start = values(index(m - 1, n - 1) + 4, 3);
                        let mut c = start.clone();
                        sgemm_with(
                            tile,
                            m,
                            n,
                            k,
                            &a,
                            &b,
                            Dest { data: as_uninit(&mut c), ldc, block, block_stride, finish: None },
                        );
                        let mut want: Vec<f64> = start.iter().map(|&v| v as f64).collect();
                        for i in 0..m {
                            for j in 0..n {
                                want[index(i, j)] = (0..k).map(|p| at(i, p, &a) * at(j, p, &b)).sum::<f64>();
                            }
                        }
                        for (e, (&got, &want)) in c.iter().zip(&want).enumerate() {
                            assert!(
                                (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "{name} {m}x{n}x{k} a_cols {a_cols} b_cols {b_cols} block {block} at {e}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Both kernels for strided lines pack what the definition says: panels of 4, 14, 16 and 32
    /// lines, a partial last panel, ascending and descending (flipped) depth steps.
    #[test]
    fn strided_lines_pack_by_their_definition() {
        let data = values(40 * 60, 4);
        let (line_stride, lines) = (60usize, 37usize);
        for descending in [false, true] {
            let starts: Vec<usize> = (0..23).map(|p| if descending { 50 - 2 * p } else { 3 + p }).collect();
            type Kernel = fn(&[f32], usize, &[usize], usize, usize, &mut [f32]);
            let mut kernels: Vec<(&str, Kernel)> = vec![("portable", strided_lines_portable)];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", |d, ls, st, l, w, dst| unsafe { strided_lines_avx512(d, ls, st, l, w, dst) }));
            }
            for (name, kernel) in kernels {
                for width in [4, 14, 16, 32] {
                    let panels = lines.div_ceil(width);
                    // The caller zeroes the last panel's missing lines; the kernels write the rest.
                    let mut dst = vec![0f32; panels * width * starts.len()];
                    kernel(&data, line_stride, &starts, lines, width, &mut dst);
                    for (e, &v) in dst.iter().enumerate() {
                        let (q, p, l) = (e / (width * starts.len()), e / width % starts.len(), e % width);
                        let line = q * width + l;
                        let want = if line < lines { data[starts[p] + line * line_stride] } else { 0.0 };
                        assert_eq!(v, want, "{name} width {width} descending {descending} entry {e}");
                    }
                }
            }
        }
    }

    /// `sgemm_new` fills fresh memory exactly as `sgemm` fills zeroed memory, in rows and in a
    /// batch's blocks (whole tiles, partial tiles, a tile across images, depth 0), each after a
    /// product that left other values in the allocator's hands; a `C` with gaps is refused.
    #[test]
    fn new_output_equals_product_into_zeroed_memory() {
        for &(m, n, k, positions) in &[(13, 33, 300, 11), (70, 578, 520, 289), (5, 64, 0, 32), (28, 64, 9, 64)] {
            let (av, bv) = (values(m * k, 4), values(k * n, 5));
            let (a, b) = (Mat::rows(&av, k), Mat::columns(&bv, n));
            drop(vec![f32::NAN; m * n * 2]);
            let rows = sgemm_new(m, n, k, &a, &b, |c| Dest::rows_uninit(c, n), None);
            let mut want = vec![0f32; m * n];
            sgemm(m, n, k, &a, &b, Dest::rows(&mut want, n));
            assert_eq!(rows, want, "{m}x{n}x{k} rows");
            drop(vec![f32::NAN; m * n * 2]);
            let batched = sgemm_new(m, n, k, &a, &b, |c| Dest::batched_uninit(c, m, positions), None);
            let mut want = vec![0f32; m * n];
            sgemm(m, n, k, &a, &b, Dest::batched(&mut want, m, positions));
            assert_eq!(batched, want, "{m}x{n}x{k} batched");
        }
        let gaps = std::panic::catch_unwind(|| {
            let (av, bv) = (values(12, 6), values(12, 7));
            sgemm_new(3, 4, 4, &Mat::rows(&av, 4), &Mat::rows(&bv, 4), |c| Dest::rows_uninit(c, 5), None)
        });
        assert!(gaps.is_err(), "a row stride wider than the row leaves gaps");
    }

    /// A product with A packed beforehand equals the one that packs A itself, bit for bit, when
    /// A is shared by all parts (wide products) and when each part takes a share of its rows
    /// (tall ones, several depth blocks); the same copy serves repeated products; a copy of
    /// another shape is refused.
    #[test]
    fn prepacked_a_equals_packing_in_the_product() {
        for &(m, n, k) in &[(13, 578, 300), (700, 40, 520), (64, 2178, 576), (5, 3, 9)] {
            let (av, bv) = (values(m * k, 8), values(k * n, 9));
            let (a, b) = (Mat::rows(&av, k), Mat::columns(&bv, n));
            let packed = PackedRows::new(&a, m, k);
            let want = sgemm_new(m, n, k, &a, &b, |c| Dest::rows_uninit(c, n), None);
            for round in 0..2 {
                let got = sgemm_new(m, n, k, &packed, &b, |c| Dest::rows_uninit(c, n), None);
                assert_eq!(got, want, "{m}x{n}x{k}, round {round}");
            }
            // As B it is read back from its panels: `A · Aᵀ` either way.
            let square = sgemm_new(m, m, k, &a, &a, |c| Dest::rows_uninit(c, m), None);
            assert_eq!(sgemm_new(m, m, k, &a, &packed, |c| Dest::rows_uninit(c, m), None), square, "{m}x{k} as B");
        }
        let (av, bv) = (values(12, 6), values(12, 7));
        let packed = PackedRows::new(&Mat::rows(&av, 4), 3, 4);
        let misfit = std::panic::catch_unwind(|| {
            sgemm_new(4, 3, 3, &packed, &Mat::rows(&bv, 3), |c| Dest::rows_uninit(c, 3), None)
        });
        assert!(misfit.is_err(), "A packed as 3x4 used as 4x3");
    }

    /// A finish applied as the parts complete gives what applying it afterwards gives, for
    /// products split either way, stored as rows or per image, and with no depth at all; each
    /// entry is finished once.
    #[test]
    fn finish_equals_applying_it_afterwards() {
        let finish = |i: usize, run: &mut [f32]| run.iter_mut().for_each(|v| *v = (*v * 0.5 + i as f32).max(1.0));
        for &(m, n, k, positions) in &[(13, 578, 300, 289), (700, 40, 520, 20), (64, 2178, 576, 1089), (5, 6, 0, 3)] {
            let (av, bv) = (values(m * k, 10), values(k * n, 11));
            let (a, b) = (Mat::rows(&av, k), Mat::columns(&bv, n));
            for batched in [false, true] {
                fn layout(
                    c: &mut [MaybeUninit<f32>],
                    batched: bool,
                    (m, n, positions): (usize, usize, usize),
                ) -> Dest<'_> {
                    if batched { Dest::batched_uninit(c, m, positions) } else { Dest::rows_uninit(c, n) }
                }
                let shape = (m, n, positions);
                let mut want = sgemm_new(m, n, k, &a, &b, |c| layout(c, batched, shape), None);
                for (r, row) in want.chunks_mut(if batched { positions } else { n }).enumerate() {
                    finish(r % m, row);
                }
                let got = sgemm_new(m, n, k, &a, &b, |c| layout(c, batched, shape), Some(&finish));
                assert_eq!(got, want, "{m}x{n}x{k}, batched {batched}");
            }
        }
    }
}

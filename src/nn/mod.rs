//! Layers and ops that Candle lacks, each with a backward on every device (built from
//! differentiable Candle ops; see DESIGN.md §4 and `ARCHITECTURE.md`).

pub mod add_relu;
pub mod attention;
pub mod batch_norm;
pub mod conv;
pub mod cross_entropy;
pub mod device_conv;
pub mod double_backward;
pub mod dropout;
pub mod im2col;
pub mod init;
pub mod pool;
pub mod resize;
pub mod rng;
pub mod sgemm;
pub mod spectral_norm;
pub mod winograd;

pub use add_relu::add_relu;
pub use attention::SelfAttention;
pub use dropout::Dropout2d;
pub use pool::{MaxPool2d, pool_out_size};
pub use resize::{adaptive_avg_pool2d, avg_pool2d_ceil, resize_bilinear};
pub use rng::SplitMix64;
pub use spectral_norm::SpectralNormConv2d;

/// A CPU op's f32 input as a slice (the CPU kernels' one way in), or an error naming `op`.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: needs a contiguous input") };
    Ok(&data[start..end])
}

/// A CPU op's f32 output, updated in place, as a slice (see [`cpu_f32`]).
pub(crate) fn cpu_f32_mut<'a>(
    storage: &'a mut candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 only") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: needs a contiguous output") };
    Ok(&mut data[start..end])
}

/// A new vector of `len` floats built in parallel, chunk `i` (of `chunk` floats, the last may be
/// shorter) from `values(i)`, which must yield exactly that many. Nothing is zeroed first: on
/// the CPU a zero pass is serial and as long as the op's own.
pub(crate) fn par_collect<I: Iterator<Item = f32>>(
    len: usize,
    chunk: usize,
    values: impl Fn(usize) -> I + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, dst)| {
        let mut written = 0;
        for (d, v) in dst.iter_mut().zip(values(i)) {
            d.write(v);
            written += 1;
        }
        assert_eq!(written, dst.len(), "par_collect: chunk {i} got {written} of {} values", dst.len());
    });
    // SAFETY: every chunk of the first `len` floats was written in full (asserted above; a panic
    // there propagates before this line).
    unsafe { out.set_len(len) };
    out
}

/// Whether a state-dict key names a buffer (state that is saved but never trained): BatchNorm
/// running statistics and the spectral-norm power-iteration vectors.
pub fn is_buffer(key: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked", "weight_u", "weight_v"]
        .iter()
        .any(|suffix| key.rsplit('.').next() == Some(*suffix))
}

/// The trainable variables of a `VarMap`, sorted by key (buffers left out).
pub fn trainable_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut vars: Vec<_> = data.iter().filter(|(k, _)| !is_buffer(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

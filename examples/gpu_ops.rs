//! What Candle's CUDA convolution costs on the shapes of the released step (512², batch 8), per
//! pass: the forward (cuDNN), the input gradient Candle's backward computes (`conv_transpose2d`,
//! its own kernel), the same gradient as a cuDNN convolution with the flipped kernel (stride 1),
//! the weight gradient as Candle computes it (a cuDNN convolution of the transposed input with
//! the transposed output gradient as its kernel), forward + `Tensor::backward` through Candle's
//! op and through `skd::nn::conv::conv2d` (`nn::device_conv` off the CPU), the forward with each
//! of cuDNN's non-FFT algorithms (CPU: all the same op), and Candle's
//! training-mode BatchNorm forward + backward. Median of 5 after 2 warm-ups, device synchronised:
//! `cargo run --release --features cuda,cudnn --example gpu_ops -- cuda [BATCH]` (`cpu 1` checks
//! it here). `scripts/gpu_ops.py` times PyTorch on the same shapes.

use candle_core::conv::CudnnFwdAlgo;
use candle_core::{Device, Result, Tensor, Var};
use std::time::Instant;

fn median_ms(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..7 {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    // SAFETY: no other thread runs yet.
    unsafe { skd::init_process() }?;
    let args: Vec<String> = std::env::args().collect();
    let dev = skd::device(args.get(1).map_or("cuda", String::as_str))?;
    let batch: usize = args.get(2).map_or(Ok(8), |b| b.parse()).map_err(candle_core::Error::wrap)?;
    // (batch, c_in, c_out, h, w, kernel, stride, padding, dilation): the student's first block
    // at 1/4, a teacher bottleneck's dilated 3x3 and its 1x1 reduction at 1/8.
    let shapes = [
        (batch, 64, 64, 128, 128, 3, 1, 1, 1),
        (batch, 256, 256, 65, 65, 3, 1, 2, 2),
        (batch, 1024, 256, 65, 65, 1, 1, 0, 1),
        (batch, 64, 128, 256, 256, 3, 2, 1, 1),
    ];
    for (b, c, co, h, w, k, s, p, d) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (co, c, k, k), &dev)? * 0.05)?)?;
        let y = x.conv2d(&wt, p, s, d, 1)?;
        let g = y.ones_like()?;
        let fwd = median_ms(&dev, || x.conv2d(&wt, p, s, d, 1).map(drop))?;
        let out_padding = h - ((y.dim(2)? - 1) * s + d * (k - 1) + 1 - 2 * p);
        let grad_input = median_ms(&dev, || g.conv_transpose2d(&wt, p, out_padding, s, d).map(drop))?;
        let flipped = if s == 1 {
            let rev = Tensor::new((0..k as u32).rev().collect::<Vec<_>>(), &dev)?;
            let wf = wt.index_select(&rev, 2)?.index_select(&rev, 3)?.transpose(0, 1)?.contiguous()?;
            let ms = median_ms(&dev, || g.conv2d(&wf, d * (k - 1) - p, 1, d, 1).map(drop))?;
            format!("{ms:.1}")
        } else {
            "-".into()
        };
        let grad_weight =
            median_ms(&dev, || x.transpose(0, 1)?.conv2d(&g.transpose(0, 1)?, p, d, s, 1)?.transpose(0, 1).map(drop))?;
        let backward = median_ms(&dev, || x.conv2d(&wt, p, s, d, 1)?.backward().map(drop))?;
        let ours = median_ms(&dev, || skd::nn::conv::conv2d(&x, &wt, s, p, d)?.backward().map(drop))?;
        let mut by_algo = Vec::new();
        for algo in [
            None,
            Some(CudnnFwdAlgo::ImplicitGemm),
            Some(CudnnFwdAlgo::ImplicitPrecompGemm),
            Some(CudnnFwdAlgo::Gemm),
            Some(CudnnFwdAlgo::Direct),
            Some(CudnnFwdAlgo::Winograd),
            Some(CudnnFwdAlgo::WinogradNonFused),
        ] {
            let ms = match x.conv2d_with_algo(&wt, p, s, d, 1, algo) {
                Ok(_) => format!("{:.2}", median_ms(&dev, || x.conv2d_with_algo(&wt, p, s, d, 1, algo).map(drop))?),
                Err(_) => "-".into(),
            };
            by_algo.push(format!("{}: {ms}", algo.map_or("heuristic".into(), |a| format!("{a:?}"))));
        }
        println!(
            "{b}x{c}->{co} {h}x{w} k{k} s{s} d{d}: fwd {fwd:.1} ms, grad input (conv_transpose2d) {grad_input:.1}, \
             as flipped conv {flipped}, grad weight (transposed conv) {grad_weight:.1}; fwd+backward: Candle's \
             {backward:.1}, skd's {ours:.1}; forward by cuDNN algorithm: {}",
            by_algo.join(", ")
        );
    }
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
    let bn = candle_nn::batch_norm(256, skd::nn::batch_norm::pytorch_config(), vb)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, 256, 65, 65), &dev)?)?;
    let bn_fwd = median_ms(&dev, || candle_core::ModuleT::forward_t(&bn, &x, true).map(drop))?;
    let bn_both = median_ms(&dev, || candle_core::ModuleT::forward_t(&bn, &x, true)?.backward().map(drop))?;
    let relu = median_ms(&dev, || x.relu()?.backward().map(drop))?;
    println!(
        "{batch}x256x65x65: batch-norm (candle_nn, train) fwd {bn_fwd:.1} ms, fwd+bwd {bn_both:.1}; relu fwd+bwd {relu:.1}"
    );
    Ok(())
}

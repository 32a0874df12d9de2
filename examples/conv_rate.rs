//! The CPU convolution's rate on the shapes of 128² training (batch 2), forward and backward
//! (input and weight gradients through `Tensor::backward`, Candle's gradient bookkeeping
//! included), best of 7:
//! `cargo run --release --example conv_rate`. `scripts/conv_rate.py` measures PyTorch the same way.

use candle_core::{Device, Tensor, Var};
use skd::nn::im2col::conv2d;
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    // SAFETY: no other thread runs yet.
    unsafe { skd::init_process() }?;
    // (batch, c_in, c_out, h, w, kernel, stride, padding, dilation)
    let shapes = [
        (2, 512, 512, 17, 17, 3, 1, 4, 4),
        (2, 1024, 128, 17, 17, 3, 1, 1, 1),
        (2, 256, 256, 17, 17, 3, 1, 2, 2),
        (2, 128, 128, 17, 17, 3, 1, 1, 1),
        (2, 64, 64, 33, 33, 3, 1, 1, 1),
        (2, 64, 64, 64, 64, 3, 1, 1, 1),
    ];
    for (b, c, co, h, w, k, s, p, d) in shapes {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (co, c, k, k), &dev)? * 0.05)?)?;
        let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            let t = Instant::now();
            let y = conv2d(x.as_tensor(), wt.as_tensor(), s, p, d)?;
            fwd = fwd.min(t.elapsed().as_secs_f64());
            let loss = y.sum_all()?;
            let t = Instant::now();
            let grads = loss.backward()?;
            bwd = bwd.min(t.elapsed().as_secs_f64());
            assert!(grads.get(x.as_tensor()).is_some() && grads.get(wt.as_tensor()).is_some());
        }
        let oh = (h + 2 * p - d * (k - 1) - 1) / s + 1;
        let flops = 2.0 * (b * co * oh * oh * c * k * k) as f64;
        println!(
            "{b}x{c}->{co} {h}x{w} k{k} d{d}: fwd {:.1} ms ({:.0} GF/s), bwd {:.1} ms ({:.0} GF/s)",
            fwd * 1e3,
            flops / fwd / 1e9,
            bwd * 1e3,
            2.0 * flops / bwd / 1e9
        );
    }
    Ok(())
}

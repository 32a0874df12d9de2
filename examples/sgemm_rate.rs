//! The SGEMM's rate on a square product and on the shapes the networks' convolutions make
//! (`C = A · B`, row-major, best of 10): `cargo run --release --example sgemm_rate`.

use skd::nn::sgemm::{Dest, Mat, sgemm};
use std::time::Instant;

fn main() {
    let shapes = [
        ("square", 1024, 1024, 1024),
        ("layer4 3x3, 256x512 input", 512, 2145, 4608),
        ("stem 3x3, 128x128 input, batch 2", 64, 8192, 576),
        ("layer4 3x3, 128x128 input, batch 2", 512, 578, 4608),
        ("its weight gradient (taps x C_out)", 4608, 512, 578),
    ];
    for (name, m, n, k) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let (a, b) = (Mat::rows(&a, k), Mat::columns(&b, n));
        let mut best = f64::MAX;
        for _ in 0..11 {
            let t = Instant::now();
            sgemm(m, n, k, &a, &b, Dest::rows(&mut c, n));
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{n}x{k} ({name}): {:.1} GFLOP/s", 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}

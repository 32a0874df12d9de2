//! How fast the SGEMM packs a strided matrix into panels, per value: a 512x4608 kernel's rows
//! into 14-line A panels and its columns into 32-line B panels, depth blocks of 256, best of 20:
//! `cargo run --release --example pack_rate`.

use skd::nn::sgemm::{Lines, Mat};
use std::time::Instant;

fn main() {
    let (m, k, kc) = (512usize, 4608usize, 256usize);
    let data: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
    let mut dst = vec![0f32; m.div_ceil(14) * 14 * kc];
    for (name, operand, width) in
        [("rows, 14-line panels", Mat::rows(&data, k), 14), ("columns, 32-line panels", Mat::columns(&data, m), 32)]
    {
        let lines = if width == 14 { m } else { k };
        let depth = if width == 14 { k } else { m };
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            for depth0 in (0..depth).step_by(kc) {
                for line0 in (0..lines).step_by(16 * width) {
                    let n = (16 * width).min(lines - line0);
                    operand.pack(line0, n, depth0, kc.min(depth - depth0), width, &mut dst);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{name}: {:.2} ns per value", best * 1e9 / (m * k) as f64);
    }
}

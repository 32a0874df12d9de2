use skd::nn::sgemm::{Mat, sgemm};
use std::time::Instant;
fn main() {
    for &(m, n, k) in &[(1024usize, 1024usize, 1024usize), (512, 2145, 4608), (64, 8192, 576)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let (am, bm) = (Mat::rows(&a, k), Mat::columns(&b, n));
        sgemm(m, n, k, &am, &bm, &mut c, n, false);
        let mut dt = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            sgemm(m, n, k, &am, &bm, &mut c, n, false);
            dt = dt.min(t.elapsed().as_secs_f64());
        }
        println!("{m}x{n}x{k}: {:.1} GFLOP/s", 2.0 * (m * n * k) as f64 / dt / 1e9);
    }
}

//! A seeded random stream whose whole state is one `u64`.
//!
//! Candle's CPU random tensors cannot be seeded (`Device::set_seed` fails on CPU), so every
//! random choice that must be reproducible and resumable (dropout masks, the WGAN-GP
//! interpolation weights, data augmentation) is drawn on the host from this stream and uploaded.
//! SplitMix64 (Steele, Lea & Flood 2014) is tiny, fast and stable across crate versions; streams
//! are keyed by [`SplitMix64::derive`] from `(seed, iteration, ...)`, so none needs saving.

/// SplitMix64 generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one sub-stream, e.g. `(seed, iteration, sample)`: the parts are mixed so
    /// that neighbouring tuples give unrelated streams.
    pub fn derive(parts: &[u64]) -> Self {
        let mut g = Self::new(0x5eed_5eed_5eed_5eed);
        for &p in parts {
            g.state ^= p;
            g.state = g.next_u64();
        }
        g
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: keeps ln finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_streams_are_reproducible_and_distinct() {
        let (mut a, mut b, mut c) =
            (SplitMix64::derive(&[7, 1]), SplitMix64::derive(&[7, 1]), SplitMix64::derive(&[7, 2]));
        let (x, y, z) = (a.next_u64(), b.next_u64(), c.next_u64());
        assert_eq!(x, y);
        assert_ne!(x, z);
    }

    #[test]
    fn uniform_stays_in_range_and_has_the_right_mean() {
        let mut g = SplitMix64::derive(&[1, 2, 3]);
        let xs: Vec<f64> = (0..10_000).map(|_| g.uniform()).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}

//! `nn.Dropout2d`: zeroes whole channels with probability `p` and scales the kept ones by
//! `1 / (1 − p)` in training; the identity in evaluation.
//!
//! The `[B, C]` mask is drawn on the host from a seeded [`SplitMix64`] stream, so a training
//! run (and a resumed one) sees the same masks; [`Dropout2d::set_seed`] re-keys the stream,
//! e.g. from `(seed, iteration)`.

use std::sync::Mutex;

use candle_core::{ModuleT, Result, Tensor};

use super::rng::SplitMix64;

#[derive(Debug)]
pub struct Dropout2d {
    p: f64,
    rng: Mutex<SplitMix64>,
}

impl Dropout2d {
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("Dropout2d probability must be in [0, 1), got {p}");
        }
        Ok(Self { p, rng: Mutex::new(SplitMix64::new(seed)) })
    }

    pub fn set_seed(&self, seed: u64) {
        *self.rng.lock().expect("dropout rng lock") = SplitMix64::new(seed);
    }
}

impl ModuleT for Dropout2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let (b, c, _, _) = x.dims4()?;
        let scale = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().expect("dropout rng lock");
            (0..b * c).map(|_| if rng.uniform() < self.p { 0.0 } else { scale as f32 }).collect()
        };
        // [B*C] -> [B, C, 1, 1], broadcast over H and W
        let mask = Tensor::from_vec(mask, (b, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn drops_whole_channels_and_rescales_the_rest() -> Result<()> {
        let d = Dropout2d::new(0.5, 3)?;
        let x = Tensor::ones((4, 16, 3, 5), candle_core::DType::F32, &Device::Cpu)?;
        let y = d.forward_t(&x, true)?;
        let per_channel = y.sum((2, 3))?.flatten_all()?.to_vec1::<f32>()?;
        assert!(per_channel.iter().all(|&s| s == 0.0 || s == 30.0), "{per_channel:?}");
        assert!(per_channel.contains(&0.0) && per_channel.contains(&30.0));
        let e = d.forward_t(&x, false)?;
        assert_eq!(e.sum_all()?.to_scalar::<f32>()?, 4.0 * 16.0 * 15.0);
        Ok(())
    }
}

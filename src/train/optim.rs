//! SGD with momentum and weight decay (PyTorch's `torch.optim.SGD`, dampening 0, no Nesterov),
//! which Candle lacks, and the poly learning-rate schedule of the released code.
//!
//! `d = g + λ·p;  v ← μ·v + d;  p ← p − lr·v` (a zero `v` makes the first step PyTorch's `v = d`).
//! Parameters without a gradient in a step are left alone, as PyTorch skips `p.grad is None`.

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

#[derive(Debug)]
pub struct Sgd {
    params: Vec<Var>,
    /// One velocity per parameter, same order.
    velocity: Vec<Var>,
    cfg: SgdConfig,
}

impl Sgd {
    /// The velocities, in the order of the parameters given to `new` (for checkpoints).
    pub fn velocity(&self) -> &[Var] {
        &self.velocity
    }
}

impl Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        if !(cfg.lr >= 0.0 && cfg.momentum >= 0.0 && cfg.weight_decay >= 0.0) {
            candle_core::bail!("sgd: lr, momentum and weight_decay must be >= 0, got {cfg:?}");
        }
        let params: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let velocity = params.iter().map(|p| Var::zeros(p.shape(), p.dtype(), p.device())).collect::<Result<_>>()?;
        Ok(Self { params, velocity, cfg })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (p, v) in self.params.iter().zip(&self.velocity) {
            let Some(g) = grads.get(p) else { continue };
            // Plain values: no graph may leak into the weights (the double-backward flag keeps
            // gradients attached to their graph).
            let g = g.detach();
            let d =
                if self.cfg.weight_decay != 0.0 { (g + (p.as_tensor().detach() * self.cfg.weight_decay)?)? } else { g };
            let vel = ((v.as_tensor() * self.cfg.momentum)? + d)?;
            p.set(&(p.as_tensor().detach() - (&vel * self.cfg.lr)?)?)?;
            v.set(&vel)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

/// `base · (1 − it / max_it)^power`, evaluated before each step (`adjust_learning_rate`).
pub fn poly_lr(base: f64, iteration: usize, max_iterations: usize, power: f64) -> f64 {
    base * (1.0 - iteration as f64 / max_iterations as f64).max(0.0).powf(power)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_sgd_with_momentum_and_weight_decay() -> Result<()> {
        // torch: p = tensor([1., -2.]); SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5);
        // loss = (p**2).sum(), two steps:
        let p = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let mut opt = Sgd::new(vec![p.clone()], SgdConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.5 })?;
        for _ in 0..2 {
            opt.backward_step(&p.as_tensor().sqr()?.sum_all()?)?;
        }
        let got = p.as_tensor().to_vec1::<f32>()?;
        // step 1: d = 2p + 0.5p = 2.5p -> v = [2.5, -5] -> p = [0.75, -1.5]
        // step 2: d = 2.5p = [1.875, -3.75]; v = 0.9v + d = [4.125, -8.25] -> p = [0.3375, -0.675]
        let want = [0.3375f32, -0.675];
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?}");
        Ok(())
    }

    #[test]
    fn poly_schedule_is_the_released_one() {
        assert_eq!(poly_lr(0.01, 0, 40000, 0.9), 0.01);
        assert!((poly_lr(0.01, 20000, 40000, 0.9) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
        assert_eq!(poly_lr(0.01, 40000, 40000, 0.9), 0.0);
    }
}

//! SGD with momentum and weight decay (PyTorch's `torch.optim.SGD`, dampening 0, no Nesterov),
//! which Candle lacks, and the learning-rate schedules of the reference code: poly (the released
//! segmentation code) and warmup + steps (maskrcnn-benchmark, which FCOS runs).
//!
//! `d = g + λ·p;  v ← μ·v + d;  p ← p − lr·v` (a zero `v` makes the first step PyTorch's `v = d`).
//! Parameters without a gradient in a step are left alone, as PyTorch skips `p.grad is None`.
//! Each parameter may scale the learning rate and set its own decay (FCOS: biases get 2·lr and
//! no weight decay).

use crate::nn::{cpu_f32, cpu_f32_mut};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Var};
use candle_nn::Optimizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// One parameter's own optimisation settings.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub var: Var,
    /// Multiplies the schedule's learning rate.
    pub lr_factor: f64,
    pub weight_decay: f64,
}

#[derive(Debug)]
pub struct Sgd {
    params: Vec<ParamGroup>,
    /// One velocity per parameter, same order.
    velocity: Vec<Var>,
    cfg: SgdConfig,
}

impl Sgd {
    /// Parameters with their own learning-rate factor and weight decay (`cfg.weight_decay` is
    /// then unused).
    pub fn with_groups(params: Vec<ParamGroup>, cfg: SgdConfig) -> Result<Self> {
        if !(cfg.lr >= 0.0 && cfg.momentum >= 0.0 && params.iter().all(|p| p.lr_factor >= 0.0 && p.weight_decay >= 0.0))
        {
            candle_core::bail!("sgd: lr, momentum, lr factors and weight decays must be >= 0, got {cfg:?}");
        }
        let params: Vec<ParamGroup> = params.into_iter().filter(|p| p.var.dtype().is_float()).collect();
        let velocity =
            params.iter().map(|p| Var::zeros(p.var.shape(), p.var.dtype(), p.var.device())).collect::<Result<_>>()?;
        Ok(Self { params, velocity, cfg })
    }

    /// The velocities, in the order of the parameters given to `new` (for checkpoints).
    pub fn velocity(&self) -> &[Var] {
        &self.velocity
    }
}

impl Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        let groups = vars.into_iter().map(|var| ParamGroup { var, lr_factor: 1.0, weight_decay: cfg.weight_decay });
        Self::with_groups(groups.collect(), cfg)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (ParamGroup { var: p, lr_factor, weight_decay }, v) in self.params.iter().zip(&self.velocity) {
            let Some(g) = grads.get(p) else { continue };
            // Plain values: no graph may leak into the weights (the double-backward flag keeps
            // gradients attached to their graph).
            let g = g.detach();
            let rate = self.cfg.lr * lr_factor;
            if p.device().is_cpu() && p.dtype() == DType::F32 {
                // In place, two passes over each parameter instead of six allocating ones.
                let velocity = Velocity { momentum: self.cfg.momentum as f32, weight_decay: *weight_decay as f32 };
                v.inplace_op3(&g, p.as_tensor(), &velocity)?;
                p.inplace_op2(v.as_tensor(), &Descend { rate: rate as f32 })?;
                continue;
            }
            let d = if *weight_decay != 0.0 { (g + (p.as_tensor().detach() * *weight_decay)?)? } else { g };
            let vel = ((v.as_tensor() * self.cfg.momentum)? + d)?;
            p.set(&(p.as_tensor().detach() - (&vel * rate)?)?)?;
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

/// `v ← μ·v + (g + λ·p)` in place on the CPU, rounded as the tensor ops round it (each
/// scalar product in f32, then the sums left to right), so both paths give the same bits.
struct Velocity {
    momentum: f32,
    weight_decay: f32,
}

impl InplaceOp3 for Velocity {
    fn name(&self) -> &'static str {
        "sgd-velocity"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        lv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> Result<()> {
        let v = cpu_f32_mut(v, lv, "sgd velocity")?;
        let (g, p) = (cpu_f32(g, lg, "sgd gradient")?, cpu_f32(p, lp, "sgd parameter")?);
        if g.len() != v.len() || p.len() != v.len() {
            candle_core::bail!(
                "sgd: velocity {}, gradient {} and parameter {} differ in size",
                v.len(),
                g.len(),
                p.len()
            );
        }
        let Self { momentum, weight_decay } = *self;
        v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(p.par_chunks(CHUNK))).for_each(|(v, (g, p))| {
            for ((v, &g), &p) in v.iter_mut().zip(g).zip(p) {
                let d = if weight_decay != 0.0 { g + p * weight_decay } else { g };
                *v = *v * momentum + d;
            }
        });
        Ok(())
    }
}

/// `p ← p − rate·v` in place on the CPU (rounded as `p − (v · rate)`).
struct Descend {
    rate: f32,
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "sgd-descend"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, lp: &Layout, v: &CpuStorage, lv: &Layout) -> Result<()> {
        let p = cpu_f32_mut(p, lp, "sgd parameter")?;
        let v = cpu_f32(v, lv, "sgd velocity")?;
        if v.len() != p.len() {
            candle_core::bail!("sgd: parameter {} and velocity {} differ in size", p.len(), v.len());
        }
        let rate = self.rate;
        p.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(p, v)| {
            p.iter_mut().zip(v).for_each(|(p, &v)| *p -= v * rate);
        });
        Ok(())
    }
}

/// Elements per parallel task of the in-place updates.
const CHUNK: usize = 1 << 14;

/// `base · (1 − it / max_it)^power`, evaluated before each step (`adjust_learning_rate`).
pub fn poly_lr(base: f64, iteration: usize, max_iterations: usize, power: f64) -> f64 {
    base * (1.0 - iteration as f64 / max_iterations as f64).max(0.0).powf(power)
}

/// How the learning rate follows the iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// [`poly_lr`] (the released segmentation code).
    Poly { power: f64 },
    /// maskrcnn-benchmark's `WarmupMultiStepLR` with the constant warmup FCOS uses: the factor
    /// `warmup_factor` while `it < warmup_iterations`, then `gamma^(#milestones ≤ it)`.
    WarmupMultiStep { warmup_iterations: usize, warmup_factor: f64, milestones: Vec<usize>, gamma: f64 },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Poly { power: 0.9 }
    }
}

impl LrSchedule {
    /// The learning rate at 1-based iteration `it` (both references count from 1 when they set
    /// the rate of a step).
    pub fn lr(&self, base: f64, it: usize, max_iterations: usize) -> f64 {
        match self {
            LrSchedule::Poly { power } => poly_lr(base, it, max_iterations, *power),
            LrSchedule::WarmupMultiStep { warmup_iterations, warmup_factor, milestones, gamma } => {
                let warmup = if it < *warmup_iterations { *warmup_factor } else { 1.0 };
                let decays = milestones.iter().filter(|&&m| m <= it).count();
                base * warmup * gamma.powi(decays as i32)
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = match self {
            LrSchedule::Poly { power } => power.is_finite() && *power >= 0.0,
            LrSchedule::WarmupMultiStep { warmup_factor, milestones, gamma, .. } => {
                warmup_factor.is_finite()
                    && *warmup_factor > 0.0
                    && gamma.is_finite()
                    && *gamma > 0.0
                    && milestones.windows(2).all(|w| w[0] < w[1])
            }
        };
        if !ok {
            candle_core::bail!(
                "optim.schedule {self:?}: power, warmup_factor and gamma must be finite and positive, milestones increasing"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

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

    /// The CPU's in-place update gives the same bits as the tensor ops other devices run.
    #[test]
    fn the_in_place_update_rounds_as_the_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::randn(0f32, 1.0, 40_000, &dev)?)?;
        let cfg = SgdConfig { lr: 0.013, momentum: 0.9, weight_decay: 5e-4 };
        let mut opt = Sgd::with_groups(vec![ParamGroup { var: p.clone(), lr_factor: 3.0, weight_decay: 5e-4 }], cfg)?;
        let (mut want_p, mut want_v) = (p.as_tensor().copy()?, p.as_tensor().zeros_like()?);
        for step in 0..3 {
            let target = Tensor::randn(0f32, 1.0, 40_000, &dev)?;
            let loss = (p.as_tensor() * &target)?.sum_all()?;
            opt.backward_step(&loss)?;
            // ∂loss/∂p = target.
            let d = (&target + (&want_p * 5e-4)?)?;
            want_v = ((&want_v * 0.9)? + d)?;
            want_p = (&want_p - (&want_v * (0.013 * 3.0))?)?;
            let (got, want) = (p.as_tensor().to_vec1::<f32>()?, want_p.to_vec1::<f32>()?);
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "step {step}: {differ} parameters differ");
        }
        Ok(())
    }

    #[test]
    fn warmup_multistep_is_maskrcnn_benchmarks() {
        let s = LrSchedule::WarmupMultiStep {
            warmup_iterations: 500,
            warmup_factor: 1.0 / 3.0,
            milestones: vec![60_000, 80_000],
            gamma: 0.1,
        };
        // The FCOS KD log shows lr 0.003333 at iteration 20.
        assert!((s.lr(0.01, 20, 90_000) - 0.01 / 3.0).abs() < 1e-12);
        assert_eq!(s.lr(0.01, 500, 90_000), 0.01);
        assert!((s.lr(0.01, 60_000, 90_000) - 0.001).abs() < 1e-12);
        assert!((s.lr(0.01, 80_000, 90_000) - 0.0001).abs() < 1e-12);
    }

    #[test]
    fn a_parameter_group_scales_the_rate_and_sets_its_decay() -> Result<()> {
        let w = Var::new(&[1f32], &Device::Cpu)?;
        let b = Var::new(&[1f32], &Device::Cpu)?;
        let cfg = SgdConfig { lr: 0.1, momentum: 0.0, weight_decay: 0.0 };
        let mut opt = Sgd::with_groups(
            vec![
                ParamGroup { var: w.clone(), lr_factor: 1.0, weight_decay: 0.5 },
                ParamGroup { var: b.clone(), lr_factor: 2.0, weight_decay: 0.0 },
            ],
            cfg,
        )?;
        opt.backward_step(&(w.as_tensor() + b.as_tensor())?.sum_all()?)?;
        // w: 1 − 0.1·(1 + 0.5) = 0.85; b: 1 − 0.2·1 = 0.8
        assert!((w.as_tensor().to_vec1::<f32>()?[0] - 0.85).abs() < 1e-6);
        assert!((b.as_tensor().to_vec1::<f32>()?[0] - 0.8).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn poly_schedule_is_the_released_one() {
        assert_eq!(poly_lr(0.01, 0, 40000, 0.9), 0.01);
        assert!((poly_lr(0.01, 20000, 40000, 0.9) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
        assert_eq!(poly_lr(0.01, 40000, 40000, 0.9), 0.0);
    }
}

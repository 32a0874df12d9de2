//! Spectral normalisation of a convolution (Miyato et al. 2018) as the SKD repository's
//! `networks/spectral.py` runs it.
//!
//! Every call, in training and evaluation alike, advances the power iteration one step with
//! the weight held constant, `v ← l2n(Wᵀu)`, `u ← l2n(W v)` with `l2n(x) = x / (‖x‖ + 1e-12)`,
//! stores `u` and `v`, and convolves with `W / σ`, `σ = uᵀ W v`. The gradient flows through `W`
//! only, with the `u`, `v` of that call (see the reference README §7.1 on why modern PyTorch
//! differs from the authors' 0.4.1 here; we follow 0.4.1).
//!
//! Keys: `module.weight_bar` (trainable), `module.bias`, and the buffers `module.weight_u`
//! `[out]`, `module.weight_v` `[in·k·k]`.

use candle_core::{Module, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::conv::default_bound;

const L2N_EPS: f64 = 1e-12;

fn l2normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_all()?.sqrt()? + L2N_EPS)?)
}

#[derive(Debug)]
pub struct SpectralNormConv2d {
    weight_bar: Tensor,
    bias: Tensor,
    weight_u: Var,
    weight_v: Var,
    stride: usize,
    padding: usize,
}

impl SpectralNormConv2d {
    /// `SpectralNorm(nn.Conv2d(c_in, c_out, kernel, stride, padding))`, under `vb` (the
    /// wrapper's prefix; the keys get `module.` as in the reference).
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("module");
        let fan_in = c_in * kernel * kernel;
        let b = default_bound(fan_in);
        let init = Init::Uniform { lo: -b, up: b };
        let weight_bar = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight_bar", init)?;
        let bias = vb.get_with_hints(c_out, "bias", init)?;
        let normal = Init::Randn { mean: 0.0, stdev: 1.0 };
        let weight_u = Var::from_tensor(&vb.get_with_hints(c_out, "weight_u", normal)?)?;
        let weight_v = Var::from_tensor(&vb.get_with_hints(fan_in, "weight_v", normal)?)?;
        // A fresh layer starts from unit vectors, as `l2normalize(torch.randn(..))` does; a
        // loaded one keeps its stored (already unit) vectors.
        weight_u.set(&l2normalize(weight_u.as_tensor())?)?;
        weight_v.set(&l2normalize(weight_v.as_tensor())?)?;
        Ok(Self { weight_bar, bias, weight_u, weight_v, stride, padding })
    }

    /// The current power-iteration vectors `(u, v)`.
    pub fn singular_vectors(&self) -> (&Tensor, &Tensor) {
        (self.weight_u.as_tensor(), self.weight_v.as_tensor())
    }

    /// Advances `u, v` one power-iteration step and returns `W / σ`.
    fn normalized_weight(&self) -> Result<Tensor> {
        let c_out = self.weight_bar.dim(0)?;
        // [out, in, k, k] -> [out, in*k*k]
        let w = self.weight_bar.reshape((c_out, ()))?;
        let w_const = w.detach();
        let u = self.weight_u.as_tensor().detach().unsqueeze(1)?; // [out, 1]
        let v = l2normalize(&w_const.t()?.matmul(&u)?)?; // [in*k*k, 1]
        let u = l2normalize(&w_const.matmul(&v)?)?; // [out, 1]
        self.weight_u.set(&u.squeeze(1)?)?;
        self.weight_v.set(&v.squeeze(1)?)?;
        let sigma = (u * w.matmul(&v)?)?.sum_all()?;
        self.weight_bar.broadcast_div(&sigma)
    }
}

impl Module for SpectralNormConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.normalized_weight()?;
        let y = super::conv::conv2d(x, &w, self.stride, self.padding, 1)?;
        // [out] -> [1, out, 1, 1]
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

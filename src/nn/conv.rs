//! A square 2-D convolution that knows its geometry (for output sizes and multiply-accumulate
//! counts), built with PyTorch's default initialisation.
//!
//! `nn.Conv2d` draws weight and bias from `U(−1/√fan_in, 1/√fan_in)` (kaiming_uniform with
//! `a = √5`); candle-nn's `conv2d` uses a Kaiming normal instead. Keys: `weight`, `bias`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// PyTorch's default uniform bound for a layer with `fan_in` inputs.
pub fn default_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// Geometry of a square convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvSpec {
    /// A `kernel x kernel` convolution, stride 1, no padding.
    pub fn new(c_in: usize, c_out: usize, kernel: usize) -> Self {
        Self { c_in, c_out, kernel, stride: 1, padding: 0, dilation: 1 }
    }

    pub fn stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    pub fn padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }

    pub fn dilation(self, dilation: usize) -> Self {
        Self { dilation, ..self }
    }

    /// Output size for an `h x w` input.
    pub fn out_hw(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let span = self.dilation * (self.kernel - 1) + 1;
        let one = |n: usize| (n + 2 * self.padding).saturating_sub(span) / self.stride + 1;
        (one(h), one(w))
    }

    /// Multiply-accumulates for an `h x w` input (batch 1), and the output size.
    pub fn macs(&self, hw: (usize, usize)) -> (u64, (usize, usize)) {
        let (oh, ow) = self.out_hw(hw);
        ((oh * ow * self.c_out * self.c_in * self.kernel * self.kernel) as u64, (oh, ow))
    }
}

#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
}

impl Conv {
    /// `nn.Conv2d` with the geometry of `spec` and PyTorch's default init.
    pub fn new(spec: ConvSpec, bias: bool, vb: VarBuilder) -> Result<Self> {
        let b = default_bound(spec.c_in * spec.kernel * spec.kernel);
        let init = Init::Uniform { lo: -b, up: b };
        Self::with_init(spec, init, bias.then_some(init), vb)
    }

    /// A convolution whose weight (and bias, when given) start as the layer's paper says.
    pub fn with_init(spec: ConvSpec, weight: Init, bias: Option<Init>, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((spec.c_out, spec.c_in, spec.kernel, spec.kernel), "weight", weight)?;
        let bias = bias.map(|init| vb.get_with_hints(spec.c_out, "bias", init)).transpose()?;
        Ok(Self { weight, bias, spec })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let y = conv2d(x, &self.weight, s.stride, s.padding, s.dilation)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, s.c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `conv2d(x, weight)` (square kernel, no bias, one group). On the CPU (f32) through
/// [`super::im2col::conv2d`]: one GEMM per pass instead of Candle's tiled forward and naive
/// transposed-convolution input gradient. Elsewhere Candle's own (cuDNN on CUDA), whose
/// backward fails for stride 2 when H and W differ in parity (the output padding is computed
/// from H alone); for an odd kernel with `padding = (k − 1) / 2` an extra zero row or column at
/// the bottom/right of an odd side changes no output value (it lies in the padding the windows
/// already see), so the odd side is made even first.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return super::im2col::conv2d(x, weight, stride, padding, dilation);
    }
    candle_conv2d(x, weight, stride, padding, dilation)
}

/// Candle's convolution, with odd sides made even for stride 2 (see [`conv2d`]).
fn candle_conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    let k = weight.dim(2)?;
    if stride == 2 && h % 2 != w % 2 && k % 2 == 1 && 2 * padding + 1 == k {
        let x = if h % 2 == 1 { x.pad_with_zeros(2, 0, 1)? } else { x.pad_with_zeros(3, 0, 1)? };
        return x.conv2d(weight, padding, stride, dilation, 1);
    }
    x.conv2d(weight, padding, stride, dilation, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Candle's path (CUDA) for a stride-2 conv on a map whose sides differ in parity: the
    /// forward equals Candle's own, and the input gradient (which Candle alone cannot compute)
    /// matches finite differences of the linear map; the CPU path agrees.
    #[test]
    fn stride_two_on_mixed_parity_has_a_correct_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = super::super::init::seeded_var_builder(&vm, 1, DType::F32, &dev);
        let conv = Conv::new(ConvSpec::new(2, 3, 3).stride(2).padding(1), false, vb)?;
        let values: Vec<f32> = (0..2 * 8 * 9).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(values.clone(), (1, 2, 8, 9), &dev)?)?;
        let spec = conv.spec;
        let forward_candle = |x: &Tensor| candle_conv2d(x, &conv.weight, spec.stride, spec.padding, spec.dilation);
        let y = forward_candle(&x)?;
        assert_eq!(y.dims(), [1, 3, 4, 5]);
        let plain = x.conv2d(&conv.weight, 1, 2, 1, 1)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, plain.flatten_all()?.to_vec1::<f32>()?);
        let cpu_path = conv.forward(&x)?;
        assert!((&cpu_path - &y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-5);
        let r = Tensor::arange(0f32, 60.0, &dev)?.reshape((1, 3, 4, 5))?.affine(0.1, -3.0)?;
        let loss = |x: &Tensor| -> Result<f32> { (forward_candle(x)? * &r)?.sum_all()?.to_scalar::<f32>() };
        let grad = (y * &r)?.sum_all()?.backward()?.get(&x).expect("input gradient").flatten_all()?.to_vec1::<f32>()?;
        let base = loss(x.as_tensor())?;
        // The last column and row (the odd side's border) and an interior entry.
        for i in [8, 17, 2 * 72 - 1, 40] {
            let mut bumped = values.clone();
            bumped[i] += 1.0;
            let fd = loss(&Tensor::from_vec(bumped, (1, 2, 8, 9), &dev)?)? - base;
            assert!((fd - grad[i]).abs() < 1e-3, "entry {i}: finite difference {fd} vs gradient {}", grad[i]);
        }
        Ok(())
    }
}

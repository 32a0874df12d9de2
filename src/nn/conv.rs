//! A square 2-D convolution that knows its geometry (for output sizes and multiply-accumulate
//! counts), built with PyTorch's default initialisation.
//!
//! `nn.Conv2d` draws weight and bias from `U(−1/√fan_in, 1/√fan_in)` (kaiming_uniform with
//! `a = √5`); candle-nn's `conv2d` uses a Kaiming normal instead. Keys: `weight`, `bias`.

use super::batch_norm::ChannelAffine;
use super::im2col::PreparedWeight;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::{Arc, OnceLock};

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
    /// The weight packed for the CPU's products, made on the first CPU forward of a weight that
    /// is no variable (a frozen network's, which never changes): the r101 teacher's 42 M weights
    /// are then packed once, not in every step.
    packed: OnceLock<Arc<PreparedWeight>>,
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
        Ok(Self { weight, bias, spec, packed: OnceLock::new() })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// The weight's packed copy, when the CPU's products can use one (see `packed`).
    fn packed_for(&self, x: &Tensor) -> Result<Option<&Arc<PreparedWeight>>> {
        if self.weight.is_variable() || !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        Ok(Some(match self.packed.get() {
            Some(packed) => packed,
            None => {
                let packed = Arc::new(super::im2col::pack_weight(&self.weight, self.spec.stride)?);
                self.packed.get_or_init(|| packed)
            }
        }))
    }

    /// `after(conv(x))` for a frozen eval-mode BatchNorm and its activation (`after`), applied
    /// as the product finishes each channel: one pass over the output fewer, the same values.
    /// `None` where that does not apply (a trainable weight, a bias, an input that needs a
    /// gradient, not the CPU); then the caller runs the two.
    pub fn forward_then(&self, x: &Tensor, after: ChannelAffine) -> Result<Option<Tensor>> {
        let s = &self.spec;
        match self.packed_for(x)? {
            Some(packed) if self.bias.is_none() && !x.track_op() && !self.weight.track_op() => {
                let geometry = (s.stride, s.padding, s.dilation);
                super::im2col::conv2d_prepacked_then(x, &self.weight, packed, geometry, after).map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        // `conv2d`'s CPU path, with the weight's packed copy.
        let y = match self.packed_for(x)? {
            Some(packed) => super::im2col::conv2d_prepacked(x, &self.weight, packed, s.stride, s.padding, s.dilation)?,
            None => conv2d(x, &self.weight, s.stride, s.padding, s.dilation)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, s.c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `conv2d(x, weight)` (square kernel, no bias, one group). On the CPU (f32) through
/// [`super::im2col::conv2d`]: one GEMM per pass instead of Candle's tiled forward and naive
/// transposed-convolution input gradient. Elsewhere through [`super::device_conv::conv2d`]:
/// Candle's forward (cuDNN on CUDA) with a backward of forward convolutions and matrix products.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return super::im2col::conv2d(x, weight, stride, padding, dilation);
    }
    super::device_conv::conv2d(x, weight, stride, padding, dilation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    /// A frozen convolution (plain-tensor weight) packs its weight once (or transforms it, for
    /// Winograd's tiles) and gives the same values, bit for bit, as the same convolution with a
    /// variable weight, which packs anew.
    #[test]
    fn a_frozen_weight_is_packed_once_with_the_same_results() -> Result<()> {
        for (spec, winograd) in [
            (ConvSpec::new(5, 19, 3).padding(2).dilation(2), false),
            (ConvSpec::new(5, 256, 3).padding(2).dilation(2), false),
            (ConvSpec::new(256, 256, 3).padding(1), true),
        ] {
            frozen_equals_trainable(spec, winograd)?;
        }
        Ok(())
    }

    fn frozen_equals_trainable(spec: ConvSpec, winograd: bool) -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let trainable = Conv::new(spec, true, super::super::init::seeded_var_builder(&vm, 3, DType::F32, &dev))?;
        let tensors: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
            .collect();
        let frozen = Conv::new(spec, true, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (2, spec.c_in, 13, 11), &dev)?;
        let want = trainable.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for call in 0..2 {
            assert_eq!(frozen.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, want, "{spec:?} call {call}");
            let prepared = frozen.packed.get().map(|p| matches!(**p, PreparedWeight::Winograd(_)));
            assert_eq!(
                prepared,
                Some(winograd),
                "{spec:?}: the frozen weight is prepared, for Winograd's tiles or not"
            );
        }
        assert!(trainable.packed.get().is_none(), "a variable weight is packed in each product");
        Ok(())
    }

    /// A frozen convolution with the eval-mode BatchNorm and activation after it applied in its
    /// product gives the two ops' values bit for bit, for each activation; it declines where
    /// it does not apply (a trainable BatchNorm, an input that needs a gradient).
    #[test]
    fn normalisation_in_the_product_equals_the_two_ops() -> Result<()> {
        use super::super::batch_norm::{Activation, BatchNorm};
        let dev = Device::Cpu;
        let spec = ConvSpec::new(5, 19, 3).stride(2).padding(2).dilation(2);
        let vm = candle_nn::VarMap::new();
        let vb = super::super::init::seeded_var_builder(&vm, 5, DType::F32, &dev);
        let (_, trainable_bn) = (Conv::new(spec, false, vb.pp("conv"))?, BatchNorm::new(19, vb.pp("bn"))?);
        let stats = |n: usize, lo: f32| {
            Tensor::from_vec((0..n).map(|i| lo + (i * 7 % 5) as f32 * 0.3).collect::<Vec<f32>>(), n, &dev)
        };
        let mut tensors: HashMap<String, Tensor> =
            vm.data().lock().expect("varmap").iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        for (key, lo) in [("bn.weight", -0.8), ("bn.bias", -0.4), ("bn.running_mean", -0.2), ("bn.running_var", 0.5)] {
            tensors.insert(key.into(), stats(19, lo)?);
        }
        let frozen = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let (conv, bn) = (Conv::new(spec, false, frozen.pp("conv"))?, BatchNorm::new(19, frozen.pp("bn"))?);
        let x = Tensor::randn(0f32, 1.0, (2, 5, 13, 11), &dev)?;
        for act in [Activation::Identity, Activation::Relu, Activation::LeakyRelu(0.01)] {
            let after = bn.frozen_affine(act)?.expect("a frozen BatchNorm");
            let fused = conv.forward_then(&x, after)?.expect("a frozen convolution");
            let two = bn.forward_act(&conv.forward(&x)?, false, act)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(&fused)?, bits(&two)?, "{act:?}");
        }
        assert!(trainable_bn.frozen_affine(Activation::Relu)?.is_none(), "a trainable BatchNorm");
        let tracked = candle_core::Var::from_tensor(&x)?;
        let after = bn.frozen_affine(Activation::Relu)?.expect("a frozen BatchNorm");
        assert!(conv.forward_then(tracked.as_tensor(), after)?.is_none(), "an input that needs a gradient");
        Ok(())
    }
}

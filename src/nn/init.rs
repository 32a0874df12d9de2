//! Parameter initialisation from a seed.
//!
//! Candle's CPU random tensors cannot be seeded, so two runs of the same config would start from
//! different weights. [`seeded_var_builder`] creates every variable of a `VarMap` from the
//! layer's own `Init` hint (constant, uniform, normal, Kaiming), drawn on the host from a
//! [`SplitMix64`] stream keyed by `(seed, parameter name)`: the same seed gives the same network,
//! whatever order the layers are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use super::SplitMix64;

/// `n` values drawn as `init` says for a tensor of `shape`.
fn draw(init: Init, shape: &Shape, rng: &mut SplitMix64) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| (lo + (up - lo) * rng.uniform()) as f32;
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| uniform(rng, lo, up)).collect(),
        Init::Randn { mean, stdev } => (0..n).map(|_| (mean + stdev * rng.normal()) as f32).collect(),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n).map(|_| uniform(rng, -bound, bound)).collect()
                }
                NormalOrUniform::Normal => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
            }
        }
    }
}

/// A `VarMap` whose missing variables are created from `(seed, name)`.
struct Seeded {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("{name}: already created with shape {:?}, asked for {:?}", v.shape(), s);
            }
            return Ok(v.as_tensor().clone());
        }
        let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let values = draw(h, &s, &mut SplitMix64::derive(&[self.seed, key]));
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded VarMap needs the shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// A `VarBuilder` over `varmap` that initialises new variables from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Seeded { varmap: varmap.clone(), seed }), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_the_hinted_distribution() -> Result<()> {
        let make = |seed| -> Result<Vec<f32>> {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
            vb.get_with_hints((100, 10), "w", Init::Uniform { lo: -0.5, up: 0.5 })?.flatten_all()?.to_vec1::<f32>()
        };
        let (a, b, c) = (make(1)?, make(1)?, make(2)?);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        Ok(())
    }
}

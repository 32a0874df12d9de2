//! The FPN of FCOS (`R-50-FPN-RETINANET` with `USE_C5: False`): P3-P5 from C3-C5 by 1x1
//! laterals, a nearest ×2 top-down path and 3x3 output convs; P6 = 3x3/2 conv on P5 and
//! P7 = 3x3/2 conv on ReLU(P6). No norm, no activation on the outputs. Every conv starts as
//! `kaiming_uniform(a = 1)` with bias 0. Keys as in the official checkpoints
//! (`fpn_inner2..4`, `fpn_layer2..4`, `top_blocks.p6/p7`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::nn::conv::{Conv, ConvSpec};

/// `kaiming_uniform_(w, a=1)`: gain 1, bound `√3 / √fan_in`.
fn kaiming_uniform_a1(spec: &ConvSpec) -> Init {
    let bound = 3f64.sqrt() / ((spec.c_in * spec.kernel * spec.kernel) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

fn conv(spec: ConvSpec, vb: VarBuilder) -> Result<Conv> {
    Conv::with_init(spec, kaiming_uniform_a1(&spec), Some(Init::Const(0.0)), vb)
}

#[derive(Debug)]
pub struct Fpn {
    /// C3, C4, C5 -> `channels`.
    inner: Vec<Conv>,
    layer: Vec<Conv>,
    p6: Conv,
    p7: Conv,
}

impl Fpn {
    /// `in_channels`: C3, C4, C5.
    pub fn new(in_channels: [usize; 3], channels: usize, vb: VarBuilder) -> Result<Self> {
        let mut inner = Vec::new();
        let mut layer = Vec::new();
        for (i, &c) in in_channels.iter().enumerate() {
            inner.push(conv(ConvSpec::new(c, channels, 1), vb.pp(format!("fpn_inner{}", i + 2)))?);
            layer.push(conv(ConvSpec::new(channels, channels, 3).padding(1), vb.pp(format!("fpn_layer{}", i + 2)))?);
        }
        let top = vb.pp("top_blocks");
        let down = ConvSpec::new(channels, channels, 3).stride(2).padding(1);
        Ok(Self { inner, layer, p6: conv(down, top.pp("p6"))?, p7: conv(down, top.pp("p7"))? })
    }

    /// P3..P7 from C3, C4, C5.
    pub fn forward(&self, c: [&Tensor; 3]) -> Result<Vec<Tensor>> {
        let mut top_down = self.inner[2].forward(c[2])?;
        let mut outs = vec![self.layer[2].forward(&top_down)?];
        for i in (0..2).rev() {
            let lateral = self.inner[i].forward(c[i])?;
            let (h, w) = (lateral.dim(2)?, lateral.dim(3)?);
            top_down = (lateral + top_down.upsample_nearest2d(h, w)?)?;
            outs.insert(0, self.layer[i].forward(&top_down)?);
        }
        let p6 = self.p6.forward(&outs[2])?;
        let p7 = self.p7.forward(&p6.relu()?)?;
        outs.push(p6);
        outs.push(p7);
        Ok(outs)
    }
}

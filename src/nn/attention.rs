//! The SAGAN self-attention block (Zhang et al. 2019) as in the SKD discriminator
//! (`networks/sagan_models.py`, `Self_Attn`).
//!
//! `q = W_q x`, `k = W_k x` (C → C/8), `v = W_v x` (C → C), all 1x1 convolutions with bias;
//! `att = softmax_j(q_iᵀ k_j)` (no scaling); `y = γ · (v attᵀ) + x` with a scalar `γ` that
//! starts at 0. Keys: `query_conv`, `key_conv`, `value_conv`, `gamma`.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::conv::{Conv, ConvSpec};

#[derive(Debug)]
pub struct SelfAttention {
    query_conv: Conv,
    key_conv: Conv,
    value_conv: Conv,
    gamma: Tensor,
}

impl SelfAttention {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        if channels < 8 {
            candle_core::bail!("self-attention needs at least 8 channels (C/8 query width), got {channels}");
        }
        Ok(Self {
            query_conv: Conv::new(ConvSpec::new(channels, channels / 8, 1), true, vb.pp("query_conv"))?,
            key_conv: Conv::new(ConvSpec::new(channels, channels / 8, 1), true, vb.pp("key_conv"))?,
            value_conv: Conv::new(ConvSpec::new(channels, channels, 1), true, vb.pp("value_conv"))?,
            gamma: vb.get_with_hints(1, "gamma", Init::Const(0.0))?,
        })
    }
}

impl Module for SelfAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B, C', H, W] -> [B, C', N]
        let q = self.query_conv.forward(x)?.reshape((b, (), h * w))?;
        let k = self.key_conv.forward(x)?.reshape((b, (), h * w))?;
        let v = self.value_conv.forward(x)?.reshape((b, c, h * w))?;
        // [B, N, C'] x [B, C', N] -> [B, N, N]; softmax over j (the keys)
        let energy = q.transpose(1, 2)?.contiguous()?.matmul(&k.contiguous()?)?;
        let att = candle_nn::ops::softmax(&energy, D::Minus1)?;
        // [B, C, N] x [B, N, N]^T -> [B, C, N] -> [B, C, H, W]
        let out = v.contiguous()?.matmul(&att.transpose(1, 2)?.contiguous()?)?.reshape((b, c, h, w))?;
        out.broadcast_mul(&self.gamma)?.add(x)
    }
}

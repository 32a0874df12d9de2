//! Pair-wise distillation: the student's affinity graph between feature nodes is taught by
//! the teacher's (paper Eq. 2; `CriterionPairWiseforWholeFeatAfterPool` + `sim_dis_compute`).
//!
//! Nodes: the feature map is pooled with kernel = stride = `(int(β·H'), int(β·W'))`, ceil mode,
//! padding 0 (β = 0.5 on 65x65 gives 3x3 nodes); max pooling as run, average as the paper says.
//! Affinity: cosine similarity between every pair of nodes, each node's L2 norm (+1e-8)
//! treated as a constant in backprop. Loss: mean over `B·N·N` of `(A_T − A_S)²`. Teacher and
//! student channel counts may differ; their spatial sizes must match.

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::{MaxPool2d, avg_pool2d_ceil};

const NORM_EPS: f64 = 1e-8;

/// How pixels are aggregated into graph nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodePool {
    /// As run (`nn.MaxPool2d`).
    #[default]
    Max,
    /// As the TPAMI paper describes (β×β average).
    Avg,
}

/// The node kernel for an `h x w` map: `(int(scale·h), int(scale·w))`, at least 1.
///
/// The reference raises for a kernel of 0 (a map smaller than `1/scale`); we clamp to 1 so the
/// small FPN levels (P7 of a small image) keep one node per pixel. `scale = None` is the full
/// graph (kernel 1).
pub fn node_kernel(h: usize, w: usize, scale: Option<f64>) -> (usize, usize) {
    match scale {
        None => (1, 1),
        Some(s) => (((h as f64 * s) as usize).max(1), ((w as f64 * s) as usize).max(1)),
    }
}

/// `[B, C, H, W] -> [B, C, H_n, W_n]` graph nodes.
pub fn nodes(f: &Tensor, pool: NodePool, scale: Option<f64>) -> Result<Tensor> {
    let (_, _, h, w) = f.dims4()?;
    let k = node_kernel(h, w, scale);
    if k == (1, 1) {
        return Ok(f.clone());
    }
    match pool {
        NodePool::Max => MaxPool2d::new(k, k, (0, 0), true).forward(f),
        NodePool::Avg => avg_pool2d_ceil(f, k, k),
    }
}

/// Cosine affinity `[B, N, N]` between the `N = H·W` nodes of `[B, C, H, W]`, the norms
/// detached.
pub fn affinity(nodes: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = nodes.dims4()?;
    let norm = (nodes.sqr()?.sum_keepdim(1)?.sqrt()? + NORM_EPS)?.detach();
    // [B, C, H, W] -> [B, C, N]
    let unit = nodes.broadcast_div(&norm)?.reshape((b, c, h * w))?;
    // [B, N, C] x [B, C, N] -> [B, N, N]
    unit.transpose(1, 2)?.contiguous()?.matmul(&unit)
}

/// The pair-wise loss of `f_s` taught by `f_t` (the teacher is detached).
pub fn pair_wise_loss(f_s: &Tensor, f_t: &Tensor, pool: NodePool, scale: Option<f64>) -> Result<Tensor> {
    let (bs, _, hs, ws) = f_s.dims4()?;
    let (bt, _, ht, wt) = f_t.dims4()?;
    if (bs, hs, ws) != (bt, ht, wt) {
        candle_core::bail!(
            "pair-wise: student features {:?} and teacher features {:?} differ in batch or size",
            f_s.dims(),
            f_t.dims()
        );
    }
    let a_s = affinity(&nodes(f_s, pool, scale)?)?;
    let a_t = affinity(&nodes(&f_t.detach(), pool, scale)?)?;
    let n = a_s.dim(1)?;
    // Summed row by row first: one f32 pass over the N² entries of a full graph (N = 4225 for
    // 65x65) loses ~1e-4 relative; two passes of length N keep it at float noise.
    (a_t - a_s)?.sqr()?.sum(2)?.sum_all()? / (n * n * bs) as f64
}

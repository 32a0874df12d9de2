//! The FCOS training losses (`FCOSLossComputation`, one device):
//!
//! ```text
//! L_cls = Σ_{locations × classes} focal(z, y) / max(#pos, 1)          α = 0.25, γ = 2
//! L_reg = Σ_pos ctr*·iou_loss(pred, target) / Σ_pos ctr*               a ctr*-weighted mean
//! L_ctr = Σ_pos BCEWithLogits(ctr_logit, ctr*) / max(#pos, 1)
//! ```
//!
//! With no positive location `L_reg` and `L_ctr` are 0, still attached to the graph (the sums
//! of empty selections in the official code). The paper normalises `L_reg` by `#pos`; the code
//! weights by the centerness targets in both the original and the "imprv" configs, as here.

use candle_core::{D, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::targets::ImageTargets;
use crate::distill::Losses;

/// Which IoU-family loss the regression branch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IouLoss {
    /// `−log IoU` (original FCOS).
    #[default]
    Iou,
    /// `1 − IoU`.
    LinearIou,
    /// `1 − GIoU` ("imprv").
    Giou,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub focal_alpha: f64,
    pub focal_gamma: f64,
    pub iou_loss: IouLoss,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { focal_alpha: 0.25, focal_gamma: 2.0, iou_loss: IouLoss::Iou }
    }
}

/// The head's outputs per level, as the loss and the post-processing read them.
#[derive(Debug, Clone)]
pub struct HeadOutputs {
    /// `[N, K, H_l, W_l]` classification logits.
    pub cls_logits: Vec<Tensor>,
    /// `[N, 4, H_l, W_l]` positive `(l, t, r, b)` distances: pixels, or strides with
    /// `norm_reg_targets` (training; the post-processing wants pixels).
    pub bbox_reg: Vec<Tensor>,
    /// `[N, 1, H_l, W_l]` centerness logits.
    pub centerness: Vec<Tensor>,
}

/// The three losses and the two normalisers.
#[derive(Debug, Clone)]
pub struct FcosLosses {
    pub cls: Tensor,
    pub reg: Tensor,
    pub ctr: Tensor,
    pub num_pos: usize,
    /// `Σ_pos ctr*` (the regression normaliser; 0 without positives).
    pub sum_ctr_targets: f64,
}

impl FcosLosses {
    /// As the official trainer logs and sums them.
    pub fn into_losses(self) -> Losses {
        let mut l = Losses::new();
        l.push("loss_cls", self.cls);
        l.push("loss_reg", self.reg);
        l.push("loss_ctr", self.ctr);
        l
    }
}

/// Levels of `[N, C, H, W]` to one `[N·L, C]` matrix: image-major, then level, then row-major
/// location (the order of `Locations`).
pub fn flatten_levels(levels: &[Tensor]) -> Result<Tensor> {
    let per_level = levels
        .iter()
        .map(|t| {
            let (n, c, h, w) = t.dims4()?;
            t.permute((0, 2, 3, 1))?.reshape((n, h * w, c))
        })
        .collect::<Result<Vec<_>>>()?;
    let all = Tensor::cat(&per_level, 1)?;
    let (n, l, c) = all.dims3()?;
    all.reshape((n * l, c))
}

/// `log σ(z) = min(z, 0) − log(1 + e^{−|z|})`, stable for every `z`.
fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    let min0 = (z - z.relu()?)?;
    min0 - z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// Σ of the sigmoid focal loss over every entry of `logits` `[P, K]`; `one_hot` `[P, K]` marks the
/// GT class of each row (all zero for background).
pub fn sigmoid_focal_loss_sum(logits: &Tensor, one_hot: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let log_p = log_sigmoid(logits)?;
    // log(1 − σ(z)) = log σ(z) − z
    let log_q = (&log_p - logits)?;
    let pow = |t: &Tensor| if gamma == 2.0 { t.exp()?.sqr() } else { (t * gamma)?.exp() };
    let pos = (pow(&log_q)? * &log_p)?.affine(-alpha, 0.0)?;
    let neg = (pow(&log_p)? * &log_q)?.affine(-(1.0 - alpha), 0.0)?;
    ((one_hot * (pos - &neg)?)? + neg)?.sum_all()
}

/// Per-row IoU-family loss of predicted and target `(l, t, r, b)` `[P, 4]` measured from the
/// same point; `IoU = (I + 1) / (U + 1)`.
pub fn iou_loss(pred: &Tensor, target: &Tensor, kind: IouLoss) -> Result<Tensor> {
    let col = |t: &Tensor, i: usize| t.narrow(1, i, 1);
    let (pl, pt, pr, pb) = (col(pred, 0)?, col(pred, 1)?, col(pred, 2)?, col(pred, 3)?);
    let (tl, tt, tr, tb) = (col(target, 0)?, col(target, 1)?, col(target, 2)?, col(target, 3)?);
    let target_area = ((&tl + &tr)? * (&tt + &tb)?)?;
    let pred_area = ((&pl + &pr)? * (&pt + &pb)?)?;
    let w_inter = (pl.minimum(&tl)? + pr.minimum(&tr)?)?;
    let h_inter = (pt.minimum(&tt)? + pb.minimum(&tb)?)?;
    let inter = (w_inter * h_inter)?;
    let union = ((target_area + pred_area)? - &inter)?;
    let iou = ((inter + 1.0)? / (&union + 1.0)?)?;
    let loss = match kind {
        IouLoss::Iou => iou.log()?.neg()?,
        IouLoss::LinearIou => iou.affine(-1.0, 1.0)?,
        IouLoss::Giou => {
            let w_enclosing = (pl.maximum(&tl)? + pr.maximum(&tr)?)?;
            let h_enclosing = (pt.maximum(&tt)? + pb.maximum(&tb)?)?;
            let enclosing = ((w_enclosing * h_enclosing)? + 1e-7)?;
            let giou = (iou - ((&enclosing - union)? / enclosing)?)?;
            giou.affine(-1.0, 1.0)?
        }
    };
    loss.squeeze(1)
}

/// `Σ BCEWithLogits(x, t) = Σ relu(x) − x·t + log(1 + e^{−|x|})`.
fn bce_with_logits_sum(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    ((x.relu()? - (x * t)?)? + softplus_neg_abs)?.sum_all()
}

/// The FCOS losses of `head` against the per-image `targets` (one per image, over the same
/// locations).
pub fn fcos_losses(head: &HeadOutputs, targets: &[ImageTargets], cfg: &LossConfig) -> Result<FcosLosses> {
    let logits = flatten_levels(&head.cls_logits)?;
    let reg = flatten_levels(&head.bbox_reg)?;
    let ctr = flatten_levels(&head.centerness)?.squeeze(1)?;
    let (rows, k) = logits.dims2()?;
    let per_image: usize = targets.first().map_or(0, |t| t.labels.len());
    if targets.iter().map(|t| t.labels.len()).sum::<usize>() != rows
        || targets.iter().any(|t| t.labels.len() != per_image)
    {
        candle_core::bail!("fcos loss: the targets cover {} locations per image, the head {rows} in all", per_image);
    }
    let device = logits.device();
    let dtype = logits.dtype();

    let mut one_hot = vec![0f32; rows * k];
    let mut pos_rows = Vec::new();
    let mut pos_reg = Vec::new();
    let mut pos_ctr = Vec::new();
    let mut sum_ctr_targets = 0f64;
    for (row, (label, (reg, c))) in
        targets.iter().flat_map(|t| t.labels.iter().zip(t.reg.iter().zip(&t.centerness))).enumerate()
    {
        if *label > 0 {
            one_hot[row * k + (*label as usize - 1)] = 1.0;
            pos_rows.push(row as u32);
            pos_reg.extend(reg.map(|v| v as f32));
            pos_ctr.push(*c as f32);
            sum_ctr_targets += c;
        }
    }
    let num_pos = pos_rows.len();
    let num_pos_avg = (num_pos as f64).max(1.0);
    let one_hot = Tensor::from_vec(one_hot, (rows, k), device)?.to_dtype(dtype)?;
    let cls = (sigmoid_focal_loss_sum(&logits, &one_hot, cfg.focal_alpha, cfg.focal_gamma)? / num_pos_avg)?;

    if num_pos == 0 {
        // Zero, but in the graph: every head output gets a (zero) gradient, as in PyTorch, so
        // weight decay still reaches the regression branch. (Candle drops `x * 0.0` from the
        // graph; a product with a zero tensor stays.)
        let zero = |t: &Tensor| {
            let s = t.sum_all()?;
            s.mul(&s.zeros_like()?)
        };
        return Ok(FcosLosses { cls, reg: zero(&reg)?, ctr: zero(&ctr)?, num_pos, sum_ctr_targets: 0.0 });
    }
    let idx = Tensor::from_vec(pos_rows, num_pos, device)?;
    let target_reg = Tensor::from_vec(pos_reg, (num_pos, 4), device)?.to_dtype(dtype)?;
    let target_ctr = Tensor::from_vec(pos_ctr, num_pos, device)?.to_dtype(dtype)?;
    let per_box = iou_loss(&reg.index_select(&idx, 0)?, &target_reg, cfg.iou_loss)?;
    let reg_loss = ((per_box * &target_ctr)?.sum(D::Minus1)? / sum_ctr_targets)?;
    let ctr_loss = (bce_with_logits_sum(&ctr.index_select(&idx, 0)?, &target_ctr)? / num_pos_avg)?;
    Ok(FcosLosses { cls, reg: reg_loss, ctr: ctr_loss, num_pos, sum_ctr_targets })
}

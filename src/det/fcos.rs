//! FCOS (Tian et al., ICCV 2019) as the official code builds it: a ResNet backbone, the FPN
//! P3-P7 and one head shared by every level.
//!
//! ```text
//! image -> ResNet -> C3, C4, C5 -> FPN -> P3..P7 ─┬─ cls tower (4 x conv3x3-GN-ReLU) -> cls_logits [K]
//!                                                 │                                  (-> centerness [1])
//!                                                 └─ bbox tower (4 x conv3x3-GN-ReLU) -> bbox_pred [4] x Scale_l
//!                                                                                    (-> centerness, "imprv")
//! bbox: exp(Scale_l · x) in pixels, or ReLU(Scale_l · x) in strides with norm_reg_targets
//! ```
//!
//! Head convs start as N(0, 0.01²) with bias 0; the classifier's bias is `−log((1 − π)/π)`,
//! π = 0.01, so every location starts as background with probability 0.99.

use candle_core::{Module, Result, Tensor};
use candle_nn::{GroupNorm, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::fpn::Fpn;
use super::loss::HeadOutputs;
use super::targets::Levels;
use crate::backbone::resnet::{is_norm_key, stage_of};
use crate::backbone::{ResNet, ResNetConfig};
use crate::distill::DenseOutputs;
use crate::nn::conv::{Conv, ConvSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcosConfig {
    pub backbone: ResNetConfig,
    /// K, without background.
    pub num_classes: usize,
    /// FPN and head width (256; the "c128" students use 128).
    pub channels: usize,
    /// Conv-GN-ReLU layers per tower.
    pub num_convs: usize,
    pub gn_groups: usize,
    /// π of the classifier's bias.
    pub prior_prob: f64,
    /// Centerness on the bbox tower ("imprv") instead of the cls tower.
    pub centerness_on_reg: bool,
    /// `ReLU(Scale·x)` in stride units instead of `exp(Scale·x)` in pixels ("imprv").
    pub norm_reg_targets: bool,
    /// Backbone parts whose parameters stay fixed: 0 none, 1 the stem, 2 the stem and layer1
    /// (`FREEZE_CONV_BODY_AT = 2`, as run).
    pub freeze_at: usize,
    /// Backbone BatchNorm as a fixed affine map of its statistics (FrozenBN, as run with ImageNet
    /// weights) instead of trained batch statistics (what a backbone trained from scratch needs).
    pub frozen_bn: bool,
    #[serde(default)]
    pub levels: Levels,
}

impl FcosConfig {
    /// `fcos_R_50_FPN_1x`: the teacher.
    pub fn fcos_r50() -> Self {
        Self {
            backbone: ResNetConfig::r50_fcos(),
            num_classes: 80,
            channels: 256,
            num_convs: 4,
            gn_groups: 32,
            prior_prob: 0.01,
            centerness_on_reg: false,
            norm_reg_targets: false,
            freeze_at: 2,
            frozen_bn: true,
            levels: Levels::default(),
        }
    }

    /// The same detector on ResNet-18: the student.
    pub fn fcos_r18() -> Self {
        Self { backbone: ResNetConfig::r18_fcos(), ..Self::fcos_r50() }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "fcos-r50" => Ok(Self::fcos_r50()),
            "fcos-r18" => Ok(Self::fcos_r18()),
            other => candle_core::bail!(
                "unknown FCOS preset {other:?}{}; presets: {}",
                crate::suggest::did_you_mean(other, PRESETS.iter().copied()),
                PRESETS.join(", ")
            ),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.levels.validate()?;
        if self.backbone.output_stride != 32 || self.backbone.stem_pool_ceil {
            candle_core::bail!(
                "fcos: the backbone needs output_stride 32 and a floor-mode stem pool (stem_pool_ceil false)"
            );
        }
        if self.levels.strides != [8, 16, 32, 64, 128] {
            candle_core::bail!("fcos: the FPN gives P3..P7, so levels.strides must be [8, 16, 32, 64, 128]");
        }
        if self.num_classes == 0 || self.channels == 0 || self.num_convs == 0 {
            candle_core::bail!("fcos: num_classes, channels and num_convs must be positive");
        }
        if self.gn_groups == 0 || !self.channels.is_multiple_of(self.gn_groups) {
            candle_core::bail!(
                "fcos: channels ({}) must be a multiple of gn_groups ({})",
                self.channels,
                self.gn_groups
            );
        }
        if !(self.prior_prob > 0.0 && self.prior_prob < 1.0) {
            candle_core::bail!("fcos: prior_prob must be in (0, 1), got {}", self.prior_prob);
        }
        if self.freeze_at > 5 {
            candle_core::bail!("fcos: freeze_at must be 0..=5, got {}", self.freeze_at);
        }
        Ok(())
    }

    /// Whether the parameter `key` (a key of the whole detector) stays fixed in training.
    pub fn is_frozen(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix("backbone.") else { return false };
        stage_of(rest).is_some_and(|s| s < self.freeze_at) || (self.frozen_bn && is_norm_key(rest))
    }
}

/// The preset names `FcosConfig::preset` knows.
pub const PRESETS: &[&str] = &["fcos-r50", "fcos-r18"];

fn head_conv(c_in: usize, c_out: usize, bias: f64, vb: VarBuilder) -> Result<Conv> {
    let spec = ConvSpec::new(c_in, c_out, 3).padding(1);
    Conv::with_init(spec, Init::Randn { mean: 0.0, stdev: 0.01 }, Some(Init::Const(bias)), vb)
}

/// `num_convs` x (conv3x3 -> GroupNorm -> ReLU); keys `{3i}` (conv) and `{3i + 1}` (GN) as the
/// official `nn.Sequential`.
#[derive(Debug)]
struct Tower {
    layers: Vec<(Conv, GroupNorm)>,
}

impl Tower {
    fn new(cfg: &FcosConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let layers = (0..cfg.num_convs)
            .map(|i| {
                let conv = head_conv(c, c, 0.0, vb.pp(3 * i))?;
                let gn = candle_nn::group_norm(cfg.gn_groups, c, 1e-5, vb.pp(3 * i + 1))?;
                Ok((conv, gn))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Module for Tower {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |y, (conv, gn)| gn.forward(&conv.forward(&y)?)?.relu())
    }
}

#[derive(Debug)]
pub struct FcosHead {
    cls_tower: Tower,
    bbox_tower: Tower,
    cls_logits: Conv,
    bbox_pred: Conv,
    centerness: Conv,
    /// One learnable scalar per level, `[1]`.
    scales: Vec<Tensor>,
    centerness_on_reg: bool,
    norm_reg_targets: bool,
}

impl FcosHead {
    pub fn new(cfg: &FcosConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let prior_bias = -((1.0 - cfg.prior_prob) / cfg.prior_prob).ln();
        let scales = (0..cfg.levels.strides.len())
            .map(|l| vb.pp("scales").pp(l).get_with_hints(1, "scale", Init::Const(1.0)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cls_tower: Tower::new(cfg, vb.pp("cls_tower"))?,
            bbox_tower: Tower::new(cfg, vb.pp("bbox_tower"))?,
            cls_logits: head_conv(c, cfg.num_classes, prior_bias, vb.pp("cls_logits"))?,
            bbox_pred: head_conv(c, 4, 0.0, vb.pp("bbox_pred"))?,
            centerness: head_conv(c, 1, 0.0, vb.pp("centerness"))?,
            scales,
            centerness_on_reg: cfg.centerness_on_reg,
            norm_reg_targets: cfg.norm_reg_targets,
        })
    }

    /// Per level: logits, the `(l, t, r, b)` distances (pixels, or strides with
    /// `norm_reg_targets`) and centerness logits.
    pub fn forward(&self, features: &[Tensor]) -> Result<HeadOutputs> {
        let mut head = HeadOutputs { cls_logits: Vec::new(), bbox_reg: Vec::new(), centerness: Vec::new() };
        for (p, scale) in features.iter().zip(&self.scales) {
            let cls = self.cls_tower.forward(p)?;
            let reg = self.bbox_tower.forward(p)?;
            let scaled = self.bbox_pred.forward(&reg)?.broadcast_mul(scale)?;
            head.cls_logits.push(self.cls_logits.forward(&cls)?);
            head.bbox_reg.push(if self.norm_reg_targets { scaled.relu()? } else { scaled.exp()? });
            head.centerness.push(self.centerness.forward(if self.centerness_on_reg { &reg } else { &cls })?);
        }
        Ok(head)
    }
}

/// What one forward pass produces.
#[derive(Debug, Clone)]
pub struct FcosOutput {
    pub head: HeadOutputs,
    /// P3..P7.
    pub features: Vec<Tensor>,
}

impl FcosOutput {
    /// What distillation sees: the class logits and the FPN features, five levels.
    pub fn dense(&self) -> DenseOutputs {
        DenseOutputs { logits: self.head.cls_logits.clone(), features: self.features.clone() }
    }
}

#[derive(Debug)]
pub struct Fcos {
    cfg: FcosConfig,
    backbone: ResNet,
    fpn: Fpn,
    head: FcosHead,
}

impl Fcos {
    /// Keys: `backbone.*`, `fpn.*`, `head.*`.
    pub fn new(cfg: &FcosConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let [_, c3, c4, c5] = cfg.backbone.out_channels();
        Ok(Self {
            cfg: cfg.clone(),
            backbone: ResNet::new(&cfg.backbone, vb.pp("backbone"))?,
            fpn: Fpn::new([c3, c4, c5], cfg.channels, vb.pp("fpn"))?,
            head: FcosHead::new(cfg, vb.pp("head"))?,
        })
    }

    pub fn config(&self) -> &FcosConfig {
        &self.cfg
    }

    /// `x`: `[B, 3, H, W]` with H and W multiples of 32 (the loader pads to them).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<FcosOutput> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h % 32 != 0 || w % 32 != 0 {
            candle_core::bail!("fcos: expected [B, 3, H, W] images with H and W multiples of 32, got {:?}", x.dims());
        }
        let backbone = self.backbone.forward_t(x, train && !self.cfg.frozen_bn)?;
        let [_, c3, c4, c5] = &backbone.layers;
        let features = self.fpn.forward([c3, c4, c5])?;
        let head = self.head.forward(&features)?;
        Ok(FcosOutput { head, features })
    }

    /// The head's distances in pixels, as the post-processing wants them.
    pub fn bbox_in_pixels(&self, head: &HeadOutputs) -> Result<HeadOutputs> {
        if !self.cfg.norm_reg_targets {
            return Ok(head.clone());
        }
        let bbox_reg =
            head.bbox_reg.iter().zip(&self.cfg.levels.strides).map(|(r, &s)| r * s as f64).collect::<Result<_>>()?;
        Ok(HeadOutputs { bbox_reg, ..head.clone() })
    }
}

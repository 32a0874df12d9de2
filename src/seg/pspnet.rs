//! PSPNet (Zhao et al. 2017) on a dilated ResNet, as the SKD code builds it
//! (`networks/pspnet_combine.py`; `skd_ref.PSPNetResNet`).
//!
//! ```text
//! x -> ResNet (OS 8) -> layer4 -> pspmodule -> feature -> head -> logits     [B, K, H/8, W/8]
//!                    \-> layer3 -> dsn -> aux_logits (training only, weight 0.4)
//! pspmodule: for b in bins (1, 2, 3, 6): adaptive_avg_pool(b) -> 1x1 conv -> BN + LeakyReLU(0.01)
//!            -> bilinear (align_corners) back to H/8 x W/8;
//!            cat [p1, p2, p3, p6, layer4] -> 3x3 conv -> BN + LeakyReLU(0.01) -> Dropout2d(0.1)
//! ```
//!
//! Keys: the backbone's at the top level, `pspmodule.stages.i.{1,2}`, `pspmodule.bottleneck.{0,1}`,
//! `head`, `dsn.{0,1,3}` — those of the released checkpoints.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::backbone::{ResNet, ResNetConfig, ResNetFeatures};
use crate::distill::DenseOutputs;
use crate::nn::batch_norm::{Activation, BatchNorm};
use crate::nn::conv::{Conv, ConvSpec};
use crate::nn::{Dropout2d, adaptive_avg_pool2d, resize_bilinear};

/// The slope of the LeakyReLU that InPlace-ABN applies in the PSP and DSN heads.
const HEAD_SLOPE: f32 = 0.01;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PspConfig {
    pub backbone: ResNetConfig,
    pub num_classes: usize,
    /// Channels of the PSP output (the pair-wise feature).
    pub psp_out: usize,
    pub bins: Vec<usize>,
    /// Hidden channels of the deep-supervision head on layer3; `None` = no DSN head.
    pub dsn_mid: Option<usize>,
    /// Dropout2d probability after the PSP bottleneck and inside the DSN head.
    pub dropout: f64,
}

/// The named presets, with what they are.
pub const PRESETS: &[(&str, &str)] = &[
    ("pspnet-r101", "teacher: ResNet-101, deep stem, PSP 2048->512, DSN 1024->512"),
    ("pspnet-r18", "student as released: ResNet-18, deep stem, PSP 512->128, DSN 256->128"),
    ("pspnet-r18-paper", "student as counted in the paper: ResNet-18, 7x7 stem, PSP 512->256, no DSN"),
    ("pspnet-r18-half", "the paper's ResNet-18 (0.5): 7x7 stem, planes 32..256, PSP 256->128, no DSN"),
];

impl PspConfig {
    /// The teacher: PSPNet-ResNet101, 70,437,350 parameters (65,707,475 without the DSN).
    pub fn pspnet_r101() -> Self {
        Self {
            backbone: ResNetConfig::r101_deep(),
            num_classes: 19,
            psp_out: 512,
            bins: vec![1, 2, 3, 6],
            dsn_mid: Some(512),
            dropout: 0.1,
        }
    }

    /// The released student: 13,068,262 parameters (12,770,515 without the DSN).
    pub fn pspnet_r18() -> Self {
        Self { backbone: ResNetConfig::r18_deep(), psp_out: 128, dsn_mid: Some(128), ..Self::pspnet_r101() }
    }

    /// The paper's R18(1.0): 15,247,187 parameters.
    pub fn pspnet_r18_paper() -> Self {
        Self { backbone: ResNetConfig::r18_7x7(), psp_out: 256, dsn_mid: None, ..Self::pspnet_r101() }
    }

    /// The paper's R18(0.5): 3,834,515 parameters.
    pub fn pspnet_r18_half() -> Self {
        Self {
            backbone: ResNetConfig { width: 0.5, ..ResNetConfig::r18_7x7() },
            psp_out: 128,
            ..Self::pspnet_r18_paper()
        }
    }

    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pspnet-r101" => Ok(Self::pspnet_r101()),
            "pspnet-r18" => Ok(Self::pspnet_r18()),
            "pspnet-r18-paper" => Ok(Self::pspnet_r18_paper()),
            "pspnet-r18-half" => Ok(Self::pspnet_r18_half()),
            other => {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                let hint = crate::suggest::did_you_mean(other, names.iter().copied());
                Err(candle_core::Error::Msg(format!(
                    "unknown model preset {other:?}{hint}; the presets are {}",
                    names.join(", ")
                )))
            }
        }
    }

    /// The same network without the DSN head (the inference graph).
    pub fn without_dsn(&self) -> Self {
        Self { dsn_mid: None, ..self.clone() }
    }

    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        if self.num_classes == 0 || self.psp_out == 0 || self.bins.is_empty() || self.bins.contains(&0) {
            candle_core::bail!(
                "pspnet: num_classes, psp_out and every bin must be positive (got {}, {}, {:?})",
                self.num_classes,
                self.psp_out,
                self.bins
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!("pspnet: dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// Logit size for an `h x w` image: stride-2 stem conv, stem pool, layer2 (and deeper
    /// strides for output stride 16/32). 512 -> 65, 1024x2048 -> 129x257.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let conv = |n: usize| n.div_ceil(2);
        let pool = self.backbone.stem_pool();
        let (mut oh, mut ow) = pool.output_hw(conv(h), conv(w))?;
        for (stride, _) in self.backbone.stage_geometry()? {
            if stride == 2 {
                (oh, ow) = (conv(oh), conv(ow));
            }
        }
        Ok((oh, ow))
    }
}

/// One pyramid level: adaptive pool to `bin x bin`, 1x1 conv, BN + LeakyReLU.
#[derive(Debug)]
struct PyramidStage {
    bin: usize,
    conv: Conv,
    bn: BatchNorm,
}

/// The pyramid pooling module (`pspmodule`).
#[derive(Debug)]
pub struct PyramidPooling {
    stages: Vec<PyramidStage>,
    bottleneck_conv: Conv,
    bottleneck_bn: BatchNorm,
    dropout: Dropout2d,
}

impl PyramidPooling {
    fn new(c_in: usize, c_out: usize, bins: &[usize], dropout: f64, vb: VarBuilder) -> Result<Self> {
        let stages = bins
            .iter()
            .enumerate()
            .map(|(i, &bin)| {
                let vb = vb.pp("stages").pp(i);
                Ok(PyramidStage {
                    bin,
                    conv: Conv::new(ConvSpec::new(c_in, c_out, 1), false, vb.pp("1"))?,
                    bn: BatchNorm::new(c_out, vb.pp("2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let vb = vb.pp("bottleneck");
        let cat = c_in + bins.len() * c_out;
        Ok(Self {
            stages,
            bottleneck_conv: Conv::new(ConvSpec::new(cat, c_out, 3).padding(1), false, vb.pp("0"))?,
            bottleneck_bn: BatchNorm::new(c_out, vb.pp("1"))?,
            dropout: Dropout2d::new(dropout, 0)?,
        })
    }

    fn macs(&self, (h, w): (usize, usize)) -> u64 {
        let stages: u64 = self.stages.iter().map(|s| s.conv.spec().macs((s.bin, s.bin)).0).sum();
        stages + self.bottleneck_conv.spec().macs((h, w)).0
    }
}

impl ModuleT for PyramidPooling {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut branches = Vec::with_capacity(self.stages.len() + 1);
        for s in &self.stages {
            let p = s.conv.forward(&adaptive_avg_pool2d(x, (s.bin, s.bin))?)?;
            let p = s.bn.forward_act(&p, train, Activation::LeakyRelu(HEAD_SLOPE))?;
            branches.push(resize_bilinear(&p, (h, w), true)?);
        }
        branches.push(x.clone());
        // [B, C + n·O, H, W]
        let cat = Tensor::cat(&branches, 1)?;
        let y = self.bottleneck_bn.forward_act(
            &self.bottleneck_conv.forward(&cat)?,
            train,
            Activation::LeakyRelu(HEAD_SLOPE),
        )?;
        self.dropout.forward_t(&y, train)
    }
}

/// The deep-supervision head on layer3 (`dsn`): 3x3 conv, BN + LeakyReLU, Dropout2d, 1x1 conv.
#[derive(Debug)]
struct DsnHead {
    conv: Conv,
    bn: BatchNorm,
    dropout: Dropout2d,
    classifier: Conv,
}

impl DsnHead {
    fn new(c_in: usize, mid: usize, classes: usize, dropout: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(ConvSpec::new(c_in, mid, 3).padding(1), true, vb.pp("0"))?,
            bn: BatchNorm::new(mid, vb.pp("1"))?,
            dropout: Dropout2d::new(dropout, 1)?,
            classifier: Conv::new(ConvSpec::new(mid, classes, 1), true, vb.pp("3"))?,
        })
    }
}

impl ModuleT for DsnHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn.forward_act(&self.conv.forward(x)?, train, Activation::LeakyRelu(HEAD_SLOPE))?;
        self.classifier.forward(&self.dropout.forward_t(&y, train)?)
    }
}

/// What one forward pass produces.
#[derive(Debug, Clone)]
pub struct PspOutput {
    /// `[B, K, H/8, W/8]`.
    pub logits: Tensor,
    /// The DSN head's logits, when the network has one.
    pub aux_logits: Option<Tensor>,
    /// The PSP output `[B, psp_out, H/8, W/8]`, the pair-wise feature.
    pub feature: Tensor,
    /// Every backbone stage's output.
    pub backbone: ResNetFeatures,
}

impl PspOutput {
    /// What distillation sees: the logits and the PSP feature, one level.
    pub fn dense(&self) -> DenseOutputs {
        DenseOutputs { logits: vec![self.logits.clone()], features: vec![self.feature.clone()] }
    }
}

#[derive(Debug)]
pub struct PspNet {
    cfg: PspConfig,
    backbone: ResNet,
    pspmodule: PyramidPooling,
    head: Conv,
    dsn: Option<DsnHead>,
}

impl PspNet {
    pub fn new(cfg: &PspConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let [_, _, c3, c4] = cfg.backbone.out_channels();
        Ok(Self {
            cfg: cfg.clone(),
            backbone: ResNet::new(&cfg.backbone, vb.clone())?,
            pspmodule: PyramidPooling::new(c4, cfg.psp_out, &cfg.bins, cfg.dropout, vb.pp("pspmodule"))?,
            head: Conv::new(ConvSpec::new(cfg.psp_out, cfg.num_classes, 1), true, vb.pp("head"))?,
            dsn: cfg
                .dsn_mid
                .map(|mid| DsnHead::new(c3, mid, cfg.num_classes, cfg.dropout, vb.pp("dsn")))
                .transpose()?,
        })
    }

    pub fn config(&self) -> &PspConfig {
        &self.cfg
    }

    /// Re-keys the Dropout2d masks (e.g. from `(seed, iteration)` for resumable runs).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.pspmodule.dropout.set_seed(seed);
        if let Some(d) = &self.dsn {
            d.dropout.set_seed(seed ^ 0x9E37_79B9_7F4A_7C15);
        }
    }

    /// `x`: `[B, 3, H, W]` BGR minus the mean. Training needs a batch of at least 2: the bin-1
    /// pyramid branch's BatchNorm sees one value per channel per sample.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<PspOutput> {
        self.forward_heads(x, train, true)
    }

    /// [`PspNet::forward_t`] without the DSN head (`aux_logits` is `None`): what distillation
    /// reads from a frozen teacher (the head is 7% of the r101 teacher's multiply-adds).
    pub fn forward_without_dsn(&self, x: &Tensor, train: bool) -> Result<PspOutput> {
        self.forward_heads(x, train, false)
    }

    fn forward_heads(&self, x: &Tensor, train: bool, dsn: bool) -> Result<PspOutput> {
        let (b, c, _, _) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("pspnet: expected [B, 3, H, W] images, got {:?}", x.dims());
        }
        if train && b < 2 {
            candle_core::bail!(
                "pspnet: training needs a batch of at least 2 (the PSP bin-1 BatchNorm sees one value per channel per sample), got {b}"
            );
        }
        let backbone = self.backbone.forward_t(x, train)?;
        let [_, _, c3, c4] = &backbone.layers;
        let aux_logits = self.dsn.as_ref().filter(|_| dsn).map(|d| d.forward_t(c3, train)).transpose()?;
        let feature = self.pspmodule.forward_t(c4, train)?;
        let logits = self.head.forward(&feature)?;
        Ok(PspOutput { logits, aux_logits, feature, backbone })
    }

    /// Multiply-accumulates of one forward pass for an `h x w` image (batch 1), DSN included
    /// when present, and the logit size.
    pub fn macs(&self, (h, w): (usize, usize)) -> Result<(u64, (usize, usize))> {
        let (backbone, sizes) = self.backbone.macs((h, w))?;
        let out = sizes[3];
        let mut total = backbone + self.pspmodule.macs(out) + self.head.spec().macs(out).0;
        if let Some(d) = &self.dsn {
            let mid = d.conv.spec().macs(sizes[2]);
            total += mid.0 + d.classifier.spec().macs(mid.1).0;
        }
        Ok((total, out))
    }
}

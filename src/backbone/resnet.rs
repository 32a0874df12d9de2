//! The ResNet family for dense prediction (He et al. 2016), as the SKD code builds it
//! (`networks/pspnet_combine.py`; `skd_ref.PSPNetResNet`'s backbone).
//!
//! - stems: the deep "CSAIL" stem (3x3 s2 3→64, 3x3 64→64, 3x3 64→128, BN + ReLU each, no bias)
//!   or torchvision's 7x7 s2 3→64; both end in a 3x3/s2/p1 **ceil-mode** max pool;
//! - BasicBlock / Bottleneck, block counts per stage, a width multiplier on the planes;
//! - output stride 8 (default: layer3 dilation 2, layer4 dilation 4), 16 (layer3 stride 2,
//!   layer4 dilation 2) or 32 (no dilation); the dilation and padding apply to every block of a
//!   stage, the first included, as in the reference.
//!
//! Keys are those of the released checkpoints and of ImageNet ResNets: `conv1`, `bn1`
//! (`conv2/3`, `bn2/3` for the deep stem), `layerL.B.convK`, `layerL.B.bnK`,
//! `layerL.0.downsample.{0,1}`. The backbone sits at the top level of the segmentation network,
//! so CSAIL (`resnet18-imagenet.pth`) and torchvision checkpoints map onto it directly.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::batch_norm::{Activation, BatchNorm};
use crate::nn::conv::{Conv, ConvSpec};
use crate::nn::{MaxPool2d, add_relu};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// Stem type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// Three 3x3 convolutions (64, 64, 128 channels), as the SKD and CSAIL ResNets.
    Deep,
    /// One 7x7 convolution (64 channels), as torchvision's ResNets and the paper's R18.
    #[serde(rename = "7x7")]
    Conv7x7,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub block: Block,
    /// Blocks in layer1..layer4, e.g. `[2, 2, 2, 2]` (ResNet-18), `[3, 4, 23, 3]` (ResNet-101).
    pub layers: [usize; 4],
    /// Multiplier on the planes 64/128/256/512.
    pub width: f64,
    pub stem: Stem,
    /// Multiplier on the stem channels.
    pub stem_width: f64,
    /// 8, 16 or 32.
    pub output_stride: usize,
    /// The stem max pool rounds up (the released segmentation code) or down (torchvision and
    /// FCOS, where every stride-2 layer must map `n` to `n / 2` for inputs padded to 32).
    #[serde(default = "ceil_mode_default")]
    pub stem_pool_ceil: bool,
}

fn ceil_mode_default() -> bool {
    true
}

/// `max(1, round(c · m))`, the reference's channel scaling.
fn scaled(c: usize, m: f64) -> usize {
    ((c as f64 * m).round() as usize).max(1)
}

impl ResNetConfig {
    /// ResNet-18 with the deep stem, output stride 8 (the released student's backbone).
    pub fn r18_deep() -> Self {
        Self {
            block: Block::Basic,
            layers: [2, 2, 2, 2],
            width: 1.0,
            stem: Stem::Deep,
            stem_width: 1.0,
            output_stride: 8,
            stem_pool_ceil: true,
        }
    }

    /// ResNet-101 with the deep stem, output stride 8 (the teacher's backbone).
    pub fn r101_deep() -> Self {
        Self { block: Block::Bottleneck, layers: [3, 4, 23, 3], ..Self::r18_deep() }
    }

    /// torchvision's ResNet-18 (7x7 stem), output stride 8.
    pub fn r18_7x7() -> Self {
        Self { stem: Stem::Conv7x7, ..Self::r18_deep() }
    }

    /// torchvision's ResNet-18 as FCOS uses it: 7x7 stem, floor-mode pool, output stride 32.
    pub fn r18_fcos() -> Self {
        Self { stem: Stem::Conv7x7, output_stride: 32, stem_pool_ceil: false, ..Self::r18_deep() }
    }

    /// ResNet-50 as FCOS uses it (stride in the 3x3 conv, torchvision style).
    pub fn r50_fcos() -> Self {
        Self { block: Block::Bottleneck, layers: [3, 4, 6, 3], ..Self::r18_fcos() }
    }

    /// The stem's 3x3, stride-2, padding-1 max pool.
    pub fn stem_pool(&self) -> MaxPool2d {
        MaxPool2d::new((3, 3), (2, 2), (1, 1), self.stem_pool_ceil)
    }

    /// Planes of layer1..layer4.
    pub fn planes(&self) -> [usize; 4] {
        [64, 128, 256, 512].map(|c| scaled(c, self.width))
    }

    /// Output channels of layer1..layer4.
    pub fn out_channels(&self) -> [usize; 4] {
        self.planes().map(|p| p * self.block.expansion())
    }

    /// Channels of the stem's convolutions.
    pub fn stem_channels(&self) -> Vec<usize> {
        match self.stem {
            Stem::Deep => vec![scaled(64, self.stem_width), scaled(64, self.stem_width), scaled(128, self.stem_width)],
            Stem::Conv7x7 => vec![scaled(64, self.stem_width)],
        }
    }

    /// `(stride, dilation)` of layer1..layer4.
    pub fn stage_geometry(&self) -> Result<[(usize, usize); 4]> {
        match self.output_stride {
            8 => Ok([(1, 1), (2, 1), (1, 2), (1, 4)]),
            16 => Ok([(1, 1), (2, 1), (2, 1), (1, 2)]),
            32 => Ok([(1, 1), (2, 1), (2, 1), (2, 1)]),
            other => candle_core::bail!("resnet: output_stride must be 8, 16 or 32, got {other}"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.stage_geometry()?;
        if self.layers.contains(&0) {
            candle_core::bail!("resnet: every stage needs at least one block, got {:?}", self.layers);
        }
        if !(self.width > 0.0 && self.stem_width > 0.0) {
            candle_core::bail!("resnet: width multipliers must be positive, got {} / {}", self.width, self.stem_width);
        }
        Ok(())
    }
}

/// Conv + BN (+ ReLU in `forward_t`'s caller) — the repeated pair, keys `convK` / `bnK`.
/// Which part of the network a parameter key (relative to the backbone) belongs to: 0 = the
/// stem, 1..=4 = layer1..layer4.
pub fn stage_of(key: &str) -> Option<usize> {
    match key.strip_prefix("layer") {
        Some(rest) => rest.chars().next().and_then(|c| c.to_digit(10)).map(|d| d as usize),
        None => (key.starts_with("conv") || key.starts_with("bn")).then_some(0),
    }
}

/// The key (relative to the backbone) is a BatchNorm parameter or statistic.
pub fn is_norm_key(key: &str) -> bool {
    key.split('.').any(|part| part.starts_with("bn")) || key.contains("downsample.1.")
}

#[derive(Debug)]
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(spec: ConvSpec, vb_conv: VarBuilder, vb_bn: VarBuilder) -> Result<Self> {
        Ok(Self { conv: Conv::new(spec, false, vb_conv)?, bn: BatchNorm::new(spec.c_out, vb_bn)? })
    }

    fn forward_t(&self, x: &Tensor, train: bool, act: Activation) -> Result<Tensor> {
        // A frozen network (the teacher, a deployed student): the normalisation and activation
        // applied as the convolution's product finishes each channel.
        if !train
            && let Some(after) = self.bn.frozen_affine(act)?
            && let Some(y) = self.conv.forward_then(x, after)?
        {
            return Ok(y);
        }
        self.bn.forward_act(&self.conv.forward(x)?, train, act)
    }
}

/// A residual block (basic or bottleneck) with its optional projection shortcut.
#[derive(Debug)]
pub struct ResidualBlock {
    /// conv1/bn1, conv2/bn2 (, conv3/bn3 for bottleneck)
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl ResidualBlock {
    fn new(block: Block, c_in: usize, planes: usize, stride: usize, dilation: usize, vb: VarBuilder) -> Result<Self> {
        let c_out = planes * block.expansion();
        let d = dilation;
        let specs = match block {
            Block::Basic => vec![
                ConvSpec::new(c_in, planes, 3).stride(stride).padding(d).dilation(d),
                ConvSpec::new(planes, planes, 3).padding(d).dilation(d),
            ],
            Block::Bottleneck => vec![
                ConvSpec::new(c_in, planes, 1),
                ConvSpec::new(planes, planes, 3).stride(stride).padding(d).dilation(d),
                ConvSpec::new(planes, c_out, 1),
            ],
        };
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvBn::new(s, vb.pp(format!("conv{}", i + 1)), vb.pp(format!("bn{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || c_in != c_out {
            let vb = vb.pp("downsample");
            Some(ConvBn::new(ConvSpec::new(c_in, c_out, 1).stride(stride), vb.pp("0"), vb.pp("1"))?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn macs(&self, hw: (usize, usize)) -> (u64, (usize, usize)) {
        let (mut total, mut out) = (0, hw);
        for c in &self.convs {
            let (m, o) = c.conv.spec().macs(out);
            total += m;
            out = o;
        }
        if let Some(ds) = &self.downsample {
            total += ds.conv.spec().macs(hw).0;
        }
        (total, out)
    }
}

impl ModuleT for ResidualBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward_t(x, train, Activation::Identity)?,
            None => x.clone(),
        };
        let last = self.convs.len() - 1;
        let mut y = x.clone();
        for (i, c) in self.convs.iter().enumerate() {
            y = c.forward_t(&y, train, if i < last { Activation::Relu } else { Activation::Identity })?;
        }
        add_relu(&y, &shortcut)
    }
}

/// The output of every stage.
#[derive(Debug, Clone)]
pub struct ResNetFeatures {
    /// After the stem's max pool (stride 4).
    pub stem: Tensor,
    /// layer1..layer4 (C2..C5 in FPN terms).
    pub layers: [Tensor; 4],
}

#[derive(Debug)]
pub struct ResNet {
    stem: Vec<ConvBn>,
    pool: MaxPool2d,
    layers: [Vec<ResidualBlock>; 4],
}

impl ResNet {
    /// Builds the backbone with its keys at `vb`'s level (`conv1`, `layer1`, ...).
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let stem_ch = cfg.stem_channels();
        let stem_specs: Vec<ConvSpec> = match cfg.stem {
            Stem::Deep => vec![
                ConvSpec::new(3, stem_ch[0], 3).stride(2).padding(1),
                ConvSpec::new(stem_ch[0], stem_ch[1], 3).padding(1),
                ConvSpec::new(stem_ch[1], stem_ch[2], 3).padding(1),
            ],
            Stem::Conv7x7 => vec![ConvSpec::new(3, stem_ch[0], 7).stride(2).padding(3)],
        };
        let stem = stem_specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvBn::new(s, vb.pp(format!("conv{}", i + 1)), vb.pp(format!("bn{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let mut c_in = *stem_ch.last().expect("stem has a conv");
        let planes = cfg.planes();
        let geometry = cfg.stage_geometry()?;
        let mut layers: [Vec<ResidualBlock>; 4] = Default::default();
        for (s, layer) in layers.iter_mut().enumerate() {
            let (stride, dilation) = geometry[s];
            let vb = vb.pp(format!("layer{}", s + 1));
            for b in 0..cfg.layers[s] {
                let stride = if b == 0 { stride } else { 1 };
                layer.push(ResidualBlock::new(cfg.block, c_in, planes[s], stride, dilation, vb.pp(b))?);
                c_in = planes[s] * cfg.block.expansion();
            }
        }
        Ok(Self { stem, pool: cfg.stem_pool(), layers })
    }

    /// Multiply-accumulates for a `h x w` image (batch 1), and the size of each stage's output.
    pub fn macs(&self, hw: (usize, usize)) -> Result<(u64, [(usize, usize); 4])> {
        let (mut total, mut out) = (0, hw);
        for c in &self.stem {
            let (m, o) = c.conv.spec().macs(out);
            total += m;
            out = o;
        }
        out = self.pool.output_hw(out.0, out.1)?;
        let mut sizes = [(0, 0); 4];
        for (s, layer) in self.layers.iter().enumerate() {
            for block in layer {
                let (m, o) = block.macs(out);
                total += m;
                out = o;
            }
            sizes[s] = out;
        }
        Ok((total, sizes))
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<ResNetFeatures> {
        let mut y = x.clone();
        for c in &self.stem {
            y = c.forward_t(&y, train, Activation::Relu)?;
        }
        let stem = self.pool.forward(&y)?;
        let mut y = stem.clone();
        let mut outs = Vec::with_capacity(4);
        for layer in &self.layers {
            for block in layer {
                y = block.forward_t(&y, train)?;
            }
            outs.push(y.clone());
        }
        let layers: [Tensor; 4] = outs.try_into().expect("four stages");
        Ok(ResNetFeatures { stem, layers })
    }
}

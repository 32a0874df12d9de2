//! Golden parity with the PyTorch twin of the released code (`shared/reference/skd_ref.py`).
//!
//! Data-driven: every `*.safetensors` in `SKD_GOLDEN_DIR` (default `tests/golden`) is checked
//! according to its `__metadata__.kind`; a kind nobody knows fails. Tolerances are those of the
//! reference READMEs (§5 of `README.md`, §2 of `README_detection_eval.md`): per tensor
//! `max|got − ref| ≤ rtol · max|ref|`, or `max|got| ≤ 1e-6` where the reference is structurally
//! zero (`max|ref| < 1e-7`); labels, matches, counts and kept indices exactly.
//!
//! The tensors live on `SKD_DEVICE` (default `cpu`; `cuda` with the `cuda` feature), so the same
//! checks run on the GPU build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use serde_json::Value;
use skd::backbone::{Block, ResNetConfig, Stem};
use skd::det::loss::{HeadOutputs, IouLoss, LossConfig, fcos_losses};
use skd::det::postprocess::{Detections, PostprocessConfig, candidates, nms, select};
use skd::det::targets::{GtBoxes, ImageTargets, Levels, Locations, TargetConfig, compute_targets};
use skd::distill::holistic::{Adversarial, HolisticConfig, critic_adv_loss, generator_adv_loss, gradient_penalty};
use skd::distill::{Holistic, NodePool, PixelWiseLoss, pair_wise, pixel_wise_loss};
use skd::nn::{MaxPool2d, adaptive_avg_pool2d, resize_bilinear};
use skd::seg::{PspConfig, PspNet, SegLoss, WeightsSource, cross_entropy_upsampled};
use skd::weights::{self, BnConvention, KeyLayout, LoadMode, StateDict};

/// Losses and forward values of losses.
const LOSS: f64 = 1e-5;
/// Gradients of losses (single and double backward).
const GRAD: f64 = 1e-4;
/// Primitives (pooling, resize): values and gradients; critic outputs, u/v and BN statistics.
const PRIM: f64 = 1e-5;
/// Network forward values (logits, features, intermediates), train-step losses and statistics.
const NET: f64 = 1e-4;
/// Network parameter gradients.
const NET_GRAD: f64 = 1e-3;

struct Golden {
    dir: PathBuf,
    kind: String,
    params: Value,
    tensors: HashMap<String, Tensor>,
    dev: Device,
}

impl Golden {
    fn load(path: &Path, dev: &Device) -> std::result::Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        let header = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .and_then(|n| bytes.get(8..8 + n))
            .ok_or("truncated safetensors header")?;
        let header: Value = serde_json::from_slice(header).map_err(|e| format!("bad header: {e}"))?;
        let meta = &header["__metadata__"];
        let kind = meta["kind"].as_str().ok_or("no __metadata__.kind")?.to_string();
        let params = match meta["params"].as_str() {
            Some(p) => serde_json::from_str(p).map_err(|e| format!("bad params: {e}"))?,
            None => Value::Null,
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, dev).map_err(|e| format!("{e}"))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self { dir, kind, params, tensors, dev: dev.clone() })
    }

    fn t(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| candle_core::Error::Msg(format!("golden tensor {name} missing")))
    }

    fn var(&self, name: &str) -> Result<Var> {
        Var::from_tensor(&self.t(name)?.copy()?)
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.params[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| candle_core::Error::Msg(format!("param {key} missing")))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.params[key].as_f64().ok_or_else(|| candle_core::Error::Msg(format!("param {key} missing")))
    }

    fn pair(&self, key: &str) -> Result<(usize, usize)> {
        let v = &self.params[key];
        match (v[0].as_u64(), v[1].as_u64()) {
            (Some(a), Some(b)) => Ok((a as usize, b as usize)),
            _ => Err(candle_core::Error::Msg(format!("param {key} is not a pair"))),
        }
    }
}

/// A tensor's values in f64, converted on the host (Candle's CUDA `to_dtype` fails on an empty
/// tensor).
fn host(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Collects every mismatch of one file.
#[derive(Default)]
struct Checker {
    compared: usize,
    mismatches: Vec<String>,
}

impl Checker {
    fn close(&mut self, g: &Golden, name: &str, got: &Tensor, rtol: f64) -> Result<()> {
        let want = g.t(name)?;
        self.compared += 1;
        let got = if got.rank() == 0 && want.dims() == [1] { got.reshape(1)? } else { got.clone() };
        if got.dims() != want.dims() {
            self.mismatches.push(format!("{name}: shape {:?}, expected {:?}", got.dims(), want.dims()));
            return Ok(());
        }
        let (got, want) = (host(&got)?, host(want)?);
        let ref_max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let (err, bound) = if ref_max < 1e-7 {
            (got.iter().fold(0f64, |m, v| m.max(v.abs())), 1e-6)
        } else {
            (got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs())), rtol * ref_max)
        };
        // NaN fails too.
        if err.is_nan() || err > bound {
            self.mismatches.push(format!("{name}: max error {err:.3e} > {bound:.3e} (max|ref| {ref_max:.3e})"));
        }
        Ok(())
    }
}

impl Checker {
    /// Values that must match exactly (labels, indices, counts), or within `atol`.
    fn values(&mut self, g: &Golden, name: &str, got: &[f64], atol: f64) -> Result<()> {
        let want = host(g.t(name)?)?;
        self.compared += 1;
        if got.len() != want.len() {
            self.mismatches.push(format!("{name}: {} values, expected {}", got.len(), want.len()));
            return Ok(());
        }
        // NaN differs from everything.
        let differs = |a: f64, b: f64| (a - b).abs().is_nan() || (a - b).abs() > atol;
        let bad = got.iter().zip(&want).position(|(a, b)| differs(*a, *b));
        if let Some(i) = bad {
            let n = got.iter().zip(&want).filter(|(a, b)| differs(**a, **b)).count();
            self.mismatches.push(format!("{name}: {n} values differ, first at {i}: {} vs {}", got[i], want[i]));
        }
        Ok(())
    }
}

/// `vjp` of a primitive `y = f(x)` against the stored upstream gradient.
fn check_primitive(g: &Golden, c: &mut Checker, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let x = g.var("input.x")?;
    let y = f(&x)?;
    c.close(g, "out.y", &y, PRIM)?;
    let grads = (y * g.t("input.grad_y")?)?.sum_all()?.backward()?;
    c.close(g, "grad.x", grads.get(&x).expect("grad x"), PRIM)
}

fn check_pixel_wise(g: &Golden, c: &mut Checker, loss: PixelWiseLoss) -> Result<()> {
    let z_s = g.var("input.z_s")?;
    let l = pixel_wise_loss(&z_s, g.t("input.z_t")?, loss)?;
    c.close(g, "out.loss", &l, LOSS)?;
    c.close(g, "grad.loss.z_s", l.backward()?.get(&z_s).expect("grad z_s"), GRAD)
}

fn check_pair_wise(g: &Golden, c: &mut Checker) -> Result<()> {
    let pool = match g.params["pool"].as_str() {
        Some("max") => NodePool::Max,
        Some("avg") => NodePool::Avg,
        other => candle_core::bail!("unknown pool {other:?}"),
    };
    let scale = Some(g.f64("scale")?);
    let f_s = g.var("input.f_s")?;
    let f_t = g.t("input.f_t")?;
    let (kh, kw) = g.pair("kernel")?;
    let (_, _, h, w) = f_s.dims4()?;
    assert_eq!(pair_wise::node_kernel(h, w, scale), (kh, kw), "node kernel");
    if g.tensors.contains_key("out.pooled_s") {
        let (p_s, p_t) = (pair_wise::nodes(&f_s, pool, scale)?, pair_wise::nodes(f_t, pool, scale)?);
        c.close(g, "out.pooled_s", &p_s, PRIM)?;
        c.close(g, "out.pooled_t", &p_t, PRIM)?;
        c.close(g, "out.affinity_s", &pair_wise::affinity(&p_s)?, LOSS)?;
        c.close(g, "out.affinity_t", &pair_wise::affinity(&p_t)?, LOSS)?;
    }
    let l = pair_wise::pair_wise_loss(&f_s, f_t, pool, scale)?;
    c.close(g, "out.loss", &l, LOSS)?;
    c.close(g, "grad.loss.f_s", l.backward()?.get(&f_s).expect("grad f_s"), GRAD)
}

fn check_ce_dsn(g: &Golden, c: &mut Checker) -> Result<()> {
    let logits = g.var("input.logits")?;
    let dsn = g.var("input.dsn_logits")?;
    let labels = g.t("input.labels")?;
    let seg = SegLoss { aux_weight: g.f64("aux_weight")?, ignore: g.usize("ignore_index")? as u32 };
    c.close(g, "out.ce_main", &cross_entropy_upsampled(&logits, labels, seg.ignore)?, LOSS)?;
    c.close(g, "out.ce_aux", &cross_entropy_upsampled(&dsn, labels, seg.ignore)?, LOSS)?;
    let loss = seg.losses(&logits, Some(&dsn), labels)?.total()?;
    c.close(g, "out.loss", &loss, LOSS)?;
    let grads = loss.backward()?;
    c.close(g, "grad.loss.logits", grads.get(&logits).expect("grad logits"), GRAD)?;
    c.close(g, "grad.loss.dsn_logits", grads.get(&dsn).expect("grad dsn"), GRAD)
}

/// A critic with the golden's initial state.
fn golden_critic(g: &Golden) -> Result<Holistic> {
    let adversarial = match g.params["adv_type"].as_str() {
        Some("wgan-gp") => Adversarial::WganGp { gp_weight: g.f64("lambda_gp")? },
        Some("hinge") => Adversarial::Hinge,
        other => candle_core::bail!("unknown adv_type {other:?}"),
    };
    let cfg = HolisticConfig {
        weight: g.f64("lambda_d")?,
        adversarial,
        conv_dim: g.usize("conv_dim")?,
        ..Default::default()
    };
    let h = Holistic::new(cfg, (g.usize("in_channels")?, g.usize("H")?, g.usize("W")?), &g.dev, 0)?;
    let data = h.varmap().data().lock().expect("varmap");
    for (key, var) in data.iter() {
        var.set(g.t(&format!("param.{key}"))?)?;
    }
    let stored = g.tensors.keys().filter(|k| k.starts_with("param.")).count();
    assert_eq!(stored, data.len(), "the critic's state has {} entries, the golden {stored}", data.len());
    drop(data);
    Ok(h)
}

fn check_uv(g: &Golden, c: &mut Checker, h: &Holistic, call: usize) -> Result<()> {
    for (i, conv) in h.critic().spectral_convs().iter().enumerate() {
        let (u, v) = conv.singular_vectors();
        c.close(g, &format!("uv.call{call}.l{}.0.module.weight_u", i + 1), u, PRIM)?;
        c.close(g, &format!("uv.call{call}.l{}.0.module.weight_v", i + 1), v, PRIM)?;
    }
    Ok(())
}

fn check_discriminator(g: &Golden, c: &mut Checker) -> Result<()> {
    let z_t = g.t("input.z_t")?;
    let z_s_var = g.var("input.z_s")?;
    let z_s = z_s_var.as_tensor();
    let alpha = match g.tensors.get("input.alpha") {
        Some(a) => a.flatten_all()?,
        None => Tensor::zeros(z_s.dim(0)?, DType::F32, &g.dev)?,
    };

    // Replay 1: call by call through the public primitives, checking u/v after each call.
    let h = golden_critic(g)?;
    let d = h.critic();
    let d_out_s = d.forward(z_s)?;
    c.close(g, "out.call1.d_out_s", &d_out_s, PRIM)?;
    let g_adv = generator_adv_loss(&d_out_s)?;
    c.close(g, "out.g_adv_loss", &g_adv, LOSS)?;
    c.close(g, "grad.g_adv_loss.z_s", g_adv.backward()?.get(&z_s_var).expect("grad z_s"), GRAD)?;
    check_uv(g, c, &h, 1)?;
    c.close(g, "out.call2.d_out_t", &d.forward(z_t)?, PRIM)?;
    check_uv(g, c, &h, 2)?;
    let d_s = d.forward(z_s)?;
    c.close(g, "out.call3.d_out_s", &d_s, PRIM)?;
    check_uv(g, c, &h, 3)?;
    let wgan = matches!(h.config().adversarial, Adversarial::WganGp { .. });
    if wgan {
        let p = gradient_penalty(d, z_t, z_s, &alpha)?;
        c.close(g, "out.call4.d_out_interp", &p.d_out_interp, PRIM)?;
        c.close(g, "out.grad_norm", &p.grad_norm, PRIM)?;
        c.close(g, "out.gp", &p.gp, LOSS)?;
        check_uv(g, c, &h, 4)?;
    }

    // Replay 2: the same step through the term's own API, as the trainer runs it.
    let h = golden_critic(g)?;
    let student = h.student_loss(z_s)?;
    let want = (g.t("out.g_adv_loss")? * h.config().weight)?;
    let err = (student.reshape(1)? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    c.compared += 1;
    if err > 1e-6 {
        c.mismatches.push(format!("student_loss differs from λ_d · g_adv_loss by {err:.3e} > 1e-6"));
    }
    let step = h.critic_loss_with_alpha(&z_s.detach(), z_t, &alpha)?;
    c.close(g, "out.call2.d_out_t", &step.d_out_t, PRIM)?;
    c.close(g, "out.call3.d_out_s", &step.d_out_s, PRIM)?;
    c.close(g, "out.d_adv", &step.adv, LOSS)?;
    c.close(g, "out.d_adv", &critic_adv_loss(&step.d_out_s, &step.d_out_t, h.config().adversarial)?, LOSS)?;
    if let Some(p) = &step.penalty {
        c.close(g, "out.gp", &p.gp, LOSS)?;
    }
    c.close(g, "out.d_loss", &step.loss, LOSS)?;
    let grads = h.critic_grads(&step.loss)?;
    let trainable = h.trainable_vars();
    for (key, var) in &trainable {
        c.close(g, &format!("grad.d_loss.{key}"), grads.get(var).expect("checked by critic_grads"), GRAD)?;
    }
    let stored = g.tensors.keys().filter(|k| k.starts_with("grad.d_loss.")).count();
    assert_eq!(trainable.len(), stored, "trainable parameter count");
    let data = h.varmap().data().lock().expect("varmap");
    c.close(g, "out.bn.running_mean", data["preprocess_additional.running_mean"].as_tensor(), PRIM)?;
    c.close(g, "out.bn.running_var", data["preprocess_additional.running_var"].as_tensor(), PRIM)?;
    drop(data);
    check_uv(g, c, &h, if wgan { 4 } else { 3 })
}

/// The network a `pspnet_*` golden describes (its `model.config`).
fn golden_pspnet_config(g: &Golden) -> Result<PspConfig> {
    let p = &g.params;
    let block = match p["block"].as_str() {
        Some("basic") => Block::Basic,
        Some("bottleneck") => Block::Bottleneck,
        other => candle_core::bail!("unknown block {other:?}"),
    };
    let stem = match p["stem"].as_str() {
        Some("deep") => Stem::Deep,
        Some("7x7") => Stem::Conv7x7,
        other => candle_core::bail!("unknown stem {other:?}"),
    };
    let layers: Vec<usize> =
        p["layers"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as usize).collect();
    let bins = p["bins"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as usize).collect();
    let cfg = PspConfig {
        backbone: ResNetConfig {
            block,
            layers: layers.try_into().map_err(|l| candle_core::Error::Msg(format!("layers {l:?}")))?,
            width: g.f64("width")?,
            stem,
            stem_width: g.f64("stem_width")?,
            output_stride: 8,
            stem_pool_ceil: true,
        },
        num_classes: g.usize("num_classes")?,
        psp_out: g.usize("psp_out")?,
        bins,
        dsn_mid: if p["dsn"].as_bool() == Some(true) { Some(g.usize("dsn_mid")?) } else { None },
        dropout: g.f64("dropout")?,
    };
    Ok(cfg)
}

/// The `param.*` tensors of a golden file as a state dict.
fn param_state_dict(g: &Golden, source: &str) -> StateDict {
    let tensors =
        g.tensors.iter().filter_map(|(k, t)| k.strip_prefix("param.").map(|k| (k.to_string(), t.clone()))).collect();
    StateDict { source: source.to_string(), tensors, metadata: HashMap::new() }
}

fn check_pspnet_forward(g: &Golden, c: &mut Checker) -> Result<()> {
    let cfg = golden_pspnet_config(g)?;
    let dev = &g.dev;
    let expected = skd::seg::weights::expected_params(&cfg)?;
    let n_params: usize =
        expected.iter().filter(|(k, _)| !skd::nn::is_buffer(k)).map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(n_params, g.usize("num_params")?, "parameter count");
    let net = match g.params["pth_file"].as_str() {
        // The released conventions (InPlace-ABN γ with random signs), through the real loader.
        Some(pth) => {
            let path = g.dir.join(pth);
            let converted = weights::read_file(&path)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .convert(KeyLayout::Skd, BnConvention::InplaceAbn)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            for (key, want) in param_state_dict(g, "golden").tensors {
                let got =
                    converted.tensors.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("{pth} lacks {key}")))?;
                let same = got.flatten_all()?.to_vec1::<f32>()? == want.flatten_all()?.to_vec1::<f32>()?;
                assert!(same, "{pth}: {key} is not bit-exact after the InPlace-ABN conversion");
            }
            let src = WeightsSource {
                path: path.display().to_string(),
                layout: KeyLayout::Skd,
                bn: BnConvention::InplaceAbn,
            };
            skd::seg::weights::load_frozen(&cfg, &src, dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?.0
        }
        None => {
            let mut sd = param_state_dict(g, "golden");
            sd.check(&expected, LoadMode::Strict).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            PspNet::new(
                &cfg,
                candle_nn::VarBuilder::from_tensors(
                    sd.into_tensors(dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?,
                    DType::F32,
                    dev,
                ),
            )?
        }
    };
    let out = net.forward_t(g.t("input.x")?, false)?;
    c.close(g, "out.stem", &out.backbone.stem, NET)?;
    for (i, x) in out.backbone.layers.iter().enumerate() {
        c.close(g, &format!("out.x{}", i + 1), x, NET)?;
    }
    c.close(g, "out.psp_feature", &out.feature, NET)?;
    c.close(g, "out.logits", &out.logits, NET)?;
    if let Some(aux) = &out.aux_logits {
        c.close(g, "out.dsn_logits", aux, NET)?;
    }
    let (_, _, h, w) = g.t("input.x")?.dims4()?;
    assert_eq!(cfg.output_hw(h, w)?, g.pair("output_hw")?, "output size");
    Ok(())
}

fn check_pspnet_train_step(g: &Golden, c: &mut Checker) -> Result<()> {
    let cfg = golden_pspnet_config(g)?;
    let weights_file =
        g.params["weights_file"].as_str().ok_or_else(|| candle_core::Error::Msg("no weights_file".into()))?;
    let w = Golden::load(&g.dir.join(weights_file), &g.dev).map_err(candle_core::Error::Msg)?;
    let dev = &g.dev;
    let varmap = candle_nn::VarMap::new();
    let net = PspNet::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let mut sd = param_state_dict(&w, weights_file);
    let expected = skd::seg::weights::expected_params(&cfg)?;
    sd.check(&expected, LoadMode::Strict).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    sd.load_into(&varmap).map_err(|e| candle_core::Error::Msg(e.to_string()))?;

    let out = net.forward_t(g.t("input.x")?, true)?;
    let labels = g.t("input.labels")?;
    let seg = SegLoss { aux_weight: g.f64("aux_weight")?, ignore: g.usize("ignore_index")? as u32 };
    let aux = out.aux_logits.as_ref().expect("the golden network has a DSN head");
    c.close(g, "out.logits", &out.logits, NET)?;
    c.close(g, "out.dsn_logits", aux, NET)?;
    c.close(g, "out.ce_main", &cross_entropy_upsampled(&out.logits, labels, seg.ignore)?, NET)?;
    c.close(g, "out.ce_aux", &cross_entropy_upsampled(aux, labels, seg.ignore)?, NET)?;
    let loss = seg.losses(&out.logits, Some(aux), labels)?.total()?;
    c.close(g, "out.loss", &loss, NET)?;
    let grads = loss.backward()?;
    let data = varmap.data().lock().expect("varmap");
    for name in g.tensors.keys().filter_map(|k| k.strip_prefix("grad.loss.")) {
        let var = data.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))?;
        c.close(g, &format!("grad.loss.{name}"), grads.get(var).expect("parameter gradient"), NET_GRAD)?;
    }
    for name in g.tensors.keys().filter_map(|k| k.strip_prefix("out.running.")) {
        let var = data.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no buffer {name}")))?;
        c.close(g, &format!("out.running.{name}"), var.as_tensor(), NET)?;
    }
    Ok(())
}

const FCOS_LEVELS: [&str; 5] = ["p3", "p4", "p5", "p6", "p7"];

fn gt_boxes(g: &Golden, boxes: &str, labels: &str) -> Result<GtBoxes> {
    let b = host(g.t(boxes)?)?;
    Ok(GtBoxes {
        boxes: b.chunks(4).map(|c| [c[0] as f32, c[1] as f32, c[2] as f32, c[3] as f32]).collect(),
        labels: host(g.t(labels)?)?.into_iter().map(|l| l as u32).collect(),
    })
}

fn target_config(g: &Golden) -> Result<TargetConfig> {
    Ok(TargetConfig {
        center_sampling_radius: g.f64("center_sampling_radius")?,
        norm_reg_targets: g.params["norm_reg_targets"].as_bool().unwrap_or(false),
    })
}

fn check_targets(g: &Golden, c: &mut Checker, t: &[&ImageTargets], prefix: &str) -> Result<()> {
    let labels: Vec<f64> = t.iter().flat_map(|t| t.labels.iter().map(|&l| l as f64)).collect();
    let reg: Vec<f64> = t.iter().flat_map(|t| t.reg.iter().flatten().copied()).collect();
    let ctr: Vec<f64> = t.iter().flat_map(|t| t.centerness.iter().copied()).collect();
    c.values(g, &format!("{prefix}labels"), &labels, 0.0)?;
    c.values(g, &format!("{prefix}reg{}", if prefix.is_empty() { "_targets" } else { "" }), &reg, 1e-6)?;
    c.values(g, &format!("{prefix}{}", if prefix.is_empty() { "centerness_targets" } else { "ctr" }), &ctr, 1e-6)
}

fn check_fcos_targets(g: &Golden, c: &mut Checker) -> Result<()> {
    let strides: Vec<usize> = host(g.t("strides")?)?.into_iter().map(|s| s as usize).collect();
    let soi = host(g.t("sizes_of_interest")?)?;
    let levels = Levels { strides, sizes_of_interest: soi.chunks(2).map(|p| (p[0], p[1])).collect() };
    let image = host(g.t("image_size")?)?;
    let sizes = levels.feature_sizes((image[0] as usize, image[1] as usize));
    c.values(g, "feature_sizes", &sizes.iter().flat_map(|&(h, w)| [h as f64, w as f64]).collect::<Vec<_>>(), 0.0)?;
    let locations = Locations::new(&levels.strides, &sizes);
    c.values(g, "locations", &locations.points.iter().flatten().copied().collect::<Vec<_>>(), 0.0)?;
    c.values(g, "level", &locations.level.iter().map(|&l| l as f64).collect::<Vec<_>>(), 0.0)?;
    let t = compute_targets(&locations, &levels, &gt_boxes(g, "gt_boxes", "gt_labels")?, &target_config(g)?);
    let matched: Vec<f64> = t.matched.iter().map(|m| m.map_or(-1.0, |i| i as f64)).collect();
    c.values(g, "matched_gt", &matched, 0.0)?;
    check_targets(g, c, &[&t], "")
}

fn check_fcos_loss(g: &Golden, c: &mut Checker) -> Result<()> {
    let level_vars = |what: &str| FCOS_LEVELS.iter().map(|p| g.var(&format!("{what}_{p}"))).collect::<Result<Vec<_>>>();
    let (cls, reg, ctr) = (level_vars("cls_logits")?, level_vars("bbox_reg")?, level_vars("centerness")?);
    let head = HeadOutputs {
        cls_logits: cls.iter().map(|v| v.as_tensor().clone()).collect(),
        bbox_reg: reg.iter().map(|v| v.as_tensor().clone()).collect(),
        centerness: ctr.iter().map(|v| v.as_tensor().clone()).collect(),
    };
    let levels = Levels::default();
    let sizes = head.cls_logits.iter().map(|t| Ok((t.dim(2)?, t.dim(3)?))).collect::<Result<Vec<_>>>()?;
    let locations = Locations::new(&levels.strides, &sizes);
    let targets = (0..g.usize("batch")?)
        .map(|n| {
            let gt = gt_boxes(g, &format!("gt_boxes_{n}"), &format!("gt_labels_{n}"))?;
            Ok(compute_targets(&locations, &levels, &gt, &target_config(g)?))
        })
        .collect::<Result<Vec<_>>>()?;
    check_targets(g, c, &targets.iter().collect::<Vec<_>>(), "target_")?;
    let iou_loss = match g.params["iou_loss_type"].as_str() {
        Some("iou") => IouLoss::Iou,
        Some("linear_iou") => IouLoss::LinearIou,
        Some("giou") => IouLoss::Giou,
        other => candle_core::bail!("unknown iou_loss_type {other:?}"),
    };
    let cfg = LossConfig { focal_alpha: g.f64("focal_alpha")?, focal_gamma: g.f64("focal_gamma")?, iou_loss };
    let losses = fcos_losses(&head, &targets, &cfg)?;
    c.values(g, "num_pos", &[losses.num_pos as f64], 0.0)?;
    let sum_ctr = g.t("sum_ctr_targets")?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
    c.values(g, "sum_ctr_targets", &[losses.sum_ctr_targets], 1e-5 * sum_ctr.abs().max(1.0))?;
    c.close(g, "loss_cls", &losses.cls, 1e-4)?;
    c.close(g, "loss_reg", &losses.reg, 1e-4)?;
    c.close(g, "loss_ctr", &losses.ctr, 1e-4)?;
    let total = ((&losses.cls + &losses.reg)? + &losses.ctr)?;
    c.close(g, "loss_total", &total, 1e-4)?;
    let grads = total.backward()?;
    for (what, vars) in [("cls_logits", &cls), ("bbox_reg", &reg), ("centerness", &ctr)] {
        for (p, v) in FCOS_LEVELS.iter().zip(vars.iter()) {
            let grad = grads.get(v).ok_or_else(|| candle_core::Error::Msg(format!("no gradient for {what}_{p}")))?;
            c.close(g, &format!("grad_{what}_{p}"), grad, 1e-5)?;
        }
    }
    Ok(())
}

/// Detections compared as the reference README says: the set of (location, label) exactly,
/// boxes within 1e-3 px and scores within 1e-6 per pair.
fn check_detections(g: &Golden, c: &mut Checker, d: &Detections, prefix: &str, n: usize) -> Result<()> {
    let field = |f: &str| -> Result<Vec<f64>> { host(g.t(&format!("{prefix}{f}_{n}"))?) };
    let (want_loc, want_labels, want_boxes, want_scores) =
        (field("loc")?, field("labels")?, field("boxes")?, field("scores")?);
    c.compared += 1;
    let want: HashMap<(usize, u32), usize> =
        want_loc.iter().zip(&want_labels).enumerate().map(|(i, (&l, &k))| ((l as usize, k as u32), i)).collect();
    if want.len() != d.len() {
        c.mismatches.push(format!("{prefix}: {} detections, expected {}", d.len(), want.len()));
        return Ok(());
    }
    for (j, key) in d.locations.iter().zip(&d.labels).enumerate() {
        let Some(&i) = want.get(&(*key.0, *key.1)) else {
            c.mismatches.push(format!("{prefix}: detection at location {} label {} is not expected", key.0, key.1));
            return Ok(());
        };
        let box_err = (0..4).map(|r| (d.boxes[j][r] - want_boxes[4 * i + r]).abs()).fold(0f64, f64::max);
        let score_err = (d.scores[j] - want_scores[i]).abs();
        if box_err > 1e-3 || score_err > 1e-6 {
            c.mismatches.push(format!(
                "{prefix}: location {} label {}: box error {box_err:.2e}, score error {score_err:.2e}",
                key.0, key.1
            ));
            return Ok(());
        }
    }
    Ok(())
}

fn check_fcos_postprocess(g: &Golden, c: &mut Checker) -> Result<()> {
    let level =
        |what: &str| FCOS_LEVELS.iter().map(|p| Ok(g.t(&format!("{what}_{p}"))?.clone())).collect::<Result<Vec<_>>>();
    let head = HeadOutputs {
        cls_logits: level("cls_logits")?,
        bbox_reg: level("bbox_reg")?,
        centerness: level("centerness")?,
    };
    let strides: Vec<usize> = host(g.t("strides")?)?.into_iter().map(|s| s as usize).collect();
    let sizes: Vec<(usize, usize)> =
        host(g.t("image_sizes")?)?.chunks(2).map(|p| (p[0] as usize, p[1] as usize)).collect();
    let cfg = PostprocessConfig {
        pre_nms_thresh: g.f64("pre_nms_thresh")?,
        pre_nms_top_n: g.usize("pre_nms_top_n")?,
        nms_thresh: g.f64("nms_thresh")?,
        detections_per_image: g.usize("post_nms_top_n")?,
        legacy_iou: true,
    };
    for (n, cand) in candidates(&head, &strides, &sizes, &cfg)?.iter().enumerate() {
        let per_level: Vec<f64> = cand.per_level.iter().map(|&v| v as f64).collect();
        c.values(g, &format!("num_candidates_{n}"), &per_level, 0.0)?;
        check_detections(g, c, &cand.detections, "pre_nms_", n)?;
        check_detections(g, c, &select(&cand.detections, &cfg), "", n)?;
    }
    Ok(())
}

fn check_nms(g: &Golden, c: &mut Checker) -> Result<()> {
    let boxes: Vec<[f64; 4]> = host(g.t("boxes")?)?.chunks(4).map(|b| [b[0], b[1], b[2], b[3]]).collect();
    let scores = host(g.t("scores")?)?;
    let classes: Vec<i64> = host(g.t("classes")?)?.into_iter().map(|v| v as i64).collect();
    let threshold = g.f64("iou_threshold")?;
    for (name, legacy) in [("keep", true), ("keep_continuous", false)] {
        let keep: Vec<f64> = nms(&boxes, &scores, &classes, threshold, legacy).into_iter().map(|i| i as f64).collect();
        c.values(g, name, &keep, 0.0)?;
    }
    Ok(())
}

fn check(g: &Golden, c: &mut Checker) -> Result<()> {
    match g.kind.as_str() {
        "pixel_wise" => check_pixel_wise(g, c, PixelWiseLoss::CrossEntropy),
        "pixel_wise_kl_t" => check_pixel_wise(g, c, PixelWiseLoss::Kl { temperature: g.f64("temperature")? }),
        "pair_wise" => check_pair_wise(g, c),
        "ce_dsn" => check_ce_dsn(g, c),
        "adaptive_avg_pool" => check_primitive(g, c, |x| adaptive_avg_pool2d(x, g.pair("output_size")?)),
        "bilinear_align_corners" => {
            let align = g.params["align_corners"].as_bool().unwrap_or(true);
            check_primitive(g, c, |x| resize_bilinear(x, g.pair("size")?, align))
        }
        "max_pool_ceil" => {
            let pool = MaxPool2d::new(
                g.pair("kernel")?,
                g.pair("stride")?,
                g.pair("padding")?,
                g.params["ceil_mode"].as_bool().unwrap_or(true),
            );
            assert_eq!(pool.output_hw(g.t("input.x")?.dim(2)?, g.t("input.x")?.dim(3)?)?, g.pair("out_hw")?);
            check_primitive(g, c, |x| pool.forward(x))
        }
        "discriminator" => check_discriminator(g, c),
        "pspnet_forward" => check_pspnet_forward(g, c),
        "pspnet_train_step" => check_pspnet_train_step(g, c),
        "fcos_targets" => check_fcos_targets(g, c),
        "fcos_loss" => check_fcos_loss(g, c),
        "fcos_postprocess" => check_fcos_postprocess(g, c),
        "nms" => check_nms(g, c),
        other => candle_core::bail!("unknown golden kind {other:?}"),
    }
}

fn golden_dir() -> PathBuf {
    std::env::var_os("SKD_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
}

#[test]
fn golden() {
    let dir = golden_dir();
    let device_name = std::env::var("SKD_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = skd::device(&device_name).unwrap_or_else(|e| panic!("SKD_DEVICE {device_name}: {e}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("SKD_GOLDEN_DIR {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.safetensors in {}", dir.display());

    let (mut checked, mut failed) = (0usize, Vec::new());
    for path in &files {
        let name = path.file_name().expect("file name").to_string_lossy().to_string();
        let g = match Golden::load(path, &dev) {
            Ok(g) => g,
            Err(e) => {
                failed.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut c = Checker::default();
        match check(&g, &mut c) {
            Err(e) => failed.push(format!("{name} ({}): {e}", g.kind)),
            Ok(()) if !c.mismatches.is_empty() => {
                failed.push(format!("{name} ({}):\n    {}", g.kind, c.mismatches.join("\n    ")))
            }
            Ok(()) => {
                checked += 1;
                println!("ok      {name} ({} tensors)", c.compared);
            }
        }
    }
    for f in &failed {
        println!("FAILED  {f}");
    }
    println!("golden: {checked} checked, {} failed (device {device_name})", failed.len());
    assert!(failed.is_empty(), "{} golden files failed", failed.len());
}

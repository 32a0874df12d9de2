//! Edges of the distillation module that the goldens do not cover.

use candle_core::{Device, Result, Tensor, Var};
use skd::distill::holistic::{critic_depth, critic_output_hw, double_backward_enabled};
use skd::distill::{
    Adversarial, DenseOutputs, DistillConfig, Distiller, Holistic, HolisticConfig, MimicConfig, NodePool,
    PairWiseConfig, PixelWiseConfig, PixelWiseLoss, pair_wise_loss, pixel_wise_loss,
};

fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1., shape, &Device::Cpu)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.max_all()?.to_scalar::<f32>()
}

#[test]
fn pair_wise_map_smaller_than_the_node_kernel_keeps_one_node_per_pixel() -> Result<()> {
    // int(0.5 * 1) = 0: the reference raises; we clamp the kernel to 1.
    let f_s = Var::from_tensor(&randn(&[2, 3, 1, 3])?)?;
    let f_t = randn(&[2, 5, 1, 3])?;
    let loss = pair_wise_loss(&f_s, &f_t, NodePool::Max, Some(0.5))?;
    assert!(loss.to_scalar::<f32>()?.is_finite());
    let g = loss.backward()?;
    assert!(max_abs(g.get(&f_s).expect("grad"))?.is_finite());
    // A single node: both affinities are [[1]], so nothing to learn.
    let one = pair_wise_loss(&randn(&[2, 3, 1, 1])?, &randn(&[2, 4, 1, 1])?, NodePool::Avg, Some(0.5))?;
    assert!(one.to_scalar::<f32>()?.abs() < 1e-6);
    Ok(())
}

#[test]
fn pixel_wise_refuses_a_softmax_over_one_class_and_mse_works() -> Result<()> {
    let (z_s, z_t) = (randn(&[2, 1, 4, 4])?, randn(&[2, 1, 4, 4])?);
    let err = pixel_wise_loss(&z_s, &z_t, PixelWiseLoss::CrossEntropy).unwrap_err().to_string();
    assert!(err.contains("mse"), "{err}");
    let mse = pixel_wise_loss(&z_s, &z_t, PixelWiseLoss::Mse)?.to_scalar::<f32>()?;
    let want = (z_s - z_t)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    assert_eq!(mse, want);
    Ok(())
}

#[test]
fn critic_depth_follows_the_logit_size() -> Result<()> {
    assert_eq!(critic_depth(65, 65)?, 4); // the released 512 crop
    assert_eq!(critic_output_hw(65, 65)?, (1, 1));
    assert_eq!(critic_output_hw(80, 80)?, (2, 2));
    assert_eq!(critic_depth(129, 257)?, 4); // whole 1024x2048 image
    assert_eq!(critic_depth(17, 17)?, 2); // a 128 px synthetic crop
    assert_eq!(critic_depth(33, 40)?, 3);
    let err = critic_depth(15, 65).unwrap_err().to_string();
    assert!(err.contains("at least 16x16"), "{err}");
    Ok(())
}

#[test]
fn released_critic_has_the_reference_parameter_count() -> Result<()> {
    // shared/golden/param_counts.json: discriminator 3,191,721 trainable + 8,432 u/v entries.
    let h = Holistic::new(HolisticConfig::default(), (19, 65, 65), &Device::Cpu, 0)?;
    let trainable: usize = h.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(trainable, 3_191_721);
    let data = h.varmap().data().lock().expect("varmap");
    let uv: usize = data
        .iter()
        .filter(|(k, _)| k.ends_with("weight_u") || k.ends_with("weight_v"))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(uv, 8_432);
    Ok(())
}

#[test]
fn critic_trains_on_a_batch_of_one_and_every_parameter_gets_a_gradient() -> Result<()> {
    assert!(double_backward_enabled()?, "CANDLE_GRAD_DO_NOT_DETACH must be set (.cargo/config.toml)");
    for adversarial in [Adversarial::WganGp { gp_weight: 10.0 }, Adversarial::Hinge] {
        let cfg = HolisticConfig { conv_dim: 8, adversarial, ..Default::default() };
        let h = Holistic::new(cfg, (5, 17, 17), &Device::Cpu, 1)?;
        let (z_s, z_t) = (randn(&[1, 5, 17, 17])?, randn(&[1, 5, 17, 17])?);
        let step = h.critic_loss(&z_s, &z_t)?;
        assert!(step.loss.to_scalar::<f32>()?.is_finite(), "{adversarial:?}");
        assert_eq!(step.penalty.is_some(), matches!(adversarial, Adversarial::WganGp { .. }));
        let grads = h.critic_grads(&step.loss)?; // errors if any parameter lacks a gradient
        for (key, var) in h.trainable_vars() {
            assert!(max_abs(grads.get(&var).expect("checked"))?.is_finite(), "{key}");
        }
        let data = h.varmap().data().lock().expect("varmap");
        let running_var = data["preprocess_additional.running_var"].to_vec1::<f32>()?;
        assert!(running_var.iter().all(|v| v.is_finite()));
    }
    Ok(())
}

/// Two FCOS-like levels with teacher and student of different widths.
fn two_levels(k: usize, c: usize) -> Result<DenseOutputs> {
    Ok(DenseOutputs {
        logits: vec![randn(&[2, k, 16, 16])?, randn(&[2, k, 8, 8])?],
        features: vec![randn(&[2, c, 16, 16])?, randn(&[2, c, 8, 8])?],
    })
}

#[test]
fn distiller_sums_each_term_over_levels_and_applies_its_weight() -> Result<()> {
    let cfg = DistillConfig {
        pixel_wise: Some(PixelWiseConfig { weight: 2.0, ..Default::default() }),
        pair_wise: Some(PairWiseConfig { weight: 3.0, scale: None, ..Default::default() }),
        holistic: None,
        mimic: Some(MimicConfig { weight: 0.5, levels: None }),
    };
    let d = Distiller::new(&cfg, (4, 16, 16), &[(6, 10), (6, 10)], &Device::Cpu, 0)?;
    let (s, t) = (two_levels(4, 6)?, two_levels(4, 10)?);
    let losses = d.student_losses(&s, &t)?;
    let pixel: f32 = (0..2)
        .map(|l| pixel_wise_loss(&s.logits[l], &t.logits[l], PixelWiseLoss::CrossEntropy)?.to_scalar::<f32>())
        .sum::<Result<f32>>()?;
    let pair: f32 = (0..2)
        .map(|l| pair_wise_loss(&s.features[l], &t.features[l], NodePool::Max, None)?.to_scalar::<f32>())
        .sum::<Result<f32>>()?;
    let mimic = d.mimic().expect("mimic configured");
    let mimic_sum: f32 =
        (0..2).map(|l| mimic.level_loss(l, &s.features[l], &t.features[l])?.to_scalar::<f32>()).sum::<Result<f32>>()?;
    let got = losses.values()?;
    assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["pixel_wise", "pair_wise", "mimic"]);
    assert!((got[0].1 - 2.0 * pixel).abs() <= 1e-5 * pixel.abs());
    assert!((got[1].1 - 3.0 * pair).abs() <= 1e-5 * pair.abs());
    assert!((got[2].1 - 0.5 * mimic_sum).abs() <= 1e-5 * mimic_sum.abs());
    // 6 -> 10 channels: one 1x1 adapter (weight and bias) per level, all reached by the gradient.
    let adapters = mimic.trainable_vars();
    assert_eq!(adapters.len(), 4, "{:?}", adapters.iter().map(|(k, _)| k).collect::<Vec<_>>());
    let grads = losses.total()?.backward()?;
    assert!(adapters.iter().all(|(_, v)| grads.get(v).is_some()));
    assert!(d.critic_loss(&s.detach(), &t)?.is_none(), "no holistic term, no critic");
    Ok(())
}

#[test]
fn mimic_is_the_plain_mse_when_channels_match() -> Result<()> {
    let cfg = DistillConfig { mimic: Some(MimicConfig::default()), ..DistillConfig::none() };
    let d = Distiller::new(&cfg, (4, 16, 16), &[(6, 6), (6, 6)], &Device::Cpu, 0)?;
    let (s, t) = (two_levels(4, 6)?, two_levels(4, 6)?);
    let want: f32 = (0..2)
        .map(|l| (&s.features[l] - &t.features[l])?.sqr()?.mean_all()?.to_scalar::<f32>())
        .sum::<Result<f32>>()?;
    let got = d.student_losses(&s, &t)?.values()?;
    assert_eq!(got.len(), 1);
    assert!((got[0].1 - want).abs() <= 1e-5 * want, "{} vs {want}", got[0].1);
    assert!(d.mimic().expect("mimic").trainable_vars().is_empty(), "no adapter when channels match");
    Ok(())
}

#[test]
fn distiller_rejects_a_level_filter_beyond_the_outputs() -> Result<()> {
    let cfg = DistillConfig {
        pixel_wise: Some(PixelWiseConfig { levels: Some(vec![0, 5]), ..Default::default() }),
        pair_wise: None,
        holistic: None,
        mimic: None,
    };
    let d = Distiller::new(&cfg, (4, 16, 16), &[], &Device::Cpu, 0)?;
    let err = d.student_losses(&two_levels(4, 6)?, &two_levels(4, 6)?).unwrap_err().to_string();
    assert!(err.contains("distill.pixel_wise.levels: level 5"), "{err}");
    Ok(())
}

#[test]
fn released_protocol_runs_on_small_synthetic_logits() -> Result<()> {
    // The quick start's shape: 19 classes at 17x17 (128 px crops), depth-2 critic.
    let cfg =
        DistillConfig { holistic: Some(HolisticConfig { conv_dim: 8, ..Default::default() }), ..Default::default() };
    let d = Distiller::new(&cfg, (19, 17, 17), &[], &Device::Cpu, 0)?;
    let s_logits = Var::from_tensor(&randn(&[2, 19, 17, 17])?)?;
    let s = DenseOutputs { logits: vec![s_logits.as_tensor().clone()], features: vec![randn(&[2, 8, 17, 17])?] };
    let t = DenseOutputs { logits: vec![randn(&[2, 19, 17, 17])?], features: vec![randn(&[2, 16, 17, 17])?] };
    let losses = d.student_losses(&s, &t)?;
    let names: Vec<_> = losses.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["pixel_wise", "pair_wise", "holistic"]);
    let g = losses.total()?.backward()?;
    assert!(max_abs(g.get(&s_logits).expect("grad"))? > 0.0);
    let critic = d.critic_loss(&s.detach(), &t)?.expect("holistic is on");
    d.holistic().expect("holistic").critic_grads(&critic.loss)?;
    Ok(())
}

#[test]
fn config_defaults_are_the_released_protocol_and_unknown_keys_are_named() {
    let cfg: DistillConfig = serde_json::from_str("{}").expect("empty config");
    assert_eq!(cfg, DistillConfig::default());
    assert_eq!(cfg.pixel_wise.as_ref().map(|c| c.weight), Some(10.0));
    assert_eq!(cfg.pair_wise.as_ref().map(|c| (c.weight, c.scale)), Some((0.5, Some(0.5))));
    assert_eq!(cfg.holistic.map(|c| (c.weight, c.adversarial)), Some((0.1, Adversarial::WganGp { gp_weight: 10.0 })));
    let err = serde_json::from_str::<DistillConfig>(r#"{"pair_wise": {"wieght": 10}}"#).unwrap_err().to_string();
    assert!(err.contains("unknown field `wieght`") && err.contains("weight"), "{err}");
    let kl: DistillConfig = serde_json::from_str(
        r#"{"pixel_wise": {"loss": {"kind": "kl", "temperature": 4}}, "pair_wise": null, "holistic": null}"#,
    )
    .expect("kl");
    assert_eq!(kl.pixel_wise.map(|c| c.loss), Some(PixelWiseLoss::Kl { temperature: 4.0 }));
}

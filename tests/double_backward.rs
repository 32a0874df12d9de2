//! The WGAN-GP penalty through the double-backward worker (as the binaries run it: every other
//! thread first-order) equals the penalty computed with the flag set process-wide (as the
//! goldens check it). One test in its own process: it changes the environment.

use candle_core::{Device, Tensor};
use skd::distill::{Holistic, HolisticConfig};

/// The critic's loss and every parameter's gradient after one WGAN-GP step.
fn critic_step() -> Vec<(String, Vec<f32>)> {
    let cfg = HolisticConfig { conv_dim: 8, ..Default::default() };
    let h = Holistic::new(cfg, (5, 17, 17), &Device::Cpu, 3).expect("critic");
    let z = |seed: u32| {
        Tensor::arange(0f32, (2 * 5 * 17 * 17) as f32, &Device::Cpu)
            .and_then(|t| (t * (0.37 + seed as f64))?.sin()?.reshape((2, 5, 17, 17)))
            .expect("z")
    };
    let step = h
        .critic_loss_with_alpha(&z(0), &z(1), &Tensor::new(&[0.3f32, 0.8], &Device::Cpu).expect("alpha"))
        .expect("loss");
    let grads = h.critic_grads(&step.loss).expect("every parameter has a gradient");
    let mut out = vec![("loss".to_string(), vec![step.loss.to_scalar::<f32>().expect("scalar")])];
    for (k, v) in h.trainable_vars() {
        out.push((k, grads.get(&v).expect("grad").flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values")));
    }
    out
}

/// Whether a convolution weight's gradient still tracks ops after a backward on this thread:
/// where the thread keeps the graph of gradients it must (to be differentiated again); elsewhere
/// it must not, or it keeps the layer's output gradient alive in the gradient store.
fn conv_weight_gradient_tracks() -> bool {
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::ones((2, 3, 9, 9), candle_core::DType::F32, &dev).expect("x"))
        .expect("var");
    let w = candle_core::Var::from_tensor(&Tensor::ones((4, 3, 3, 3), candle_core::DType::F32, &dev).expect("w"))
        .expect("var");
    let y = skd::nn::im2col::conv2d(x.as_tensor(), w.as_tensor(), 1, 1, 1).expect("conv");
    let grads = y.sqr().and_then(|t| t.sum_all()).and_then(|t| t.backward()).expect("backward");
    grads.get(w.as_tensor()).expect("weight gradient").track_op()
}

#[test]
fn penalty_through_the_worker_equals_the_process_wide_flag() {
    assert!(std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_some(), ".cargo/config.toml sets the flag for tests");
    // The reference on a pool of its own, so that the global pool's threads start only after
    // the flag is gone, as in the binaries: an op that hands a backward's work to the pool must
    // not depend on the pool's threads keeping the graph.
    let flagged = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool");
    let reference = flagged.install(critic_step);
    assert!(flagged.install(conv_weight_gradient_tracks), "with the flag a gradient keeps its graph");
    // As skd::init_process does: the worker latches the flag, then the flag goes away.
    assert!(skd::nn::double_backward::start().expect("worker"));
    // SAFETY: this process runs this one test; the worker has latched the flag and waits.
    unsafe { std::env::remove_var("CANDLE_GRAD_DO_NOT_DETACH") };
    let (through_worker, tracks) =
        std::thread::spawn(|| (critic_step(), conv_weight_gradient_tracks())).join().expect("a first-order thread");
    assert!(!tracks, "without the flag a weight's gradient is detached");
    assert_eq!(reference.len(), through_worker.len());
    for ((k, a), (_, b)) in reference.iter().zip(&through_worker) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{k}: {err} (scale {scale})");
    }
}

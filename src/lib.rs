//! # skd — structured knowledge distillation for dense prediction, on Candle
//!
//! A reproduction of Liu et al., "Structured Knowledge Distillation for Semantic
//! Segmentation" (CVPR 2019) and its extension to detection. See `ARCHITECTURE.md` for the
//! map of the crate; the arrows point one way:
//!
//! ```text
//! bin/skd-seg, bin/skd-det  ->  seg/, det/ (tasks)  ->  distill/ (DenseOutputs -> Losses)  ->  nn/
//! ```
#![doc = include_str!("../README.md")]

pub mod backbone;
pub mod config;
pub mod det;
pub mod distill;
pub mod nn;
pub mod seg;
pub mod suggest;
pub mod train;
pub mod weights;

/// The device named `name`: `cpu`, `cuda` or `cuda:N` (the CUDA ones need the `cuda` feature).
pub fn device(name: &str) -> candle_core::Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => candle_core::Device::new_cuda(i),
            None => Err(candle_core::Error::Msg(format!("unknown device {other:?}; use cpu, cuda or cuda:N"))),
        },
    }
}

/// Prepares the process for training, first thing in `main`:
///
/// - double backward for the WGAN-GP penalty on one worker thread only
///   (`nn::double_backward`): `CANDLE_GRAD_DO_NOT_DETACH=1` is set, the worker latches it, and it
///   is removed again, so every other backward stays first-order (a third of the memory). An
///   explicit `CANDLE_GRAD_DO_NOT_DETACH` in the environment is left as it is, process-wide;
/// - `RAYON_NUM_THREADS` = the CPUs available, unless set: Candle otherwise re-reads
///   `/proc/cpuinfo` on every matmul and counts physical cores only;
/// - Candle's element-wise worker threads sleep as soon as they are idle, unless
///   `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set: by default each spins for about a millisecond after
///   every large element-wise op, on the cores the convolutions (rayon) need next. Measured on
///   `bench` case (a), 5 alternating runs each: median step 864 ms spinning, 772 ms not;
/// - glibc's malloc keeps freed memory instead of returning it to the kernel: every op allocates
///   its output afresh, and mapping and zeroing new pages cost ~40% of a small CPU training step;
///   and it keeps one arena for all threads: the trainer runs the student's part of a step on a
///   pool worker, and with an arena per thread what one thread freed did not serve the next
///   one's allocations (case (d)'s peak 2417 MB, 1894 with one arena; (a) 367 either way, its
///   step unchanged in three alternated runs).
///
/// # Safety
/// Call at the start of `main`, before any other thread exists (see [`std::env::set_var`]).
pub unsafe fn init_process() -> candle_core::Result<()> {
    const FLAG: &str = "CANDLE_GRAD_DO_NOT_DETACH";
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    // First, before any thread is started: a thread takes its arena at its first allocation.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let ours = std::env::var_os(FLAG).is_none();
    // SAFETY: the caller guarantees no other thread reads the environment concurrently; the
    // worker started in between has latched the flag before `start` returns.
    unsafe {
        if ours {
            std::env::set_var(FLAG, "1");
        }
        nn::double_backward::start()?;
        if ours {
            std::env::remove_var(FLAG);
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        if std::env::var_os(SPIN_LIMIT).is_none() {
            std::env::set_var(SPIN_LIMIT, "0");
        }
    }
    Ok(())
}

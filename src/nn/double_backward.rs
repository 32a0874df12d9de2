//! Double backward on one thread, first-order backward everywhere else.
//!
//! Candle keeps the graph of gradients (so that a gradient can be differentiated again, as the
//! WGAN-GP penalty needs) only on threads whose first backward saw `CANDLE_GRAD_DO_NOT_DETACH`
//! set; it reads the variable once per thread. With the variable set for the whole process,
//! every backward also builds the graph of its own gradients, which triples the memory of a
//! training step. So [`start`] gives the variable to one worker thread only: `skd::init_process`
//! sets it, starts the worker (which latches it), and removes it again before any other thread
//! exists. [`backward_with_graph`] runs a backward on that worker; everything else stays
//! first-order. Without [`start`] (tests set the variable for the whole process), it runs on the
//! calling thread.

use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};

type Job = Box<dyn FnOnce() + Send>;

static WORKER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Whether this thread keeps the graph of gradients (its first backward decides). A gradient
/// tracks ops either way (it is computed from the forward's tracked arguments), so the probe
/// differentiates twice: `d²/dx² x⁴` at 1 is 12 through the whole graph, 4 when each node's
/// incoming gradient is detached.
fn keeps_graph_here() -> Result<bool> {
    let x = Var::new(&[1f32], &Device::Cpu)?;
    let Some(first) = x.sqr()?.sqr()?.sum_all()?.backward()?.remove(&x) else { return Ok(false) };
    let Some(second) = first.sum_all()?.backward()?.remove(&x) else { return Ok(false) };
    Ok((second.sum_all()?.to_scalar::<f32>()? - 12.0).abs() < 1e-3)
}

/// Starts the worker thread; call while `CANDLE_GRAD_DO_NOT_DETACH` is set and before other
/// threads exist. Returns whether the worker keeps the graph of gradients.
pub fn start() -> Result<bool> {
    let (tx, rx) = channel::<Job>();
    let (ready_tx, ready_rx) = channel();
    std::thread::Builder::new()
        .name("skd-double-backward".into())
        .spawn(move || {
            // Latch the variable now, while it is set.
            let _ = ready_tx.send(keeps_graph_here());
            for job in rx {
                job();
            }
        })
        .map_err(|e| candle_core::Error::Msg(format!("cannot start the double-backward thread: {e}")))?;
    let enabled = ready_rx.recv().map_err(|e| candle_core::Error::Msg(e.to_string()))??;
    // A second start keeps the first worker; this one then exits with its channel.
    let _ = WORKER.set(Mutex::new(tx));
    Ok(enabled)
}

/// Runs `f` on the worker if there is one, else here.
fn on_worker<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    let Some(worker) = WORKER.get() else { return f() };
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    worker
        .lock()
        .expect("worker lock")
        .send(job)
        .map_err(|_| candle_core::Error::Msg("the double-backward thread stopped".into()))?;
    rx.recv().map_err(|_| candle_core::Error::Msg("the double-backward thread stopped".into()))?
}

thread_local! {
    /// [`keeps_graph_here`], probed once per thread (`None`: the probe failed).
    static KEEPS_GRAPH: Option<bool> = keeps_graph_here().ok();
}

/// A forward argument as an op's backward reads it: as it is where this thread's backward keeps
/// the graph of gradients (so that the gradient can be differentiated again), detached elsewhere.
/// Candle detaches only the incoming gradient, so a weight's gradient computed from the (tracked)
/// weight would keep that gradient, a layer's output gradient, alive in the gradient store until
/// the store is dropped: every layer's at once by the end of the backward. If the probe failed,
/// as it is: the gradients stay right, only larger.
pub fn operand(t: &Tensor) -> Tensor {
    if KEEPS_GRAPH.with(|keeps| keeps.unwrap_or(true)) { t.clone() } else { t.detach() }
}

/// Whether [`backward_with_graph`] returns gradients that can be differentiated again.
pub fn enabled() -> Result<bool> {
    on_worker(|| {
        KEEPS_GRAPH
            .with(|keeps| *keeps)
            .ok_or_else(|| candle_core::Error::Msg("cannot tell whether this thread keeps gradient graphs".into()))
    })
}

/// `loss.backward()` with the gradients kept as graph nodes.
pub fn backward_with_graph(loss: &Tensor) -> Result<GradStore> {
    let loss = loss.clone();
    on_worker(move || loss.backward())
}

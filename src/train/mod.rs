//! The task-generic trainer: one structured-distillation step, the schedule, the NaN guard and
//! the training state, for any task that hands the distiller [`DenseOutputs`].
//!
//! ```text
//! Trainer::step(batch, it)
//!   lr = schedule(base, it + 1)                   (both optimisers; released: it = 1, 2, ...)
//!   t = dense(teacher(x, train = false))          (plain tensors: no graph)
//!   out = student(x, train = true); s = dense(out)
//!   losses = task_loss(out, batch) + distiller.student_losses(s, t)
//!   guard: a non-finite term or gradient skips the update; K in a row stop the run
//!   student_opt.step(grads)
//!   critic_opt.step(critic_grads(distiller.critic_loss(s.detach(), t)))   (logits from before the update)
//! ```

pub mod log;
pub mod optim;
pub mod run;
pub mod state;

use candle_core::{Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use crate::distill::{DenseOutputs, Distiller, Losses};
use crate::nn::{SplitMix64, trainable_vars};
pub use optim::{LrSchedule, ParamGroup, Sgd, SgdConfig, poly_lr};

/// A network whose outputs can be distilled.
pub trait DenseNet {
    type Output: Send;
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Self::Output>;
    fn dense(out: &Self::Output) -> DenseOutputs;
    /// A frozen teacher's dense outputs: an evaluation-mode forward, which may leave out what
    /// distillation never reads.
    fn teacher_dense(&self, images: &Tensor) -> Result<DenseOutputs> {
        Ok(Self::dense(&self.forward_t(images, false)?))
    }
    /// Re-keys the random choices inside the network (dropout masks).
    fn reseed(&self, seed: u64);
    /// Parameters (by `VarMap` key) the optimiser leaves alone.
    fn is_frozen(&self, _key: &str) -> bool {
        false
    }
}

/// A task: what a batch is, where its images are, and its own loss. Sendable, as the trainer
/// runs a step on a worker of the thread pool; its networks shared between threads, as the
/// teacher's forward runs beside the student's.
pub trait Task: Send {
    type Batch: Sync;
    type Net: DenseNet + Send + Sync;
    fn images<'a>(&self, batch: &'a Self::Batch) -> &'a Tensor;
    fn task_loss(&self, out: &<Self::Net as DenseNet>::Output, batch: &Self::Batch) -> Result<Losses>;
}

/// The optimisation settings shared by every task (defaults as run).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub iterations: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: LrSchedule,
    /// Multiplies the learning rate of every bias (FCOS: 2).
    pub bias_lr_factor: f64,
    /// The weight decay of every bias; `None` = `weight_decay` (FCOS: 0).
    pub bias_weight_decay: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            iterations: 40_000,
            batch_size: 8,
            lr: 1e-2,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: LrSchedule::default(),
            bias_lr_factor: 1.0,
            bias_weight_decay: None,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, v: f64| candle_core::Error::Msg(format!("optim.{what} must be finite and >= 0, got {v}"));
        for (what, v) in [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
            ("bias_lr_factor", self.bias_lr_factor),
        ]
        .into_iter()
        .chain(self.bias_weight_decay.map(|w| ("bias_weight_decay", w)))
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(what, v));
            }
        }
        if self.iterations == 0 || self.batch_size == 0 {
            candle_core::bail!("optim.iterations and optim.batch_size must be positive");
        }
        self.schedule.validate()
    }
}

/// How the trainer runs, beside the networks.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub optim: OptimConfig,
    /// Keys dropout masks and the critic's `α` per iteration.
    pub seed: u64,
    /// Non-finite steps in a row that stop the run.
    pub max_skips: usize,
}

/// What the NaN guard decides after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Apply,
    Skip,
    Stop,
}

/// Which sample fills slot `slot` of iteration `iteration`: a fresh shuffle every epoch.
pub fn sample_index(n: usize, seed: u64, batch: usize, iteration: usize, slot: usize) -> usize {
    let k = iteration * batch + slot;
    let (epoch, pos) = (k / n, k % n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::derive(&[seed, epoch as u64, 0x5eed]);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order[pos]
}

/// The NaN guard: a step with a non-finite loss or gradient is skipped; `max_skips` in a row stop.
pub fn guard(finite: bool, consecutive_skips: usize, max_skips: usize) -> Guard {
    match (finite, consecutive_skips + 1 >= max_skips) {
        (true, _) => Guard::Apply,
        (false, false) => Guard::Skip,
        (false, true) => Guard::Stop,
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    pub iteration: usize,
    pub lr: f64,
    /// The student's weighted terms.
    pub losses: Vec<(&'static str, f32)>,
    pub total: f32,
    /// The critic's loss (holistic term only).
    pub critic_loss: Option<f32>,
    /// Why the update was skipped, if it was.
    pub skipped: Option<String>,
}

/// Every value of every tensor is finite, and so is each tensor's f32 sum of squares (values
/// beyond ~1e19 overflow it: such a gradient is refused too).
pub fn all_finite<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<bool> {
    let mut total = 0f64;
    for t in tensors {
        total += sum_of_squares(t)?;
    }
    Ok(total.is_finite())
}

/// `t`'s sum of squares in f32. On the CPU one parallel pass over it (the tensor ops write the
/// squares out first, serially).
fn sum_of_squares(t: &Tensor) -> Result<f64> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        let partial = data[start..end].par_chunks(1 << 14).map(squares_in_lanes);
        return Ok(partial.reduce(|| 0.0, |a, b| a + b) as f64);
    }
    drop(storage);
    t.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// The sum of squares in sixteen running sums, which the compiler keeps in one vector
/// register: with one sum every value waits for the addition before it (a 128² step's 13 M
/// gradients: 6.5–8.5 ms of the step that way, 3.4–4.0 in lanes).
fn squares_in_lanes(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// [`Trainer::student_update`]'s result: the report, the problem, the teacher's and the
/// student's dense outputs.
type StudentUpdate = (StepReport, Option<String>, Option<DenseOutputs>, DenseOutputs);

/// `f` run on a worker of rayon's pool (this thread waits), or here when this thread is one.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The gradients of `vars` are finite.
fn grads_finite(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)]) -> Result<bool> {
    all_finite(vars.iter().filter_map(|(_, v)| grads.get(v)))
}

/// The prefix of the mimic adapters in the training state (they are not part of the student).
const ADAPTER: &str = "adapter";

pub struct Trainer<T: Task> {
    pub task: T,
    pub student: T::Net,
    pub student_vars: VarMap,
    pub teacher: Option<T::Net>,
    pub distiller: Option<Distiller>,
    student_opt: Sgd,
    critic_opt: Option<Sgd>,
    student_params: Vec<(String, Var)>,
    critic_params: Vec<(String, Var)>,
    optim: OptimConfig,
    critic_lr: f64,
    seed: u64,
    max_skips: usize,
    consecutive_skips: usize,
}

impl<T: Task> Trainer<T> {
    /// `student` with its variables; `distiller` needs a teacher.
    pub fn new(
        task: T,
        (student, student_vars): (T::Net, VarMap),
        teacher: Option<T::Net>,
        distiller: Option<Distiller>,
        Settings { optim, seed, max_skips }: Settings,
    ) -> Result<Self> {
        optim.validate()?;
        if distiller.is_some() && teacher.is_none() {
            candle_core::bail!("distillation needs a teacher");
        }
        let sgd = |lr| SgdConfig { lr, momentum: optim.momentum, weight_decay: optim.weight_decay };
        // The student's own parameters, then the mimic adapters (trained with it).
        let mut student_params = trainable_vars(&student_vars);
        student_params.retain(|(k, _)| !student.is_frozen(k));
        if let Some(m) = distiller.as_ref().and_then(|d| d.mimic()) {
            student_params.extend(m.trainable_vars().into_iter().map(|(k, v)| (format!("{ADAPTER}/{k}"), v)));
        }
        let groups = student_params
            .iter()
            .map(|(k, var)| {
                let bias = k.ends_with("bias");
                ParamGroup {
                    var: var.clone(),
                    lr_factor: if bias { optim.bias_lr_factor } else { 1.0 },
                    weight_decay: if bias {
                        optim.bias_weight_decay.unwrap_or(optim.weight_decay)
                    } else {
                        optim.weight_decay
                    },
                }
            })
            .collect();
        let student_opt = Sgd::with_groups(groups, sgd(optim.lr))?;
        let holistic = distiller.as_ref().and_then(|d| d.holistic());
        let critic_params = holistic.map(|h| h.trainable_vars()).unwrap_or_default();
        let critic_lr = holistic.map(|h| h.config().lr).unwrap_or(0.0);
        let critic_opt = holistic
            .map(|_| Sgd::new(critic_params.iter().map(|(_, v)| v.clone()).collect(), sgd(critic_lr)))
            .transpose()?;
        Ok(Self {
            task,
            student,
            student_vars,
            teacher,
            distiller,
            student_opt,
            critic_opt,
            student_params,
            critic_params,
            optim,
            critic_lr,
            seed,
            max_skips: max_skips.max(1),
            consecutive_skips: 0,
        })
    }

    /// One training step at 0-based `iteration`. An error means the run must stop (including
    /// `max_skips` non-finite steps in a row; the last checkpoint is untouched).
    pub fn step(&mut self, batch: &T::Batch, iteration: usize) -> Result<StepReport> {
        let schedule = &self.optim.schedule;
        let lr = schedule.lr(self.optim.lr, iteration + 1, self.optim.iterations);
        self.student_opt.set_learning_rate(lr);
        if let Some(opt) = &mut self.critic_opt {
            opt.set_learning_rate(schedule.lr(self.critic_lr, iteration + 1, self.optim.iterations));
        }
        let it = iteration as u64;
        self.student.reseed(SplitMix64::derive(&[self.seed, it, 1]).next_u64());
        if let Some(h) = self.distiller.as_ref().and_then(|d| d.holistic()) {
            h.set_seed(SplitMix64::derive(&[self.seed, it, 2]).next_u64());
        }

        // The student's part on a worker of the thread pool: the many parallel ops inside then
        // start on the thread that calls them, where from any other thread each parallel call
        // blocks it until a worker wakes it again. 128² steps alternated with and without, paired
        // medians over 7 runs: 0.97–1.06, median 0.98.
        let (mut report, mut problem, t, s) = on_pool(|| self.student_update(batch, iteration, lr))?;
        if problem.is_none()
            && let (Some(d), Some(t), Some(opt)) = (&self.distiller, &t, &mut self.critic_opt)
            && let Some(critic) = d.critic_loss(&s.detach(), t)?
        {
            let value = critic.loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            report.critic_loss = Some(value);
            let holistic = d.holistic().expect("a critic loss means a holistic term");
            if !value.is_finite() {
                problem = Some(format!("critic loss = {value}"));
            } else {
                let grads = holistic.critic_grads(&critic.loss)?;
                if grads_finite(&grads, &self.critic_params)? {
                    opt.step(&grads)?;
                } else {
                    problem = Some("non-finite critic gradient".into());
                }
            }
        }
        match guard(problem.is_none(), self.consecutive_skips, self.max_skips) {
            Guard::Apply => self.consecutive_skips = 0,
            Guard::Skip => {
                self.consecutive_skips += 1;
                report.skipped = problem;
            }
            Guard::Stop => candle_core::bail!(
                "stopping at iteration {iteration}: {} non-finite steps in a row (last: {}); the last checkpoint is intact — \
                 lower the learning rate or switch the critic to hinge (distill.holistic.adversarial.kind=hinge)",
                self.max_skips,
                problem.unwrap_or_default()
            ),
        }
        Ok(report)
    }

    /// Teacher and student forward, the losses and, when they are finite, the student's
    /// backward and update: the report, what went wrong (if anything), and both networks'
    /// dense outputs for the critic.
    fn student_update(&mut self, batch: &T::Batch, iteration: usize, lr: f64) -> Result<StudentUpdate> {
        let x = self.task.images(batch);
        // The two forwards side by side on the thread pool: each one's ops fill the other's
        // waits (the serial stretches between products, a product's last parts). 128² steps
        // alternated with and without in one process: paired median 0.88 (quartiles
        // 0.83–1.04, 39 pairs).
        let (t, out) = rayon::join(
            || self.teacher.as_ref().map(|t| t.teacher_dense(x)).transpose(),
            || self.student.forward_t(x, true),
        );
        let (t, out) = (t?, out?);
        let s = T::Net::dense(&out);
        let mut losses = self.task.task_loss(&out, batch)?;
        if let (Some(d), Some(t)) = (&self.distiller, &t) {
            losses.extend(d.student_losses(&s, t)?);
        }
        let values = losses.values()?;
        let total = losses.total()?;
        let report = StepReport {
            iteration,
            lr,
            total: total.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?,
            losses: values,
            critic_loss: None,
            skipped: None,
        };
        let mut problem =
            report.losses.iter().find(|(_, v)| !v.is_finite()).map(|(n, v)| format!("loss term {n} = {v}"));
        if problem.is_none() {
            let grads = total.backward()?;
            if grads_finite(&grads, &self.student_params)? {
                self.student_opt.step(&grads)?;
            } else {
                problem = Some("non-finite student gradient".into());
            }
        }
        Ok((report, problem, t, s))
    }

    /// Every piece of state a resumed run needs, by name (see [`state`]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut dump = |prefix: &str, vm: &VarMap| {
            let data = vm.data().lock().expect("varmap lock");
            out.extend(data.iter().map(|(k, v)| (format!("{prefix}/{k}"), v.as_tensor().clone())));
        };
        dump("student", &self.student_vars);
        if let Some(h) = self.distiller.as_ref().and_then(|d| d.holistic()) {
            dump("critic", h.varmap());
        }
        if let Some(m) = self.distiller.as_ref().and_then(|d| d.mimic()) {
            dump(ADAPTER, m.varmap());
        }
        for ((k, _), v) in self.student_params.iter().zip(self.student_opt.velocity()) {
            out.push((format!("student_velocity/{k}"), v.as_tensor().clone()));
        }
        if let Some(opt) = &self.critic_opt {
            for ((k, _), v) in self.critic_params.iter().zip(opt.velocity()) {
                out.push((format!("critic_velocity/{k}"), v.as_tensor().clone()));
            }
        }
        out
    }

    /// Restores what [`Trainer::state_tensors`] saved; every variable must be present.
    pub fn restore(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let mut targets: Vec<(String, Var)> = Vec::new();
        let mut collect = |prefix: &str, vm: &VarMap| {
            let data = vm.data().lock().expect("varmap lock");
            targets.extend(data.iter().map(|(k, v)| (format!("{prefix}/{k}"), v.clone())));
        };
        collect("student", &self.student_vars);
        if let Some(h) = self.distiller.as_ref().and_then(|d| d.holistic()) {
            collect("critic", h.varmap());
        }
        if let Some(m) = self.distiller.as_ref().and_then(|d| d.mimic()) {
            collect(ADAPTER, m.varmap());
        }
        targets.extend(
            self.student_params
                .iter()
                .zip(self.student_opt.velocity())
                .map(|((k, _), v)| (format!("student_velocity/{k}"), v.clone())),
        );
        if let Some(opt) = &self.critic_opt {
            targets.extend(
                self.critic_params
                    .iter()
                    .zip(opt.velocity())
                    .map(|((k, _), v)| (format!("critic_velocity/{k}"), v.clone())),
            );
        }
        let missing: Vec<&str> =
            targets.iter().filter(|(k, _)| !tensors.contains_key(k)).map(|(k, _)| k.as_str()).collect();
        if !missing.is_empty() {
            candle_core::bail!(
                "the training state lacks {} tensors, e.g. {}",
                missing.len(),
                missing.iter().take(3).copied().collect::<Vec<_>>().join(", ")
            );
        }
        for (k, v) in targets {
            v.set(&tensors[&k].to_device(v.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass CPU check and the tensor-op path (a transposed view) agree: finite values
    /// pass, NaN, infinities and values whose square overflows f32 do not, inside the sixteen
    /// lanes of a pass or in the values past the last sixteen (the last one).
    #[test]
    fn all_finite_refuses_nan_inf_and_overflowing_squares() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols) = (251, 199);
        let base: Vec<f32> = (0..rows * cols).map(|i| (i % 97) as f32 - 48.0).collect();
        for at in [31_337, rows * cols - 1] {
            for (bad, want) in
                [(None, true), (Some(f32::NAN), false), (Some(f32::NEG_INFINITY), false), (Some(1e20), false)]
            {
                let mut v = base.clone();
                if let Some(x) = bad {
                    v[at] = x;
                }
                let t = Tensor::from_vec(v, (rows, cols), &dev)?;
                let small = Tensor::new(&[1f32, 2.0], &dev)?;
                assert_eq!(all_finite([&small, &t])?, want, "{bad:?} at {at}, contiguous");
                assert_eq!(all_finite([&t.t()?, &small])?, want, "{bad:?} at {at}, transposed");
            }
        }
        Ok(())
    }
}

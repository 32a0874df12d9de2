//! Training configurations: JSON files in `configs/`, every field typed, unknown keys rejected,
//! `Default` = the reference protocol; `--set a.b=value` overrides (shared by every task).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("--set {arg:?}: {detail}")]
    Override { arg: String, detail: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// Keys of a JSON object, for suggestions.
fn keys(v: &Value) -> Vec<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Applies `a.b.c=value` to `root`; the value is JSON when it parses, else a string. A key that
/// does not exist where the object has keys is refused with the nearest one.
pub fn apply_override(root: &mut Value, arg: &str) -> Result<(), ConfigError> {
    let err = |detail: String| ConfigError::Override { arg: arg.to_string(), detail };
    let (path, raw) = arg.split_once('=').ok_or_else(|| err("expected key.path=value".into()))?;
    let value: Value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let parts: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            // An optional section that is off: switching it on starts from its defaults.
            *node = Value::Object(Default::default());
        }
        let obj = node.as_object_mut().ok_or_else(|| err(format!("{} is not an object", parts[..i].join("."))))?;
        if !obj.contains_key(*part) && !obj.is_empty() {
            let known: Vec<String> = obj.keys().cloned().collect();
            let hint = crate::suggest::did_you_mean(part, known.iter().map(String::as_str));
            let prefix = if i == 0 { String::new() } else { format!("{}.", parts[..i].join(".")) };
            return Err(err(format!("unknown key {prefix}{part}{hint}; known: {}", known.join(", "))));
        }
        if i + 1 == parts.len() {
            obj.insert(part.to_string(), value);
            return Ok(());
        }
        node = obj.entry(part.to_string()).or_insert(Value::Null);
    }
    unreachable!("split yields at least one part")
}

/// The config from a JSON file (or `T::default()`) with `overrides` applied. The file is parsed
/// alone first, so that unknown keys are reported against it.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&std::path::Path>,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let mut value = serde_json::to_value(T::default()).expect("the default config serialises");
    if let Some(path) = file {
        let file_err = |detail: String| ConfigError::File { path: path.display().to_string(), detail };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let file_value: Value = serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        serde_json::from_value::<T>(file_value.clone()).map_err(|e| file_err(e.to_string()))?;
        value = file_value;
    }
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    serde_json::from_value(value).map_err(|e| {
        ConfigError::Invalid(format!(
            "{e} (keys at the top: {})",
            keys(&serde_json::to_value(T::default()).expect("serialises")).join(", ")
        ))
    })
}

/// The checks every task's training config shares: optimiser and distillation values, a teacher
/// whenever a distillation term is on, and a device that exists.
pub fn check_training(
    optim: &crate::train::OptimConfig,
    distill: &crate::distill::DistillConfig,
    has_teacher: bool,
    device: &str,
) -> Result<(), ConfigError> {
    let bad = |e: candle_core::Error| ConfigError::Invalid(e.to_string());
    optim.validate().map_err(bad)?;
    distill.validate().map_err(bad)?;
    if distill.is_active() && !has_teacher {
        return Err(ConfigError::Invalid(
            "distillation terms are on but there is no teacher; set teacher or turn the terms off (--set distill.pixel_wise=null ...)".into(),
        ));
    }
    crate::device(device).map(|_| ()).map_err(|e| ConfigError::Invalid(format!("device {device:?}: {e}")))
}

/// The resolved config a run writes into its directory (and `--resume` reads back).
pub const CONFIG_FILE: &str = "config.json";

/// The arguments every `train` command takes: a new run from a config file and overrides, or
/// `--resume DIR`, which continues that run with the config it wrote.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// A JSON config (configs/*.json); without it, the defaults (the reference protocol).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override a config value, e.g. --set distill.pair_wise.weight=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset root (data.root).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// The teacher's weights file.
    #[arg(long)]
    pub teacher: Option<String>,
    /// Where the run's files go (default `runs/<task>-<unix time>`).
    #[arg(long, conflicts_with = "resume")]
    pub run_dir: Option<std::path::PathBuf>,
    /// Continue the run in this directory from its last checkpoint, with its config.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<std::path::PathBuf>,
    /// Print the resolved config as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl RunArgs {
    /// The config (through `load`), the run directory and whether the run resumes. `--teacher`
    /// sets the config key `teacher_key`; a new run without `--run-dir` goes to
    /// `runs/<prefix>-<unix time>`.
    pub fn resolve<T>(
        &self,
        teacher_key: &str,
        prefix: &str,
        load: impl Fn(Option<&std::path::Path>, &[String]) -> Result<T, ConfigError>,
    ) -> Result<(T, std::path::PathBuf, bool), ConfigError> {
        if let Some(dir) = &self.resume {
            if self.config.is_some() || !self.set.is_empty() || self.data.is_some() || self.teacher.is_some() {
                return Err(ConfigError::Invalid(
                    "--resume takes the run's own config; drop --config/--set/--data/--teacher".into(),
                ));
            }
            return Ok((load(Some(&dir.join(CONFIG_FILE)), &[])?, dir.clone(), true));
        }
        let quoted = |v: &str| serde_json::to_string(v).expect("a string serialises");
        let mut overrides = self.set.clone();
        if let Some(d) = &self.data {
            overrides.push(format!("data.root={}", quoted(&d.display().to_string())));
        }
        if let Some(t) = &self.teacher {
            overrides.push(format!("{teacher_key}={}", quoted(t)));
        }
        let cfg = load(self.config.as_deref(), &overrides)?;
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let dir = self.run_dir.clone().unwrap_or_else(|| format!("runs/{prefix}-{secs}").into());
        Ok((cfg, dir, false))
    }
}

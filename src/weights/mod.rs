//! Network weights in and out: PyTorch `.pth` (zip format), safetensors and Hugging Face cache
//! references; key maps for the released SKD, segmentation-toolbox and ImageNet checkpoints;
//! the InPlace-ABN BatchNorm convention; strict and partial loading with one report of every
//! problem; atomic safetensors writing with metadata.
//!
//! ```text
//! read(path | hf://owner/repo/file) -> StateDict -> .convert(layout, bn) -> .check(expected, mode)
//!     -> VarBuilder::from_tensors (frozen teacher)  |  load_into(&VarMap) (trainable student)
//! save(path, tensors, metadata)  — temp file, fsync, rename
//! ```

mod read;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use read::{read, read_file, resolve_hf};

/// How a checkpoint stores BatchNorm's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BnConvention {
    /// `nn.BatchNorm2d`: `y = x̂ · γ + β`.
    #[default]
    Standard,
    /// InPlace-ABN v0.x (the released SKD checkpoints): `y = x̂ · (|γ| + 1e-5) + β`.
    InplaceAbn,
}

impl BnConvention {
    pub fn name(self) -> &'static str {
        match self {
            BnConvention::Standard => "standard",
            BnConvention::InplaceAbn => "inplace_abn",
        }
    }
}

/// How a checkpoint's keys map onto ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyLayout {
    /// Our keys = the released SKD student/teacher keys (`conv1`, `layer1.0.conv1`,
    /// `pspmodule.`, `head.`, `dsn.`); a DataParallel `module.` prefix is stripped.
    #[default]
    Skd,
    /// The segmentation-toolbox teacher (`utils.load_T_model`): `head.0.` -> `pspmodule.`,
    /// `head.1.` -> `head.`, `fc.*` dropped.
    Toolbox,
    /// An ImageNet classifier (CSAIL `resnet{18,101}-imagenet.pth` with the deep stem, or
    /// torchvision's ResNets with the 7x7 stem): `fc.*` dropped; load it in partial mode.
    Imagenet,
}

/// Whether every parameter of the model must come from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Missing, unexpected and mis-shaped keys are all errors.
    Strict,
    /// Load what the file has (ImageNet initialisation); the rest keeps its initial value.
    /// Mis-shaped keys are still errors, and a file with nothing that fits is one.
    Partial,
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{path}: a legacy (pre-1.6, non-zip) PyTorch file, which skd cannot read; convert it once with \
         python -c \"import torch; torch.save(torch.load('{path}', map_location='cpu'), 'converted.pth')\" \
         (or save it as safetensors) and pass the converted file"
    )]
    LegacyPth { path: String },
    #[error("{path}: not a PyTorch zip checkpoint or a safetensors file ({detail})")]
    UnknownFormat { path: String, detail: String },
    #[error("{path}: unreadable or truncated: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("{path}: key {key}: {detail}")]
    BadTensor { path: String, key: String, detail: String },
    #[error("{reference}: {detail}")]
    NotCached { reference: String, detail: String },
    #[error("{path}: does not fit the model:{detail}{hint}")]
    Mismatch { path: String, detail: String, hint: String },
    #[error("{path}: {detail}")]
    Conflict { path: String, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, WeightsError>;

/// Parameter (and buffer) names with their shapes.
pub type ParamShapes = Vec<(String, Vec<usize>)>;

/// Named tensors read from one file, with the file's metadata (safetensors only).
#[derive(Debug, Clone)]
pub struct StateDict {
    /// The file (or reference) they came from, for messages.
    pub source: String,
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Model parameters absent from the file (partial mode only).
    pub kept_initial: Vec<String>,
    /// File tensors the model has no use for (partial mode only).
    pub unused: Vec<String>,
    /// Things worth a look that are not errors.
    pub warnings: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {} tensors", self.loaded.len())?;
        if !self.kept_initial.is_empty() {
            write!(f, "; {} keep their initial value: {}", self.kept_initial.len(), preview(&self.kept_initial))?;
        }
        if !self.unused.is_empty() {
            write!(f, "; {} file tensors unused: {}", self.unused.len(), preview(&self.unused))?;
        }
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// The first few names of a list, and how many more.
fn preview(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let head = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN { format!("{head}, ... ({} more)", names.len() - SHOWN) } else { head }
}

/// Whether `key` names BatchNorm state that checkpoints may carry and we do not keep.
fn is_ignorable(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
}

impl StateDict {
    /// Maps the keys to ours and converts the BatchNorm convention to the standard one.
    pub fn convert(mut self, layout: KeyLayout, bn: BnConvention) -> Result<Self> {
        if let Some(stored) = self.metadata.get("bn_convention")
            && stored != bn.name()
        {
            return Err(WeightsError::Conflict {
                path: self.source,
                detail: format!(
                    "the file records BatchNorm convention {stored:?} but {:?} was asked for; drop the option",
                    bn.name()
                ),
            });
        }
        let mut out = BTreeMap::new();
        for (key, t) in std::mem::take(&mut self.tensors) {
            let key = key.strip_prefix("module.").map(str::to_string).unwrap_or(key);
            let first = key.split('.').next().unwrap_or("");
            let key = match layout {
                KeyLayout::Skd => key,
                KeyLayout::Toolbox | KeyLayout::Imagenet if first == "fc" => continue,
                KeyLayout::Toolbox => {
                    if let Some(rest) = key.strip_prefix("head.0.") {
                        format!("pspmodule.{rest}")
                    } else if let Some(rest) = key.strip_prefix("head.1.") {
                        format!("head.{rest}")
                    } else {
                        key
                    }
                }
                KeyLayout::Imagenet => key,
            };
            out.insert(key, t);
        }
        if bn == BnConvention::InplaceAbn {
            let prefixes: Vec<String> =
                out.keys().filter_map(|k| k.strip_suffix(".running_mean").map(str::to_string)).collect();
            for p in prefixes {
                if let Some(w) = out.get_mut(&format!("{p}.weight")) {
                    // |γ| + 1e-5 in the checkpoint's dtype, as InPlace-ABN's bn.cu normalises.
                    *w = (w.abs()? + 1e-5)?;
                }
            }
        }
        self.tensors = out;
        Ok(self)
    }

    /// Checks the tensors against the model's `expected` parameters and buffers, converts
    /// floating dtypes to f32, and reports what fits; see [`LoadMode`].
    pub fn check(&mut self, expected: &[(String, Vec<usize>)], mode: LoadMode) -> Result<LoadReport> {
        let mut missing = Vec::new();
        let mut mis_shaped = Vec::new();
        let mut report = LoadReport::default();
        for (key, shape) in expected {
            match self.tensors.get_mut(key) {
                None => missing.push(key.clone()),
                Some(t) => {
                    if !t.dtype().is_float() {
                        return Err(WeightsError::BadTensor {
                            path: self.source.clone(),
                            key: key.clone(),
                            detail: format!("dtype {:?}, expected a floating-point tensor", t.dtype()),
                        });
                    }
                    if t.dims() != shape.as_slice() {
                        mis_shaped.push(format!("{key}: file {:?}, model {:?}", t.dims(), shape));
                        continue;
                    }
                    if t.dtype() != DType::F32 {
                        *t = t.to_dtype(DType::F32)?;
                    }
                    report.loaded.push(key.clone());
                }
            }
        }
        let expected_keys: std::collections::HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
        let unexpected: Vec<String> =
            self.tensors.keys().filter(|k| !expected_keys.contains(k.as_str()) && !is_ignorable(k)).cloned().collect();
        let strict_problems = mode == LoadMode::Strict && (!missing.is_empty() || !unexpected.is_empty());
        if strict_problems || !mis_shaped.is_empty() || report.loaded.is_empty() {
            let mut detail = String::new();
            if !missing.is_empty() {
                detail += &format!("\n  missing ({}): {}", missing.len(), preview(&missing));
            }
            if !unexpected.is_empty() {
                detail += &format!("\n  unexpected ({}): {}", unexpected.len(), preview(&unexpected));
            }
            if !mis_shaped.is_empty() {
                detail += &format!("\n  shape mismatch ({}): {}", mis_shaped.len(), preview(&mis_shaped));
            }
            if report.loaded.is_empty() {
                detail += "\n  no tensor of the file fits the model";
            }
            return Err(WeightsError::Mismatch {
                path: self.source.clone(),
                detail,
                hint: self.hint(&missing, &unexpected),
            });
        }
        if mode == LoadMode::Partial {
            report.kept_initial = missing;
            report.unused = unexpected;
        }
        // Our own files are standard BN by construction; trained γ may legitimately be negative.
        let ours = self.metadata.get("format").is_some_and(|f| f == "skd");
        let negative = if ours { 0 } else { self.negative_bn_weights()? };
        if negative > 0 {
            report.warnings.push(format!(
                "{negative} BatchNorm weights are negative: if this is a released SKD (InPlace-ABN) checkpoint, \
                 load it with the inplace_abn convention"
            ));
        }
        Ok(report)
    }

    /// Why the keys might not fit, from their shape.
    fn hint(&self, missing: &[String], unexpected: &[String]) -> String {
        let has = |p: &str| self.tensors.keys().any(|k| k.starts_with(p));
        if has("head.0.") && !has("pspmodule.") {
            "\n  hint: the keys look like the segmentation-toolbox teacher layout; use the `toolbox` key layout".into()
        } else if unexpected.iter().any(|k| k.starts_with("fc."))
            || (has("layer1.") && !has("pspmodule.") && !missing.is_empty())
        {
            "\n  hint: this looks like an ImageNet backbone; load it as initialisation (the `imagenet` key layout, partial mode)".into()
        } else {
            String::new()
        }
    }

    /// BatchNorm weights (of prefixes owning a `running_mean`) below zero.
    fn negative_bn_weights(&self) -> Result<usize> {
        let mut n = 0;
        for key in self.tensors.keys().filter_map(|k| k.strip_suffix(".running_mean")) {
            if let Some(w) = self.tensors.get(&format!("{key}.weight")) {
                n += w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().filter(|&&v| v < 0.0).count();
            }
        }
        Ok(n)
    }

    /// The checked tensors on `device`, ready for `VarBuilder::from_tensors` (a frozen network).
    pub fn into_tensors(self, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.tensors.into_iter().map(|(k, t)| Ok((k, t.to_device(device)?))).collect()
    }

    /// Copies the checked tensors into the variables of `varmap` (a trainable network).
    pub fn load_into(&self, varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().expect("varmap lock");
        for (key, var) in data.iter() {
            if let Some(t) = self.tensors.get(key) {
                var.set(&t.to_device(var.device())?)?;
            }
        }
        Ok(())
    }
}

/// A `VarBuilder` backend that records what a network asks for and hands out zeros.
struct Recorder(std::sync::Arc<Mutex<ParamShapes>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().expect("recorder lock").push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every parameter and buffer that `build` asks its `VarBuilder` for, with its shape, sorted by
/// key, without initialising anything.
pub fn expected_params<T>(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> candle_core::Result<ParamShapes> {
    let recorded = std::sync::Arc::new(Mutex::new(Vec::new()));
    build(VarBuilder::from_backend(Box::new(Recorder(recorded.clone())), DType::F32, Device::Cpu))?;
    let mut params = std::mem::take(&mut *recorded.lock().expect("recorder lock"));
    params.sort();
    params.dedup();
    Ok(params)
}

/// Writes `tensors` as safetensors with `metadata`, atomically: a temp file beside `path`,
/// fsync, rename, fsync of the directory. A crash leaves the old file or the new one, whole.
pub fn save(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: HashMap<String, String>) -> Result<()> {
    let io = |source| WeightsError::Io { path: path.display().to_string(), source };
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(cpu, Some(metadata))
        .map_err(|e| WeightsError::Corrupt { path: path.display().to_string(), detail: e.to_string() })?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        std::process::id()
    ));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Persist the rename; not every platform can sync a directory, hence no error.
        let _ = d.sync_all();
    }
    Ok(())
}

/// The metadata every skd weights file carries.
pub fn skd_metadata(extra: impl IntoIterator<Item = (String, String)>) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = extra.into_iter().collect();
    m.insert("format".into(), "skd".into());
    m.insert("skd_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("bn_convention".into(), BnConvention::Standard.name().into());
    m
}

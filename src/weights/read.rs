//! Reading tensors from `.pth` (zip), safetensors and Hugging Face cache references.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::{Result, StateDict, WeightsError};

const HF_SCHEME: &str = "hf://";

/// Reads a weights file, or resolves `hf://owner/repo[@revision]/path/in/repo` through the
/// Hugging Face cache (`HF_HOME`, else `~/.cache/huggingface`) and reads that.
pub fn read(reference: &str) -> Result<StateDict> {
    if reference.starts_with(HF_SCHEME) {
        let path = resolve_hf(reference, &hf_hub::Cache::from_env())?;
        let mut sd = read_file(&path)?;
        sd.source = format!("{reference} ({})", path.display());
        return Ok(sd);
    }
    read_file(Path::new(reference))
}

/// The cached file of an `hf://owner/repo[@revision]/file` reference. Nothing is downloaded:
/// a file not in `cache` is an error that says how to fetch it.
pub fn resolve_hf(reference: &str, cache: &hf_hub::Cache) -> Result<PathBuf> {
    let bad = |detail: &str| WeightsError::NotCached { reference: reference.to_string(), detail: detail.to_string() };
    let rest = reference.strip_prefix(HF_SCHEME).ok_or_else(|| bad("not an hf:// reference"))?;
    let mut parts = rest.splitn(3, '/');
    let (owner, repo, file) = match (parts.next(), parts.next(), parts.next()) {
        (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() => (o, r, f),
        _ => return Err(bad("expected hf://owner/repo/path/to/file")),
    };
    let (repo, revision) = match repo.split_once('@') {
        Some((r, rev)) => (r, rev.to_string()),
        None => (repo, "main".to_string()),
    };
    let id = format!("{owner}/{repo}");
    let hf_repo = hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision.clone());
    cache.repo(hf_repo).get(file).ok_or_else(|| {
        bad(&format!(
            "not in the Hugging Face cache at {} (revision {revision}); skd reads the cache and downloads \
             nothing: fetch it once with `huggingface-cli download {id} {file}` (HF_HOME selects the cache), \
             or pass a local path",
            cache.path().display()
        ))
    })
}

/// Reads a `.pth` (zip format; the state dict at the top level or under `state_dict` / `model`)
/// or a safetensors file, told apart by their first bytes.
pub fn read_file(path: &Path) -> Result<StateDict> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io { path: name.clone(), source })?;
    let corrupt = |e: &dyn std::fmt::Display| WeightsError::Corrupt { path: name.clone(), detail: e.to_string() };
    if bytes.starts_with(b"PK\x03\x04") {
        let tensors = read_pth(path).map_err(|e| corrupt(&e))?;
        return Ok(StateDict { source: name, tensors, metadata: HashMap::new() });
    }
    // safetensors: a little-endian u64 header length, then a JSON object.
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if header_len.is_some_and(|n| n > 0) && bytes.get(8) == Some(&b'{') {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(&e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| corrupt(&e))?;
        return Ok(StateDict { source: name, tensors: tensors.into_iter().collect(), metadata });
    }
    if bytes.first() == Some(&0x80) {
        // A pickle protocol marker at byte 0: torch.save before 1.6 (or `_use_new_zipfile_serialization=False`).
        return Err(WeightsError::LegacyPth { path: name });
    }
    let detail = if bytes.is_empty() {
        "the file is empty".to_string()
    } else {
        format!("first bytes {:02x?}", &bytes[..bytes.len().min(8)])
    };
    Err(WeightsError::UnknownFormat { path: name, detail })
}

/// The tensors of a zip `.pth`, wherever the state dict sits.
fn read_pth(path: &Path) -> candle_core::Result<BTreeMap<String, candle_core::Tensor>> {
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(v) if !v.is_empty() => return Ok(v.into_iter().collect()),
            Ok(_) => continue,
            // A nested key that is not there: try the next layout.
            Err(e) if key.is_some() && e.to_string().contains("not found") => continue,
            Err(e) => return Err(e),
        }
    }
    candle_core::bail!("no tensors at the top level or under `state_dict` / `model`")
}

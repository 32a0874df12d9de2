//! The run's JSON-lines log and the process's memory, for the records people and tools read.

use std::io::Write;
use std::path::Path;

/// Appends one JSON object per line and flushes it, so a killed run keeps every line written.
pub struct JsonlLog {
    file: std::fs::File,
}

impl JsonlLog {
    pub fn append(path: &Path) -> std::io::Result<Self> {
        Ok(Self { file: std::fs::OpenOptions::new().create(true).append(true).open(path)? })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> std::io::Result<()> {
        writeln!(self.file, "{value}")?;
        self.file.flush()
    }
}

/// Resident memory of this process in MB (Linux; `None` elsewhere).
pub fn rss_mb() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1e6)
}

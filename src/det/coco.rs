//! The COCO instances format: ground truth (`images`, `annotations`, `categories`) and detection
//! results, read with errors that name the file, the position in it and the offending id.
//!
//! Boxes stay in COCO's `[x, y, w, h]` (absolute pixels, continuous). Category ids are
//! non-contiguous (1..90 in COCO); [`Instances::labels`] maps them, sorted, to the contiguous
//! labels 1..K the network predicts (0 = background; classifier channel k <-> label k + 1).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    /// serde_json's message carries the line and column.
    #[error("{path}: malformed JSON: {detail}")]
    Json { path: String, detail: String },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
}

pub type Result<T> = std::result::Result<T, CocoError>;

fn invalid(path: &Path, detail: impl std::fmt::Display) -> CocoError {
    CocoError::Invalid { path: path.display().to_string(), detail: detail.to_string() }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// The segmentation area in real COCO; what the evaluator's small/medium/large split uses.
    /// Missing: `w·h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<f64>,
    /// 0 or 1 in the files.
    #[serde(default)]
    pub iscrowd: u8,
}

impl Annotation {
    pub fn area(&self) -> f64 {
        self.area.unwrap_or(self.bbox[2] * self.bbox[3])
    }

    pub fn is_crowd(&self) -> bool {
        self.iscrowd != 0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// A ground-truth file: every annotation refers to an image and a category of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instances {
    /// pycocotools 2.0.9/2.0.10 fail in `loadRes` without it; written empty.
    #[serde(default)]
    pub info: serde_json::Value,
    #[serde(default)]
    pub licenses: Vec<serde_json::Value>,
    pub images: Vec<Image>,
    #[serde(default)]
    pub annotations: Vec<Annotation>,
    pub categories: Vec<Category>,
}

/// One detection in the results format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels of the original image.
    pub bbox: [f64; 4],
    pub score: f64,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CocoError::File { path: path.display().to_string(), detail: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| CocoError::Json { path: path.display().to_string(), detail: e.to_string() })
}

/// Writes `value` to `path` through a temporary file, so a reader never sees half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| CocoError::File { path: path.display().to_string(), detail: e.to_string() };
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let text = serde_json::to_string(value).map_err(|e| err(&e))?;
    std::fs::write(&tmp, text).map_err(|e| err(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(&e))
}

impl Instances {
    /// Reads and checks a ground-truth file: unique image, annotation and category ids, every
    /// annotation's image and category present, finite boxes, positive image sizes.
    pub fn read(path: &Path) -> Result<Self> {
        let instances: Self = read_json(path)?;
        instances.check(path)?;
        Ok(instances)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }

    /// The checks of [`Instances::read`]; `path` names the file in the errors.
    pub fn check(&self, path: &Path) -> Result<()> {
        let mut images = HashSet::new();
        for im in &self.images {
            if !images.insert(im.id) {
                return Err(invalid(path, format!("image id {} appears twice", im.id)));
            }
            if im.width == 0 || im.height == 0 {
                return Err(invalid(
                    path,
                    format!("image {} ({}) has size {}x{}", im.id, im.file_name, im.width, im.height),
                ));
            }
        }
        let mut categories = HashSet::new();
        for c in &self.categories {
            if !categories.insert(c.id) {
                return Err(invalid(path, format!("category id {} appears twice", c.id)));
            }
        }
        let mut annotations = HashSet::new();
        for a in &self.annotations {
            if !annotations.insert(a.id) {
                return Err(invalid(path, format!("annotation id {} appears twice", a.id)));
            }
            if !images.contains(&a.image_id) {
                return Err(invalid(
                    path,
                    format!("annotation {} refers to image {}, which is not in `images`", a.id, a.image_id),
                ));
            }
            if !categories.contains(&a.category_id) {
                return Err(invalid(
                    path,
                    format!("annotation {} has category id {}, which is not in `categories`", a.id, a.category_id),
                ));
            }
            if a.bbox.iter().any(|v| !v.is_finite()) || a.area.is_some_and(|v| !v.is_finite()) {
                return Err(invalid(path, format!("annotation {} has a non-finite bbox or area: {:?}", a.id, a.bbox)));
            }
        }
        Ok(())
    }

    /// Category ids sorted; label `k + 1` is `category_ids()[k]`.
    pub fn category_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.categories.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids
    }

    /// Category id -> contiguous label 1..K.
    pub fn labels(&self) -> HashMap<u64, usize> {
        self.category_ids().into_iter().enumerate().map(|(k, id)| (id, k + 1)).collect()
    }

    /// The annotations of each image, in file order.
    pub fn annotations_by_image(&self) -> HashMap<u64, Vec<&Annotation>> {
        let mut by_image: HashMap<u64, Vec<&Annotation>> = self.images.iter().map(|im| (im.id, Vec::new())).collect();
        for a in &self.annotations {
            by_image.entry(a.image_id).or_default().push(a);
        }
        by_image
    }
}

/// Reads a detections file (the results format: a list) and checks it against the ground
/// truth: every image id must be one of its images (as pycocotools' `loadRes` asserts) and every
/// category id one of its categories; boxes and scores finite.
pub fn read_detections(path: &Path, gt: &Instances) -> Result<Vec<Detection>> {
    let detections: Vec<Detection> = read_json(path)?;
    let images: HashSet<u64> = gt.images.iter().map(|im| im.id).collect();
    let categories: HashSet<u64> = gt.categories.iter().map(|c| c.id).collect();
    for (i, d) in detections.iter().enumerate() {
        if !images.contains(&d.image_id) {
            return Err(invalid(
                path,
                format!("detection {i} refers to image {}, which the ground truth lacks", d.image_id),
            ));
        }
        if !categories.contains(&d.category_id) {
            return Err(invalid(
                path,
                format!("detection {i} has category id {}, which the ground truth lacks", d.category_id),
            ));
        }
        if d.bbox.iter().any(|v| !v.is_finite()) || !d.score.is_finite() {
            return Err(invalid(path, format!("detection {i} has a non-finite bbox or score")));
        }
    }
    Ok(detections)
}

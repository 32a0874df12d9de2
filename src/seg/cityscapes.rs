//! The Cityscapes dataset: its label table, its file layout, and reading one sample.
//!
//! Layout (the real one, which the synthetic set copies):
//! `leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png` with
//! `gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png` when present, else
//! `..._gtFine_labelIds.png` mapped through the 34 -> 19 table (everything else -> 255). A list
//! file (the reference's `train.lst`: `image_path label_path` per line, relative to the root)
//! can fix the samples instead.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::loss::IGNORE_LABEL;

/// The 19 evaluated classes, in train-id order.
pub const CLASS_NAMES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// The label id of each train id (cityscapesScripts `labels.py`).
pub const TRAIN_TO_LABEL_ID: [u8; 19] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33];

/// The colour of each train id (cityscapesScripts `labels.py`), for people to look at.
pub const TRAIN_COLORS: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// Label ids 0..=33 exist; 34.. (and 255 in a labelIds file) do not.
pub const NUM_LABEL_IDS: usize = 34;

/// `LABEL_TO_TRAIN[id]` = the train id of a label id, or 255 for the ignored ones.
pub const LABEL_TO_TRAIN: [u8; NUM_LABEL_IDS] = {
    let mut t = [IGNORE_LABEL as u8; NUM_LABEL_IDS];
    let mut i = 0;
    while i < TRAIN_TO_LABEL_ID.len() {
        t[TRAIN_TO_LABEL_ID[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// The BGR mean subtracted from 0..255 images (no std division), as the released code.
pub const BGR_MEAN: [f64; 3] = [104.00698793, 116.66876762, 122.67891434];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("{path}: missing label {label}")]
    MissingLabel { path: String, label: String },
    #[error("{image}: image is {image_hw:?} but its label {label} is {label_hw:?} (H, W)")]
    SizeMismatch { image: String, image_hw: (u32, u32), label: String, label_hw: (u32, u32) },
    #[error("{path}: label value {value} at (y {y}, x {x}) is not a Cityscapes {what}")]
    BadLabel { path: String, value: u8, y: usize, x: usize, what: &'static str },
    #[error("{root}: no images for split {split:?} (expected {expected})")]
    EmptySplit { root: String, split: String, expected: String },
}

pub type Result<T> = std::result::Result<T, DataError>;

fn file_err(path: &Path, detail: impl std::fmt::Display) -> DataError {
    DataError::File { path: path.display().to_string(), detail: detail.to_string() }
}

/// How a label file stores classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LabelKind {
    /// `*_gtFine_labelIds.png`: ids 0..=33.
    LabelIds,
    /// `*_gtFine_labelTrainIds.png`: 0..=18 and 255.
    TrainIds,
}

/// One image and its label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// `{city}_{seq}_{frame}`.
    pub name: String,
    pub image: PathBuf,
    pub label: PathBuf,
    pub kind: LabelKind,
}

/// The samples of one split, sorted by name.
#[derive(Debug, Clone)]
pub struct Split {
    pub root: PathBuf,
    pub split: String,
    pub samples: Vec<Sample>,
}

const IMAGE_SUFFIX: &str = "_leftImg8bit.png";

fn sorted_dir(path: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| file_err(path, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| file_err(path, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    Ok(entries)
}

/// The label file of an image, preferring train ids.
fn label_for(root: &Path, split: &str, city: &str, name: &str) -> Option<(PathBuf, LabelKind)> {
    let dir = root.join("gtFine").join(split).join(city);
    let train = dir.join(format!("{name}_gtFine_labelTrainIds.png"));
    if train.is_file() {
        return Some((train, LabelKind::TrainIds));
    }
    let ids = dir.join(format!("{name}_gtFine_labelIds.png"));
    ids.is_file().then_some((ids, LabelKind::LabelIds))
}

impl Split {
    /// Finds the samples of `split` under `root` in the Cityscapes layout. Images without a
    /// label are an error naming them (all of them at once).
    pub fn discover(root: &Path, split: &str) -> Result<Self> {
        let images_dir = root.join("leftImg8bit").join(split);
        let expected = format!("{}/<city>/*{IMAGE_SUFFIX}", images_dir.display());
        if !images_dir.is_dir() {
            return Err(DataError::EmptySplit { root: root.display().to_string(), split: split.into(), expected });
        }
        let mut samples = Vec::new();
        let mut missing = Vec::new();
        for city_dir in sorted_dir(&images_dir)?.into_iter().filter(|p| p.is_dir()) {
            let city = city_dir.file_name().map(|c| c.to_string_lossy().to_string()).unwrap_or_default();
            for image in sorted_dir(&city_dir)? {
                let Some(name) = image.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(IMAGE_SUFFIX))
                else {
                    continue;
                };
                match label_for(root, split, &city, name) {
                    Some((label, kind)) => samples.push(Sample { name: name.to_string(), image, label, kind }),
                    None => missing.push(image),
                }
            }
        }
        if let Some(first) = missing.first() {
            let more =
                if missing.len() > 1 { format!(" (and {} more images)", missing.len() - 1) } else { String::new() };
            return Err(DataError::MissingLabel {
                path: first.display().to_string(),
                label: format!("gtFine/{split}/<city>/<name>_gtFine_labelIds.png{more}"),
            });
        }
        if samples.is_empty() {
            return Err(DataError::EmptySplit { root: root.display().to_string(), split: split.into(), expected });
        }
        Ok(Self { root: root.to_path_buf(), split: split.to_string(), samples })
    }

    /// Reads a list file of `image_path label_path` lines relative to `root` (the reference's
    /// `train.lst`); the label kind follows the label's file name.
    pub fn from_list(root: &Path, list: &Path, split: &str) -> Result<Self> {
        let text = std::fs::read_to_string(list).map_err(|e| file_err(list, e))?;
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let mut parts = line.split_whitespace();
            let (Some(image), Some(label), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(file_err(list, format!("line {}: expected `image_path label_path`, got {line:?}", i + 1)));
            };
            let (image, label) = (root.join(image), root.join(label));
            for p in [&image, &label] {
                if !p.is_file() {
                    return Err(file_err(list, format!("line {}: {} does not exist", i + 1, p.display())));
                }
            }
            let kind = if label.to_string_lossy().contains("labelTrainIds") {
                LabelKind::TrainIds
            } else {
                LabelKind::LabelIds
            };
            let name = image
                .file_name()
                .map(|f| f.to_string_lossy().trim_end_matches(IMAGE_SUFFIX).to_string())
                .unwrap_or_default();
            samples.push(Sample { name, image, label, kind });
        }
        if samples.is_empty() {
            return Err(DataError::EmptySplit {
                root: root.display().to_string(),
                split: split.into(),
                expected: list.display().to_string(),
            });
        }
        Ok(Self { root: root.to_path_buf(), split: split.to_string(), samples })
    }
}

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// A train-id map (0..=18, 255), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// Reads an RGB PNG.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| file_err(path, format!("cannot decode image: {e}")))?.into_rgb8();
    let (w, h) = img.dimensions();
    Ok(RgbImage { height: h as usize, width: w as usize, data: img.into_raw() })
}

/// Reads a single-channel 8-bit PNG as raw values.
pub fn read_gray(path: &Path) -> Result<LabelMap> {
    let img = image::open(path).map_err(|e| file_err(path, format!("cannot decode label: {e}")))?;
    if !matches!(img.color(), image::ColorType::L8) {
        return Err(file_err(path, format!("expected an 8-bit single-channel PNG, found {:?}", img.color())));
    }
    let img = img.into_luma8();
    let (w, h) = img.dimensions();
    Ok(LabelMap { height: h as usize, width: w as usize, data: img.into_raw() })
}

/// Maps label ids to train ids in place; a value outside 0..=33 is an error naming the pixel.
pub fn label_ids_to_train_ids(map: &mut LabelMap, path: &Path) -> Result<()> {
    for (i, v) in map.data.iter_mut().enumerate() {
        *v = *LABEL_TO_TRAIN.get(*v as usize).ok_or_else(|| DataError::BadLabel {
            path: path.display().to_string(),
            value: *v,
            y: i / map.width,
            x: i % map.width,
            what: "label id (0..=33)",
        })?;
    }
    Ok(())
}

/// Reads a sample's label as train ids, checking its values.
pub fn read_label(sample: &Sample) -> Result<LabelMap> {
    let mut map = read_gray(&sample.label)?;
    match sample.kind {
        LabelKind::LabelIds => label_ids_to_train_ids(&mut map, &sample.label)?,
        LabelKind::TrainIds => {
            if let Some(i) = map.data.iter().position(|&v| v >= 19 && v != IGNORE_LABEL as u8) {
                return Err(DataError::BadLabel {
                    path: sample.label.display().to_string(),
                    value: map.data[i],
                    y: i / map.width,
                    x: i % map.width,
                    what: "train id (0..=18 or 255)",
                });
            }
        }
    }
    Ok(map)
}

/// Reads a sample's image and label and checks that their sizes agree.
pub fn read_sample(sample: &Sample) -> Result<(RgbImage, LabelMap)> {
    let image = read_rgb(&sample.image)?;
    let label = read_label(sample)?;
    if (image.height, image.width) != (label.height, label.width) {
        return Err(DataError::SizeMismatch {
            image: sample.image.display().to_string(),
            image_hw: (image.height as u32, image.width as u32),
            label: sample.label.display().to_string(),
            label_hw: (label.height as u32, label.width as u32),
        });
    }
    Ok((image, label))
}

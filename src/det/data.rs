//! COCO-format detection samples as the official FCOS code makes them (maskrcnn-benchmark's
//! `COCODataset` and `build_transforms`), and a loader that decodes, resizes and batches them in
//! parallel ahead of the training step.
//!
//! Per image: boxes in the legacy convention (`x2 = x + w - 1`), crowd annotations dropped,
//! boxes clipped to the image and empty ones dropped; the shorter side resized to `min_size`
//! unless the longer would pass `max_size` (`Resize.get_size`), bilinear with PIL's antialiasing,
//! boxes scaled per axis; training only: a horizontal flip with probability `flip`; then
//! normalised (`CaffeBgr` as run). A batch is zero-padded bottom/right to its largest image,
//! rounded up to a multiple of `size_divisibility`. Training drops the images without a usable
//! annotation (`has_valid_annotation`); evaluation keeps every image. Every random choice comes
//! from `SplitMix64::derive([seed, iteration, slot])` and the sample order from the per-epoch
//! shuffle of the segmentation loader, so a run is reproducible and can resume at any iteration.
//!
//! Call graph: `DetDataset::open` (read, filter, check files) -> `Loader::{train, eval}` ->
//! background thread: `train_picks`/`eval_picks` -> `prepare` (rayon, per image) -> `collate`
//! -> caller's thread: `HostBatch::upload` -> [`DetBatch`].

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coco::{CocoError, Instances};
pub use super::targets::GtBoxes;
use crate::nn::SplitMix64;
use crate::train::sample_index;

/// The BGR mean of the Caffe2/MSRA ImageNet weights (`INPUT.PIXEL_MEAN`), 0..255.
pub const CAFFE_BGR_MEAN: [f32; 3] = [102.9801, 115.9465, 122.7717];
/// torchvision's ImageNet RGB mean and std, 0..1.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Coco(#[from] CocoError),
    #[error(
        "{annotations}: image {image_id}: {path} does not exist{more}; check the image directory the annotations go with"
    )]
    MissingImage { annotations: String, image_id: u64, path: String, more: String },
    #[error("{path}: image {image_id}: {detail}")]
    Image { path: String, image_id: u64, detail: String },
    #[error("{path}: image {image_id} is {decoded_w}x{decoded_h} (WxH) but {annotations} says {json_w}x{json_h}")]
    SizeMismatch {
        path: String,
        image_id: u64,
        decoded_w: usize,
        decoded_h: usize,
        annotations: String,
        json_w: usize,
        json_h: usize,
    },
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("input config: {0}")]
    Config(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// How pixels become network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// For the Caffe2/MSRA weights (as run): BGR, 0..255, minus [`CAFFE_BGR_MEAN`], std 1.
    #[default]
    CaffeBgr,
    /// For torchvision weights: RGB / 255, minus [`IMAGENET_MEAN`], over [`IMAGENET_STD`].
    ImageNet,
}

impl Normalize {
    /// The three input planes' values of one RGB pixel.
    fn planes(self, rgb: [u8; 3]) -> [f32; 3] {
        match self {
            Normalize::CaffeBgr => std::array::from_fn(|c| rgb[2 - c] as f32 - CAFFE_BGR_MEAN[c]),
            Normalize::ImageNet => {
                std::array::from_fn(|c| (rgb[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
            }
        }
    }
}

/// The input settings (defaults as the official 1x configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    /// The shorter side after resizing (`INPUT.MIN_SIZE_TRAIN`/`_TEST`).
    pub min_size: usize,
    /// The cap on the longer side (`INPUT.MAX_SIZE_TRAIN`/`_TEST`).
    pub max_size: usize,
    /// Probability of a horizontal flip; training only.
    pub flip: f64,
    /// Padded batch sides are multiples of this (`DATALOADER.SIZE_DIVISIBILITY`; 0 or 1: none).
    pub size_divisibility: usize,
    pub normalize: Normalize,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self { min_size: 800, max_size: 1333, flip: 0.5, size_divisibility: 32, normalize: Normalize::CaffeBgr }
    }
}

impl InputConfig {
    pub fn check(&self) -> Result<()> {
        if self.min_size == 0 || self.max_size == 0 {
            return Err(DataError::Config(format!(
                "min_size ({}) and max_size ({}) must be positive",
                self.min_size, self.max_size
            )));
        }
        if !(0.0..=1.0).contains(&self.flip) {
            return Err(DataError::Config(format!("flip = {} is not a probability (0 to 1)", self.flip)));
        }
        Ok(())
    }
}

/// maskrcnn-benchmark `Resize.get_size`: the `(h, w)` an `(h, w)` image is resized to. The
/// shorter side becomes `min_size`, unless the longer side would then pass `max_size`: then the
/// shorter side is `round(max_size · short / long)` (Python's `round`: ties to even). The
/// longer side is `int(shorter · long / short)`, truncated.
pub fn resized_size((h, w): (usize, usize), min_size: usize, max_size: usize) -> (usize, usize) {
    let (short, long) = (h.min(w) as f64, h.max(w) as f64);
    let mut size = min_size;
    if long / short * size as f64 > max_size as f64 {
        size = ((max_size as f64 * short / long).round_ties_even() as usize).max(1);
    }
    if w < h {
        (((size * h) as f64 / w as f64) as usize, size)
    } else {
        (size, ((size * w) as f64 / h as f64) as usize)
    }
}

/// COCO `[x, y, w, h]` -> the legacy xyxy `[x, y, x + w - 1, y + h - 1]` (in f32, as the
/// reference's tensors). [`xyxy_to_coco`] is the inverse.
pub fn coco_to_xyxy(bbox: [f64; 4]) -> [f32; 4] {
    let [x, y, w, h] = bbox.map(|v| v as f32);
    [x, y, x + w - 1.0, y + h - 1.0]
}

/// Legacy xyxy -> COCO `[x, y, x2 - x1 + 1, y2 - y1 + 1]`, as detections are written.
pub fn xyxy_to_coco(b: [f32; 4]) -> [f64; 4] {
    let [x1, y1, x2, y2] = b;
    [x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0].map(f64::from)
}

/// A box of an `from = (h, w)` image in a resized `to = (h, w)` one: x by `to_w / from_w`, y by
/// `to_h / from_h` (`BoxList.resize`). Detections go back with `from` and `to` swapped.
pub fn scale_xyxy(b: [f32; 4], from: (usize, usize), to: (usize, usize)) -> [f32; 4] {
    let sx = (to.1 as f64 / from.1 as f64) as f32;
    let sy = (to.0 as f64 / from.0 as f64) as f32;
    [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]
}

/// A box of a `width`-wide image, mirrored left-right (`BoxList.transpose`, legacy `-1`).
/// Its own inverse.
pub fn flip_xyxy(b: [f32; 4], width: usize) -> [f32; 4] {
    let w = width as f32;
    [w - b[2] - 1.0, b[1], w - b[0] - 1.0, b[3]]
}

/// A box clamped to the pixels of an `(h, w)` image: x in `[0, w - 1]`, y in `[0, h - 1]`.
pub fn clip_xyxy(b: [f32; 4], (h, w): (usize, usize)) -> [f32; 4] {
    let (xm, ym) = (w as f32 - 1.0, h as f32 - 1.0);
    [b[0].clamp(0.0, xm), b[1].clamp(0.0, ym), b[2].clamp(0.0, xm), b[3].clamp(0.0, ym)]
}

/// `BoxList.remove_empty`'s test: nothing left between the corners.
fn is_empty(b: [f32; 4]) -> bool {
    !(b[2] > b[0] && b[3] > b[1])
}

/// One image of the dataset, its targets in its own pixels (clipped, crowd ones dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image_id: u64,
    pub path: PathBuf,
    /// `(h, w)` as the annotations file says.
    pub size: (usize, usize),
    pub gt: GtBoxes,
}

/// What opening a dataset kept and dropped, and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DataReport {
    pub annotations: String,
    pub images_in_file: usize,
    /// Images in the dataset.
    pub images: usize,
    /// Training only: images without any annotation, dropped.
    pub unannotated_images: usize,
    /// Training only: images whose boxes (crowd ones included) all have w <= 1 or h <= 1, dropped.
    pub tiny_box_images: usize,
    /// Boxes used as targets.
    pub boxes: usize,
    /// Crowd annotations: not targets (the reference does not use them as ignore regions either).
    pub crowd: usize,
    /// Boxes partly outside their image, clipped to it and kept.
    pub clipped: usize,
    /// Annotation ids of boxes with w <= 1 or h <= 1 (empty as legacy xyxy), dropped.
    pub degenerate: Vec<u64>,
    /// Annotation ids of boxes with nothing inside their image, dropped.
    pub outside: Vec<u64>,
}

/// The first few ids of a list, and how many more.
fn preview(ids: &[u64]) -> String {
    const SHOWN: usize = 6;
    let head = ids.iter().take(SHOWN).map(|id| id.to_string()).collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN { format!("{head}, ... ({} more)", ids.len() - SHOWN) } else { head }
}

impl DataReport {
    /// One line per kind of dropped box, naming the file and a few annotation ids.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.degenerate.is_empty() {
            out.push(format!(
                "{}: dropped {} degenerate boxes (w <= 1 or h <= 1 pixel): annotation ids {}",
                self.annotations,
                self.degenerate.len(),
                preview(&self.degenerate)
            ));
        }
        if !self.outside.is_empty() {
            out.push(format!(
                "{}: dropped {} boxes outside their image (empty after clipping to it): annotation ids {}",
                self.annotations,
                self.outside.len(),
                preview(&self.outside)
            ));
        }
        out
    }
}

impl std::fmt::Display for DataReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {} images, {} boxes", self.images, self.images_in_file, self.boxes)?;
        let dropped = [
            (self.unannotated_images, "images without annotations"),
            (self.tiny_box_images, "images with only boxes of w or h <= 1"),
            (self.crowd, "crowd annotations"),
            (self.degenerate.len(), "degenerate boxes"),
            (self.outside.len(), "boxes outside their image"),
        ];
        for (n, what) in dropped.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, "; dropped {n} {what}")?;
        }
        if self.clipped > 0 {
            write!(f, "; clipped {} boxes to their image", self.clipped)?;
        }
        Ok(())
    }
}

/// Which sample fills a batch slot, and whether it is flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub flip: bool,
}

/// A COCO-format split ready to be batched.
#[derive(Debug, Clone)]
pub struct DetDataset {
    pub annotations: PathBuf,
    pub train: bool,
    pub cfg: InputConfig,
    /// Sorted by image id (as `COCODataset`).
    pub samples: Vec<Sample>,
    /// Label `k` (1..K) is category `category_ids[k - 1]`.
    pub category_ids: Vec<u64>,
    pub report: DataReport,
}

impl DetDataset {
    /// Reads `annotations` (images under `image_root`) as the training (`train`) or evaluation
    /// split and checks that every image file exists, so a run fails before it starts.
    pub fn open(annotations: &Path, image_root: &Path, train: bool, cfg: InputConfig) -> Result<Self> {
        cfg.check()?;
        let instances = Instances::read(annotations)?;
        let labels = instances.labels();
        let by_image = instances.annotations_by_image();
        let mut images: Vec<_> = instances.images.iter().collect();
        images.sort_by_key(|im| im.id);
        let mut report = DataReport {
            annotations: annotations.display().to_string(),
            images_in_file: images.len(),
            ..DataReport::default()
        };
        let mut samples = Vec::new();
        let mut missing = Vec::new();
        for im in images {
            let anns = &by_image[&im.id];
            // maskrcnn-benchmark `has_valid_annotation`, before crowd annotations are dropped.
            if train && anns.is_empty() {
                report.unannotated_images += 1;
                continue;
            }
            if train && anns.iter().all(|a| a.bbox[2] <= 1.0 || a.bbox[3] <= 1.0) {
                report.tiny_box_images += 1;
                continue;
            }
            let size = (im.height as usize, im.width as usize);
            let mut gt = GtBoxes::default();
            for a in anns {
                if a.is_crowd() {
                    report.crowd += 1;
                    continue;
                }
                let b = coco_to_xyxy(a.bbox);
                let clipped = clip_xyxy(b, size);
                if is_empty(b) {
                    report.degenerate.push(a.id);
                } else if is_empty(clipped) {
                    report.outside.push(a.id);
                } else {
                    report.clipped += usize::from(clipped != b);
                    gt.boxes.push(clipped);
                    gt.labels.push(labels[&a.category_id] as u32);
                }
            }
            report.boxes += gt.boxes.len();
            let path = image_root.join(&im.file_name);
            if !path.is_file() {
                missing.push((im.id, path.clone()));
            }
            samples.push(Sample { image_id: im.id, path, size, gt });
        }
        if let Some((image_id, path)) = missing.first() {
            let more =
                if missing.len() > 1 { format!(" (and {} more images)", missing.len() - 1) } else { String::new() };
            return Err(DataError::MissingImage {
                annotations: report.annotations,
                image_id: *image_id,
                path: path.display().to_string(),
                more,
            });
        }
        if samples.is_empty() {
            return Err(DataError::File {
                path: report.annotations.clone(),
                detail: format!("no usable images ({report})"),
            });
        }
        report.images = samples.len();
        Ok(Self {
            annotations: annotations.to_path_buf(),
            train,
            cfg,
            samples,
            category_ids: instances.category_ids(),
            report,
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples of training iteration `iteration`: a fresh shuffle every epoch, the flips
    /// drawn from `(seed, iteration, slot)`.
    pub fn train_picks(&self, seed: u64, batch: usize, iteration: usize) -> Vec<Pick> {
        (0..batch)
            .map(|slot| {
                let mut rng = SplitMix64::derive(&[seed, iteration as u64, slot as u64]);
                Pick {
                    index: sample_index(self.samples.len(), seed, batch, iteration, slot),
                    flip: rng.uniform() < self.cfg.flip,
                }
            })
            .collect()
    }

    /// Every sample once, in order, `batch` at a time (the last batch may be smaller), unflipped.
    pub fn eval_picks(&self, batch: usize) -> Vec<Vec<Pick>> {
        let picks: Vec<Pick> = (0..self.samples.len()).map(|index| Pick { index, flip: false }).collect();
        picks.chunks(batch.max(1)).map(<[Pick]>::to_vec).collect()
    }

    /// Decodes, resizes, normalises and pads the picked samples (decoding in parallel).
    pub fn batch(&self, picks: &[Pick], device: &Device) -> Result<DetBatch> {
        self.host_batch(picks)?.upload(device)
    }

    fn host_batch(&self, picks: &[Pick]) -> Result<HostBatch> {
        let prepared = picks.par_iter().map(|&p| self.prepare(p)).collect::<Result<Vec<_>>>()?;
        Ok(collate(prepared, self.cfg.size_divisibility))
    }

    /// One sample as network input.
    fn prepare(&self, Pick { index, flip }: Pick) -> Result<Prepared> {
        let sample = &self.samples[index];
        let image_err = |detail: String| DataError::Image {
            path: sample.path.display().to_string(),
            image_id: sample.image_id,
            detail,
        };
        // By content, not by extension: a PNG named `.jpg` still reads.
        let img = image::ImageReader::open(&sample.path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| image_err(format!("cannot read: {e}")))?
            .decode()
            .map_err(|e| image_err(format!("cannot decode: {e}")))?
            .into_rgb8();
        let decoded = (img.height() as usize, img.width() as usize);
        if decoded != sample.size {
            return Err(DataError::SizeMismatch {
                path: sample.path.display().to_string(),
                image_id: sample.image_id,
                decoded_w: decoded.1,
                decoded_h: decoded.0,
                annotations: self.annotations.display().to_string(),
                json_w: sample.size.1,
                json_h: sample.size.0,
            });
        }
        let (h, w) = resized_size(sample.size, self.cfg.min_size, self.cfg.max_size);
        // PIL's bilinear (what torchvision's resize does to the reference's PIL images) widens
        // its kernel when shrinking; the image crate's triangle filter does the same.
        let img = if (h, w) == decoded {
            img
        } else {
            image::imageops::resize(&img, w as u32, h as u32, FilterType::Triangle)
        };
        let mut pixels = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            let x = if flip { w - 1 - x as usize } else { x as usize };
            for (c, v) in self.cfg.normalize.planes(p.0).into_iter().enumerate() {
                pixels[(c * h + y as usize) * w + x] = v;
            }
        }
        let boxes = sample
            .gt
            .boxes
            .iter()
            .map(|&b| {
                let b = scale_xyxy(b, sample.size, (h, w));
                if flip { flip_xyxy(b, w) } else { b }
            })
            .collect();
        Ok(Prepared {
            image_id: sample.image_id,
            original_size: sample.size,
            size: (h, w),
            pixels,
            gt: GtBoxes { boxes, labels: sample.gt.labels.clone() },
        })
    }
}

/// One image as network input, before batching.
struct Prepared {
    image_id: u64,
    original_size: (usize, usize),
    size: (usize, usize),
    /// `[3, h, w]` normalised values.
    pixels: Vec<f32>,
    gt: GtBoxes,
}

/// A batch on the host: made on the loader's thread, uploaded on the caller's.
struct HostBatch {
    /// `[B, 3, H, W]` values.
    images: Vec<f32>,
    shape: (usize, usize, usize, usize),
    image_sizes: Vec<(usize, usize)>,
    original_sizes: Vec<(usize, usize)>,
    gt: Vec<GtBoxes>,
    image_ids: Vec<u64>,
}

/// Stacks prepared images, zero-padding bottom/right to the largest, rounded up to a multiple
/// of `divisibility` (maskrcnn-benchmark `to_image_list`).
fn collate(prepared: Vec<Prepared>, divisibility: usize) -> HostBatch {
    let round_up = |n: usize| if divisibility > 1 { n.div_ceil(divisibility) * divisibility } else { n };
    let ph = round_up(prepared.iter().map(|p| p.size.0).max().unwrap_or(0));
    let pw = round_up(prepared.iter().map(|p| p.size.1).max().unwrap_or(0));
    let b = prepared.len();
    let mut images = vec![0f32; b * 3 * ph * pw];
    let mut out = HostBatch {
        images: Vec::new(),
        shape: (b, 3, ph, pw),
        image_sizes: Vec::with_capacity(b),
        original_sizes: Vec::with_capacity(b),
        gt: Vec::with_capacity(b),
        image_ids: Vec::with_capacity(b),
    };
    for (i, p) in prepared.into_iter().enumerate() {
        let (h, w) = p.size;
        for c in 0..3 {
            for y in 0..h {
                let dst = ((i * 3 + c) * ph + y) * pw;
                images[dst..dst + w].copy_from_slice(&p.pixels[(c * h + y) * w..(c * h + y + 1) * w]);
            }
        }
        out.image_sizes.push(p.size);
        out.original_sizes.push(p.original_size);
        out.gt.push(p.gt);
        out.image_ids.push(p.image_id);
    }
    out.images = images;
    out
}

impl HostBatch {
    fn upload(self, device: &Device) -> Result<DetBatch> {
        Ok(DetBatch {
            images: Tensor::from_vec(self.images, self.shape, device)?,
            image_sizes: self.image_sizes,
            original_sizes: self.original_sizes,
            gt: self.gt,
            image_ids: self.image_ids,
        })
    }
}

/// A batch of network inputs and their targets.
#[derive(Debug, Clone)]
pub struct DetBatch {
    /// `[B, 3, H, W]` normalised, zero-padded bottom/right; H and W are multiples of
    /// `size_divisibility`.
    pub images: Tensor,
    /// Each image's resized `(h, w)` before padding: detections are clipped to it.
    pub image_sizes: Vec<(usize, usize)>,
    /// Each image's `(h, w)` in its file: a detection goes back with
    /// `scale_xyxy(b, image_sizes[i], original_sizes[i])`, then [`xyxy_to_coco`].
    pub original_sizes: Vec<(usize, usize)>,
    /// Targets in the network input (resized, flipped with the image).
    pub gt: Vec<GtBoxes>,
    pub image_ids: Vec<u64>,
}

/// Batches made by a background thread `prefetch` ahead, uploaded to `device` as they are taken.
pub struct Loader {
    rx: Receiver<Result<HostBatch>>,
    device: Device,
}

impl Loader {
    /// The training batches of iterations `range`.
    pub fn train(
        dataset: Arc<DetDataset>,
        seed: u64,
        batch: usize,
        range: Range<usize>,
        prefetch: usize,
        device: Device,
    ) -> Self {
        let ds = dataset.clone();
        Self::spawn(dataset, range.map(move |it| ds.train_picks(seed, batch, it)), prefetch, device)
    }

    /// The whole split in order, `batch` images at a time.
    pub fn eval(dataset: Arc<DetDataset>, batch: usize, prefetch: usize, device: Device) -> Self {
        let picks = dataset.eval_picks(batch);
        Self::spawn(dataset, picks.into_iter(), prefetch, device)
    }

    fn spawn(
        dataset: Arc<DetDataset>,
        jobs: impl Iterator<Item = Vec<Pick>> + Send + 'static,
        prefetch: usize,
        device: Device,
    ) -> Self {
        let (tx, rx): (SyncSender<Result<HostBatch>>, _) = sync_channel(prefetch.max(1));
        std::thread::spawn(move || {
            for picks in jobs {
                let b = dataset.host_batch(&picks);
                let failed = b.is_err();
                // A closed channel means the consumer stopped: nothing left to do.
                if tx.send(b).is_err() || failed {
                    break;
                }
            }
        });
        Self { rx, device }
    }
}

impl Iterator for Loader {
    type Item = Result<DetBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok().map(|b| b.and_then(|b| b.upload(&self.device)))
    }
}

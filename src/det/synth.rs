//! A synthetic COCO-format detection set in the real layout: the quick start's and the tests'
//! embedded dataset (no downloads).
//!
//! Layout: `annotations/instances_{train,val}.json` and `{train,val}/{image id:012}.jpg`
//! (`info: {}`, `licenses: []`; image ids are disjoint across the splits, as in COCO).
//!
//! Each image: a textured background (value noise, a gradient or stripes, all of low
//! saturation), then a few shapes, largest first, each placed only if every shape under it keeps
//! at least 60% of its pixels visible. The shape decides the category: disc, square, triangle,
//! ring or cross, with the non-contiguous ids of [`CATEGORIES`]. Colours lean to a hue per
//! category but overlap their neighbours', and stand out in brightness from the background.
//! Long sides are log-uniform from 10 px to 90% of the longer image side (the shorter side is
//! capped at 95% of the image's), so at `min_size` 256-320 every level from P3 to P6 gets
//! positives (P7 needs an object farther than 512 px from a location, which these inputs lack).
//! Shapes may be cut by the image border. A quarter of the images get a crowd: a cluster of tiny
//! shapes of one category under one `iscrowd = 1` box; every twelfth image has no objects. As in
//! real COCO, a box is the tight box of the visible pixels and `area` their count.

use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coco::{Annotation, Category, Image, Instances};
use super::data::{DataError, Result};
use crate::nn::SplitMix64;

/// `(category id, name)`; the index is the shape drawn.
pub const CATEGORIES: [(u64, &str); 5] = [(1, "disc"), (3, "square"), (7, "triangle"), (18, "ring"), (44, "cross")];

/// The hue (degrees) each category's colours lean to, ±30.
const HUES: [f32; 5] = [0.0, 215.0, 120.0, 45.0, 285.0];

/// What to write (defaults: the README experiment's set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub train_images: usize,
    pub val_images: usize,
    /// The largest image width; each image's is drawn from 5/8 of it to all of it (an eighth of
    /// the images are then turned portrait).
    pub width: usize,
    /// The largest image height, drawn likewise.
    pub height: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { train_images: 64, val_images: 16, width: 512, height: 384, seed: 0 }
    }
}

/// What one split holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SplitSummary {
    pub images: usize,
    pub empty_images: usize,
    /// Annotations, crowd ones included.
    pub annotations: usize,
    pub crowd: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthSummary {
    pub train: SplitSummary,
    pub val: SplitSummary,
}

impl std::fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in [("train", &self.train), ("val", &self.val)] {
            writeln!(
                f,
                "{name}: {} images ({} without objects), {} annotations ({} crowd)",
                s.images, s.empty_images, s.annotations, s.crowd
            )?;
        }
        Ok(())
    }
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> DataError {
    DataError::File { path: path.display().to_string(), detail: detail.to_string() }
}

fn between(rng: &mut SplitMix64, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.uniform() as f32
}

/// HSV (hue in degrees, s and v in 0..1) -> RGB 0..255.
fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    [r, g, b].map(|u| (u + v - c) * 255.0)
}

/// Luminance 0..1 (Rec. 601).
fn luma(c: [f32; 3]) -> f32 {
    (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0
}

/// A textured background of `h x w` and its mean luminance.
fn background(h: usize, w: usize, rng: &mut SplitMix64) -> (Vec<[f32; 3]>, f32) {
    let base = hsv(between(rng, 0.0, 360.0), between(rng, 0.0, 0.3), between(rng, 0.25, 0.85));
    let theta = between(rng, 0.0, std::f32::consts::PI);
    let (cos, sin) = (theta.cos(), theta.sin());
    let mut pixels = vec![base; h * w];
    match rng.below(3) {
        // Value noise: random levels on a coarse grid, bilinearly interpolated.
        0 => {
            let cell = 12.0 + rng.below(36) as f32;
            let (gw, gh) = ((w as f32 / cell) as usize + 2, (h as f32 / cell) as usize + 2);
            let grid: Vec<f32> = (0..gw * gh).map(|_| between(rng, -35.0, 35.0)).collect();
            for (i, p) in pixels.iter_mut().enumerate() {
                let (gx, gy) = ((i % w) as f32 / cell, (i / w) as f32 / cell);
                let (x0, y0) = (gx as usize, gy as usize);
                let (fx, fy) = (gx.fract(), gy.fract());
                let g = |x: usize, y: usize| grid[y * gw + x];
                let top = g(x0, y0) * (1.0 - fx) + g(x0 + 1, y0) * fx;
                let bottom = g(x0, y0 + 1) * (1.0 - fx) + g(x0 + 1, y0 + 1) * fx;
                *p = p.map(|v| v + top * (1.0 - fy) + bottom * fy);
            }
        }
        // A linear gradient to a second colour across the image.
        1 => {
            let to = hsv(between(rng, 0.0, 360.0), between(rng, 0.0, 0.3), between(rng, 0.25, 0.85));
            let to: [f32; 3] = std::array::from_fn(|c| base[c] + (to[c] - base[c]) * 0.6);
            let span = (w as f32 * cos.abs() + h as f32 * sin.abs()).max(1.0);
            for (i, p) in pixels.iter_mut().enumerate() {
                let (x, y) = ((i % w) as f32 - w as f32 / 2.0, (i / w) as f32 - h as f32 / 2.0);
                let t = ((x * cos + y * sin) / span + 0.5).clamp(0.0, 1.0);
                *p = std::array::from_fn(|c| base[c] * (1.0 - t) + to[c] * t);
            }
        }
        // Stripes at a random angle and period.
        _ => {
            let period = 8.0 + rng.below(32) as f32;
            for (i, p) in pixels.iter_mut().enumerate() {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                let phase = (x * cos + y * sin) / period * std::f32::consts::TAU;
                let d = 22.0 * phase.sin().signum();
                *p = p.map(|v| v + d);
            }
        }
    }
    for p in pixels.iter_mut() {
        let g = between(rng, -6.0, 6.0);
        *p = p.map(|v| v + g);
    }
    let mean = pixels.iter().map(|&p| luma(p)).sum::<f32>() / (h * w) as f32;
    (pixels, mean)
}

/// A filled shape: `kind` indexes [`CATEGORIES`]; `(a, b)` are the half-sizes along its own
/// axes, turned by `angle`.
struct Shape {
    kind: usize,
    cx: f32,
    cy: f32,
    a: f32,
    b: f32,
    cos: f32,
    sin: f32,
    /// Ring: inner radius / outer.
    hole: f32,
    /// Cross: half the arm thickness / half the size.
    arm: f32,
}

impl Shape {
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let u = (dx * self.cos + dy * self.sin) / self.a;
        let v = (dy * self.cos - dx * self.sin) / self.b;
        let r2 = u * u + v * v;
        match self.kind {
            0 => r2 <= 1.0,
            1 => u.abs() <= 1.0 && v.abs() <= 1.0,
            // Apex at v = -1, base at v = 1.
            2 => v <= 1.0 && u.abs() <= (v + 1.0) / 2.0,
            3 => r2 <= 1.0 && r2 >= self.hole * self.hole,
            _ => (u.abs() <= self.arm && v.abs() <= 1.0) || (v.abs() <= self.arm && u.abs() <= 1.0),
        }
    }

    /// The indices of the `h x w` image's pixels whose centres lie inside.
    fn pixels(&self, h: usize, w: usize) -> Vec<usize> {
        let r = self.a.hypot(self.b);
        let xs = ((self.cx - r).floor().max(0.0) as usize)..((self.cx + r).ceil().max(0.0) as usize).min(w);
        let ys = ((self.cy - r).floor().max(0.0) as usize)..((self.cy + r).ceil().max(0.0) as usize).min(h);
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| self.contains(x as f32 + 0.5, y as f32 + 0.5))
            .map(|(x, y)| y * w + x)
            .collect()
    }
}

/// A shape of `kind` and long side `long`, centred at `(cx, cy)`. Past 95% of the image's shorter
/// side, the long axis lies along the image's longer one and the short side is capped.
fn make_shape(rng: &mut SplitMix64, kind: usize, long: f32, (cx, cy): (f32, f32), (h, w): (usize, usize)) -> Shape {
    let cap = 0.95 * h.min(w) as f32;
    let short = (long * between(rng, 0.7, 1.0)).min(cap);
    let along_x = if long > cap { w >= h } else { rng.below(2) == 0 };
    let (a, b) = if along_x { (long / 2.0, short / 2.0) } else { (short / 2.0, long / 2.0) };
    let angle = match kind {
        0 | 3 => 0.0,
        2 => between(rng, -std::f32::consts::PI, std::f32::consts::PI),
        // Squares and crosses: turned a little, so they still read as such; not at all when
        // capped, so they stay inside the image.
        _ if long > cap => 0.0,
        _ => between(rng, -0.35, 0.35),
    };
    Shape {
        kind,
        cx,
        cy,
        a,
        b,
        cos: angle.cos(),
        sin: angle.sin(),
        hole: between(rng, 0.5, 0.7),
        arm: between(rng, 0.28, 0.4),
    }
}

/// A colour of `kind`'s hue family that stands out from a background of luminance `bg`.
fn object_colour(rng: &mut SplitMix64, kind: usize, bg: f32) -> [f32; 3] {
    let c = hsv(HUES[kind] + between(rng, -30.0, 30.0), between(rng, 0.55, 1.0), between(rng, 0.6, 1.0));
    let l = luma(c);
    if bg > 0.5 {
        let target = bg - 0.35;
        c.map(|v| v * (target / l).min(1.0))
    } else {
        let t = ((bg + 0.35 - l) / (1.0 - l)).clamp(0.0, 1.0);
        c.map(|v| v + (255.0 - v) * t)
    }
}

/// One annotated region while the scene is drawn.
struct Region {
    kind: usize,
    crowd: bool,
    /// Pixels it covered when placed.
    drawn: usize,
    /// Pixels still showing.
    visible: usize,
}

/// A scene being drawn: colours and, per pixel, the region showing there (0 = background).
struct Scene {
    h: usize,
    w: usize,
    rgb: Vec<[f32; 3]>,
    owner: Vec<usize>,
    regions: Vec<Region>,
    bg_luma: f32,
}

impl Scene {
    /// Paints `shape` as part of region `region` (1-based; a new one when it is
    /// `regions.len() + 1`) unless it is under `min_pixels` in the image or it would leave another
    /// region less than 60% visible. Whether it was painted.
    fn place(
        &mut self,
        shape: &Shape,
        region: usize,
        min_pixels: usize,
        colour: [f32; 3],
        rng: &mut SplitMix64,
    ) -> bool {
        let pixels = shape.pixels(self.h, self.w);
        if pixels.len() < min_pixels {
            return false;
        }
        let mut covered = vec![0usize; self.regions.len() + 1];
        for &i in &pixels {
            covered[self.owner[i]] += 1;
        }
        let occludes_too_much = self
            .regions
            .iter()
            .enumerate()
            .any(|(k, r)| k + 1 != region && (r.visible - covered[k + 1]) as f32 * 10.0 < r.drawn as f32 * 6.0);
        if occludes_too_much {
            return false;
        }
        if region > self.regions.len() {
            self.regions.push(Region { kind: shape.kind, crowd: false, drawn: 0, visible: 0 });
        }
        for (k, n) in covered.iter().enumerate().skip(1) {
            self.regions[k - 1].visible -= n;
        }
        let r = &mut self.regions[region - 1];
        r.drawn += pixels.len();
        r.visible += pixels.len();
        let radius = shape.a.max(shape.b);
        let shade = between(rng, -18.0, 18.0);
        for i in pixels {
            let along = ((i % self.w) as f32 + 0.5 - shape.cx) / radius;
            let g = between(rng, -8.0, 8.0) + shade * along;
            self.rgb[i] = colour.map(|v| v + g);
            self.owner[i] = region;
        }
        true
    }

    /// The regions still showing, as annotations.
    fn annotations(&self) -> Vec<Drawn> {
        let mut bounds = vec![(usize::MAX, usize::MAX, 0usize, 0usize); self.regions.len() + 1];
        for (i, &k) in self.owner.iter().enumerate().filter(|(_, k)| **k > 0) {
            let (x, y) = (i % self.w, i / self.w);
            let b = &mut bounds[k];
            *b = (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y));
        }
        self.regions
            .iter()
            .zip(&bounds[1..])
            .filter(|(r, _)| r.visible > 0)
            .map(|(r, &(x0, y0, x1, y1))| {
                let bbox = [x0 as f64, y0 as f64, (x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64];
                Drawn { kind: r.kind, crowd: r.crowd, bbox, area: r.visible as f64 }
            })
            .collect()
    }
}

/// An annotation of a drawn image, before it has ids.
struct Drawn {
    kind: usize,
    crowd: bool,
    /// COCO `[x, y, w, h]` of the visible pixels.
    bbox: [f64; 4],
    /// The visible pixels.
    area: f64,
}

/// Draws one image of `h x w`: its RGB bytes and annotations.
fn draw(h: usize, w: usize, with_objects: bool, rng: &mut SplitMix64) -> (Vec<u8>, Vec<Drawn>) {
    let (rgb, bg_luma) = background(h, w, rng);
    let mut scene = Scene { h, w, rgb, owner: vec![0; h * w], regions: Vec::new(), bg_luma };
    if with_objects {
        let (lo, hi) = (10f32.ln(), (0.9 * h.max(w) as f32).ln());
        let mut sizes: Vec<f32> = (0..1 + rng.below(7)).map(|_| between(rng, lo, hi).exp()).collect();
        sizes.sort_by(|a, b| b.total_cmp(a));
        for long in sizes {
            let kind = rng.below(CATEGORIES.len() as u64) as usize;
            let colour = object_colour(rng, kind, scene.bg_luma);
            // Up to 30% of the shape may fall outside the image.
            let centre = |rng: &mut SplitMix64, n: usize| {
                let m = (0.4 * long / 2.0).min(n as f32 / 2.0);
                between(rng, m, n as f32 - m)
            };
            for _ in 0..20 {
                let at = (centre(rng, w), centre(rng, h));
                let shape = make_shape(rng, kind, long, at, (h, w));
                if scene.place(&shape, scene.regions.len() + 1, 20, colour, rng) {
                    break;
                }
            }
        }
        if rng.below(4) == 0 {
            draw_crowd(&mut scene, rng);
        }
    }
    let annotations = scene.annotations();
    let bytes = scene.rgb.iter().flat_map(|p| p.map(|v| v.clamp(0.0, 255.0).round() as u8)).collect();
    (bytes, annotations)
}

/// A cluster of tiny shapes of one category, annotated as one crowd region.
fn draw_crowd(scene: &mut Scene, rng: &mut SplitMix64) {
    let (h, w) = (scene.h, scene.w);
    let kind = rng.below(CATEGORIES.len() as u64) as usize;
    let colour = object_colour(rng, kind, scene.bg_luma);
    let radius = h.min(w) as f32 * between(rng, 0.06, 0.15);
    let (cx, cy) = (between(rng, radius, w as f32 - radius), between(rng, radius, h as f32 - radius));
    let region = scene.regions.len() + 1;
    for _ in 0..6 + rng.below(9) {
        let (r, t) = (radius * rng.uniform().sqrt() as f32, between(rng, 0.0, std::f32::consts::TAU));
        let long = between(rng, 5.0, 9.0);
        let shape = make_shape(rng, kind, long, (cx + r * t.cos(), cy + r * t.sin()), (h, w));
        scene.place(&shape, region, 8, colour, rng);
    }
    if let Some(r) = scene.regions.get_mut(region - 1) {
        r.crowd = true;
    }
}

/// Writes the images and the annotations file of one split; image ids start at `first_id`.
fn write_split(out: &Path, split: &str, count: usize, first_id: u64, cfg: &SynthConfig) -> Result<SplitSummary> {
    let dir = out.join(split);
    std::fs::create_dir_all(&dir).map_err(|e| file_err(&dir, e))?;
    let split_key = split.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let drawn = (0..count)
        .into_par_iter()
        .map(|i| {
            let mut rng = SplitMix64::derive(&[cfg.seed, split_key, i as u64]);
            let (mut w, mut h) = (
                (cfg.width as f32 * between(&mut rng, 0.625, 1.0)).round().max(16.0) as usize,
                (cfg.height as f32 * between(&mut rng, 0.625, 1.0)).round().max(16.0) as usize,
            );
            if rng.below(8) == 0 {
                std::mem::swap(&mut w, &mut h);
            }
            let (rgb, annotations) = draw(h, w, i % 12 != 11, &mut rng);
            let id = first_id + i as u64;
            let image = Image { id, file_name: format!("{id:012}.jpg"), width: w as u32, height: h as u32 };
            let path = dir.join(&image.file_name);
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
                .encode(&rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                .map_err(|e| file_err(&path, e))?;
            std::fs::write(&path, jpeg).map_err(|e| file_err(&path, e))?;
            Ok((image, annotations))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut instances = Instances {
        info: serde_json::json!({}),
        licenses: Vec::new(),
        images: Vec::with_capacity(count),
        annotations: Vec::new(),
        categories: CATEGORIES
            .iter()
            .map(|&(id, name)| Category { id, name: name.to_string(), supercategory: Some("shape".to_string()) })
            .collect(),
    };
    let mut summary = SplitSummary { images: count, empty_images: 0, annotations: 0, crowd: 0 };
    for (image, annotations) in drawn {
        summary.empty_images += usize::from(annotations.is_empty());
        for a in annotations {
            instances.annotations.push(Annotation {
                id: instances.annotations.len() as u64 + 1,
                image_id: image.id,
                category_id: CATEGORIES[a.kind].0,
                bbox: a.bbox,
                area: Some(a.area),
                iscrowd: u8::from(a.crowd),
            });
            summary.crowd += usize::from(a.crowd);
        }
        instances.images.push(image);
    }
    summary.annotations = instances.annotations.len();
    let ann_dir = out.join("annotations");
    std::fs::create_dir_all(&ann_dir).map_err(|e| file_err(&ann_dir, e))?;
    instances.write(&ann_dir.join(format!("instances_{split}.json")))?;
    Ok(summary)
}

/// Writes the synthetic set under `out` (see the module docs); the same config gives the same
/// bytes.
pub fn write_dataset(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    if cfg.width < 16 || cfg.height < 16 {
        return Err(DataError::Config(format!(
            "synthetic images of {}x{} are too small (16x16 at least)",
            cfg.width, cfg.height
        )));
    }
    let train = write_split(out, "train", cfg.train_images, 1, cfg)?;
    let val = write_split(out, "val", cfg.val_images, cfg.train_images as u64 + 1, cfg)?;
    Ok(SynthSummary { train, val })
}

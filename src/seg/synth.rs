//! Synthetic street scenes in the exact Cityscapes layout: the quick start's and the tests'
//! embedded dataset (no downloads).
//!
//! Each scene is drawn back to front: sky above a random horizon, buildings and low walls along
//! it, a perspective road with lane marks between sidewalks, terrain and trees beside them,
//! fences, poles carrying signs and lights, then vehicles (cars, trucks, buses, the odd train),
//! people, riders on two-wheelers, and the ego vehicle's hood. Labels are Cityscapes label ids
//! (the 34-id table, ignored ids included: ego vehicle, static, ground, dynamic). Colours vary
//! per instance and carry texture, and some classes share palettes (wall and building, car and
//! building, fence and pole, terrain and vegetation) so that context, not colour alone, tells
//! them apart.

use std::path::Path;

use super::cityscapes::{DataError, Result};
use crate::nn::SplitMix64;

/// Label ids drawn here (cityscapesScripts `labels.py`).
mod id {
    pub const EGO_VEHICLE: u8 = 1;
    pub const STATIC: u8 = 4;
    pub const DYNAMIC: u8 = 5;
    pub const GROUND: u8 = 6;
    pub const ROAD: u8 = 7;
    pub const SIDEWALK: u8 = 8;
    pub const BUILDING: u8 = 11;
    pub const WALL: u8 = 12;
    pub const FENCE: u8 = 13;
    pub const POLE: u8 = 17;
    pub const TRAFFIC_LIGHT: u8 = 19;
    pub const TRAFFIC_SIGN: u8 = 20;
    pub const VEGETATION: u8 = 21;
    pub const TERRAIN: u8 = 22;
    pub const SKY: u8 = 23;
    pub const PERSON: u8 = 24;
    pub const RIDER: u8 = 25;
    pub const CAR: u8 = 26;
    pub const TRUCK: u8 = 27;
    pub const BUS: u8 = 28;
    pub const TRAIN: u8 = 31;
    pub const MOTORCYCLE: u8 = 32;
    pub const BICYCLE: u8 = 33;
}

/// Palettes shared between classes on purpose.
const STONE: [[f32; 3]; 4] = [[150., 140., 125.], [120., 110., 100.], [170., 160., 150.], [110., 90., 80.]];
const PAINT: [[f32; 3]; 6] =
    [[180., 30., 30.], [30., 60., 150.], [200., 200., 200.], [40., 40., 40.], [150., 140., 125.], [90., 110., 60.]];
const METAL: [f32; 3] = [130., 130., 135.];
const GREEN: [[f32; 3]; 3] = [[60., 110., 40.], [90., 130., 50.], [110., 120., 60.]];
const CLOTHES: [[f32; 3]; 5] =
    [[200., 40., 60.], [40., 40., 90.], [230., 210., 80.], [60., 60., 60.], [150., 140., 125.]];

/// What a shape is painted with: a label id, a colour and a texture amplitude.
#[derive(Clone, Copy)]
struct Paint(u8, [f32; 3], f32);

/// A scene being drawn: label ids and linear RGB.
struct Canvas {
    h: usize,
    w: usize,
    label: Vec<u8>,
    rgb: Vec<[f32; 3]>,
    /// Keys the per-pixel texture.
    salt: u64,
}

/// A cheap per-pixel hash in [-1, 1] for texture.
fn grain(x: usize, y: usize, salt: u64) -> f32 {
    let mut z = (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (y as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ salt;
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

impl Canvas {
    fn new(h: usize, w: usize, salt: u64) -> Self {
        Self { h, w, label: vec![0; h * w], rgb: vec![[0.0; 3]; h * w], salt }
    }

    /// Paints the pixels of rows `y0..y1` whose span `span(y)` covers them.
    fn fill_rows(&mut self, y0: f32, y1: f32, Paint(id, color, texture): Paint, span: impl Fn(f32) -> (f32, f32)) {
        let (ya, yb) = (y0.max(0.0) as usize, (y1.max(0.0) as usize).min(self.h));
        for y in ya..yb {
            let (xa, xb) = span(y as f32 + 0.5);
            let (xa, xb) = (xa.max(0.0) as usize, (xb.max(0.0) as usize).min(self.w));
            for x in xa..xb {
                let i = y * self.w + x;
                let g = grain(x, y, self.salt ^ id as u64) * texture;
                self.label[i] = id;
                self.rgb[i] = [color[0] + g, color[1] + g, color[2] + g];
            }
        }
    }

    fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, paint: Paint) {
        self.fill_rows(y0, y1, paint, |_| (x0, x1));
    }

    fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, paint: Paint) {
        self.fill_rows(cy - ry, cy + ry, paint, |y| {
            let t = 1.0 - ((y - cy) / ry).powi(2);
            let half = if t > 0.0 { rx * t.sqrt() } else { -1.0 };
            (cx - half, cx + half)
        });
    }
}

fn pick<T: Copy>(rng: &mut SplitMix64, xs: &[T]) -> T {
    xs[rng.below(xs.len() as u64) as usize]
}

fn jitter(rng: &mut SplitMix64, c: [f32; 3], amount: f32) -> [f32; 3] {
    let shade = (rng.uniform() as f32 - 0.5) * amount;
    c.map(|v| v + shade + (rng.uniform() as f32 - 0.5) * amount * 0.5)
}

/// A palette colour, varied per instance.
fn varied(rng: &mut SplitMix64, palette: &[[f32; 3]], amount: f32) -> [f32; 3] {
    let c = pick(rng, palette);
    jitter(rng, c, amount)
}

fn between(rng: &mut SplitMix64, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.uniform() as f32
}

/// Draws one scene of `h x w`: `(RGB bytes, label ids)`.
pub fn scene(h: usize, w: usize, rng: &mut SplitMix64) -> (Vec<u8>, Vec<u8>) {
    let mut c = Canvas::new(h, w, rng.next_u64());
    let (hf, wf) = (h as f32, w as f32);
    let horizon = hf * between(rng, 0.35, 0.5);
    // Sky: a vertical gradient.
    let sky = jitter(rng, [110., 160., 215.], 30.);
    c.fill_rows(0.0, horizon, Paint(id::SKY, sky, 4.0), |_| (0.0, wf));
    for y in 0..(horizon as usize).min(h) {
        for x in 0..w {
            let t = y as f32 / horizon;
            let p = &mut c.rgb[y * w + x];
            p[0] += 30.0 * t;
            p[1] += 20.0 * t;
        }
    }
    // Buildings along the horizon, windows darker.
    let mut x = -between(rng, 0.0, 0.1) * wf;
    while x < wf {
        let bw = wf * between(rng, 0.08, 0.25);
        let top = horizon - hf * between(rng, 0.1, 0.35);
        let color = varied(rng, &STONE, 25.);
        c.rect(x, top, x + bw, horizon + 2.0, Paint(id::BUILDING, color, 10.0));
        let win = color.map(|v| v * 0.55);
        let (step_x, step_y) = (bw / 5.0, hf * 0.04);
        let mut wy = top + step_y * 0.5;
        while wy + step_y * 0.5 < horizon - step_y {
            for k in 0..4 {
                let wx = x + step_x * (k as f32 + 0.6);
                c.rect(wx, wy, wx + step_x * 0.5, wy + step_y * 0.5, Paint(id::BUILDING, win, 4.0));
            }
            wy += step_y;
        }
        x += bw;
    }
    // Ground beside the road: terrain or vegetation; the road and its sidewalks in perspective.
    let cx = wf * between(rng, 0.4, 0.6);
    let far = wf * 0.04;
    let near = wf * between(rng, 0.35, 0.5);
    let half = move |y: f32| far + (near - far) * ((y - horizon) / (hf - horizon)).clamp(0.0, 1.0);
    let side = if rng.below(2) == 0 {
        (id::TERRAIN, jitter(rng, [120., 125., 70.], 20.))
    } else {
        (id::VEGETATION, varied(rng, &GREEN, 20.))
    };
    c.fill_rows(horizon, hf, Paint(side.0, side.1, 14.0), |_| (0.0, wf));
    let walk = 0.35;
    let sidewalk = varied(rng, &STONE, 20.);
    c.fill_rows(horizon, hf, Paint(id::SIDEWALK, sidewalk, 6.0), |y| {
        (cx - half(y) * (1.0 + walk), cx + half(y) * (1.0 + walk))
    });
    c.fill_rows(horizon, hf, Paint(id::ROAD, jitter(rng, [75., 75., 80.], 15.), 6.0), |y| (cx - half(y), cx + half(y)));
    // Dashed centre line (still road).
    let mut y = horizon + 2.0;
    while y < hf {
        let len = 0.02 * hf + 0.06 * (y - horizon);
        let thick = 0.004 * wf + 0.01 * half(y) * 0.2;
        c.fill_rows(y, y + len, Paint(id::ROAD, [200., 200., 190.], 3.0), |_| (cx - thick, cx + thick));
        y += len * 2.2;
    }
    // Ignored ground patches on the sidewalk, static clutter.
    for _ in 0..rng.below(3) {
        let y = between(rng, horizon + 0.1 * (hf - horizon), hf * 0.95);
        let side_x = cx + (half(y) * 1.15) * if rng.below(2) == 0 { -1.0 } else { 1.0 };
        let r = 0.01 * wf + 0.03 * (y - horizon);
        let (label, color) = if rng.below(2) == 0 {
            (id::GROUND, jitter(rng, [110., 100., 90.], 20.))
        } else {
            (id::STATIC, jitter(rng, [90., 80., 70.], 30.))
        };
        c.ellipse(side_x, y, r, r * 0.5, Paint(label, color, 8.0));
    }
    // Low walls and fences along the sidewalk edges.
    for sign in [-1.0f32, 1.0] {
        let roll = rng.below(3);
        let y0 = horizon + (hf - horizon) * between(rng, 0.15, 0.35);
        let y1 = y0 + (hf - horizon) * between(rng, 0.15, 0.3);
        let scale = |y: f32| (y - horizon) / (hf - horizon);
        let x_edge = move |y: f32| cx + sign * half(y) * (1.0 + walk);
        let height = |y: f32| 0.02 * hf + 0.12 * hf * scale(y);
        let (ya, yb) = (y0, y1);
        if roll == 0 {
            let color = varied(rng, &STONE, 20.);
            c.fill_rows(ya - height(ya), yb, Paint(id::WALL, color, 8.0), move |y| {
                let xe = x_edge(y.max(ya));
                if sign < 0.0 {
                    (xe - 0.15 * wf * scale(ya.max(y)), xe)
                } else {
                    (xe, xe + 0.15 * wf * scale(ya.max(y)))
                }
            });
        } else if roll == 1 {
            let xe = x_edge(yb);
            let (xa, xb) = if sign < 0.0 { (xe - 0.2 * wf, xe) } else { (xe, xe + 0.2 * wf) };
            let top = yb - height(yb) * 1.5;
            let mut bx = xa;
            while bx < xb {
                c.rect(bx, top, bx + 0.004 * wf + 1.0, yb, Paint(id::FENCE, METAL, 6.0));
                bx += 0.015 * wf + 2.0;
            }
            c.rect(xa, top, xb, top + 0.01 * hf + 1.0, Paint(id::FENCE, METAL, 6.0));
            c.rect(xa, yb - 0.012 * hf - 1.0, xb, yb, Paint(id::FENCE, METAL, 6.0));
        }
    }
    // Trees, poles with signs and lights beside the road, far to near.
    let mut props: Vec<(f32, u64)> = (0..3 + rng.below(5))
        .map(|_| (between(rng, horizon + 0.05 * (hf - horizon), hf * 0.92), rng.next_u64()))
        .collect();
    props.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (base, key) in props {
        let mut r = SplitMix64::new(key);
        let s = (base - horizon) / (hf - horizon);
        let sign = if r.below(2) == 0 { -1.0 } else { 1.0 };
        let x = cx + sign * half(base) * (1.0 + walk * between(&mut r, 0.5, 1.6));
        let tall = hf * (0.12 + 0.5 * s);
        if r.below(3) == 0 {
            let color = varied(&mut r, &GREEN, 20.);
            c.rect(
                x - 0.005 * wf * (1.0 + 3.0 * s),
                base - tall * 0.5,
                x + 0.005 * wf * (1.0 + 3.0 * s),
                base,
                Paint(id::VEGETATION, [90., 70., 50.], 6.0),
            );
            c.ellipse(x, base - tall * 0.7, tall * 0.3, tall * 0.3, Paint(id::VEGETATION, color, 25.0));
        } else {
            let pw = 0.002 * wf * (1.0 + 4.0 * s) + 1.0;
            c.rect(x - pw, base - tall, x + pw, base, Paint(id::POLE, METAL, 5.0));
            let box_s = tall * 0.12;
            if r.below(2) == 0 {
                let color = pick(&mut r, &[[230., 200., 40.], [40., 80., 170.], [220., 220., 220.]]);
                c.rect(
                    x - box_s * 0.6,
                    base - tall,
                    x + box_s * 0.6,
                    base - tall + box_s,
                    Paint(id::TRAFFIC_SIGN, color, 5.0),
                );
            } else {
                c.rect(
                    x - box_s * 0.35,
                    base - tall,
                    x + box_s * 0.35,
                    base - tall + box_s * 1.6,
                    Paint(id::TRAFFIC_LIGHT, [35., 35., 35.], 4.0),
                );
                let lamp = pick(&mut r, &[[240., 40., 30.], [250., 180., 30.], [40., 220., 90.]]);
                c.ellipse(
                    x,
                    base - tall + box_s * 0.4,
                    box_s * 0.22,
                    box_s * 0.22,
                    Paint(id::TRAFFIC_LIGHT, lamp, 2.0),
                );
            }
        }
    }
    // Road users, far to near: vehicles on the road, people on the sidewalks.
    let mut users: Vec<(f32, u64)> = (0..2 + rng.below(7))
        .map(|_| (between(rng, horizon + 0.08 * (hf - horizon), hf * 0.97), rng.next_u64()))
        .collect();
    users.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (base, key) in users {
        let mut r = SplitMix64::new(key);
        let s = 0.15 + 0.85 * (base - horizon) / (hf - horizon);
        let kind = r.below(20);
        if kind < 11 {
            let (label, len, height, palette): (u8, f32, f32, &[[f32; 3]]) = match kind {
                0..=6 => (id::CAR, 0.22, 0.09, &PAINT),
                7 | 8 => (id::TRUCK, 0.3, 0.16, &PAINT[..3]),
                9 => (id::BUS, 0.45, 0.17, &[[230., 200., 40.], [200., 40., 40.], [220., 220., 220.]]),
                _ => (id::TRAIN, 0.7, 0.15, &[[200., 200., 200.], [200., 60., 40.]]),
            };
            let (lw, lh) = (len * wf * s, height * hf * s * 1.6);
            let x = cx + half(base) * between(&mut r, -0.7, 0.7) - lw * 0.5;
            let color = varied(&mut r, palette, 25.);
            c.rect(x, base - lh, x + lw, base - lh * 0.15, Paint(label, color, 6.0));
            c.rect(x + lw * 0.1, base - lh * 0.92, x + lw * 0.9, base - lh * 0.62, Paint(label, [40., 50., 60.], 4.0));
            for wx in [x + lw * 0.18, x + lw * 0.82] {
                c.ellipse(wx, base - lh * 0.15, lh * 0.16, lh * 0.16, Paint(label, [25., 25., 25.], 3.0));
            }
        } else {
            let sign = if r.below(2) == 0 { -1.0 } else { 1.0 };
            let x = cx + sign * half(base) * between(&mut r, 1.0, 1.3);
            let ph = 0.3 * hf * s;
            let cloth = varied(&mut r, &CLOTHES, 30.);
            if kind < 16 {
                c.ellipse(x, base - ph * 0.45, ph * 0.13, ph * 0.45, Paint(id::PERSON, cloth, 10.0));
                c.ellipse(x, base - ph * 0.95, ph * 0.08, ph * 0.08, Paint(id::PERSON, [200., 160., 130.], 4.0));
            } else if kind < 19 {
                let (vehicle, vc) = if r.below(2) == 0 {
                    (id::BICYCLE, [30., 30., 30.])
                } else {
                    (id::MOTORCYCLE, varied(&mut r, &PAINT, 20.))
                };
                c.ellipse(x - ph * 0.2, base - ph * 0.15, ph * 0.15, ph * 0.15, Paint(vehicle, vc, 4.0));
                c.ellipse(x + ph * 0.2, base - ph * 0.15, ph * 0.15, ph * 0.15, Paint(vehicle, vc, 4.0));
                c.rect(x - ph * 0.25, base - ph * 0.35, x + ph * 0.25, base - ph * 0.25, Paint(vehicle, vc, 4.0));
                c.ellipse(x, base - ph * 0.7, ph * 0.12, ph * 0.35, Paint(id::RIDER, cloth, 10.0));
                c.ellipse(x, base - ph * 1.1, ph * 0.08, ph * 0.08, Paint(id::RIDER, [200., 160., 130.], 4.0));
            } else {
                c.ellipse(
                    x,
                    base - ph * 0.2,
                    ph * 0.2,
                    ph * 0.2,
                    Paint(id::DYNAMIC, jitter(&mut r, [120., 90., 60.], 30.), 8.0),
                );
            }
        }
    }
    // The ego vehicle's hood along the bottom.
    let hood = hf * between(rng, 0.04, 0.08);
    c.fill_rows(hf - hood, hf, Paint(id::EGO_VEHICLE, jitter(rng, [30., 30., 35.], 15.), 3.0), |y| {
        let t = (y - (hf - hood)) / hood;
        (wf * 0.2 * (1.0 - t), wf * (1.0 - 0.2 * (1.0 - t)))
    });
    let lighting = between(rng, 0.8, 1.15);
    let rgb = c.rgb.iter().flat_map(|p| p.map(|v| (v * lighting).clamp(0.0, 255.0) as u8)).collect();
    (rgb, c.label)
}

const TRAIN_CITIES: [&str; 4] = ["aachen", "bochum", "bremen", "cologne"];
const VAL_CITIES: [&str; 3] = ["frankfurt", "lindau", "munster"];

/// Writes `count` scenes of one split under `out` in the Cityscapes layout.
pub fn write_split(out: &Path, split: &str, count: usize, (h, w): (usize, usize), seed: u64) -> Result<()> {
    use rayon::prelude::*;
    let cities: &[&str] = if split == "train" { &TRAIN_CITIES } else { &VAL_CITIES };
    (0..count).into_par_iter().try_for_each(|i| {
        let city = cities[i % cities.len()];
        let name = format!("{city}_{:06}_{:06}", i / cities.len(), 19 + i);
        let split_key = split.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = SplitMix64::derive(&[seed, split_key, i as u64]);
        let (rgb, labels) = scene(h, w, &mut rng);
        let img_dir = out.join("leftImg8bit").join(split).join(city);
        let gt_dir = out.join("gtFine").join(split).join(city);
        for d in [&img_dir, &gt_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| DataError::File { path: d.display().to_string(), detail: e.to_string() })?;
        }
        let save = |path: std::path::PathBuf, data: Vec<u8>, color: image::ExtendedColorType| {
            image::save_buffer(&path, &data, w as u32, h as u32, color)
                .map_err(|e| DataError::File { path: path.display().to_string(), detail: e.to_string() })
        };
        save(img_dir.join(format!("{name}_leftImg8bit.png")), rgb, image::ExtendedColorType::Rgb8)?;
        save(gt_dir.join(format!("{name}_gtFine_labelIds.png")), labels, image::ExtendedColorType::L8)
    })
}

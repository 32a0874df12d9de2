//! FCOS locations and training targets (`prepare_targets` / `compute_targets_for_locations` of
//! the official code, HEAD a773f12), computed on the host in f64.
//!
//! A location `(x, y)` of level `l` (stride `s`) is positive for a GT box when it lies strictly
//! inside the box (or, with centre sampling, strictly inside the box's centre region of radius
//! `ρ·s`) and the largest of its distances `(l, t, r, b)` falls in the level's size range, both
//! ends included. Among the boxes that pass, the one with the smallest `+1` area wins; an exact
//! tie goes to the lowest box index (`torch.min` returns the first minimum).

use serde::{Deserialize, Serialize};

/// Upper bound of the last size range (the official `INF`).
pub const INF: f64 = 1e8;

/// The FPN levels the head predicts on: strides and the object-size range each one covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    /// Powers of two, increasing (P3..P7: 8..128).
    pub strides: Vec<usize>,
    /// `(lo, hi)` on `max(l, t, r, b)` per level, both inclusive.
    pub sizes_of_interest: Vec<(f64, f64)>,
}

impl Default for Levels {
    fn default() -> Self {
        Self {
            strides: vec![8, 16, 32, 64, 128],
            sizes_of_interest: vec![(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF)],
        }
    }
}

impl Levels {
    pub fn validate(&self) -> candle_core::Result<()> {
        if self.strides.is_empty() || self.strides.len() != self.sizes_of_interest.len() {
            candle_core::bail!(
                "levels: {} strides but {} size ranges",
                self.strides.len(),
                self.sizes_of_interest.len()
            );
        }
        if let Some(s) = self.strides.iter().find(|s| !s.is_power_of_two() || **s < 2) {
            candle_core::bail!("levels: stride {s} is not a power of two >= 2");
        }
        Ok(())
    }

    /// Feature map size of every level for a padded `h x w` input: every stride-2 layer maps
    /// `n` to `ceil(n / 2)`.
    pub fn feature_sizes(&self, (h, w): (usize, usize)) -> Vec<(usize, usize)> {
        self.strides
            .iter()
            .map(|&s| {
                let halvings = s.trailing_zeros();
                (0..halvings).fold((h, w), |(h, w), _| (h.div_ceil(2), w.div_ceil(2)))
            })
            .collect()
    }
}

/// Every location of every level, P3 first, each level row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Locations {
    /// `(x, y)`: `x = s·j + s/2`, `y = s·i + s/2`.
    pub points: Vec<[f64; 2]>,
    /// Level index of each point.
    pub level: Vec<usize>,
    /// `(h, w)` of each level.
    pub sizes: Vec<(usize, usize)>,
}

impl Locations {
    pub fn new(strides: &[usize], sizes: &[(usize, usize)]) -> Self {
        let mut points = Vec::new();
        let mut level = Vec::new();
        for (l, (&s, &(h, w))) in strides.iter().zip(sizes).enumerate() {
            for i in 0..h {
                for j in 0..w {
                    points.push([(s * j + s / 2) as f64, (s * i + s / 2) as f64]);
                    level.push(l);
                }
            }
        }
        Self { points, level, sizes: sizes.to_vec() }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Index of each level's first location.
    pub fn offsets(&self) -> Vec<usize> {
        self.sizes
            .iter()
            .scan(0, |acc, (h, w)| {
                let start = *acc;
                *acc += h * w;
                Some(start)
            })
            .collect()
    }
}

/// How targets are assigned (the "imprv" switches of FCOS).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetConfig {
    /// ρ (0 = off; 1.5 in "imprv").
    pub center_sampling_radius: f64,
    /// Regression targets in units of the level's stride (`NORM_REG_TARGETS`).
    pub norm_reg_targets: bool,
}

impl Default for TargetConfig {
    /// The original FCOS (`fcos_R_50_FPN_1x`).
    fn default() -> Self {
        Self { center_sampling_radius: 0.0, norm_reg_targets: false }
    }
}

/// One image's ground truth in input pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GtBoxes {
    /// `(x1, y1, x2, y2)`, the legacy `+1` convention (`x2 = x + w − 1`).
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous labels 1..K.
    pub labels: Vec<u32>,
}

/// The targets of one image, one entry per location.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTargets {
    /// 0 = background, else 1..K.
    pub labels: Vec<u32>,
    /// `(l, t, r, b)` of the matched box (pixels, or strides with `norm_reg_targets`); 0 for
    /// background.
    pub reg: Vec<[f64; 4]>,
    /// `sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`; 0 for background.
    pub centerness: Vec<f64>,
    /// Index of the matched box.
    pub matched: Vec<Option<usize>>,
}

impl ImageTargets {
    pub fn num_pos(&self) -> usize {
        self.labels.iter().filter(|&&l| l > 0).count()
    }
}

/// `sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`.
pub fn centerness([l, t, r, b]: [f64; 4]) -> f64 {
    ((l.min(r) / l.max(r)) * (t.min(b) / t.max(b))).sqrt()
}

/// The targets of every location for one image.
pub fn compute_targets(locations: &Locations, levels: &Levels, gt: &GtBoxes, cfg: &TargetConfig) -> ImageTargets {
    let n = locations.len();
    let mut out =
        ImageTargets { labels: vec![0; n], reg: vec![[0.0; 4]; n], centerness: vec![0.0; n], matched: vec![None; n] };
    let boxes: Vec<[f64; 4]> = gt.boxes.iter().map(|b| b.map(f64::from)).collect();
    let areas: Vec<f64> = boxes.iter().map(|b| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)).collect();
    for (i, (&[x, y], &l)) in locations.points.iter().zip(&locations.level).enumerate() {
        let stride = levels.strides[l] as f64;
        let (lo, hi) = levels.sizes_of_interest[l];
        let mut best: Option<(usize, f64)> = None;
        for (g, b) in boxes.iter().enumerate() {
            let d = [x - b[0], y - b[1], b[2] - x, b[3] - y];
            let inside = if cfg.center_sampling_radius > 0.0 {
                let radius = cfg.center_sampling_radius * stride;
                let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                let sub = [
                    (cx - radius).max(b[0]),
                    (cy - radius).max(b[1]),
                    (cx + radius).min(b[2]),
                    (cy + radius).min(b[3]),
                ];
                x - sub[0] > 0.0 && y - sub[1] > 0.0 && sub[2] - x > 0.0 && sub[3] - y > 0.0
            } else {
                d.iter().all(|&v| v > 0.0)
            };
            let reach = d.iter().fold(f64::MIN, |m, &v| m.max(v));
            // Strictly smaller: an exact tie keeps the lower index.
            if inside && lo <= reach && reach <= hi && best.is_none_or(|(_, a)| areas[g] < a) {
                best = Some((g, areas[g]));
            }
        }
        if let Some((g, _)) = best {
            let b = boxes[g];
            let d = [x - b[0], y - b[1], b[2] - x, b[3] - y];
            let reg = if cfg.norm_reg_targets { d.map(|v| v / stride) } else { d };
            out.labels[i] = gt.labels[g];
            out.reg[i] = reg;
            out.centerness[i] = centerness(reg);
            out.matched[i] = Some(g);
        }
    }
    out
}

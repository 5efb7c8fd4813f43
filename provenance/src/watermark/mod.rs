//! The invisible watermark: a keyed, self-synchronising spread-spectrum mark
//! in luminance that carries 64 bits and survives re-encoding, resizing,
//! cropping, small rotations, blur, noise and brightness changes.
//!
//! How it works, top to bottom:
//! - **Layout.** A tile of 32×32 *chips* repeats over the whole image (at
//!   least four tiles across the short side). A key-driven permutation makes
//!   272 chips a fixed *sync* pattern and spreads each of the 188 coded bits
//!   (64 payload + keyed CRC-24, convolutional code, see [`ecc`]) over 4
//!   chips with key-driven signs.
//! - **Embedding.** The chip grid is interpolated into a smooth periodic
//!   pattern, scaled per pixel by a texture mask (more in busy areas, less in
//!   flat ones) and by one global gain set for the target PSNR, and added
//!   equally to R, G and B, so only luminance changes and chroma subsampling
//!   cannot touch it.
//! - **Synchronisation.** The detector whitens the image residual's power
//!   spectrum; the autocorrelation of a periodic mark then peaks on its tile
//!   lattice, which gives the scale and rotation the image went through.
//!   Folding every pixel into one tile (modulo the lattice) adds up all tile
//!   copies; a circular correlation with the sync pattern gives the shift
//!   (how the image was cropped).
//! - **Decoding.** Matched filters read the chips, the soft values of each
//!   coded bit are summed, and a Viterbi decoder recovers the payload. The
//!   mark is reported only when the keyed CRC-24 checks: an unmarked image
//!   passes with probability 2⁻²⁴ per decode, at most 9 decodes per image
//!   (small geometry refinements), so below 10⁻⁶ by design.

pub mod attacks;
pub mod ecc;

use image::RgbImage;
use rustfft::FftPlanner;
use rustfft::num_complex::Complex32;
use sha2::{Digest, Sha256};

/// Chips along one side of the tile.
pub const CHIPS: usize = 32;
const CHIP_COUNT: usize = CHIPS * CHIPS;
/// Chips of the fixed sync pattern; the rest carry the coded bits, each bit
/// on 4 or 5 chips.
const SYNC_CHIPS: usize = 160;
/// Sub-bins per chip when folding.
const SUB: usize = 4;
const FOLD: usize = CHIPS * SUB;
/// Longest side analysed (larger images are box-downscaled first).
const ANALYSIS: usize = 512;
/// How much the mark follows texture: strength ∝ (local activity)^this.
/// Low, because the detector normalises by local activity too, so flat
/// areas carry the most signal per unit of energy.
const MASK_EXPONENT: f32 = 0.2;
/// Band of tile period over short side the detector searches: embedding uses
/// 0.19–0.25; a centre crop keeping 73% of each side still lands inside.
const MIN_PERIOD_RATIO: f32 = 0.16;
const MAX_PERIOD_RATIO: f32 = 0.34;
/// Strongest autocorrelation peaks tried as the lattice.
const LATTICE_CANDIDATES: usize = 3;
/// Sync score (standard deviations over the correlation floor) below which
/// no decode is attempted.
const MIN_SYNC_Z: f32 = 4.0;

/// The key secret used when a deployment configures none: for development
/// only, since anyone who knows it can forge and strip marks.
pub const DEVELOPMENT_KEY: &str = "hallmark-development-watermark-key";

/// The secret that places and signs the chips. Deployments set their own;
/// a mark is found only with the key it was made with.
#[derive(Clone)]
pub struct WatermarkKey {
    seed: [u8; 32],
}

impl WatermarkKey {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            seed: Sha256::digest(secret).into(),
        }
    }

    /// The key for marks made at a later stage (`refine`, `upscale`): a
    /// refined or upscaled image may still carry its base image's mark at
    /// exactly the tile period its own mark gets, so the two need
    /// independent chips and sync patterns. The `generate` stage uses the
    /// key itself.
    pub fn for_stage(&self, stage: &str) -> Self {
        if stage == "generate" {
            return self.clone();
        }
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update(b"/stage/");
        h.update(stage.as_bytes());
        Self {
            seed: h.finalize().into(),
        }
    }

    fn crc_seed(&self) -> u32 {
        u32::from_le_bytes([self.seed[0], self.seed[1], self.seed[2], 0])
    }

    fn rng(&self) -> SplitMix {
        SplitMix(u64::from_le_bytes(
            self.seed[8..16].try_into().unwrap_or_default(),
        ))
    }
}

impl std::fmt::Debug for WatermarkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatermarkKey(…)")
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn sign(&mut self) -> f32 {
        if self.next() & 1 == 1 { 1.0 } else { -1.0 }
    }
}

/// Where the sync chips are and which coded bit each data chip carries.
struct Layout {
    /// ±1 on sync chips, 0 on data chips.
    sync: Vec<f32>,
    /// Coded bit index of a data chip (usize::MAX on sync chips).
    bit: Vec<usize>,
    /// Spreading sign of a data chip.
    sign: Vec<f32>,
}

impl Layout {
    fn new(key: &WatermarkKey) -> Self {
        let mut rng = key.rng();
        let mut order: Vec<usize> = (0..CHIP_COUNT).collect();
        for i in (1..CHIP_COUNT).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut sync = vec![0.0; CHIP_COUNT];
        let mut bit = vec![usize::MAX; CHIP_COUNT];
        let mut sign = vec![0.0; CHIP_COUNT];
        for (k, &chip) in order.iter().enumerate() {
            if k < SYNC_CHIPS {
                sync[chip] = rng.sign();
            } else {
                bit[chip] = (k - SYNC_CHIPS) % ecc::CODED_BITS;
                sign[chip] = rng.sign();
            }
        }
        Self { sync, bit, sign }
    }

    /// Chip values (±1) for a payload.
    fn chips(&self, coded: &[u8]) -> Vec<f32> {
        (0..CHIP_COUNT)
            .map(|c| {
                if self.bit[c] == usize::MAX {
                    self.sync[c]
                } else if coded[self.bit[c]] == 1 {
                    self.sign[c]
                } else {
                    -self.sign[c]
                }
            })
            .collect()
    }
}

/// A periodic tile of `size`×`size` samples interpolating the chip grid
/// (bilinear with wrap-around, chip centres at half-chip offsets).
fn render_tile(chips: &[f32], size: usize) -> Vec<f32> {
    let per = size as f32 / CHIPS as f32;
    let mut tile = vec![0.0; size * size];
    for y in 0..size {
        let fy = (y as f32 + 0.5) / per - 0.5;
        let y0 = fy.floor();
        let ty = fy - y0;
        let (ya, yb) = (wrap(y0 as i64), wrap(y0 as i64 + 1));
        for x in 0..size {
            let fx = (x as f32 + 0.5) / per - 0.5;
            let x0 = fx.floor();
            let tx = fx - x0;
            let (xa, xb) = (wrap(x0 as i64), wrap(x0 as i64 + 1));
            let top = chips[ya * CHIPS + xa] * (1.0 - tx) + chips[ya * CHIPS + xb] * tx;
            let bottom = chips[yb * CHIPS + xa] * (1.0 - tx) + chips[yb * CHIPS + xb] * tx;
            tile[y * size + x] = top * (1.0 - ty) + bottom * ty;
        }
    }
    tile
}

fn wrap(i: i64) -> usize {
    i.rem_euclid(CHIPS as i64) as usize
}

/// Smallest side the mark is made on: with chips of two pixels the tile
/// (64 pixels) must stay within the detector's lattice search band (at
/// most 0.34 of the short side).
pub const MIN_SIDE: u32 = 192;

/// Pixels per chip for an image: at least four tiles across the short side.
pub fn chip_size(width: u32, height: u32) -> usize {
    ((width.min(height) as usize) / (4 * CHIPS)).max(2)
}

/// How strongly to mark.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// PSNR of the marked image against the original, in dB.
    pub target_psnr: f64,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self { target_psnr: 42.2 }
    }
}

/// Why an image cannot be marked.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("image is {0}×{1}; the watermark needs at least {MIN_SIDE}×{MIN_SIDE} pixels")]
    TooSmall(u32, u32),
}

fn luma(img: &RgbImage) -> Vec<f32> {
    img.pixels()
        .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
        .collect()
}

/// Mean over a (2r+1)² window, edges clamped; separable running sums, the
/// vertical pass row by row so memory is read in order.
fn box_blur(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut tmp = vec![0.0f32; w * h];
    for (row, out) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        let mut sum: f32 = row[..=r.min(w - 1)].iter().sum();
        let mut n = (r.min(w - 1) + 1) as f32;
        for x in 0..w {
            out[x] = sum / n;
            if x + r + 1 < w {
                sum += row[x + r + 1];
                n += 1.0;
            }
            if x >= r {
                sum -= row[x - r];
                n -= 1.0;
            }
        }
    }
    let mut out = vec![0.0f32; w * h];
    let mut sum = vec![0.0f32; w];
    for row in tmp.chunks_exact(w).take(r.min(h - 1) + 1) {
        sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    let mut n = (r.min(h - 1) + 1) as f32;
    for y in 0..h {
        let inv = 1.0 / n;
        out[y * w..(y + 1) * w]
            .iter_mut()
            .zip(&sum)
            .for_each(|(o, s)| *o = s * inv);
        if y + r + 1 < h {
            let add = &tmp[(y + r + 1) * w..(y + r + 2) * w];
            sum.iter_mut().zip(add).for_each(|(s, v)| *s += v);
            n += 1.0;
        }
        if y >= r {
            let sub = &tmp[(y - r) * w..(y - r + 1) * w];
            sum.iter_mut().zip(sub).for_each(|(s, v)| *s -= v);
            n -= 1.0;
        }
    }
    out
}

/// Marks `img` with `payload`. The result differs from the input only in
/// luminance, by a smooth pattern whose strength follows the texture.
pub fn embed(
    img: &RgbImage,
    payload: u64,
    key: &WatermarkKey,
    opts: EmbedOptions,
) -> Result<RgbImage, WatermarkError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < MIN_SIDE as usize || h < MIN_SIDE as usize {
        return Err(WatermarkError::TooSmall(img.width(), img.height()));
    }
    let layout = Layout::new(key);
    let chips = layout.chips(&ecc::encode(payload, key.crc_seed()));
    let c = chip_size(img.width(), img.height());
    let period = CHIPS * c;
    let tile = render_tile(&chips, period);

    // Texture mask: local mean of |Laplacian| relative to the image's mean.
    let y = luma(img);
    let mut lap = vec![0.0f32; w * h];
    for yy in 1..h - 1 {
        for xx in 1..w - 1 {
            let i = yy * w + xx;
            lap[i] = (4.0 * y[i] - y[i - 1] - y[i + 1] - y[i - w] - y[i + w]).abs();
        }
    }
    let activity = box_blur(&lap, w, h, c);
    let mean = (activity
        .chunks(1024)
        .map(|c| f64::from(c.iter().sum::<f32>()))
        .sum::<f64>()
        / activity.len() as f64)
        .max(1e-3) as f32;

    // The mask through a table: a power per pixel would dominate the cost.
    const STEPS: usize = 1024;
    let (lo, hi) = (0.25f32, 3.0f32);
    let table: Vec<f32> = (0..=STEPS)
        .map(|i| (lo + (hi - lo) * i as f32 / STEPS as f32).powf(MASK_EXPONENT))
        .collect();
    let to_index = STEPS as f32 / ((hi - lo) * mean);
    let mut delta = vec![0.0f32; w * h];
    let mut energy = 0.0f64;
    for (yy, (out, act)) in delta
        .chunks_exact_mut(w)
        .zip(activity.chunks_exact(w))
        .enumerate()
    {
        let row = &tile[(yy % period) * period..(yy % period + 1) * period];
        let mut row_energy = 0.0f32;
        // The tile row repeats across the image row: walk it in whole periods.
        for (out, act) in out.chunks_mut(period).zip(act.chunks(period)) {
            for ((o, &a), &t) in out.iter_mut().zip(act).zip(row) {
                let m = table[((a - lo * mean) * to_index).clamp(0.0, STEPS as f32) as usize];
                let d = m * t;
                *o = d;
                row_energy += d * d;
            }
        }
        energy += f64::from(row_energy);
    }
    // The same rounding the pixels get, so the PSNR is known before they
    // are touched; clipping at 0 and 255 can only raise it further.
    let round = |x: f32| (x + 0.5f32.copysign(x)) as i32;
    let rounded_psnr = |gain: f32| {
        let err: u64 = delta.iter().map(|&d| round(gain * d).pow(2) as u64).sum();
        let mse = err as f64 / (w * h) as f64;
        if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255.0f64 * 255.0 / mse).log10()
        }
    };
    let target_rms = 255.0 / 10f64.powf(opts.target_psnr / 20.0);
    let mut gain = (target_rms / (energy / (w * h) as f64).sqrt().max(1e-9)) as f32;
    for _ in 0..8 {
        let got = rounded_psnr(gain);
        if got >= opts.target_psnr {
            break;
        }
        gain *= 10f32.powf(((got - opts.target_psnr) / 20.0) as f32) * 0.995;
    }

    let mut out = img.clone();
    for (px, &d) in out.as_mut().chunks_exact_mut(3).zip(&delta) {
        let d = round(gain * d);
        for ch in px {
            *ch = (i32::from(*ch) + d).clamp(0, 255) as u8;
        }
    }
    Ok(out)
}

/// A mark found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub payload: u64,
    /// Sync correlation peak, in standard deviations over the floor.
    pub sync_z: f32,
    /// Share of coded bits whose soft value agrees with the decoded payload.
    pub agreement: f32,
    /// Estimated scale of the image relative to the marked original.
    pub scale: f32,
    /// Estimated rotation in degrees.
    pub rotation_deg: f32,
}

/// What the detector saw, for diagnostics and benchmarks.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// The most likely payload, checked or not.
    pub best_payload: Option<u64>,
    pub detection: Option<Detection>,
    pub sync_z: f32,
}

/// Looks for a mark made with `key`; `None` when there is none (or it is
/// too damaged to read with confidence).
pub fn detect(img: &RgbImage, key: &WatermarkKey) -> Option<Detection> {
    analyze(img, key).detection
}

/// Looks for farm marks stage by stage, latest first: an upscale or a
/// refine carries its own mark (made with [`WatermarkKey::for_stage`]) on
/// top of what is left of its base image's. Lazy, so taking the first hit
/// decodes no further.
pub fn detect_stages<'a>(
    img: &'a RgbImage,
    key: &'a WatermarkKey,
) -> impl Iterator<Item = (&'static str, Detection)> + 'a {
    ["upscale", "refine", "generate"]
        .into_iter()
        .filter_map(move |stage| detect(img, &key.for_stage(stage)).map(|d| (stage, d)))
}

/// Like [`detect`], with the best guess even when the CRC does not check.
pub fn analyze(img: &RgbImage, key: &WatermarkKey) -> Analysis {
    let none = Analysis {
        best_payload: None,
        detection: None,
        sync_z: 0.0,
    };
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if w0 < 64 || h0 < 64 {
        return none;
    }
    // Box-downscale by an integer factor so the analysis is at most ANALYSIS wide.
    let k = w0.min(h0).div_ceil(ANALYSIS).max(1);
    let (w, h) = (w0 / k, h0 / k);
    let raw_px = img.as_raw();
    let mut y = vec![0.0f32; w * h];
    for yy in 0..h {
        for dy in 0..k {
            let src = &raw_px[(yy * k + dy) * w0 * 3..];
            for (xx, out) in y[yy * w..(yy + 1) * w].iter_mut().enumerate() {
                for dx in 0..k {
                    let p = &src[(xx * k + dx) * 3..(xx * k + dx) * 3 + 3];
                    *out +=
                        0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
                }
            }
        }
    }
    let norm = 1.0 / (k * k) as f32;
    y.iter_mut().for_each(|v| *v *= norm);
    // Residual: the image minus its local mean, edges clipped.
    let blur = box_blur(&y, w, h, 3);
    let raw: Vec<f32> = y.iter().zip(&blur).map(|(a, b)| a - b).collect();
    // Normalise by the local residual level: the mark is weak against busy
    // texture and strong against flat areas, so flat areas must count.
    let level = box_blur(&raw.iter().map(|v| v.abs()).collect::<Vec<_>>(), w, h, 3);
    let mut residual: Vec<f32> = raw
        .iter()
        .zip(&level)
        .map(|(r, l)| (r / (l + 1.0)).clamp(-3.0, 3.0))
        .collect();
    // Flat fills (the corners a rotation leaves, letterboxing, saturated
    // areas) carry no mark; their borders are straight edges that would
    // only confuse the lattice search. Blank them and a margin around them.
    let flat: Vec<f32> = level
        .iter()
        .map(|&l| if l < 0.05 { 1.0 } else { 0.0 })
        .collect();
    if flat.contains(&1.0) {
        let near_flat = box_blur(&flat, w, h, 4);
        for (r, f) in residual.iter_mut().zip(&near_flat) {
            if *f > 0.0 {
                *r = 0.0;
            }
        }
    }

    let layout = Layout::new(key);
    let seed = key.crc_seed();
    let aligner = Aligner::new(&layout);
    // Pick the candidate lattice the sync pattern confirms best, refine its
    // angle and scale on the same measure, and decode the two best: at most
    // two CRC checks per image keeps false positives below 10⁻⁶.
    let probe = |period: f32, angle: f32| {
        let folded = fold(&residual, w, h, period, angle);
        let (offset, z) = aligner.align(&folded);
        (z, period, angle, offset, folded)
    };
    let Some(coarse) = find_lattices(&residual, w, h)
        .into_iter()
        .map(|l| probe(l.period, l.angle))
        .max_by(|a, b| a.0.total_cmp(&b.0))
    else {
        return none;
    };
    // Decode the best candidate; when that fails, refine angle and scale on
    // the sync measure and decode the best refinement. At most two CRC
    // checks per image keep false positives below 10⁻⁶.
    let mut best = Analysis {
        best_payload: None,
        detection: None,
        sync_z: coarse.0,
    };
    let (p0, a0) = (coarse.1, coarse.2);
    let mut next = Some(coarse);
    for round in 0..2 {
        let Some((z, period, angle, offset, folded)) = next.take() else {
            break;
        };
        best.sync_z = best.sync_z.max(z);
        if z >= MIN_SYNC_Z {
            let soft = read_bits(&folded, offset, &layout);
            if let Some((payload, ok)) = ecc::decode_best(&soft, seed) {
                best.best_payload = Some(payload);
                if ok {
                    let coded = ecc::encode(payload, seed);
                    let agree = soft
                        .iter()
                        .zip(&coded)
                        .filter(|(s, c)| (**s > 0.0) == (**c == 1))
                        .count();
                    let original_period = (CHIPS * chip_size(img.width(), img.height())) as f32;
                    best.detection = Some(Detection {
                        payload,
                        sync_z: z,
                        agreement: agree as f32 / soft.len() as f32,
                        // Relative to the tile an unscaled image of this size would carry.
                        scale: period * k as f32 / original_period,
                        rotation_deg: angle.to_degrees(),
                    });
                    return best;
                }
            }
        }
        if round == 0 {
            next = [
                (0.2f32, 1.0f32),
                (-0.2, 1.0),
                (0.0, 1.005),
                (0.0, 0.995),
                (0.2, 1.005),
                (-0.2, 0.995),
                (0.2, 0.995),
                (-0.2, 1.005),
            ]
            .into_iter()
            .map(|(da, ds)| probe(p0 * ds, a0 + da.to_radians()))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    best
}

struct Lattice {
    period: f32,
    angle: f32,
}

/// Candidate tile lattices from the autocorrelation of the whitened residual.
fn find_lattices(residual: &[f32], w: usize, h: usize) -> Vec<Lattice> {
    let n = w.max(h).next_power_of_two().min(ANALYSIS);
    let mut planner = FftPlanner::<f32>::new();
    let mut grid = vec![Complex32::new(0.0, 0.0); n * n];
    for y in 0..h.min(n) {
        for x in 0..w.min(n) {
            grid[y * n + x].re = residual[y * w + x];
        }
    }
    // Forward transform left transposed: the whitening below is symmetric
    // in x and y, and the inverse transform transposes it back.
    let forward = planner.plan_fft_forward(n);
    forward.process(&mut grid);
    transpose(&mut grid, n);
    forward.process(&mut grid);
    // Whiten: divide the power spectrum by its local average so the mark's
    // harmonics (spikes) stand out from the image's smooth spectrum.
    let power: Vec<f32> = grid.iter().map(|c| c.norm_sqr()).collect();
    let smooth = box_blur(&power, n, n, 12);
    for (c, (p, s)) in grid.iter_mut().zip(power.iter().zip(&smooth)) {
        *c = Complex32::new(p / (s + 1e-6), 0.0);
    }
    let inverse = planner.plan_fft_inverse(n);
    inverse.process(&mut grid);
    transpose(&mut grid, n);
    inverse.process(&mut grid);
    let acf = |dx: i64, dy: i64| {
        grid[(dy.rem_euclid(n as i64) as usize) * n + dx.rem_euclid(n as i64) as usize].re
    };

    // The tile is a quarter of the short side at embedding (a little less
    // after rounding to whole chips); resizing keeps that ratio and cropping
    // raises it, so the period lies in a band of the short side here.
    let short = w.min(h) as f32;
    let (min_len, max_len) = (
        (short * MIN_PERIOD_RATIO).max(12.0),
        (short * MAX_PERIOD_RATIO).min(n as f32 / 2.0 - 2.0),
    );
    // Candidate lattice vectors: the strongest local maxima of the score,
    // and half of each (in case a multiple outscored the fundamental). The
    // caller keeps the one the sync pattern confirms best.
    let score = |x: i64, y: i64| acf(x, y) + acf(-y, x);
    let in_band = |x: i64, y: i64| {
        let len = ((x * x + y * y) as f32).sqrt();
        x > 0
            && len >= min_len
            && len <= max_len
            && (y as f32 / x as f32).atan().abs() <= 8f32.to_radians()
    };
    let mut peaks: Vec<(f32, i64, i64)> = Vec::new();
    for dy in -(max_len as i64)..=(max_len as i64) {
        for dx in 1..=(max_len as i64) {
            if !in_band(dx, dy) {
                continue;
            }
            let v = score(dx, dy);
            if v <= 0.0
                || [(1, 0), (-1, 0), (0, 1), (0, -1)]
                    .iter()
                    .any(|(ex, ey)| score(dx + ex, dy + ey) > v)
            {
                continue;
            }
            // Rank by prominence over the same direction a little shorter and
            // longer: a straight edge in the image (a rotated frame, a
            // horizon) makes a ridge along its direction, the lattice a point.
            let len = ((dx * dx + dy * dy) as f32).sqrt();
            let at = |f: f32| {
                score(
                    (dx as f32 * f).round() as i64,
                    (dy as f32 * f).round() as i64,
                )
            };
            let (near, far) = (1.0 - 6.0 / len, 1.0 + 6.0 / len);
            peaks.push((v - 0.5 * (at(near) + at(far)), dx, dy));
        }
    }
    peaks.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut starts: Vec<(i64, i64)> = Vec::new();
    for &(_, x, y) in peaks.iter().take(LATTICE_CANDIDATES) {
        starts.push((x, y));
        let (hx, hy) = (
            (x as f32 / 2.0).round() as i64,
            (y as f32 / 2.0).round() as i64,
        );
        if in_band(hx, hy) {
            starts.push((hx, hy));
        }
    }
    // Sub-pixel refinement by a parabola through the neighbours.
    let refine = |c: f32, m: f32, p: f32| {
        let d = m - 2.0 * c + p;
        if d.abs() < 1e-9 {
            0.0
        } else {
            (0.5 * (m - p) / d).clamp(-0.5, 0.5)
        }
    };
    let peak_at = |x: i64, y: i64| {
        let c = acf(x, y);
        (
            x as f32 + refine(c, acf(x - 1, y), acf(x + 1, y)),
            y as f32 + refine(c, acf(x, y - 1), acf(x, y + 1)),
        )
    };
    let mut lattices = Vec::new();
    for (bx, by) in starts {
        // Estimates of the lattice vector from its first two multiples, along
        // both axes (the perpendicular vector rotated back); a multiple
        // further out pins the angle and period down more finely.
        let mut estimates: Vec<(f32, f32, f32)> = Vec::new();
        for (ax, ay, turn) in [(bx, by, false), (-by, bx, true)] {
            for mult in 1..=2i64 {
                let (gx, gy) = (ax * mult, ay * mult);
                if ((gx * gx + gy * gy) as f32).sqrt() > n as f32 / 2.0 - 2.0
                    || gx.unsigned_abs().max(gy.unsigned_abs()) as usize > w.min(h) * 2 / 3
                {
                    continue;
                }
                // The true peak of the multiple is within ±1 of its prediction.
                let mut p = (f32::MIN, gx, gy);
                for ey in -1..=1 {
                    for ex in -1..=1 {
                        let v = acf(gx + ex, gy + ey);
                        if v > p.0 {
                            p = (v, gx + ex, gy + ey);
                        }
                    }
                }
                if p.0 <= 0.0 {
                    continue;
                }
                let (fx, fy) = peak_at(p.1, p.2);
                let (fx, fy) = (fx / mult as f32, fy / mult as f32);
                let (fx, fy) = if turn { (fy, -fx) } else { (fx, fy) };
                estimates.push((fx, fy, mult as f32 * p.0));
            }
        }
        let total: f32 = estimates.iter().map(|e| e.2).sum();
        if total <= 0.0 {
            continue;
        }
        let fx = estimates.iter().map(|e| e.0 * e.2).sum::<f32>() / total;
        let fy = estimates.iter().map(|e| e.1 * e.2).sum::<f32>() / total;
        lattices.push(Lattice {
            period: (fx * fx + fy * fy).sqrt(),
            angle: fy.atan2(fx),
        });
    }
    lattices
}

/// A 2-D FFT of an n×n grid: rows, then columns (through a transpose, which
/// keeps the column pass cache-friendly).
fn fft2_with(fft: &std::sync::Arc<dyn rustfft::Fft<f32>>, data: &mut [Complex32], n: usize) {
    fft.process(data);
    transpose(data, n);
    fft.process(data);
    transpose(data, n);
}

/// In-place transpose of an n×n grid, in blocks that stay in cache.
fn transpose(data: &mut [Complex32], n: usize) {
    const B: usize = 16;
    for by in (0..n).step_by(B) {
        for bx in (by..n).step_by(B) {
            for y in by..(by + B).min(n) {
                let start = if bx == by { y + 1 } else { bx };
                for x in start..(bx + B).min(n) {
                    data.swap(y * n + x, x * n + y);
                }
            }
        }
    }
}

/// Folds every pixel into one tile of FOLD×FOLD bins along the lattice.
fn fold(residual: &[f32], w: usize, h: usize, period: f32, angle: f32) -> Vec<f32> {
    // Tile coordinates in 16.16 fixed point, stepped per pixel: the bin is
    // the integer part masked to the (power-of-two) fold size, which floors
    // negative coordinates correctly too.
    const ONE: f64 = 65536.0;
    let (s, c) = (f64::from(angle).sin(), f64::from(angle).cos());
    let scale = FOLD as f64 / f64::from(period);
    let mask = (FOLD - 1) as i64;
    let (du_x, dv_x) = ((c * scale * ONE) as i64, (-s * scale * ONE) as i64);
    let mut acc = vec![0.0f32; FOLD * FOLD];
    let mut cnt = vec![0u32; FOLD * FOLD];
    for y in 0..h {
        let yf = y as f64 + 0.5;
        let mut u = ((0.5 * c + yf * s) * scale * ONE) as i64;
        let mut v = ((-0.5 * s + yf * c) * scale * ONE) as i64;
        let row = &residual[y * w..(y + 1) * w];
        for &r in row {
            let bin = (((v >> 16) & mask) as usize) * FOLD + ((u >> 16) & mask) as usize;
            acc[bin] += r;
            cnt[bin] += 1;
            u += du_x;
            v += dv_x;
        }
    }
    for (a, n) in acc.iter_mut().zip(cnt) {
        if n > 0 {
            *a /= n as f32;
        }
    }
    let mean = acc.iter().sum::<f32>() / acc.len() as f32;
    acc.iter_mut().for_each(|a| *a -= mean);
    acc
}

/// The conjugate spectrum of the sync chips rendered at fold resolution,
/// and the FFT plans, computed once per detection.
struct Aligner {
    template: Vec<Complex32>,
    forward: std::sync::Arc<dyn rustfft::Fft<f32>>,
    inverse: std::sync::Arc<dyn rustfft::Fft<f32>>,
}

impl Aligner {
    fn new(layout: &Layout) -> Self {
        let mut planner = FftPlanner::<f32>::new();
        let forward = planner.plan_fft_forward(FOLD);
        let inverse = planner.plan_fft_inverse(FOLD);
        let mut template: Vec<Complex32> = render_tile(&layout.sync, FOLD)
            .iter()
            .map(|&v| Complex32::new(v, 0.0))
            .collect();
        fft2_with(&forward, &mut template, FOLD);
        template.iter_mut().for_each(|c| *c = c.conj());
        Self {
            template,
            forward,
            inverse,
        }
    }

    /// Circular cross-correlation of the folded tile with the sync pattern:
    /// the shift with the highest peak, and that peak in standard deviations.
    fn align(&self, folded: &[f32]) -> ((usize, usize), f32) {
        let mut a: Vec<Complex32> = folded.iter().map(|&v| Complex32::new(v, 0.0)).collect();
        fft2_with(&self.forward, &mut a, FOLD);
        for (x, t) in a.iter_mut().zip(&self.template) {
            *x *= t;
        }
        fft2_with(&self.inverse, &mut a, FOLD);
        let re: Vec<f32> = a.iter().map(|c| c.re).collect();
        let (idx, peak) = re
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        let mean = re.iter().sum::<f32>() / re.len() as f32;
        let var = re.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / re.len() as f32;
        (
            (idx % FOLD, idx / FOLD),
            (peak - mean) / var.sqrt().max(1e-12),
        )
    }
}

/// Soft values of the coded bits: matched filters on the shifted fold.
fn read_bits(folded: &[f32], (ox, oy): (usize, usize), layout: &Layout) -> Vec<f32> {
    // Each chip's footprint in fold bins: a bilinear bump two chips wide.
    let mut soft = vec![0.0f32; ecc::CODED_BITS];
    for cy in 0..CHIPS {
        for cx in 0..CHIPS {
            let chip = cy * CHIPS + cx;
            let b = layout.bit[chip];
            if b == usize::MAX {
                continue;
            }
            let mut v = 0.0;
            for dy in 0..2 * SUB {
                let wy = 1.0 - ((dy as f32 + 0.5) - SUB as f32).abs() / SUB as f32;
                let yy = (cy * SUB + dy + FOLD - SUB / 2 + oy) % FOLD;
                for dx in 0..2 * SUB {
                    let wx = 1.0 - ((dx as f32 + 0.5) - SUB as f32).abs() / SUB as f32;
                    let xx = (cx * SUB + dx + FOLD - SUB / 2 + ox) % FOLD;
                    v += wx * wy * folded[yy * FOLD + xx];
                }
            }
            soft[b] += layout.sign[chip] * v;
        }
    }
    let rms = (soft.iter().map(|s| s * s).sum::<f32>() / soft.len() as f32)
        .sqrt()
        .max(1e-12);
    soft.iter().map(|s| s / rms).collect()
}

/// PSNR of `b` against `a` over all channels, in dB.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum::<f64>()
        / a.as_raw().len().max(1) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3)
//! and F(4×4, 3×3) (Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2015). Each m×m block of outputs comes from the
//! (m+2)×(m+2) block of input under it through (m+2)² products per input
//! channel, where the direct convolution takes 9m²: 16 instead of 36 for
//! F(2×2), 36 instead of 144 for F(4×4). With `g` a 3×3 filter and `d` an
//! input tile,
//!
//! ```text
//! Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A
//! ```
//!
//! Over a layer the points ξ of the transformed tile are as many matmuls,
//! `M[ξ] (cout × tiles) = U[ξ] (cout × cin) · V[ξ] (cin × tiles)`, with
//! U the transformed filters and V the transformed input tiles: 2.25 (F2)
//! or 4 (F4) times fewer multiply-adds than the im2col's single matmul, for
//! three passes over memory of their own (the input's, the output's and
//! the filters' transforms). The filters are transformed on every call, so
//! a model holds no second copy of its weights. F(2×2)'s coefficients are
//! 0, ±1 and ½, so in f32 its result stays within a few roundings of the
//! direct convolution's; F(4×4)'s reach 8 and 1/24, which costs about one
//! decimal digit more (checked against the direct convolution and by the
//! diffusers reference tests at their tolerances), so it runs only where
//! its larger tiles pay: maps of at least [`F4_MIN_SIDE`] a side with
//! [`F4_PIXELS_PER_CHANNEL`] output pixels per channel
//! (`HALLMARK_WINOGRAD=f2` keeps F(2×2) everywhere, the benchmarks'
//! baseline).
//!
//! The work goes in bands of tile rows (several whole images for small
//! maps) whose transformed input and products stay near the cache, and
//! only where it gains: from 32 channels in and out and 128 tiles up (see
//! [`runs`]); the im2col takes the rest. Narrow layers (up to 256
//! channels) give each thread bands of its own, small enough for its
//! core's cache ([`per_core`]); wide ones put all threads on one band at a
//! time, its transforms split over the channels and its matmuls over the
//! points ([`shared`]). The layouts keep what one thread writes together — U as `[cout][ξ][cin]`, V
//! as `[cin][ξ][tile]`, M as `[ξ][cout][tile]` — and the matmuls read U and
//! V through their strides.

use rayon::prelude::*;

use super::{ConvShape, Epilogue, Operand, Tile, matmul_strided, split_rows};

/// Which of the two minimal filterings a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// F(2×2, 3×3): 2×2 outputs from 4×4 inputs, 16 points.
    F2,
    /// F(4×4, 3×3): 4×4 outputs from 6×6 inputs, 36 points.
    F4,
}

impl Form {
    /// The side of a tile's outputs.
    fn m(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Points of a transformed tile: the matmuls per band.
    fn points(self) -> usize {
        match self {
            Self::F2 => F2_POINTS,
            Self::F4 => F4_POINTS,
        }
    }

    /// How far this form's output may stray from a direct f32
    /// convolution, relative to the output's largest magnitude, in the
    /// tests: a few times what `both_forms_stay_close_to_the_exact_convolution`
    /// measures against f64 (F(2×2) up to 1e-6, F(4×4) up to 1.8e-5), plus
    /// the direct convolution's own rounding. A misplaced tile or a wrong
    /// transform is off by order 1.
    #[cfg(test)]
    fn tolerance(self) -> f32 {
        match self {
            Self::F2 => 5e-6,
            Self::F4 => 8e-5,
        }
    }

    /// The form for `s`: F(4×4) where both sides of the output are at
    /// least [`F4_MIN_SIDE`] and it has [`F4_PIXELS_PER_CHANNEL`] output
    /// pixels (all images) per channel of the wider side, unless
    /// `HALLMARK_WINOGRAD=f2` (the benchmarks' in-run baseline) says
    /// F(2×2) everywhere.
    fn for_shape(s: &ConvShape) -> Self {
        let f2_only = crate::conv::winograd_f2_only();
        let pixels = s.batch * s.out_h * s.out_w;
        if !f2_only
            && s.out_h.min(s.out_w) >= F4_MIN_SIDE
            && pixels >= F4_PIXELS_PER_CHANNEL * s.cin.max(s.cout)
        {
            Self::F4
        } else {
            Self::F2
        }
    }
}

/// Points of a transformed F(2×2, 3×3) tile (4×4) and of an F(4×4, 3×3)
/// one (6×6).
const F2_POINTS: usize = 16;
const F4_POINTS: usize = 36;

/// The output side from which F(4×4, 3×3) runs: below it partial tiles and
/// the larger transforms eat what its fewer products save.
const F4_MIN_SIDE: usize = 16;

/// Output pixels per channel from which F(4×4, 3×3) runs: its filters'
/// transform (36 points per filter where F(2×2) has 16) is paid once per
/// call, its savings per pixel. Measured (`hallmark-diffusion-bench conv`,
/// `HALLMARK_WINOGRAD=f2` the baseline, 2-core Zen 3): 1.4–1.9 times
/// F(2×2)'s speed for Real-ESRGAN's layers at 128² (up to 85 pixels per
/// channel), 1.45 for 320 channels at 64² × 2 (26), 1.5 for 256 at 256²;
/// even for 640 at 32² × 2 (3.2) and 512 at 64² (8); 0.7 for 1280 at 16² × 2
/// (0.4).
const F4_PIXELS_PER_CHANNEL: usize = 16;

/// What a band's transformed input, and its products, may take.
const BAND_BYTES: usize = 16 << 20;

/// Tiles per band at the least, whatever the channels: each matmul's
/// columns (with 384 of them the top-level matmuls of the SD-1.5 UNet ran
/// at 320 GFLOP/s on two Zen 5 cores, with 2048 at 420).
const MIN_BAND_TILES: usize = 1024;

/// Layers up to this many channels (in and out) run [`per_core`], wider
/// ones [`shared`]. Per core, every band reads all of U, which is small
/// here (4 MiB at 256 channels): 256 → 256 at 256² took 101 ms per core
/// and 109 shared; 640 → 640 at 32² (26 MiB of U) 32 ms per core and 21
/// shared.
const CORE_CHANNELS: usize = 256;

/// What a band's transformed input, and its products, may take in
/// [`per_core`]: one core's share of the cache.
const CORE_BAND_BYTES: usize = 1 << 20;

/// Tiles (of all images) below which the im2col is faster: the filters'
/// transform, on every call, costs about what 2.5 tiles' products save per
/// filter. Measured (`hallmark-diffusion-bench conv`): 1.3 times the
/// im2col's speed at 128 tiles (1280 channels at 16², batch 2), no gain at
/// 32 (8²).
const MIN_TILES: usize = 128;

/// Channels (in and out) below which the im2col is as fast. Measured
/// (`hallmark-diffusion-bench conv`, per-core bands): Real-ESRGAN's 64 → 32
/// at 128² and 64 → 64 at 512² 1.1–1.2 times the im2col's speed, 160 → 32
/// 1.5; the tiny models' 32 channels about the same; a 4-channel input
/// (the UNet's first convolution) a quarter.
const MIN_CHANNELS: usize = 32;

/// Whether this kernel runs `s`: a 3×3 kernel at stride 1 (any padding)
/// with enough channels and tiles to gain.
pub(super) fn runs(s: &ConvShape) -> bool {
    let tiles = s.batch * s.out_h.div_ceil(2) * s.out_w.div_ceil(2);
    s.kh == 3
        && s.kw == 3
        && s.stride == 1
        && s.cin.min(s.cout) >= MIN_CHANNELS
        && tiles >= MIN_TILES
}

/// The convolution of `x` (`(batch, cin, height, width)`) by `w` (`(cout,
/// cin, 3, 3)`) into `out` (`(batch, cout, out_h, out_w)`) at `s`'s
/// padding, `ep` applied to each band's rows as they are written; `s` must
/// be 3×3 at stride 1 (the callers check [`runs`]).
pub(super) fn convolve(x: &[f32], w: &[f32], s: &ConvShape, out: &mut [f32], ep: &Epilogue) {
    convolve_as(Form::for_shape(s), x, w, s, out, ep);
}

/// [`Form::tolerance`] of the form [`convolve`] takes for `s`.
#[cfg(test)]
pub(super) fn tolerance(s: &ConvShape) -> f32 {
    Form::for_shape(s).tolerance()
}

/// [`convolve`] by the given form.
fn convolve_as(f: Form, x: &[f32], w: &[f32], s: &ConvShape, out: &mut [f32], ep: &Epilogue) {
    assert!(
        s.kh == 3 && s.kw == 3 && s.stride == 1,
        "Winograd F(m×m, 3×3) takes {s:?}"
    );
    let u = filters(f, w, s);
    if s.cin.max(s.cout) <= CORE_CHANNELS {
        per_core(f, x, &u, s, out, ep)
    } else {
        shared(f, x, &u, s, out, ep)
    }
}

/// Bands of tile rows whose transformed input and products take at most
/// `bytes`, or `min_tiles` tiles, whichever is more (a tile row at the
/// least).
fn bands(f: Form, s: &ConvShape, bytes: usize, min_tiles: usize) -> Vec<Tile> {
    let (tiles_h, tiles_w) = (s.out_h.div_ceil(f.m()), s.out_w.div_ceil(f.m()));
    let budget = (bytes / 4 / (f.points() * s.cin.max(s.cout).max(1))).max(min_tiles);
    split_rows(s.batch, tiles_h, tiles_w, budget)
}

/// The elements of one output plane that `band`'s tile rows cover (rows
/// `m band.row ..`, cut at the plane's last row).
fn band_rows(f: Form, s: &ConvShape, band: Tile) -> std::ops::Range<usize> {
    let first = f.m() * band.row;
    let last = (f.m() * (band.row + band.rows)).min(s.out_h);
    first * s.out_w..last * s.out_w
}

/// Input `channels`' tiles of `band` into `v`, by `f`'s transform.
fn transform_input(
    f: Form,
    v: &mut [f32],
    x: &[f32],
    s: &ConvShape,
    channels: std::ops::Range<usize>,
    band: Tile,
) {
    match f {
        Form::F2 => transform_input2(v, x, s, channels, band, s.out_w.div_ceil(2)),
        Form::F4 => transform_input4(v, x, s, channels, band, s.out_w.div_ceil(4)),
    }
}

/// One output plane's rows of `band` from the products, by `f`'s transform.
fn transform_output(f: Form, y: &mut [f32], m: &[f32], s: &ConvShape, band: Tile, first: usize) {
    match f {
        Form::F2 => transform_output2(y, m, s, band, first, s.out_w.div_ceil(2)),
        Form::F4 => transform_output4(y, m, s, band, first, s.out_w.div_ceil(4)),
    }
}

/// Wide layers: each band's transforms split over the channels and its
/// matmuls over the points, all threads on one band at a time.
fn shared(f: Form, x: &[f32], u: &[f32], s: &ConvShape, out: &mut [f32], ep: &Epilogue) {
    let points = f.points();
    let tiles_w = s.out_w.div_ceil(f.m());
    let bands = bands(f, s, BAND_BYTES, MIN_BAND_TILES);
    let widest = bands
        .iter()
        .map(|b| b.images * b.rows * tiles_w)
        .max()
        .unwrap_or(0);
    let mut v = vec![0f32; s.cin * points * widest];
    let mut m = vec![0f32; s.cout * points * widest];
    for band in bands {
        let tiles = band.images * band.rows * tiles_w;
        let v = &mut v[..s.cin * points * tiles];
        let m = &mut m[..s.cout * points * tiles];
        v.par_chunks_mut(points * tiles)
            .enumerate()
            .for_each(|(c, v)| transform_input(f, v, x, s, c..c + 1, band));
        // Each matmul on one thread: at the small maps' sizes a matmul's
        // own split costs more than it saves.
        m.par_chunks_mut(s.cout * tiles)
            .enumerate()
            .for_each(|(xi, m)| products(f, m, u, v, s, xi, tiles));
        let plane = s.out_h * s.out_w;
        let images = &mut out[band.image * s.cout * plane..][..band.images * s.cout * plane];
        images.par_chunks_mut(plane).enumerate().for_each(|(j, y)| {
            let (image, o) = (j / s.cout, j % s.cout);
            let first = o * tiles + image * band.rows * tiles_w;
            let rows = band_rows(f, s, band);
            let at = (band.image * s.cout + j) * plane + rows.start;
            let y = &mut y[rows];
            transform_output(f, y, m, s, band, first);
            ep.apply(y, band.image * s.cout + j, at);
        });
    }
}

/// `M[ξ] = U[ξ] · V[ξ]` into `m` (`cout × tiles`); U's and V's rows are
/// `f`'s points apart.
fn products(f: Form, m: &mut [f32], u: &[f32], v: &[f32], s: &ConvShape, xi: usize, tiles: usize) {
    let point = |start: usize, row: usize| Operand {
        start,
        strides: [f.points() * row, 1],
    };
    matmul_strided(
        (s.cout, tiles, s.cin),
        1.0,
        (m, Operand::row_major(tiles)),
        (u, point(xi * s.cin, s.cin)),
        (v, point(xi * tiles, tiles)),
        gemm::Parallelism::None,
    );
}

/// The output, shared by the threads of [`per_core`]: each writes the rows
/// of its own bands only.
struct Planes {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `Planes::rows` hands out only the rows of one band, and bands do
// not overlap.
unsafe impl Sync for Planes {}

impl Planes {
    /// The `rows` of plane (`image`, `o`).
    ///
    /// # Safety
    /// No other live slice from this `Planes` may overlap them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(
        &self,
        s: &ConvShape,
        image: usize,
        o: usize,
        rows: std::ops::Range<usize>,
    ) -> &mut [f32] {
        let start = (image * s.cout + o) * s.out_h * s.out_w + rows.start;
        assert!(start + rows.len() <= self.len, "rows inside the output");
        // SAFETY: in bounds (above); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), rows.len()) }
    }
}

/// Narrow layers: one band per thread at a time, small enough that its
/// transformed tiles and products stay in that core's cache, where the
/// shared scheme would pass them between cores through memory.
fn per_core(f: Form, x: &[f32], u: &[f32], s: &ConvShape, out: &mut [f32], ep: &Epilogue) {
    let points = f.points();
    let tiles_w = s.out_w.div_ceil(f.m());
    let bands = bands(f, s, CORE_BAND_BYTES, 0);
    assert_eq!(
        out.len(),
        s.batch * s.cout * s.out_h * s.out_w,
        "the output's size"
    );
    let planes = Planes {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    bands.par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(v, m), &band| {
            let tiles = band.images * band.rows * tiles_w;
            v.resize(s.cin * points * tiles, 0f32);
            m.resize(s.cout * points * tiles, 0f32);
            transform_input(f, v, x, s, 0..s.cin, band);
            for (xi, m) in m.chunks_exact_mut(s.cout * tiles).enumerate() {
                products(f, m, u, v, s, xi, tiles);
            }
            for image in 0..band.images {
                for o in 0..s.cout {
                    let rows = band_rows(f, s, band);
                    let plane = (band.image + image) * s.cout + o;
                    let at = plane * s.out_h * s.out_w + rows.start;
                    // SAFETY: these rows belong to this band alone.
                    let y = unsafe { planes.rows(s, band.image + image, o, rows) };
                    let first = o * tiles + image * band.rows * tiles_w;
                    transform_output(f, y, m, s, band, first);
                    ep.apply(y, plane, at);
                }
            }
        },
    );
}

/// U as `[cout][ξ][cin]`, each filter `g = w[o][c]` turned into `G g Gᵀ`
/// of `f`.
fn filters(f: Form, w: &[f32], s: &ConvShape) -> Vec<f32> {
    let mut u = vec![0f32; s.cout * f.points() * s.cin];
    u.par_chunks_mut(f.points() * s.cin)
        .zip(w.par_chunks(9 * s.cin))
        .for_each(|(u, w)| match f {
            Form::F2 => transform_filters2(u, w, s.cin),
            Form::F4 => transform_filters4(u, w, s.cin),
        });
    u
}

/// Channel `c`'s plane of image `image` of the input.
#[inline(always)]
fn input_plane<'a>(x: &'a [f32], s: &ConvShape, image: usize, c: usize) -> &'a [f32] {
    let len = s.height * s.width;
    &x[(image * s.cin + c) * len..][..len]
}

/// The `N` input rows under a tile row from padded row `top` (input row
/// `top - padding`), each cut to `zeros`'s length; `zeros` itself where a
/// row lies outside the map.
#[inline(always)]
fn tile_rows<'a, const N: usize>(
    plane: &'a [f32],
    s: &ConvShape,
    top: usize,
    zeros: &'a [f32],
) -> [&'a [f32]; N] {
    std::array::from_fn(
        |i| match (top + i).checked_sub(s.padding).filter(|&iy| iy < s.height) {
            Some(iy) => &plane[iy * s.width..][..zeros.len()],
            None => zeros,
        },
    )
}

/// `G v` for one 3-vector: `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`.
#[inline(always)]
fn g_times([a, b, c]: [f32; 3]) -> [f32; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// One output channel's filters, `w` as `[cin][3][3]`, into `u` as
/// `[ξ][cin]` (ξ = A i + j): `G g Gᵀ` with `g_times` applying `G`.
#[inline(always)]
fn transform_filters_by<const A: usize>(
    u: &mut [f32],
    w: &[f32],
    cin: usize,
    g_times: impl Fn([f32; 3]) -> [f32; A],
) {
    for (c, g) in w.chunks_exact(9).enumerate() {
        // G g, then (G g) Gᵀ: G applied to each row of G g.
        let columns: [[f32; A]; 3] = std::array::from_fn(|j| g_times([g[j], g[3 + j], g[6 + j]]));
        for i in 0..A {
            let row = g_times([columns[0][i], columns[1][i], columns[2][i]]);
            for (j, value) in row.into_iter().enumerate() {
                u[(A * i + j) * cin + c] = value;
            }
        }
    }
}

multiversion! {
    /// [`transform_filters_by`] F(2×2, 3×3)'s `G`.
    fn transform_filters2(u: &mut [f32], w: &[f32], cin: usize) {
        transform_filters_by(u, w, cin, g_times)
    }
}

multiversion! {
    /// The tiles of `band` of input `channels` into `v`, each channel's as
    /// `[ξ][tile]`: `Bᵀ d B` of every 4×4 tile `d`, `Bᵀ = [1 0 -1 0; 0 1 1
    /// 0; 0 -1 1 0; 0 1 0 -1]`; tile (ty, tx) starts at input row 2 ty -
    /// padding, column 2 tx - padding, zero outside the map. `Bᵀ` combines
    /// a tile row's four input rows straight from the input into padded
    /// rows, then `B` their columns into the tiles.
    fn transform_input2(
        v: &mut [f32],
        x: &[f32],
        s: &ConvShape,
        channels: std::ops::Range<usize>,
        band: Tile,
        tiles_w: usize,
    ) {
        let tiles = band.images * band.rows * tiles_w;
        let wide = 2 * tiles_w + 2;
        // Padded column k is input column k - padding; the columns outside
        // the input are never written, so stay zero.
        let first = s.padding.min(wide);
        let n = s.width.min(wide - first);
        let zeros = vec![0f32; n];
        let mut q = vec![0f32; 4 * wide];
        for (v, c) in v.chunks_exact_mut(F2_POINTS * tiles).zip(channels) {
            for image in 0..band.images {
                let plane = input_plane(x, s, band.image + image, c);
                for r in 0..band.rows {
                    let [d0, d1, d2, d3] = tile_rows(plane, s, 2 * (band.row + r), &zeros);
                    let (q0, rest) = q.split_at_mut(wide);
                    let (q1, rest) = rest.split_at_mut(wide);
                    let (q2, q3) = rest.split_at_mut(wide);
                    let (q0, q1) = (&mut q0[first..first + n], &mut q1[first..first + n]);
                    let (q2, q3) = (&mut q2[first..first + n], &mut q3[first..first + n]);
                    for k in 0..n {
                        q0[k] = d0[k] - d2[k];
                        q1[k] = d1[k] + d2[k];
                        q2[k] = d2[k] - d1[k];
                        q3[k] = d1[k] - d3[k];
                    }
                    let base = (image * band.rows + r) * tiles_w;
                    for (i, qi) in q.chunks_exact(wide).enumerate() {
                        let (p0, rest) = v[4 * i * tiles..].split_at_mut(tiles);
                        let (p1, rest) = rest.split_at_mut(tiles);
                        let (p2, rest) = rest.split_at_mut(tiles);
                        let p3 = &mut rest[..tiles];
                        for tx in 0..tiles_w {
                            let [a, b, cc, e] = [qi[2 * tx], qi[2 * tx + 1], qi[2 * tx + 2], qi[2 * tx + 3]];
                            let t = base + tx;
                            p0[t] = a - cc;
                            p1[t] = b + cc;
                            p2[t] = cc - b;
                            p3[t] = b - e;
                        }
                    }
                }
            }
        }
    }
}

/// Tiles per chunk of [`transform_output`]'s row: its four partial rows
/// stay in registers' reach on the stack.
const OUT_CHUNK: usize = 64;

multiversion! {
    /// One output plane's rows of `band` (`y`, from the band's first output
    /// row) from `m`, the products as `[ξ][cout][tile]` (this plane's tiles
    /// from `first` in each point's block): `Aᵀ M A` of every tile, `Aᵀ =
    /// [1 1 1 0; 0 1 -1 -1]`, cut at the plane's edges. A tile row goes in
    /// chunks: the even and odd columns of its two output rows are worked
    /// out over the chunk's tiles (16 streams in, four out, all contiguous,
    /// so the loop vectorises), then interleaved into the rows.
    fn transform_output2(y: &mut [f32], m: &[f32], s: &ConvShape, band: Tile, first: usize, tiles_w: usize) {
        let block = m.len() / F2_POINTS;
        let point = |xi: usize| &m[xi * block + first..][..band.rows * tiles_w];
        let p: [&[f32]; F2_POINTS] = std::array::from_fn(point);
        for r in 0..band.rows {
            // Output rows 2(band.row + r) and the one below, where inside.
            let rows = (s.out_h - 2 * (band.row + r)).min(2);
            let mut tx0 = 0;
            while tx0 < tiles_w {
                let n = OUT_CHUNK.min(tiles_w - tx0);
                let at = r * tiles_w + tx0;
                let q: [&[f32]; F2_POINTS] = std::array::from_fn(|xi| &p[xi][at..at + n]);
                // [top even, top odd, bottom even, bottom odd]
                let mut out = [[0f32; OUT_CHUNK]; 4];
                for k in 0..n {
                    // Aᵀ M: its two rows of four, then each row times A.
                    let top: [f32; 4] = std::array::from_fn(|j| q[j][k] + q[4 + j][k] + q[8 + j][k]);
                    let bottom: [f32; 4] =
                        std::array::from_fn(|j| q[4 + j][k] - q[8 + j][k] - q[12 + j][k]);
                    out[0][k] = top[0] + top[1] + top[2];
                    out[1][k] = top[1] - top[2] - top[3];
                    out[2][k] = bottom[0] + bottom[1] + bottom[2];
                    out[3][k] = bottom[1] - bottom[2] - bottom[3];
                }
                let ox0 = 2 * tx0;
                let cols = (s.out_w - ox0).min(2 * n);
                for dy in 0..rows {
                    let (even, odd) = (&out[2 * dy][..n], &out[2 * dy + 1][..n]);
                    let row = &mut y[(2 * r + dy) * s.out_w + ox0..][..cols];
                    let mut pairs = row.chunks_exact_mut(2);
                    for ((pair, &e), &o) in (&mut pairs).zip(even).zip(odd) {
                        pair[0] = e;
                        pair[1] = o;
                    }
                    // An odd-width plane's last column.
                    if let [last] = pairs.into_remainder() {
                        *last = even[cols / 2];
                    }
                }
                tx0 += n;
            }
        }
    }
}

/// `G v` for one 3-vector, F(4×4, 3×3)'s `G = [¼ 0 0; -⅙ -⅙ -⅙; -⅙ ⅙ -⅙;
/// 1/24 1/12 ⅙; 1/24 -1/12 ⅙; 0 0 1]`.
#[inline(always)]
fn g4_times([a, b, c]: [f32; 3]) -> [f32; 6] {
    let (even, odd) = (a + c, b);
    let (quarter, twelfth) = (a / 24.0 + c / 6.0, b / 12.0);
    [
        a / 4.0,
        -(even + odd) / 6.0,
        -(even - odd) / 6.0,
        quarter + twelfth,
        quarter - twelfth,
        c,
    ]
}

/// `Bᵀ d` for one 6-vector, F(4×4, 3×3)'s `Bᵀ = [4 0 -5 0 1 0; 0 -4 -4 1 1
/// 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]`.
#[inline(always)]
fn bt4_times([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    let (a, b) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (c, e) = (d4 - d2, 2.0 * (d3 - d1));
    [
        4.0 * d0 - 5.0 * d2 + d4,
        a + b,
        a - b,
        c + e,
        c - e,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ m` for one 6-vector, F(4×4, 3×3)'s `Aᵀ = [1 1 1 1 1 0; 0 1 -1 2 -2
/// 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]`.
#[inline(always)]
fn at4_times([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (sum12, diff12) = (m1 + m2, m1 - m2);
    let (sum34, diff34) = (m3 + m4, m3 - m4);
    [
        m0 + sum12 + sum34,
        diff12 + 2.0 * diff34,
        sum12 + 4.0 * sum34,
        diff12 + 8.0 * diff34 + m5,
    ]
}

multiversion! {
    /// [`transform_filters_by`] F(4×4, 3×3)'s `G`.
    fn transform_filters4(u: &mut [f32], w: &[f32], cin: usize) {
        transform_filters_by(u, w, cin, g4_times)
    }
}

multiversion! {
    /// [`transform_input2`] for F(4×4, 3×3): 6×6 tiles, 4 apart; tile (ty,
    /// tx) starts at input row 4 ty - padding, column 4 tx - padding. `Bᵀ`
    /// combines a tile row's six input rows straight from the input into
    /// padded rows, then `B` each tile's six columns of them.
    fn transform_input4(
        v: &mut [f32],
        x: &[f32],
        s: &ConvShape,
        channels: std::ops::Range<usize>,
        band: Tile,
        tiles_w: usize,
    ) {
        let tiles = band.images * band.rows * tiles_w;
        let wide = 4 * tiles_w + 2;
        let first = s.padding.min(wide);
        let n = s.width.min(wide - first);
        let zeros = vec![0f32; n];
        let mut q = vec![0f32; 6 * wide];
        for (v, c) in v.chunks_exact_mut(F4_POINTS * tiles).zip(channels) {
            for image in 0..band.images {
                let plane = input_plane(x, s, band.image + image, c);
                for r in 0..band.rows {
                    let d: [&[f32]; 6] = tile_rows(plane, s, 4 * (band.row + r), &zeros);
                    {
                        let mut rows = q.chunks_exact_mut(wide);
                        let mut q: [&mut [f32]; 6] =
                            std::array::from_fn(|_| rows.next().expect("six rows"));
                        for k in 0..n {
                            let out = bt4_times(std::array::from_fn(|i| d[i][k]));
                            for (q, value) in q.iter_mut().zip(out) {
                                q[first + k] = value;
                            }
                        }
                    }
                    let base = (image * band.rows + r) * tiles_w;
                    for (i, qi) in q.chunks_exact(wide).enumerate() {
                        let mut points = v[6 * i * tiles..][..6 * tiles].chunks_exact_mut(tiles);
                        let mut p: [&mut [f32]; 6] =
                            std::array::from_fn(|_| points.next().expect("six points"));
                        for tx in 0..tiles_w {
                            let out = bt4_times(std::array::from_fn(|j| qi[4 * tx + j]));
                            for (p, value) in p.iter_mut().zip(out) {
                                p[base + tx] = value;
                            }
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// [`transform_output2`] for F(4×4, 3×3): 4×4 outputs of each tile from
    /// its 36 points (ξ = 6 i + j) by `Aᵀ M A`, a tile row in chunks whose
    /// sixteen output streams (row dy, column dx) are worked out over the
    /// chunk's tiles, then interleaved into the rows.
    fn transform_output4(y: &mut [f32], m: &[f32], s: &ConvShape, band: Tile, first: usize, tiles_w: usize) {
        let block = m.len() / F4_POINTS;
        let point = |xi: usize| &m[xi * block + first..][..band.rows * tiles_w];
        let p: [&[f32]; F4_POINTS] = std::array::from_fn(point);
        for r in 0..band.rows {
            let rows = (s.out_h - 4 * (band.row + r)).min(4);
            let mut tx0 = 0;
            while tx0 < tiles_w {
                let n = OUT_CHUNK.min(tiles_w - tx0);
                let at = r * tiles_w + tx0;
                let q: [&[f32]; F4_POINTS] = std::array::from_fn(|xi| &p[xi][at..at + n]);
                // Output (dy, dx) of the chunk's tiles at 4 dy + dx.
                let mut out = [[0f32; OUT_CHUNK]; 16];
                for k in 0..n {
                    // Aᵀ M: each of the six columns j down to four rows.
                    let columns: [[f32; 4]; 6] =
                        std::array::from_fn(|j| at4_times(std::array::from_fn(|i| q[6 * i + j][k])));
                    for dy in 0..4 {
                        let row = at4_times(std::array::from_fn(|j| columns[j][dy]));
                        for (dx, value) in row.into_iter().enumerate() {
                            out[4 * dy + dx][k] = value;
                        }
                    }
                }
                let ox0 = 4 * tx0;
                let cols = (s.out_w - ox0).min(4 * n);
                for dy in 0..rows {
                    let streams: [&[f32]; 4] = std::array::from_fn(|dx| &out[4 * dy + dx][..n]);
                    let row = &mut y[(4 * r + dy) * s.out_w + ox0..][..cols];
                    let mut quads = row.chunks_exact_mut(4);
                    for (k, quad) in (&mut quads).enumerate() {
                        for (dx, v) in quad.iter_mut().enumerate() {
                            *v = streams[dx][k];
                        }
                    }
                    // The plane's last, partial tile.
                    let last = cols / 4;
                    for (dx, v) in quads.into_remainder().iter_mut().enumerate() {
                        *v = streams[dx][last];
                    }
                }
                tx0 += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{rand, randn, relative_diff};
    use candle_core::{Device, Tensor};

    /// [`shared`] or [`per_core`].
    type Scheme = fn(Form, &[f32], &[f32], &ConvShape, &mut [f32], &Epilogue);

    /// Both forms' and both schemes' convolution of `x` by `w` at
    /// `padding`, checked against candle's, bare and with an epilogue (a
    /// bias, the leaky ReLU and a scaled residual, each output element's
    /// own).
    fn check(x: &Tensor, w: &Tensor, padding: usize, what: &str) {
        let s = ConvShape::new(x.shape(), w.shape(), 1, padding).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, ws) = (flat(x), flat(w));
        let conv = x.conv2d(w, padding, 1, 1, 1).unwrap();
        let bias = randn(&[s.cout]);
        let residual = randn(conv.dims());
        let biased = conv
            .broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let leaky = biased.maximum(&(&biased * 0.2).unwrap()).unwrap();
        let with_epilogue = (&residual + (leaky * 0.5).unwrap()).unwrap();
        let (bias, residual) = (flat(&bias), flat(&residual));
        let epilogue = Epilogue {
            bias: Some(&bias),
            leaky: Some(0.2),
            residual: Some((&residual, 0.5)),
        };
        let schemes: [(&str, Scheme); 2] = [("shared", shared), ("per core", per_core)];
        for form in [Form::F2, Form::F4] {
            let u = filters(form, &ws, &s);
            for (name, scheme) in schemes {
                for (ep, want) in [(Epilogue::default(), &conv), (epilogue, &with_epilogue)] {
                    let dims = (s.batch, s.cout, s.out_h, s.out_w);
                    // Whatever the output held before is overwritten.
                    let mut out = vec![f32::NAN; s.batch * s.cout * s.out_h * s.out_w];
                    scheme(form, &xs, &u, &s, &mut out, &ep);
                    let ours = Tensor::from_vec(out, dims, &Device::Cpu).unwrap();
                    assert_eq!(ours.dims(), want.dims());
                    let d = relative_diff(&ours, want);
                    let bare = ep.bias.is_none();
                    assert!(
                        d < form.tolerance(),
                        "{what}, {form:?} {name} (bare: {bare}): differs by {d} of the largest output"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_direct_convolution_at_every_size_and_padding() {
        // (batch, cin, h, w, cout, padding): odd and even outputs (partial
        // tiles at the right and bottom edges), no padding and more than
        // the kernel needs, one channel, a single output pixel, maps
        // narrower than a tile.
        let cases = [
            (2, 5, 9, 7, 4, 1),
            (1, 3, 8, 8, 6, 1),
            (3, 4, 10, 11, 3, 0),
            (1, 2, 5, 6, 2, 2),
            (2, 1, 7, 7, 1, 1),
            (1, 3, 3, 3, 2, 0),
            (1, 4, 1, 2, 3, 1),
        ];
        for (b, cin, h, w, cout, padding) in cases {
            let (x, wt) = (randn(&[b, cin, h, w]), randn(&[cout, cin, 3, 3]));
            check(
                &x,
                &wt,
                padding,
                &format!("{:?}", (b, cin, h, w, cout, padding)),
            );
        }
    }

    #[test]
    fn bands_of_rows_and_of_whole_images_cover_every_output() {
        // 64 channels, F(2×2) tiles: 4096 tiles per band shared by the
        // threads, 256 per core. A 151² output (76² = 5776 tiles) goes in
        // row bands in both schemes; thirteen 40² images (400 tiles each)
        // go ten to a shared band, and three; thirteen 20² ones (100
        // tiles) two to a core's band. (`check` runs F(4×4) too.)
        let schemes = [(BAND_BYTES, MIN_BAND_TILES), (CORE_BAND_BYTES, 0)];
        // Per scheme: whether some case went in row bands, and whether some
        // went several images to a band, in more than one band.
        let mut seen = [(false, false); 2];
        for (b, side) in [(1, 151), (13, 40), (13, 20)] {
            let x = randn(&[b, 64, side, side]);
            let w = (randn(&[8, 64, 3, 3]) * 0.1).unwrap();
            let s = ConvShape::new(x.shape(), w.shape(), 1, 1).unwrap();
            for (&(bytes, min_tiles), seen) in schemes.iter().zip(&mut seen) {
                let bands = bands(Form::F2, &s, bytes, min_tiles);
                seen.0 |= bands.iter().any(|t| t.rows < side.div_ceil(2));
                seen.1 |= bands.len() > 1 && bands.iter().any(|t| t.images > 1);
            }
            check(&x, &w, 1, &format!("{b}×{side}²"));
        }
        assert_eq!(seen, [(true, true); 2]);
    }

    #[test]
    fn filters_transform_as_g_g_transposed() {
        // One filter of ones: G g Gᵀ is the outer product of G's row sums
        // with themselves: (1, 3/2, 1/2, 1) for F(2×2), (1/4, -1/2, -1/6,
        // 7/24, 1/8, 1) for F(4×4).
        let mut u = vec![0f32; F2_POINTS];
        transform_filters2(&mut u, &[1.0; 9], 1);
        let sums = [1.0, 1.5, 0.5, 1.0];
        for (xi, &v) in u.iter().enumerate() {
            assert_eq!(v, sums[xi / 4] * sums[xi % 4], "F2 point {xi}");
        }
        let mut u = vec![0f32; F4_POINTS];
        transform_filters4(&mut u, &[1.0; 9], 1);
        let sums = [0.25, -0.5, -1.0 / 6.0, 7.0 / 24.0, 0.125, 1.0];
        for (xi, &v) in u.iter().enumerate() {
            let want = sums[xi / 6] * sums[xi % 6];
            assert!((v - want).abs() < 1e-6, "F4 point {xi}: {v} for {want}");
        }
    }

    #[test]
    fn both_forms_stay_close_to_the_exact_convolution() {
        // Against the convolution in f64, relative to the output's largest
        // magnitude, PyTorch's initialisation: F(2×2) measured 3e-7–1e-6
        // (f32's direct convolution 5e-7–9e-7), F(4×4) 7e-6–1.8e-5.
        use candle_core::DType;
        for (cin, cout, side) in [(64, 32, 40), (192, 192, 24)] {
            let x = randn(&[1, cin, side, side]).to_dtype(DType::F64).unwrap();
            let bound = 1.0 / ((9 * cin) as f64).sqrt();
            let w = rand(&[cout, cin, 3, 3], -bound, bound);
            let w = w.to_dtype(DType::F64).unwrap();
            let exact = x.conv2d(&w, 1, 1, 1, 1).unwrap();
            let largest = exact
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let flat = |t: &Tensor| {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let s = ConvShape::new(x.shape(), w.shape(), 1, 1).unwrap();
            for (form, tolerance) in [(Form::F2, 4e-6), (Form::F4, 6e-5)] {
                let mut out = vec![0f32; exact.elem_count()];
                convolve_as(
                    form,
                    &flat(&x),
                    &flat(&w),
                    &s,
                    &mut out,
                    &Epilogue::default(),
                );
                let ours = Tensor::from_vec(out, exact.dims(), &Device::Cpu).unwrap();
                let d = (ours.to_dtype(DType::F64).unwrap() - &exact).unwrap();
                let d = d
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    / largest;
                assert!(
                    d < tolerance,
                    "{form:?}, {cin} → {cout} at {side}²: {d:e} off"
                );
            }
        }
    }

    #[test]
    fn f4_runs_on_maps_of_enough_pixels_per_channel() {
        let shape = |batch, channels, side| {
            let x = candle_core::Shape::from((batch, channels, side, side + 3));
            ConvShape::new(&x, &(channels, channels, 3, 3).into(), 1, 1).unwrap()
        };
        assert_eq!(Form::for_shape(&shape(2, 32, F4_MIN_SIDE)), Form::F4);
        assert_eq!(Form::for_shape(&shape(1, 32, F4_MIN_SIDE)), Form::F2);
        assert_eq!(Form::for_shape(&shape(4, 32, F4_MIN_SIDE - 1)), Form::F2);
        // The SD-1.5 UNet's levels at 512², batch 2.
        assert_eq!(Form::for_shape(&shape(2, 320, 62)), Form::F4);
        assert_eq!(Form::for_shape(&shape(2, 1280, 14)), Form::F2);
    }
}

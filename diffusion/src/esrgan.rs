//! Real-ESRGAN's generator (RRDBNet) for ×2 and ×4 super-resolution, read
//! from safetensors with the original parameter names (`conv_first`,
//! `body.N.rdbM.convK`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`,
//! `conv_last`); the architecture (scale, width, depth, growth) is read off
//! the weight shapes. Inference runs in overlapping tiles so large images
//! fit in memory.
//!
//! On the CPU in f32 the network runs over plain buffers
//! ([`RrdbNet::forward`]): each dense block keeps its input and the four
//! growths in one buffer, so every convolution reads a prefix of it and
//! writes its output after that prefix — no concatenation — and the bias,
//! the leaky ReLU and the block's scaled residual are applied as each
//! output band is written, while it is in cache. Elsewhere the network is
//! candle's operations, written as the original is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use rayon::prelude::*;

use crate::DiffusionError;
use crate::conv::{Conv2d, ConvAlgorithm};
use crate::cpu::Epilogue;
use crate::model::{WeightFile, sha256_file};

/// The shape of an RRDBNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrdbConfig {
    /// 1, 2 or 4.
    pub scale: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
}

struct ResidualDenseBlock {
    convs: Vec<Conv2d>,
}

impl ResidualDenseBlock {
    fn new(vb: VarBuilder, nf: usize, gc: usize, algo: ConvAlgorithm) -> candle_core::Result<Self> {
        let convs = (0..5)
            .map(|k| {
                let cin = nf + k * gc;
                let cout = if k == 4 { nf } else { gc };
                let name = format!("conv{}", k + 1);
                algo.conv2d((cin, cout, 3), 1, 1, vb.pp(name))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { convs })
    }

    /// The block on `dense`, whose first `nf` channels hold its `(1, nf,
    /// h, w)` input and which has room for the four growths after them;
    /// `x + 0.2 · conv5(…)` into `out`.
    fn forward_cpu(
        &self,
        dense: &mut [f32],
        out: &mut [f32],
        (h, w): (usize, usize),
    ) -> candle_core::Result<()> {
        let nf = out.len() / (h * w);
        let mut channels = nf;
        for conv in &self.convs[..4] {
            let (input, rest) = dense.split_at_mut(channels * h * w);
            let ep = Epilogue {
                leaky: Some(LEAKY_SLOPE),
                ..Default::default()
            };
            let grown = conv.weight().dim(0)?;
            let rest = &mut rest[..grown * h * w];
            conv.forward_cpu_into(input, (1, channels, h, w), rest, ep)?;
            channels += grown;
        }
        let ep = Epilogue {
            residual: Some((&dense[..nf * h * w], RESIDUAL_SCALE)),
            ..Default::default()
        };
        self.convs[4].forward_cpu_into(dense, (1, channels, h, w), out, ep)?;
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&feats, 1)?)?)?;
            feats.push(y);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&feats, 1)?)?;
        (x5 * RESIDUAL_SCALE as f64)? + x
    }
}

/// The leaky ReLU's slope below zero.
const LEAKY_SLOPE: f32 = 0.2;

/// What the dense blocks, and the blocks of three, scale their output by
/// before adding their input.
const RESIDUAL_SCALE: f32 = 0.2;

fn lrelu(x: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, slope·x)
    x.maximum(&(x * LEAKY_SLOPE as f64)?)
}

/// `(c, h, w)` planes repeated into `(c, 2h, 2w)`: nearest-neighbour ×2.
fn upsample2(x: &[f32], (c, h, w): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; c * 4 * h * w];
    out.par_chunks_mut(4 * w)
        .enumerate()
        .for_each(|(row, dst)| {
            // Output rows 2y and 2y + 1 of channel `row / h` from input row y.
            let (channel, y) = (row / h, row % h);
            let src = &x[(channel * h + y) * w..][..w];
            let (top, bottom) = dst.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
                pair.fill(v);
            }
            bottom.copy_from_slice(top);
        });
    out
}

fn pixel_unshuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}

/// A loaded Real-ESRGAN generator.
pub struct RrdbNet {
    pub config: RrdbConfig,
    pub weights: WeightFile,
    conv_first: Conv2d,
    body: Vec<[ResidualDenseBlock; 3]>,
    conv_body: Conv2d,
    conv_up1: Conv2d,
    conv_up2: Conv2d,
    conv_hr: Conv2d,
    conv_last: Conv2d,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for RrdbNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RrdbNet")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Names and shapes from the header of a whole safetensors file.
fn header_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, DiffusionError> {
    Ok(crate::model::safetensors_header(path)?
        .iter()
        .filter_map(|(k, v)| {
            let shape = v.get("shape")?.as_array()?;
            Some((
                k.clone(),
                shape
                    .iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect(),
            ))
        })
        .collect())
}

/// The `.safetensors` file of an upscaler given as a file or a folder.
pub fn find_weights(path: &Path) -> Result<PathBuf, DiffusionError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|e| DiffusionError::io(path, e))?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(DiffusionError::BadModel(format!(
            "{} holds no .safetensors file",
            path.display()
        ))),
        _ => Err(DiffusionError::BadModel(format!(
            "{} holds several .safetensors files; name one",
            path.display()
        ))),
    }
}

impl RrdbConfig {
    /// Read the architecture off the weight shapes.
    pub fn from_weights(path: &Path) -> Result<Self, DiffusionError> {
        let shapes = header_shapes(path)?;
        let get = |k: &str| {
            shapes.get(k).cloned().ok_or_else(|| {
                DiffusionError::BadModel(format!(
                    "{}: no tensor {k} (not an RRDBNet checkpoint)",
                    path.display()
                ))
            })
        };
        let first = get("conv_first.weight")?;
        let grow = get("body.0.rdb1.conv1.weight")?;
        if first.len() != 4 || grow.len() != 4 {
            return Err(DiffusionError::corrupt(
                path,
                "conv weights must have 4 dimensions",
            ));
        }
        let scale = match first[1] {
            3 => 4,
            12 => 2,
            48 => 1,
            c => {
                return Err(DiffusionError::BadModel(format!(
                    "{}: conv_first takes {c} channels; expected 3 (x4), 12 (x2) or 48 (x1)",
                    path.display()
                )));
            }
        };
        let num_block = (0..)
            .take_while(|i| shapes.contains_key(&format!("body.{i}.rdb1.conv1.weight")))
            .count();
        Ok(Self {
            scale,
            num_feat: first[0],
            num_block,
            num_grow_ch: grow[0],
        })
    }
}

impl RrdbNet {
    /// Load a Real-ESRGAN checkpoint (a `.safetensors` file or a folder
    /// holding one).
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self, DiffusionError> {
        Self::load_with(path, device, dtype, ConvAlgorithm::default())
    }

    /// [`RrdbNet::load`], its convolutions run by `algo`.
    pub fn load_with(
        path: &Path,
        device: &Device,
        dtype: DType,
        algo: ConvAlgorithm,
    ) -> Result<Self, DiffusionError> {
        crate::gpu::prepare(device);
        let file = find_weights(path)?;
        let config = RrdbConfig::from_weights(&file)?;
        let size = std::fs::metadata(&file)
            .map_err(|e| DiffusionError::io(&file, e))?
            .len();
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], dtype, device) }
            .map_err(|e| DiffusionError::corrupt(&file, e))?;
        let weights = WeightFile {
            relative: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: file.clone(),
            size,
        };
        Self::new(vb, config, weights, algo)
            .map_err(|e| DiffusionError::BadModel(format!("loading {}: {e}", file.display())))
    }

    /// Build the network from `vb` (a checkpoint, or the tiny-checkpoint
    /// writer).
    pub(crate) fn new(
        vb: VarBuilder,
        config: RrdbConfig,
        weights: WeightFile,
        algo: ConvAlgorithm,
    ) -> candle_core::Result<Self> {
        let (nf, gc) = (config.num_feat, config.num_grow_ch);
        let in_ch = 3 * (4 / config.scale) * (4 / config.scale);
        let conv = |cin, cout, name: &str| algo.conv2d((cin, cout, 3), 1, 1, vb.pp(name));
        let body = (0..config.num_block)
            .map(|i| {
                let b = vb.pp("body").pp(i.to_string());
                Ok([
                    ResidualDenseBlock::new(b.pp("rdb1"), nf, gc, algo)?,
                    ResidualDenseBlock::new(b.pp("rdb2"), nf, gc, algo)?,
                    ResidualDenseBlock::new(b.pp("rdb3"), nf, gc, algo)?,
                ])
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            conv_first: conv(in_ch, nf, "conv_first")?,
            body,
            conv_body: conv(nf, nf, "conv_body")?,
            conv_up1: conv(nf, nf, "conv_up1")?,
            conv_up2: conv(nf, nf, "conv_up2")?,
            conv_hr: conv(nf, nf, "conv_hr")?,
            conv_last: conv(nf, 3, "conv_last")?,
            weights,
            config,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// sha256 of the weights file.
    pub fn weights_sha256(&self) -> Result<String, DiffusionError> {
        sha256_file(&self.weights.path)
    }

    /// `(b, 3, h, w)` in [0, 1] → `(b, 3, h·s, w·s)`; `h` and `w` must be
    /// multiples of `4 / scale`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let feat = self.unshuffle(x)?;
        if crate::cpu::applies(&feat) && self.conv_first.runs_on_cpu_slices() {
            self.forward_cpu(&feat)
        } else {
            self.forward_candle(&feat)
        }
    }

    /// [`RrdbNet::forward`] as candle's operations on every device (the
    /// CPU's own buffers' in-run baseline in `hallmark-diffusion-bench
    /// esrgan --composed`).
    pub fn forward_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_candle(&self.unshuffle(x)?)
    }

    /// The input at the body's resolution: ×4 as it is, ×2 and ×1 pixel-
    /// unshuffled by 2 and 4.
    fn unshuffle(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.scale {
            2 => pixel_unshuffle(x, 2),
            1 => pixel_unshuffle(x, 4),
            _ => Ok(x.clone()),
        }
    }

    /// The network after the pixel unshuffle, over plain buffers with the
    /// CPU kernels, an image at a time (see the module's doc).
    fn forward_cpu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, cin, h, w) = x.dims4()?;
        let (nf, gc) = (self.config.num_feat, self.config.num_grow_ch);
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let plane = h * w;
        let mut images = Vec::with_capacity(batch);
        for image in input.chunks_exact(cin * plane) {
            let none = Epilogue::default;
            let mut feat = vec![0f32; nf * plane];
            self.conv_first
                .forward_cpu_into(image, (1, cin, h, w), &mut feat, none())?;
            // The trunk: blocks of three dense blocks, each dense block from
            // one buffer into the next one's first channels.
            let mut body = feat.clone();
            let mut dense = vec![0f32; (nf + 4 * gc) * plane];
            let mut next = dense.clone();
            for rrdb in &self.body {
                dense[..nf * plane].copy_from_slice(&body);
                for rdb in rrdb {
                    rdb.forward_cpu(&mut dense, &mut next[..nf * plane], (h, w))?;
                    std::mem::swap(&mut dense, &mut next);
                }
                body.par_chunks_mut(1 << 14)
                    .zip(dense[..nf * plane].par_chunks(1 << 14))
                    .for_each(|(b, y)| {
                        for (b, &y) in b.iter_mut().zip(y) {
                            *b += RESIDUAL_SCALE * y;
                        }
                    });
            }
            drop((dense, next));
            let trunk = Epilogue {
                residual: Some((&feat, 1.0)),
                ..none()
            };
            let mut up = vec![0f32; nf * plane];
            self.conv_body
                .forward_cpu_into(&body, (1, nf, h, w), &mut up, trunk)?;
            let leaky = Epilogue {
                leaky: Some(LEAKY_SLOPE),
                ..none()
            };
            let mut size = (h, w);
            let mut larger = Vec::new();
            for conv in [&self.conv_up1, &self.conv_up2] {
                larger = upsample2(&up, (nf, size.0, size.1));
                size = (2 * size.0, 2 * size.1);
                up = vec![0f32; nf * size.0 * size.1];
                conv.forward_cpu_into(&larger, (1, nf, size.0, size.1), &mut up, leaky)?;
            }
            // Into the last upsampled map, read by now: the largest maps are
            // tens of megabytes, each a fresh allocation's page faults.
            let hr = &mut larger;
            self.conv_hr
                .forward_cpu_into(&up, (1, nf, size.0, size.1), hr, leaky)?;
            let mut out = vec![0f32; 3 * size.0 * size.1];
            self.conv_last
                .forward_cpu_into(hr, (1, nf, size.0, size.1), &mut out, none())?;
            images.push(Tensor::from_vec(out, (1, 3, size.0, size.1), &Device::Cpu)?);
        }
        Tensor::cat(&images, 0)
    }

    /// The network after the pixel unshuffle, as candle's operations.
    fn forward_candle(&self, feat: &Tensor) -> candle_core::Result<Tensor> {
        let mut feat = self.conv_first.forward(feat)?;
        let mut body = feat.clone();
        for rrdb in &self.body {
            let mut y = body.clone();
            for rdb in rrdb {
                y = rdb.forward(&y)?;
            }
            body = ((y * RESIDUAL_SCALE as f64)? + body)?;
        }
        feat = (feat + self.conv_body.forward(&body)?)?;
        let (_, _, h, w) = feat.dims4()?;
        feat = lrelu(
            &self
                .conv_up1
                .forward(&feat.upsample_nearest2d(h * 2, w * 2)?)?,
        )?;
        feat = lrelu(
            &self
                .conv_up2
                .forward(&feat.upsample_nearest2d(h * 4, w * 4)?)?,
        )?;
        self.conv_last
            .forward(&lrelu(&self.conv_hr.forward(&feat)?)?)
    }

    /// Upscale an image by the network's own factor, in tiles of at most
    /// `tile` input pixels per side overlapping by `overlap` pixels.
    pub fn upscale(
        &self,
        img: &RgbImage,
        tile: usize,
        overlap: usize,
    ) -> Result<RgbImage, DiffusionError> {
        let s = self.config.scale;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let align = 4 / s;
        let tile = (tile.max(16) / align) * align;
        let overlap = (overlap / align) * align;
        // Pad to the alignment the pixel unshuffle needs by repeating the edge.
        let (pw, ph) = (w.div_ceil(align) * align, h.div_ceil(align) * align);
        let mut input = vec![0f32; 3 * ph * pw];
        for y in 0..ph {
            for x in 0..pw {
                let p = img.get_pixel(x.min(w - 1) as u32, y.min(h - 1) as u32);
                for c in 0..3 {
                    input[c * ph * pw + y * pw + x] = p[c] as f32 / 255.0;
                }
            }
        }
        let full = Tensor::from_vec(input, (1, 3, ph, pw), &Device::Cpu)?;
        let mut out = vec![0f32; 3 * ph * s * pw * s];
        let (ow, oh) = (pw * s, ph * s);
        let mut y0 = 0;
        while y0 < ph {
            let th = tile.min(ph - y0);
            let mut x0 = 0;
            while x0 < pw {
                let tw = tile.min(pw - x0);
                // The tile with its margin, clamped to the image.
                let (my0, mx0) = (y0.saturating_sub(overlap), x0.saturating_sub(overlap));
                let (my1, mx1) = ((y0 + th + overlap).min(ph), (x0 + tw + overlap).min(pw));
                let patch = full
                    .narrow(2, my0, my1 - my0)?
                    .narrow(3, mx0, mx1 - mx0)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?;
                let up = self
                    .forward(&patch)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                let sum = up.abs()?.sum_all()?.to_scalar::<f32>()?;
                if !sum.is_finite() {
                    return Err(DiffusionError::NonFinite {
                        stage: "super-resolution network",
                        hint: String::new(),
                    });
                }
                let up = up
                    .narrow(2, (y0 - my0) * s, th * s)?
                    .narrow(3, (x0 - mx0) * s, tw * s)?
                    .squeeze(0)?
                    .to_vec3::<f32>()?;
                for (c, plane) in up.iter().enumerate() {
                    for (dy, row) in plane.iter().enumerate() {
                        let base = c * oh * ow + (y0 * s + dy) * ow + x0 * s;
                        out[base..base + row.len()].copy_from_slice(row);
                    }
                }
                x0 += tw;
            }
            y0 += th;
        }
        let (fw, fh) = (w * s, h * s);
        let mut result = RgbImage::new(fw as u32, fh as u32);
        for (x, y, p) in result.enumerate_pixels_mut() {
            for c in 0..3 {
                let v = out[c * oh * ow + y as usize * ow + x as usize];
                p[c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;

    #[test]
    fn cpu_buffers_run_the_network_as_candle_operations_do() {
        // 32 features and growth channels at 24² (144 Winograd tiles): the
        // dense blocks' convolutions run Winograd under the default
        // algorithm, the im2col under `im2col`; two images, ×2 and ×4.
        let tmp = tempfile::tempdir().unwrap();
        for scale in [2, 4] {
            let config = RrdbConfig {
                scale,
                num_feat: 32,
                num_block: 2,
                num_grow_ch: 32,
            };
            let dir = tmp.path().join(format!("x{scale}"));
            std::fs::create_dir(&dir).unwrap();
            crate::tiny::write_esrgan(&dir, config, 3, "test").unwrap();
            let side = 24 * 4 / scale;
            let x = crate::test_util::rand(&[2, 3, side, side], 0.0, 1.0);
            for algo in [ConvAlgorithm::WinogradNonfused, ConvAlgorithm::Im2col] {
                let net = RrdbNet::load_with(&dir, &Device::Cpu, DType::F32, algo).unwrap();
                assert_eq!(net.config, config);
                let ours = net.forward(&x).unwrap();
                assert_eq!(ours.dims(), [2, 3, side * scale, side * scale]);
                let want = net.forward_composed(&x).unwrap();
                // Relative to the output's spread: the random network's
                // output stays near mid-grey.
                let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap();
                let spread = scalar(want.max_all().unwrap()) - scalar(want.min_all().unwrap());
                let d = max_diff(&ours, &want);
                assert!(
                    d < 5e-4 * spread,
                    "x{scale}, {algo}: differs by {d} (spread {spread})"
                );
                // Each image is its own: the second alone gives its half.
                let second = net.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
                let d = max_diff(&second, &ours.narrow(0, 1, 1).unwrap());
                assert!(
                    d < 5e-4 * spread,
                    "x{scale}, {algo}: the batch mixes images ({d})"
                );
            }
        }
    }

    #[test]
    fn nearest_upsampling_repeats_each_pixel_twice_each_way() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let t = Tensor::from_vec(x.clone(), (1, 2, 2, 3), &Device::Cpu).unwrap();
        let want = t.upsample_nearest2d(4, 6).unwrap().flatten_all().unwrap();
        assert_eq!(upsample2(&x, (2, 2, 3)), want.to_vec1::<f32>().unwrap());
    }
}

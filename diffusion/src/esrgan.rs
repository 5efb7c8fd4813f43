//! Real-ESRGAN's generator (RRDBNet) for ×2 and ×4 super-resolution, read
//! from safetensors with the original parameter names (`conv_first`,
//! `body.N.rdbM.convK`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`,
//! `conv_last`); the architecture (scale, width, depth, growth) is read off
//! the weight shapes. Inference runs in overlapping tiles so large images
//! fit in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::DiffusionError;
use crate::conv::{Conv2d, ConvAlgorithm};
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

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&feats, 1)?)?)?;
            feats.push(y);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&feats, 1)?)?;
        (x5 * 0.2)? + x
    }
}

fn lrelu(x: &Tensor) -> candle_core::Result<Tensor> {
    // leaky ReLU with slope 0.2: max(x, 0.2x)
    x.maximum(&(x * 0.2)?)
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

/// Names and shapes from a safetensors header.
fn header_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, DiffusionError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| DiffusionError::io(path, e))?;
    let size = f.metadata().map_err(|e| DiffusionError::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| DiffusionError::corrupt(path, "not a safetensors file (too short)"))?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n + 8 > size || n > 100 << 20 {
        return Err(DiffusionError::corrupt(
            path,
            "not a safetensors file (bad header length)",
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| DiffusionError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| DiffusionError::corrupt(path, format!("header: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| DiffusionError::corrupt(path, "header is not an object"))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
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

    /// `(1, 3, h, w)` in [0, 1] → `(1, 3, h·s, w·s)`; `h` and `w` must be
    /// multiples of `4 / scale`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut feat = match self.config.scale {
            2 => pixel_unshuffle(x, 2)?,
            1 => pixel_unshuffle(x, 4)?,
            _ => x.clone(),
        };
        feat = self.conv_first.forward(&feat)?;
        let mut body = feat.clone();
        for rrdb in &self.body {
            let mut y = body.clone();
            for rdb in rrdb {
                y = rdb.forward(&y)?;
            }
            body = ((y * 0.2)? + body)?;
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

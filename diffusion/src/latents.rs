//! Initial latents from a file: a NumPy `.npy` array or a `.safetensors`
//! file holding one tensor (or one named `latents`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::DiffusionError;

/// Read initial latents `(batch, channels, h, w)` as f32 on the CPU.
pub fn read_latents(path: &Path) -> Result<Tensor, DiffusionError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !path.is_file() {
        return Err(DiffusionError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    let t = match ext {
        "npy" => Tensor::read_npy(path).map_err(|e| DiffusionError::corrupt(path, e))?,
        "safetensors" => {
            let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| DiffusionError::corrupt(path, e))?;
            match tensors.remove("latents") {
                Some(t) => t,
                None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
                None => {
                    return Err(DiffusionError::corrupt(
                        path,
                        format!(
                            "expected one tensor or one named \"latents\", found {}",
                            tensors.len()
                        ),
                    ));
                }
            }
        }
        _ => {
            return Err(DiffusionError::BadRequest(format!(
                "{}: initial latents must be a .npy or .safetensors file",
                path.display()
            )));
        }
    };
    let t = match t.rank() {
        3 => t.unsqueeze(0)?,
        4 => t,
        r => {
            return Err(DiffusionError::corrupt(
                path,
                format!(
                    "latents must have 4 dimensions (batch, channels, height, width), found {r}"
                ),
            ));
        }
    };
    let t = t.to_dtype(DType::F32)?;
    let finite = t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite();
    if !finite {
        return Err(DiffusionError::corrupt(
            path,
            "the latents contain NaN or infinite values",
        ));
    }
    Ok(t)
}

//! Parity with diffusers' `VaeImageProcessor` (PIL) for what is done to an
//! inpainting mask outside the sampler: blur, crop region, overlay. The
//! reference is `tests/reference/masks.safetensors`, made by
//! `tests/reference/make_mask_reference.py` (`run.sh masks`).

use std::path::Path;

use hallmark_diffusion::mask::{self, Region};
use image::{GrayImage, RgbImage};

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn read() -> Self {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/masks.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn grey(&self, name: &str) -> GrayImage {
        let (shape, data) = self.tensor(name);
        GrayImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap()
    }

    fn rgb(&self, name: &str) -> RgbImage {
        let (shape, data) = self.tensor(name);
        assert_eq!(shape[2], 3, "{name}");
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).unwrap()
    }

    fn region(&self, name: &str) -> Region {
        let (_, data) = self.tensor(name);
        let v: Vec<u32> = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        Region {
            x1: v[0],
            y1: v[1],
            x2: v[2],
            y2: v[3],
        }
    }
}

/// The largest difference of one byte, and how many bytes differ.
fn differences(ours: &[u8], theirs: &[u8]) -> (u8, usize) {
    assert_eq!(ours.len(), theirs.len());
    let max = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    let count = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
    (max, count)
}

#[test]
fn the_mask_blur_is_pil_s_gaussian_blur_byte_for_byte() {
    let r = Reference::read();
    let m = r.grey("mask");
    for radius in [1, 4, 13] {
        let ours = mask::blur(&m, radius as f32);
        let theirs = r.grey(&format!("blur_{radius}"));
        assert_eq!(
            differences(ours.as_raw(), theirs.as_raw()),
            (0, 0),
            "radius {radius}"
        );
        assert_ne!(ours, m, "radius {radius} changes the mask");
    }
}

#[test]
fn the_crop_region_is_diffusers_get_crop_region() {
    let r = Reference::read();
    let masks = [
        ("mask", r.grey("mask")),
        ("corner", r.grey("corner")),
        ("blur_4", r.grey("blur_4")),
    ];
    for (name, m) in &masks {
        for (w, h, pad) in [
            (96, 64, 0),
            (96, 64, 8),
            (64, 64, 8),
            (32, 64, 16),
            (96, 64, 200),
        ] {
            let key = format!("crop_{name}_{w}x{h}_{pad}");
            assert_eq!(
                mask::crop_region(m, w, h, pad),
                Some(r.region(&key)),
                "{key}"
            );
        }
    }
}

#[test]
fn the_overlay_is_diffusers_apply_overlay() {
    let r = Reference::read();
    let (init, output) = (r.rgb("init"), r.rgb("output"));
    // Whole image, soft mask: PIL's integer blend, exactly.
    let ours = mask::overlay(&init, &r.grey("blur_4"), &output, None);
    let theirs = r.rgb("overlay_blur_4");
    assert_eq!(differences(ours.as_raw(), theirs.as_raw()), (0, 0));

    // A crop: the output resized into the region (Lanczos here and in PIL,
    // their own roundings), the init image's pixels outside it.
    let spot = r.grey("spot_blur_2");
    let region = r.region("overlay_crop_box");
    assert_eq!(mask::crop_region(&spot, 96, 64, 4), Some(region));
    assert!(region.width() < 96 && region.height() < 64, "{region:?}");
    let ours = mask::overlay(&init, &spot, &output, Some(region));
    let theirs = r.rgb("overlay_crop");
    let (max, _) = differences(ours.as_raw(), theirs.as_raw());
    assert!(max <= 3, "the resized output differs by up to {max}");
    for (x, y, p) in ours.enumerate_pixels() {
        let inside = (region.x1..region.x2).contains(&x) && (region.y1..region.y2).contains(&y);
        if !inside {
            assert_eq!(p, init.get_pixel(x, y), "({x}, {y}) is outside the crop");
            assert_eq!(theirs.get_pixel(x, y), p);
        }
    }
}

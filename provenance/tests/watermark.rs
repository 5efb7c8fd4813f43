//! The watermark against the targets, on real photographs
//! (`tests/data/images`) and on smooth generated-looking images, at 512
//! and 1024 pixels wide: PSNR ≥ 42 dB, and the exact payload back after every
//! attack in the suite; nothing found on unmarked images or with another key.

use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey, attacks::Attack};
use image::RgbImage;

fn photos_dir() -> std::path::PathBuf {
    std::env::var_os("HALLMARK_TEST_IMAGES")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/images")
        })
}

fn photo(name: &str) -> RgbImage {
    let path = photos_dir().join(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set HALLMARK_TEST_IMAGES)", path.display()))
        .to_rgb8()
}

fn at_width(img: &RgbImage, width: u32) -> RgbImage {
    let height = (u64::from(width) * u64::from(img.height()) / u64::from(img.width())) as u32;
    image::imageops::resize(img, width, height, image::imageops::FilterType::Lanczos3)
}

fn generated(width: u32, height: u32, seed: u32) -> RgbImage {
    watermark::attacks::smooth_field(width, height, seed)
}

fn key() -> WatermarkKey {
    WatermarkKey::from_secret(b"hallmark test key")
}

fn check_suite(name: &str, img: &RgbImage, payload: u64) {
    let marked = watermark::embed(img, payload, &key(), EmbedOptions::default()).unwrap();
    let psnr = watermark::psnr(img, &marked);
    assert!(psnr >= 42.0, "{name}: PSNR {psnr:.2} dB");
    for attack in Attack::SUITE {
        let found = watermark::detect(&attack.apply(&marked), &key());
        let got = found.as_ref().map(|d| d.payload);
        assert_eq!(
            got,
            Some(payload),
            "{name} {}x{}: {} lost the mark",
            img.width(),
            img.height(),
            attack.name()
        );
    }
}

#[test]
fn marks_on_photographs_survive_every_attack() {
    for (i, name) in ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
        .into_iter()
        .enumerate()
    {
        let img = photo(name);
        for width in [512, 1024] {
            check_suite(
                name,
                &at_width(&img, width),
                0x0123_4567_89AB_CDEF ^ (i as u64) << 40 ^ u64::from(width),
            );
        }
    }
}

#[test]
fn marks_on_generated_images_survive_every_attack() {
    for (seed, (w, h)) in [(512, 512), (1024, 1024), (768, 512)]
        .into_iter()
        .enumerate()
    {
        check_suite(
            "generated",
            &generated(w, h, seed as u32),
            0xFEED_0000_0000_0000 | seed as u64,
        );
    }
}

#[test]
fn unmarked_images_and_other_keys_find_nothing() {
    let mut checked = 0;
    let mut images: Vec<RgbImage> = Vec::new();
    for name in ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"] {
        let img = photo(name);
        images.push(img.clone());
        images.push(at_width(&img, 1024));
    }
    images.push(generated(512, 512, 1));
    images.push(generated(1024, 768, 2));
    for img in &images {
        for a in Attack::SUITE {
            assert_eq!(
                watermark::detect(&a.apply(img), &key()),
                None,
                "unmarked image after {}",
                a.name()
            );
            checked += 1;
        }
    }
    // A mark under one key is invisible under another.
    let marked = watermark::embed(
        &images[0],
        42,
        &WatermarkKey::from_secret(b"someone else"),
        EmbedOptions::default(),
    )
    .unwrap();
    assert_eq!(watermark::detect(&marked, &key()), None);
    assert!(checked >= 100);
}

#[test]
fn only_luminance_changes_and_tiny_images_are_refused() {
    let img = generated(256, 256, 3);
    let marked = watermark::embed(&img, 9, &key(), EmbedOptions::default()).unwrap();
    for (a, b) in img.pixels().zip(marked.pixels()) {
        let d: Vec<i16> = (0..3).map(|c| i16::from(b[c]) - i16::from(a[c])).collect();
        let unclipped = (0..3).all(|c| a[c] > 8 && a[c] < 247);
        if unclipped {
            assert!(
                d[0] == d[1] && d[1] == d[2],
                "R, G and B move together: {d:?}"
            );
        }
    }
    assert!(watermark::embed(&generated(100, 300, 0), 1, &key(), EmbedOptions::default()).is_err());
    assert_eq!(watermark::detect(&generated(40, 40, 0), &key()), None);
}

#[test]
fn an_upscale_carries_its_own_mark_beside_the_base_images() {
    // The base mark, scaled ×2, sits at the very tile period the upscale's
    // own mark uses; per-stage keys keep the upscale's own id readable.
    let base_key = key();
    let up_key = key().for_stage("upscale");
    for (i, name) in ["coffee.png", "astronaut.png"].into_iter().enumerate() {
        let base = at_width(&photo(name), 512);
        let marked =
            watermark::embed(&base, 0xBA5E + i as u64, &base_key, EmbedOptions::default()).unwrap();
        let (w, h) = (marked.width() * 2, marked.height() * 2);
        let big = image::imageops::resize(&marked, w, h, image::imageops::FilterType::Lanczos3);
        let up =
            watermark::embed(&big, 0xC41D + i as u64, &up_key, EmbedOptions::default()).unwrap();
        for attack in Attack::SUITE {
            let attacked = attack.apply(&up);
            assert_eq!(
                watermark::detect(&attacked, &up_key).map(|d| d.payload),
                Some(0xC41D + i as u64),
                "{name}: upscale mark lost to {}",
                attack.name()
            );
        }
        // The base mark, where it still reads, is the base image's id and
        // never mistaken for the upscale's.
        if let Some(d) = watermark::detect(&up, &base_key) {
            assert_eq!(d.payload, 0xBA5E + i as u64, "{name}");
        }
    }
}

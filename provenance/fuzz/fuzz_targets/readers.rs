//! Every reader of untrusted bytes: format sniffing, image decoding (with
//! its size limits), C2PA manifest extraction and validation, and the
//! watermark detector on whatever decodes. None may panic.
#![no_main]

use hallmark_provenance::credentials::{self, inspect};
use hallmark_provenance::watermark::{self, WatermarkKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = credentials::ImageFormat::sniff(data);
    let _ = inspect::manifest_store(data);
    let _ = credentials::inspect(data, None);
    if let Ok(img) = credentials::decode_image(data)
        && u64::from(img.width()) * u64::from(img.height()) <= 1 << 22
    {
        let _ = watermark::detect(&img, &WatermarkKey::from_secret(b"fuzz"));
    }
});

use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey};
fn main() {
    let key = WatermarkKey::from_secret(b"probe");
    let img = image::open("/work/shared/data/images/astronaut.png").unwrap().to_rgb8();
    let img = image::imageops::resize(&img, 1024, 1024, image::imageops::FilterType::Lanczos3);
    let mut e = Vec::new(); let mut d = Vec::new();
    for _ in 0..15 {
        let t = std::time::Instant::now();
        let m = watermark::embed(&img, 1, &key, EmbedOptions::default()).unwrap();
        e.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = std::time::Instant::now();
        assert!(watermark::detect(&m, &key).is_some());
        d.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    e.sort_by(f64::total_cmp); d.sort_by(f64::total_cmp);
    println!("embed median {:.1} ms, detect median {:.1} ms", e[7], d[7]);
}

use hallmark_provenance::watermark::{self, attacks::Attack, EmbedOptions, WatermarkKey};
fn main() {
    let key = WatermarkKey::from_secret(b"probe");
    let dir = std::env::args().nth(1).unwrap();
    for name in ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"] {
        let img = image::open(format!("{dir}/{name}")).unwrap().to_rgb8();
        for size in [512u32, 1024] {
            let img = image::imageops::resize(&img, size, size * img.height() / img.width(), image::imageops::FilterType::Lanczos3);
            let payload = 0x0123_4567_89AB_CDEF;
            let t = std::time::Instant::now();
            let marked = watermark::embed(&img, payload, &key, EmbedOptions::default()).unwrap();
            let te = t.elapsed();
            print!("{name} {}x{} psnr {:.2} embed {:?}", marked.width(), marked.height(), watermark::psnr(&img, &marked), te);
            let t = std::time::Instant::now();
            let _ = watermark::analyze(&marked, &key);
            println!(" detect {:?}", t.elapsed());
            for a in Attack::SUITE {
                let att = a.apply(&marked);
                let r = watermark::analyze(&att, &key);
                let acc = r.best_payload.map(|p| 64 - (p ^ payload).count_ones()).unwrap_or(0);
                println!("   {:<28} found {:<5} bits {:>2}/64 z {:.1} {:?}", a.name(), r.detection.is_some(), acc, r.sync_z, r.detection.as_ref().map(|d| (d.scale, d.rotation_deg)));
            }
            let r = watermark::analyze(&img, &key);
            println!("   unmarked: found {} z {:.1}", r.detection.is_some(), r.sync_z);
        }
    }
}

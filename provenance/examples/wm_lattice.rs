use hallmark_provenance::watermark::{self, attacks::Attack, EmbedOptions, WatermarkKey};
fn main() {
    let key = WatermarkKey::from_secret(b"probe");
    let dir = "/work/shared/data/images";
    let mut ok = 0; let mut total = 0;
    for name in ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"] {
        let img = image::open(format!("{dir}/{name}")).unwrap().to_rgb8();
        for size in [512u32, 1024] {
            let img = image::imageops::resize(&img, size, size * img.height() / img.width(), image::imageops::FilterType::Lanczos3);
            let marked = watermark::embed(&img, 7, &key, EmbedOptions::default()).unwrap();
            for a in Attack::SUITE {
                total += 1;
                if watermark::detect(&a.apply(&marked), &key).is_some() { ok += 1; }
            }
        }
    }
    println!("detected {ok}/{total}");
}

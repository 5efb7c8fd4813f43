use hallmark_provenance::watermark::{self, attacks::Attack, EmbedOptions, WatermarkKey};
fn main() {
    let key = WatermarkKey::from_secret(b"probe");
    let path = std::env::args().nth(1).unwrap();
    let img = image::open(path).unwrap().to_rgb8();
    let marked = watermark::embed(&img, 0x0123_4567_89AB_CDEF, &key, EmbedOptions::default()).unwrap();
    for a in [Attack::None, Attack::Rotate(2.0), Attack::Rotate(-2.0), Attack::Rotate(1.0), Attack::Noise(5.0)] {
        let r = watermark::analyze(&a.apply(&marked), &key);
        println!("{} {:?} {:.1}", a.name(), r.detection.map(|d| d.rotation_deg), r.sync_z);
    }
}

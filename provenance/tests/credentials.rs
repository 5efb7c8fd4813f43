//! Content credentials end to end on real files: a test CA from `ca::init`,
//! watermark then sign, read back with the `c2pa` validator.

use hallmark_provenance::credentials::{
    self, GenerationRecord, ImageFormat, PromptPolicy, SigningAlgorithm, Stamp, TrainingMining,
    UpscaleRecord, Verdict, ca, inspect, stamp::Stamper,
};
use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey};
use image::RgbImage;

fn photo() -> RgbImage {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/images/coffee.png");
    let img = image::open(&path).unwrap().to_rgb8();
    image::imageops::resize(&img, 256, 192, image::imageops::FilterType::Triangle)
}

fn record(stage: &str, task: &str) -> GenerationRecord {
    let mut r = GenerationRecord {
        model_id: "sd15-test".into(),
        weights_sha256: "ab".repeat(32),
        datasets: vec!["laion-mini@1".into()],
        seed: u64::MAX - 7, // seeds use all 64 bits
        steps: 20,
        guidance: 7.5,
        scheduler: "euler_a".into(),
        stage: stage.into(),
        width: 256,
        height: 192,
        job_id: "job-1".into(),
        task_id: task.into(),
        worker_id: "worker-a".into(),
        ..Default::default()
    };
    r.set_prompt("a cup of coffee", PromptPolicy::Hash);
    r
}

struct Ca {
    _dir: tempfile::TempDir,
    files: ca::CaFiles,
}

fn new_ca(alg: SigningAlgorithm, org: &str) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let files = ca::init(&dir.path().join("ca"), org, alg).unwrap();
    Ca { _dir: dir, files }
}

impl Ca {
    fn anchors(&self) -> String {
        self.files.trust_anchors().unwrap()
    }
    fn stamper(&self) -> Stamper {
        let identity = self.files.identity(None).unwrap();
        Stamper::new(&identity, Some(&self.anchors()), ("hallmark-test", "0")).unwrap()
    }
}

/// Watermarks `img` with `id`, encodes it as `format` and signs it.
fn stamped(
    stamper: &Stamper,
    img: &RgbImage,
    format: ImageFormat,
    record: &GenerationRecord,
    id: u64,
    parent: Option<&[u8]>,
) -> Vec<u8> {
    let marked = watermark::embed(img, id, &key(), EmbedOptions::default()).unwrap();
    let encoded = credentials::encode_image(&marked, format).unwrap();
    stamper
        .sign(
            format,
            &encoded,
            &Stamp {
                title: format!("{}.{}", record.task_id, format.extension()),
                record,
                watermark_id: id,
                training_mining: Some(TrainingMining::default()),
                parent,
                input: None,
                mask: None,
            },
        )
        .unwrap()
}

fn key() -> WatermarkKey {
    WatermarkKey::from_secret(b"credentials test key")
}

#[test]
fn signed_files_verify_in_every_format_and_algorithm() {
    let img = photo();
    for alg in [SigningAlgorithm::Es256, SigningAlgorithm::Ed25519] {
        let ca = new_ca(alg, "Hallmark Test");
        let stamper = ca.stamper();
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
            let rec = record("generate", "task-1");
            let file = stamped(&stamper, &img, format, &rec, 0x1234_5678_9abc_def0, None);
            assert_eq!(ImageFormat::sniff(&file).unwrap(), format);
            let report = inspect(&file, Some(&ca.anchors())).unwrap();
            assert_eq!(
                report.verdict,
                Verdict::Verified,
                "{alg:?} {format:?}: {:?}",
                report.failures
            );
            assert_eq!(report.generation.as_ref(), Some(&rec));
            assert_eq!(report.watermark_id.as_deref(), Some("123456789abcdef0"));
            assert_eq!(
                report.actions,
                ["c2pa.created", "c2pa.watermarked.bound"],
                "{format:?}"
            );
            assert_eq!(
                report.digital_source_type.as_deref(),
                Some(credentials::TRAINED_ALGORITHMIC_MEDIA)
            );
            assert_eq!(report.signer.as_deref(), Some("Hallmark Test"));
            // The pixels still carry the mark the soft binding names.
            let pixels = credentials::decode_image(&file).unwrap();
            let found = watermark::detect(&pixels, &key()).map(|d| d.payload);
            assert_eq!(found, Some(0x1234_5678_9abc_def0), "{format:?}");
        }
    }
}

#[test]
fn the_soft_binding_value_is_a_cbor_byte_string() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let file = stamped(
        &ca.stamper(),
        &photo(),
        ImageFormat::Png,
        &record("generate", "t"),
        7,
        None,
    );
    let store = credentials::inspect::manifest_store(&file).unwrap();
    // CBOR: "value" (text, 5 bytes) then a byte string of length 8 (0x48).
    let needle = [b"evalue".as_slice(), &[0x48], &7u64.to_be_bytes()].concat();
    assert!(
        store.windows(needle.len()).any(|w| w == needle),
        "soft-binding value is not an 8-byte CBOR byte string"
    );
}

#[test]
fn the_prompt_policy_decides_what_is_signed() {
    let mut r = record("generate", "t");
    r.set_prompt("secret prompt", PromptPolicy::Keep);
    assert_eq!(r.prompt.as_deref(), Some("secret prompt"));
    r.set_prompt("secret prompt", PromptPolicy::Hash);
    assert_eq!(r.prompt, None);
    assert_eq!(
        r.prompt_sha256.as_deref(),
        Some(hallmark_provenance::sha256_hex(b"secret prompt").as_str())
    );
    r.set_prompt("secret prompt", PromptPolicy::Omit);
    assert_eq!((r.prompt, r.prompt_sha256), (None, None));
}

#[test]
fn one_changed_pixel_is_a_hash_mismatch() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let img = photo();
    let marked = watermark::embed(&img, 9, &key(), EmbedOptions::default()).unwrap();
    // Unfiltered scanlines: one byte of the inflated stream is one channel of
    // one pixel.
    let mut encoded = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut encoded,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(
        marked.as_raw(),
        marked.width(),
        marked.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    let rec = record("generate", "t");
    let signed = ca
        .stamper()
        .sign(
            ImageFormat::Png,
            &encoded,
            &Stamp {
                title: "t.png".into(),
                record: &rec,
                watermark_id: 9,
                training_mining: None,
                parent: None,
                input: None,
                mask: None,
            },
        )
        .unwrap();
    assert_eq!(
        inspect(&signed, Some(&ca.anchors())).unwrap().verdict,
        Verdict::Verified
    );

    let tampered = png_with_one_pixel_changed(&signed, marked.width() as usize);
    let before = credentials::decode_image(&signed).unwrap();
    let after = credentials::decode_image(&tampered).unwrap();
    let changed = before.pixels().zip(after.pixels()).filter(|(a, b)| a != b);
    assert_eq!(changed.count(), 1, "the edit must change exactly one pixel");

    let report = inspect(&tampered, Some(&ca.anchors())).unwrap();
    assert_eq!(report.verdict, Verdict::Invalid);
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.contains("dataHash.mismatch")),
        "{:?}",
        report.failures
    );
}

use image::ImageEncoder;

/// Rewrites the IDAT data of an unfiltered RGB PNG with pixel (10, 10)'s red
/// channel changed, keeping every other chunk (the manifest too) as it was.
fn png_with_one_pixel_changed(png: &[u8], width: usize) -> Vec<u8> {
    let mut chunks = Vec::new();
    let mut pos = 8;
    while pos < png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[pos + 4..pos + 8].try_into().unwrap();
        chunks.push((kind, png[pos + 8..pos + 8 + len].to_vec()));
        pos += 12 + len;
    }
    let first_idat = chunks.iter().position(|(k, _)| k == b"IDAT").unwrap();
    let idat: Vec<u8> = chunks
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.clone())
        .collect();
    let mut raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat).unwrap();
    let stride = 1 + width * 3;
    let at = 10 * stride + 1 + 10 * 3;
    raw[at] = raw[at].wrapping_add(1);
    let recompressed = miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6);

    let mut out = png[..8].to_vec();
    for (i, (kind, data)) in chunks.iter().enumerate() {
        if kind == b"IDAT" && i != first_idat {
            continue;
        }
        let data = if kind == b"IDAT" { &recompressed } else { data };
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    out
}

#[test]
fn a_wrong_trust_anchor_reports_an_untrusted_signer() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let other = new_ca(SigningAlgorithm::Es256, "Someone Else");
    let file = stamped(
        &ca.stamper(),
        &photo(),
        ImageFormat::Jpeg,
        &record("generate", "t"),
        3,
        None,
    );
    let report = inspect(&file, Some(&other.anchors())).unwrap();
    assert_eq!(report.verdict, Verdict::UntrustedSigner, "{report:?}");
    assert!(report.failures.is_empty());
    let report = inspect(&file, None).unwrap();
    assert_eq!(report.verdict, Verdict::UntrustedSigner);
}

#[test]
fn an_upscale_names_its_base_image_and_a_tampered_base_spoils_it() {
    let ca = new_ca(SigningAlgorithm::Ed25519, "Hallmark Test");
    let stamper = ca.stamper();
    let base_img = photo();
    let base_rec = record("generate", "task-base");
    let base = stamped(&stamper, &base_img, ImageFormat::Png, &base_rec, 11, None);

    let big = image::imageops::resize(&base_img, 512, 384, image::imageops::FilterType::Lanczos3);
    let mut up_rec = record("upscale", "task-up");
    up_rec.width = 512;
    up_rec.height = 384;
    up_rec.upscale = Some(UpscaleRecord {
        method: "esrgan".into(),
        factor: 2,
        weights_sha256: Some("cd".repeat(32)),
        ..Default::default()
    });
    let child = stamped(&stamper, &big, ImageFormat::Png, &up_rec, 12, Some(&base));
    let report = inspect(&child, Some(&ca.anchors())).unwrap();
    assert_eq!(report.verdict, Verdict::Verified, "{:?}", report.failures);
    assert_eq!(
        report.generation.as_ref(),
        Some(&up_rec),
        "the upscale's method and network survive signing"
    );
    assert_eq!(
        report.actions,
        ["c2pa.opened", "c2pa.resized", "c2pa.watermarked.bound"]
    );
    let parent = report.parent.expect("parent ingredient");
    assert_eq!(parent.generation.as_ref(), Some(&base_rec));
    assert_eq!(parent.watermark_id.as_deref(), Some("000000000000000b"));

    // A base whose pixels changed after signing: the upscale's own signature
    // is fine, but the ingredient's recorded validation is not.
    let mut tampered_base = base.clone();
    let n = tampered_base.len();
    tampered_base[n - 40] ^= 0x01; // inside the last IDAT, before IEND
    let child = stamped(
        &stamper,
        &big,
        ImageFormat::Png,
        &up_rec,
        13,
        Some(&tampered_base),
    );
    let report = inspect(&child, Some(&ca.anchors())).unwrap();
    assert_eq!(report.verdict, Verdict::Invalid);
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.starts_with("ingredient") && f.contains("mismatch")),
        "{:?}",
        report.failures
    );
}

#[test]
fn unsigned_random_truncated_and_absurd_files_fail_clearly() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let plain = credentials::encode_image(&photo(), ImageFormat::Png).unwrap();
    assert_eq!(
        inspect(&plain, None).unwrap().verdict,
        Verdict::NoCredentials
    );

    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = inspect(&noise, None).unwrap_err().to_string();
    assert!(err.contains("not a PNG, JPEG or WebP"), "{err}");

    let signed = stamped(
        &ca.stamper(),
        &photo(),
        ImageFormat::Jpeg,
        &record("generate", "t"),
        5,
        None,
    );
    for cut in [20, signed.len() / 3, signed.len() / 2, signed.len() - 10] {
        // Never a panic, never "verified".
        if let Ok(report) = inspect(&signed[..cut], Some(&ca.anchors())) {
            assert_ne!(report.verdict, Verdict::Verified, "cut at {cut}");
        }
        // A JPEG decoder may fill in a cut-off scan; it must not panic.
        let _ = credentials::decode_image(&signed[..cut]);
    }

    // A PNG header claiming 100000 × 100000 pixels.
    let mut absurd = plain.clone();
    absurd[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    absurd[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32fast::hash(&absurd[12..29]);
    absurd[29..33].copy_from_slice(&crc.to_be_bytes());
    let err = credentials::decode_image(&absurd).unwrap_err().to_string();
    assert!(err.contains("limit") || err.contains("memory"), "{err}");
}

#[test]
fn ca_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    ca::init(dir.path(), "A", SigningAlgorithm::Es256).unwrap();
    let err = ca::init(dir.path(), "A", SigningAlgorithm::Es256)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a CA"), "{err}");
}

/// A local RFC 3161 authority with a TSA certificate from `ca`'s root.
struct LocalTsa {
    url: String,
    _dir: tempfile::TempDir,
}

fn local_tsa(ca: &Ca) -> LocalTsa {
    let dir = tempfile::tempdir().unwrap();
    let url =
        hallmark_provenance::credentials::local_tsa::start(&ca.files, "Hallmark Test", dir.path())
            .unwrap();
    LocalTsa { url, _dir: dir }
}

#[test]
fn signatures_are_timestamped_by_the_configured_authority() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let tsa = local_tsa(&ca);
    let identity = ca.files.identity(Some(tsa.url.clone())).unwrap();
    let stamper = Stamper::new(&identity, Some(&ca.anchors()), ("t", "0")).unwrap();
    let rec = record("generate", "ts");
    let img = photo();
    let marked = watermark::embed(&img, 21, &key(), EmbedOptions::default()).unwrap();
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let encoded = credentials::encode_image(&marked, format).unwrap();
        let stamp = Stamp {
            title: "ts".into(),
            record: &rec,
            watermark_id: 21,
            training_mining: None,
            parent: None,
            input: None,
            mask: None,
        };
        let file = stamper.sign(format, &encoded, &stamp).unwrap();
        let report = inspect(&file, Some(&ca.anchors())).unwrap();
        assert_eq!(report.verdict, Verdict::Verified, "{:?}", report.failures);
        assert!(
            report.signed_at.is_some(),
            "a timestamped signature carries its time"
        );
    }
    // Without an authority there is no trusted time in the signature.
    let plain = stamped(&ca.stamper(), &img, ImageFormat::Png, &rec, 22, None);
    assert_eq!(
        inspect(&plain, Some(&ca.anchors())).unwrap().signed_at,
        None
    );
}

#[test]
fn an_unreachable_or_https_timestamp_authority_fails_signing_clearly() {
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let identity = ca
        .files
        .identity(Some("https://tsa.example/".into()))
        .unwrap();
    let err = Stamper::new(&identity, None, ("t", "0"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("only http:// URLs"), "{err}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let identity = ca
        .files
        .identity(Some(format!("http://{closed}/")))
        .unwrap();
    let stamper = Stamper::new(&identity, None, ("t", "0")).unwrap();
    let rec = record("generate", "ts");
    let encoded = credentials::encode_image(&photo(), ImageFormat::Png).unwrap();
    let stamp = Stamp {
        title: "ts".into(),
        record: &rec,
        watermark_id: 1,
        training_mining: None,
        parent: None,
        input: None,
        mask: None,
    };
    assert!(stamper.sign(ImageFormat::Png, &encoded, &stamp).is_err());
}

#[test]
fn detached_signatures_carry_the_time_stamp_authoritys_time() {
    use hallmark_provenance::credentials::detached::{sign_detached, verify_detached};
    let ca = new_ca(SigningAlgorithm::Es256, "Hallmark Test");
    let tsa = local_tsa(&ca);
    let payload = b"hallmark-audit-checkpoint-v1\n7\nabc\n1";
    let before = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let identity = ca.files.identity(Some(tsa.url.clone())).unwrap();
    let sig = sign_detached(&identity, payload).unwrap();
    let after = time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 1000;
    let v = verify_detached(&sig, payload, Some(&ca.anchors())).unwrap();
    assert_eq!(v.trusted, Some(true));
    // The authority's certificate comes from the same root.
    assert_eq!(v.timestamp_trusted, Some(true));
    assert_eq!(
        verify_detached(&sig, payload, None)
            .unwrap()
            .timestamp_trusted,
        None,
        "no anchors, nothing to hold the authority to"
    );
    // The authority's clock (openssl's, one-second accuracy) saw it now.
    let at = v
        .timestamp_ms
        .expect("a time-stamped signature carries its time");
    assert!(
        (before - 2000..=after + 2000).contains(&at),
        "{at} not within {before}..{after}"
    );
    // The token covers this signature only: the payload changed, the
    // signature fails as before.
    assert!(verify_detached(&sig, b"hallmark-audit-checkpoint-v1\n8\nabc\n1", None).is_err());
    // An authority under another root: the signer is still trusted, the
    // time-stamp is not, until that root is trusted too.
    let elsewhere = new_ca(SigningAlgorithm::Es256, "Elsewhere");
    let other_dir = tempfile::tempdir().unwrap();
    let other_tsa = hallmark_provenance::credentials::local_tsa::start(
        &elsewhere.files,
        "Elsewhere",
        other_dir.path(),
    )
    .unwrap();
    let sig = sign_detached(&ca.files.identity(Some(other_tsa)).unwrap(), payload).unwrap();
    let v = verify_detached(&sig, payload, Some(&ca.anchors())).unwrap();
    assert_eq!((v.trusted, v.timestamp_trusted), (Some(true), Some(false)));
    assert!(v.timestamp_ms.is_some(), "its time is still read");
    let both = format!("{}\n{}", ca.anchors(), elsewhere.anchors());
    let v = verify_detached(&sig, payload, Some(&both)).unwrap();
    assert_eq!((v.trusted, v.timestamp_trusted), (Some(true), Some(true)));
    // An authority that cannot be reached fails the signature, naming it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/");
    let unreachable = ca.files.identity(Some(url.clone())).unwrap();
    let err = sign_detached(&unreachable, payload)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url), "{err}");
}

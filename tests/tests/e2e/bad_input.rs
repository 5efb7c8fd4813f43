//! Bad input: each case gets a clear error naming what was wrong, a non-zero
//! exit, and leaves no rows behind.

use bytes::{Buf, BufMut};
use hallmark_e2e::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Sends raw bytes as a gRPC message, to play a client that sends garbage.
#[derive(Default, Clone)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

fn expect_refusal(args: &[&str], needles: &[&str]) {
    let out = hallmark(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: error should mention {n:?}; got: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_MAX_ITEMS_PER_JOB", 50);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;

    let p = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let good = p("good.txt", b"a lighthouse\n");
    let c = ["--coordinator", url.as_str()];
    fn submit<'a>(c: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [c, &["submit"], extra].concat()
    }

    expect_refusal(&submit(&c, &[&p("empty.txt", b"")]), &["has no prompts"]);
    expect_refusal(
        &submit(&c, &[&p("latin1.txt", b"caf\xe9 au lait\n")]),
        &["not UTF-8"],
    );
    expect_refusal(
        &submit(&c, &[&good, "--width", "513"]),
        &["width", "multiple of 8"],
    );
    expect_refusal(
        &submit(&c, &[&good, "--width", "64"]),
        &["width", "watermark needs at least 192"],
    );
    expect_refusal(
        &submit(&c, &[&good, "--steps", "0"]),
        &["steps", "outside 1..="],
    );
    let many: String = (0..60).map(|i| format!("prompt {i}\n")).collect();
    expect_refusal(
        &submit(&c, &[&p("many.txt", many.as_bytes())]),
        &["60 items", "limit of 50"],
    );
    expect_refusal(
        &submit(&c, &[&good, "--model", "no-such-model"]),
        &["unknown model", "no-such-model"],
    );
    expect_refusal(
        &submit(
            &c,
            &[&p(
                "bad.jsonl",
                b"{\"prompt\": \"x\"}\n{\"prompt\": 3, \"width\": \"wide\"}\n",
            )],
        ),
        &["line 2", "width"],
    );
    expect_refusal(
        &[&c[..], &["status", "j-doesnotexist"]].concat(),
        &["not found", "j-doesnotexist"],
    );
    expect_refusal(
        &[
            &c[..],
            &[
                "download",
                "j-doesnotexist",
                "-o",
                dir.path().join("dl").to_str().unwrap(),
            ],
        ]
        .concat(),
        &["not found"],
    );
    assert!(!dir.path().join("dl").join("job.json").exists());

    // A malformed gRPC message: bytes that are not a protobuf SubmitJobRequest.
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]),
            PathAndQuery::from_static("/hallmark.v1.Jobs/Submit"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert!(err.message().to_lowercase().contains("decode"), "{err}");

    for table in ["jobs", "items", "tasks", "artifacts"] {
        assert_eq!(
            scalar(
                &db,
                &format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}")
            )
            .await,
            0,
            "{table} must stay empty"
        );
    }
    // The same farm still takes a good job afterwards.
    let out = hallmark(&submit(&c, &[&good, "--width", "192", "--height", "192"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_diffusion_worker_given_synthetic_model_ids_is_refused() {
    let ca = test_ca();
    let out = std::process::Command::new(bin("hallmark-worker"))
        .env("HALLMARK_SIGNING_CERT_CHAIN", &ca.signer_chain)
        .env("HALLMARK_SIGNING_PRIVATE_KEY", &ca.signer_key)
        .args(["--engine", "diffusion", "--model", "sd15=/models/sd15"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--model-path"), "{stderr}");
}

#[test]
fn the_coordinator_names_a_misspelt_setting() {
    let out = std::process::Command::new(bin("hallmark-coordinator"))
        .env("HALLMARK_HTTP_LISTN", "127.0.0.1:0")
        .args(["--database-url", "nowhere://x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("HALLMARK_HTTP_LISTN") && stderr.contains("not a coordinator setting"),
        "{stderr}"
    );
    assert!(stderr.contains("neither postgres"), "{stderr}");
}

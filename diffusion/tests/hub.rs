//! Hub downloads through the real `hf-hub` client against a local server
//! that answers as the Hugging Face Hub does (repository listing, `resolve`
//! with ranges, `ETag` and `X-Repo-Commit` headers), serving a tiny model
//! folder plus files the engine must not fetch.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hallmark_diffusion::hub::{HubModel, HubOptions, fetch};
use hallmark_diffusion::model::ModelFolder;
use hallmark_diffusion::tiny::{TinyArch, init_tiny};
use hallmark_diffusion::{GenerateRequest, LoadOptions, Sample, StableDiffusion};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    endpoint: String,
    /// Paths of the files served (`resolve` requests), in order.
    served: Arc<Mutex<Vec<String>>>,
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
}

fn respond(mut s: TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn handle(s: TcpStream, repos: &[(String, PathBuf)], served: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().to_string());
        }
    }
    let not_found = || vec![];
    for (repo, root) in repos {
        if path == format!("/api/models/{repo}/revision/main") {
            let mut files = Vec::new();
            list_files(root, root, &mut files);
            let siblings: Vec<_> = files
                .iter()
                .map(|f| serde_json::json!({"rfilename": f}))
                .collect();
            let body =
                serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}).to_string();
            return respond(s, "200 OK", &not_found(), body.as_bytes());
        }
        if let Some(file) = path.strip_prefix(&format!("/{repo}/resolve/main/")) {
            let Ok(mut bytes) = std::fs::read(root.join(file)) else {
                break;
            };
            let size = bytes.len();
            let etag = format!(
                "\"{}\"",
                hallmark_diffusion::model::sha256_file(&root.join(file)).unwrap()
            );
            let mut headers = vec![
                ("ETag".to_string(), etag),
                ("X-Repo-Commit".to_string(), COMMIT.to_string()),
            ];
            let mut status = "200 OK";
            if let Some(r) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                let (a, b) = r.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = if b.is_empty() {
                    size - 1
                } else {
                    b.parse().unwrap()
                };
                bytes = bytes[a.min(size)..(b + 1).min(size)].to_vec();
                headers.push(("Content-Range".into(), format!("bytes {a}-{b}/{size}")));
                status = "206 Partial Content";
                if !(a == 0 && b == 0) {
                    served.lock().unwrap().push(file.to_string());
                }
            }
            return respond(s, status, &headers, &bytes);
        }
    }
    respond(
        s,
        "404 Not Found",
        &[("X-Error-Code".into(), "RepoNotFound".into())],
        b"{\"error\":\"Repository not found\"}",
    );
}

fn start_hub(repos: Vec<(String, PathBuf)>) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(Mutex::new(Vec::new()));
    let s2 = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let repos = repos.clone();
            let served = s2.clone();
            std::thread::spawn(move || handle(conn, &repos, &served));
        }
    });
    FakeHub { endpoint, served }
}

fn clip_bpe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/clip/bpe_simple_vocab_16e6.txt.gz")
}

fn render(dir: &Path) -> Vec<f32> {
    let sd = StableDiffusion::load(
        ModelFolder::open(dir, None).unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let mut req = GenerateRequest::new(
        vec![Sample {
            prompt: "a red fox".into(),
            negative: String::new(),
            seed: 3,
        }],
        64,
        64,
    );
    req.steps = 2;
    sd.generate(&req, &|_| {})
        .unwrap()
        .latents
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn hub_error(model: &str, endpoint: &str, cache: &Path) -> String {
    let m = HubModel::parse(model).unwrap().unwrap();
    let opts = HubOptions {
        endpoint: Some(endpoint.into()),
        cache_dir: Some(cache.into()),
        ..Default::default()
    };
    fetch(&m, None, &opts).unwrap_err().to_string()
}

#[test]
fn hub_models_download_only_what_the_engine_loads_and_render_like_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("repo");
    init_tiny(&local, TinyArch::Sdxl, 5, Some(&clip_bpe())).unwrap();
    // Files a real repository holds that the engine must not fetch.
    std::fs::create_dir_all(local.join("safety_checker")).unwrap();
    std::fs::write(
        local.join("safety_checker/model.safetensors"),
        b"not needed",
    )
    .unwrap();
    std::fs::write(local.join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    std::fs::write(
        local.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        b"half",
    )
    .unwrap();
    std::fs::write(
        local.join("sd_xl_base_1.0.safetensors"),
        b"single-file checkpoint",
    )
    .unwrap();
    let mut not_a_pipeline = tmp.path().join("lora");
    std::fs::create_dir_all(&not_a_pipeline).unwrap();
    std::fs::write(not_a_pipeline.join("adapter.safetensors"), b"x").unwrap();
    let hub = start_hub(vec![
        ("tiny/sdxl".into(), local.clone()),
        ("tiny/lora".into(), std::mem::take(&mut not_a_pipeline)),
    ]);

    let cache = tmp.path().join("hub-cache");
    let opts = HubOptions {
        endpoint: Some(hub.endpoint.clone()),
        cache_dir: Some(cache.clone()),
        ..Default::default()
    };
    let model = HubModel::parse("hf:tiny/sdxl").unwrap().unwrap();
    let root = fetch(&model, None, &opts).unwrap();
    assert!(
        root.starts_with(&cache),
        "{} is in the Hub cache",
        root.display()
    );

    let served = hub.served.lock().unwrap().clone();
    for skipped in ["safety_checker", ".bin", "fp16", "sd_xl_base"] {
        assert!(
            !served.iter().any(|f| f.contains(skipped)),
            "{skipped} was downloaded: {served:?}"
        );
    }
    for needed in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(
            served.iter().any(|f| f == needed),
            "{needed} missing from {served:?}"
        );
    }
    // The snapshot opens through the ordinary loader and renders exactly as
    // the original folder.
    assert_eq!(render(&root), render(&local));

    // Offline: the cache answers, the network is not asked.
    let before = hub.served.lock().unwrap().len();
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    assert_eq!(fetch(&model, None, &offline).unwrap(), root);
    assert_eq!(hub.served.lock().unwrap().len(), before);
    let e = fetch(
        &HubModel::parse("hf:tiny/other").unwrap().unwrap(),
        None,
        &offline,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not in the Hub cache"), "{e}");

    // A missing repository and a repository that is not a pipeline are named.
    let e = hub_error("hf:tiny/missing", &hub.endpoint, &cache);
    assert!(
        e.contains("tiny/missing@main") && e.contains("listing the repository"),
        "{e}"
    );
    let e = hub_error("hf:tiny/lora", &hub.endpoint, &cache);
    assert!(e.contains("no model_index.json"), "{e}");
    // An unreachable hub fails with the model named, not a hang.
    let e = hub_error("hf:tiny/sdxl", "http://127.0.0.1:9", &tmp.path().join("c2"));
    assert!(e.contains("tiny/sdxl@main"), "{e}");
}

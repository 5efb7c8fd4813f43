//! Authentication end to end: a coordinator process with `auth = "tokens"`,
//! a worker process holding a worker token, and the `hallmark` CLI as two
//! tenants, a worker, an operator and a stranger — each allowed what its role
//! allows and refused the rest with an error that says why.

use std::process::Output;
use std::time::{Duration, Instant};

use hallmark_e2e::*;
use serde_json::Value;

/// A coordinator configuration file under `dir` with `auth = "tokens"` and
/// one new token per role; the tokens, in the roles' order.
pub(crate) fn token_config(
    dir: &std::path::Path,
    roles: &[&str],
) -> (std::path::PathBuf, Vec<String>) {
    let mut toml = String::from("auth = \"tokens\"\n[auth_tokens]\n");
    let mut tokens = Vec::new();
    for role in roles {
        let (token, digest) = new_token(role);
        toml.push_str(&format!("\"{digest}\" = \"{role}\"\n"));
        tokens.push(token);
    }
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, toml).unwrap();
    (path, tokens)
}

/// A Jobs client at `url` presenting `token` (`None`: no token); the
/// future borrows neither.
fn jobs_as(
    url: &str,
    token: Option<&str>,
) -> impl std::future::Future<
    Output = hallmark_proto::v1::jobs_client::JobsClient<hallmark_proto::client::AuthChannel>,
> + use<> {
    let url = url.to_string();
    let bearer = hallmark_proto::client::BearerToken::new(token).unwrap();
    async move { hallmark_proto::v1::jobs_client::JobsClient::new(bearer.on(channel(&url).await)) }
}

/// Asserts the command failed and its stderr says `what`.
pub(crate) fn refused(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(what),
        "expected a refusal saying {what:?}; exit {:?}\n{}\n{stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
}

pub(crate) fn submit(url: &str, token: &str, model: &str, extra: &[&str]) -> Output {
    hallmark_as(
        url,
        Some(token),
        &[
            &[
                "--json",
                "submit",
                "--model",
                model,
                "--width",
                "192",
                "--height",
                "192",
                "--prompt",
                "a private prompt",
            ],
            extra,
        ]
        .concat(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_allowed_its_own_calls_and_refused_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = token_config(
        dir.path(),
        &[
            "tenant:acme",
            "tenant:globex",
            "worker:gpu-pool",
            "operator:ops",
        ],
    );
    let [acme, globex, worker, operator] = [0, 1, 2, 3].map(|i| tokens[i].as_str());
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_CONFIG", config.display())
        .with("HALLMARK_TRUST_ANCHORS", test_ca().root_cert.display());
    let _c = spec.start().await;
    let url = spec.url();

    // A worker without a token, or with a tenant's, stops at once saying why.
    for (name, extra) in [
        ("no-token", vec![]),
        ("tenant-token", vec!["--token", acme]),
    ] {
        let mut p = start_worker(&url, name, 0, &extra);
        let started = Instant::now();
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "a worker with {name} kept running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(!status.success(), "{name}: {status:?}");
    }
    let _worker = start_worker(&url, "gpu-0", 0, &["--token", worker]);
    let listed = hallmark_as(&url, Some(operator), &["--json", "workers"]);
    ok(&listed);
    eventually("the worker registers", Duration::from_secs(20), || {
        let out = hallmark_as(&url, Some(operator), &["--json", "workers"]);
        let one = out.status.success() && json_of(&out).as_array().is_some_and(|w| w.len() == 1);
        async move { one }
    })
    .await;

    // Strangers: no token, or one the coordinator does not know.
    refused(&submit_raw(&url, None), "not authenticated");
    refused(
        &submit(&url, "hmk_not-a-real-token", "synthetic-v1", &[]),
        "not known",
    );
    // A tenant submits as itself; naming another tenant is refused.
    let out = submit(&url, acme, "synthetic-v1", &[]);
    ok(&out);
    let job_id = json_of(&out)["job_id"].as_str().unwrap().to_string();
    refused(
        &submit(&url, acme, "synthetic-v1", &["--tenant", "globex"]),
        "not allowed",
    );
    // Workers do not submit.
    refused(&submit(&url, worker, "synthetic-v1", &[]), "not allowed");
    // Nothing was written by the refused submits.
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM jobs").await, 1);
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM jobs WHERE tenant = 'acme'").await,
        1
    );

    let watched = hallmark_as(&url, Some(acme), &["--json", "watch", &job_id]);
    ok(&watched);
    let status = hallmark_as(&url, Some(acme), &["--json", "status", &job_id]);
    let job = json_of(&status);
    assert_eq!(
        (job["state"].as_str(), job["tenant"].as_str()),
        (Some("succeeded"), Some("acme")),
        "{job:#}"
    );

    // Another tenant cannot tell the job exists, let alone touch it.
    for args in [
        vec!["status", job_id.as_str()],
        vec!["retry", job_id.as_str()],
        vec!["download", job_id.as_str(), "-o", "unused"],
    ] {
        refused(&hallmark_as(&url, Some(globex), &args), "no job with id");
    }
    let theirs = hallmark_as(&url, Some(globex), &["--json", "jobs"]);
    assert_eq!(json_of(&theirs).as_array().map(Vec::len), Some(0));
    let mine = hallmark_as(&url, Some(acme), &["--json", "jobs"]);
    assert_eq!(json_of(&mine).as_array().map(Vec::len), Some(1));
    refused(
        &hallmark_as(&url, Some(globex), &["jobs", "--tenant", "acme"]),
        "not allowed",
    );

    // The owner downloads; its image resolves for anyone, its prompt only
    // for the owner (and operators).
    let files = dir.path().join("files");
    ok(&hallmark_as(
        &url,
        Some(acme),
        &["download", &job_id, "-o", files.to_str().unwrap()],
    ));
    let image = files.join("00000.png");
    let anchors = test_ca().root_cert.to_str().unwrap().to_string();
    let prompt_seen_by = |token: Option<&str>| -> Value {
        let out = hallmark_as(
            &url,
            token,
            &[
                "--json",
                "verify",
                "--trust-anchors",
                &anchors,
                image.to_str().unwrap(),
            ],
        );
        let report = json_of(&out);
        assert_eq!(report["status"], "verified", "{report:#}");
        report["repository"]["chain"][0]["prompt"].clone()
    };
    assert_eq!(prompt_seen_by(Some(acme)), "a private prompt");
    assert_eq!(prompt_seen_by(Some(operator)), "a private prompt");
    assert_eq!(prompt_seen_by(Some(globex)), Value::Null);
    assert_eq!(prompt_seen_by(None), Value::Null);

    // Operators' calls: the worker list and the audit ledger.
    refused(&hallmark_as(&url, Some(acme), &["workers"]), "not allowed");
    refused(&hallmark_as(&url, None, &["workers"]), "needs a token");
    refused(
        &hallmark_as(&url, Some(acme), &["audit", "verify"]),
        "not allowed",
    );
    // A tenant reads its own job's ledger entries (not the whole chain,
    // which holds every tenant's). The log lists sealed entries, and the
    // reaper seals on its own time.
    wait_for_count(
        &db,
        "the job's submit entry sealed",
        &format!("SELECT COUNT(*) FROM audit_events WHERE kind = 'submit' AND job_id = '{job_id}' AND seq IS NOT NULL"),
        |n| n == 1,
    )
    .await;
    let log = hallmark_as(
        &url,
        Some(acme),
        &["--json", "audit", "log", "--job", &job_id],
    );
    let entries: Vec<Value> = ok(&log)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        entries.first().map(|e| e["kind"].clone()),
        Some("submit".into())
    );
    assert!(
        entries.iter().all(|e| e["job_id"] == job_id.as_str()),
        "{entries:?}"
    );
    refused(
        &hallmark_as(&url, Some(globex), &["audit", "log", "--job", &job_id]),
        "no job with id",
    );
    refused(
        &hallmark_as(&url, Some(acme), &["audit", "log"]),
        "not allowed",
    );
    // Registering models is the operators'; a control names who did it in
    // the ledger.
    let args = register_unserved_model_args(dir.path(), "unserved");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let register = |token: &str| hallmark_as(&url, Some(token), &args);
    refused(&register(acme), "not allowed");
    ok(&register(operator));
    let paused = submit(&url, acme, "unserved", &["--queue-unservable"]);
    ok(&paused);
    let second = json_of(&paused)["job_id"].as_str().unwrap().to_string();
    ok(&hallmark_as(&url, Some(acme), &["cancel", &second]));
    let audit = hallmark_as(&url, Some(operator), &["--json", "audit", "verify"]);
    ok(&audit);
    let actor = scalar(
        &db,
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'cancel' AND job_id = '{second}' AND actor = 'tenant:acme'"
        ),
    )
    .await;
    assert_eq!(actor, 1);
    // An operator may submit for a tenant; the ledger names the operator.
    let for_acme = hallmark_as(
        &url,
        Some(operator),
        &[
            "--json",
            "submit",
            "--tenant",
            "acme",
            "--model",
            "unserved",
            "--queue-unservable",
            "--prompt",
            "on behalf",
        ],
    );
    let on_behalf = json_of(&for_acme);
    assert_eq!(on_behalf["tenant"], "acme");
    let submitted_by = scalar(
        &db,
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'submit' AND job_id = '{}' AND actor = 'operator:ops'",
            on_behalf["job_id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(submitted_by, 1);
    let registered_by = scalar(
        &db,
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'register_model' AND subject = 'unserved' AND actor = 'operator:ops'",
    )
    .await;
    assert_eq!(registered_by, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_renders_and_downloads_only_the_inputs_it_uploaded() {
    use hallmark_proto::client::BearerToken;
    use hallmark_proto::v1::{Chunk, DownloadArtifactRequest, SubmitJobRequest};

    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = token_config(
        dir.path(),
        &["tenant:acme", "tenant:globex", "worker", "operator"],
    );
    let [acme, globex, worker, operator] = [0, 1, 2, 3].map(|i| tokens[i].as_str());
    let photo = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/images/coffee.png"),
    )
    .unwrap();
    let db = fresh_database().await;
    // Room for one upload of the photo per tenant per minute, not two.
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_CONFIG", config.display())
        .with(
            "HALLMARK_TENANT_UPLOAD_BYTES_PER_MINUTE",
            photo.len() * 3 / 2,
        );
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &["--token", worker]);
    wait_for_count(&db, "the worker", "SELECT COUNT(*) FROM workers", |n| {
        n == 1
    })
    .await;
    let client = |token: Option<&str>| jobs_as(&url, token);
    let upload = |token: Option<&str>| {
        let photo = photo.clone();
        let client = client(token);
        async move {
            client
                .await
                .upload_input(tokio_stream::iter(vec![Chunk { data: photo }]))
                .await
                .map(|r| r.into_inner().sha256)
        }
    };
    assert_eq!(
        upload(None).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        upload(Some(worker)).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let sha256 = upload(Some(acme)).await.unwrap();
    // The tenant's upload allowance is spent; nothing of the refused upload
    // is kept.
    let spent = upload(Some(acme)).await.unwrap_err();
    assert_eq!(spent.code(), tonic::Code::ResourceExhausted, "{spent:?}");
    assert!(
        spent.message().contains("bytes per minute") && spent.message().contains("retry in"),
        "{spent:?}"
    );
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM input_owners").await, 1);

    // The hash is public (every output's credentials name it); only the
    // uploader may render from it or fetch it back.
    let submit = |token: &str| {
        let client = client(Some(token));
        let mut spec = synthetic_spec(1, 0);
        spec.init_image_sha256 = sha256.clone();
        spec.strength = 0.5;
        async move {
            client
                .await
                .submit(SubmitJobRequest {
                    spec: Some(spec),
                    queue_unservable: false,
                })
                .await
        }
    };
    let theirs = submit(globex).await.unwrap_err();
    assert_eq!(theirs.code(), tonic::Code::InvalidArgument);
    assert!(
        theirs.message().contains("no uploaded input image"),
        "{theirs:?}"
    );
    let mine = submit(acme).await.unwrap().into_inner();
    assert_eq!(mine.tenant, "acme");
    // The worker fetched the input while it held the task (the job renders);
    // with no such lease its token fetches nothing by hash.
    ok(&hallmark_as(&url, Some(acme), &["watch", &mine.job_id]));
    let state = hallmark_as(&url, Some(acme), &["--json", "status", &mine.job_id]);
    assert_eq!(json_of(&state)["state"], "succeeded", "{state:?}");
    let fetched = {
        use hallmark_proto::v1::workers_client::WorkersClient;
        let bearer = BearerToken::new(Some(worker)).unwrap();
        WorkersClient::new(bearer.on(channel(&url).await))
            .fetch_artifact(DownloadArtifactRequest {
                sha256: sha256.clone(),
            })
            .await
    };
    let e = fetched.map(|_| ()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("no task leased to worker"), "{e:?}");
    let download = |token: &str| {
        let client = client(Some(token));
        let sha256 = sha256.clone();
        async move {
            client
                .await
                .download_artifact(DownloadArtifactRequest { sha256 })
                .await
                .map(|_| ())
        }
    };
    assert_eq!(
        download(globex).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    download(acme).await.unwrap();
    // Once globex uploads the same picture itself, it may use it too.
    assert_eq!(upload(Some(globex)).await.unwrap(), sha256);
    let globex_job = submit(globex).await.unwrap().into_inner();
    ok(&hallmark_as(
        &url,
        Some(globex),
        &["watch", &globex_job.job_id],
    ));

    // Deleting takes back one's own upload only: a worker may not, acme's
    // deletion leaves globex's picture, and globex's, the last, purges it.
    let delete =
        |token: &str| hallmark_as(&url, Some(token), &["inputs", "delete", sha256.as_str()]);
    let by_worker = delete(worker);
    assert!(!by_worker.status.success());
    assert!(
        String::from_utf8_lossy(&by_worker.stderr).contains("deleting an input image"),
        "{}",
        String::from_utf8_lossy(&by_worker.stderr)
    );
    let listed = |token: &str, extra: &[&str]| {
        let out = hallmark_as(
            &url,
            Some(token),
            &[&["--json", "inputs", "list"], extra].concat(),
        );
        json_of(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["sha256"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(acme, &[]), std::slice::from_ref(&sha256));
    ok(&delete(acme));
    assert!(listed(acme, &[]).is_empty(), "acme's own list");
    assert_eq!(
        listed(globex, &[]),
        std::slice::from_ref(&sha256),
        "globex's own list"
    );
    assert_eq!(
        listed(operator, &["--tenant", "acme"]),
        Vec::<String>::new()
    );
    assert_eq!(
        listed(operator, &[]),
        std::slice::from_ref(&sha256),
        "everyone's, for an operator"
    );
    let nosy = hallmark_as(&url, Some(acme), &["inputs", "list", "--tenant", "globex"]);
    assert!(!nosy.status.success(), "a tenant lists only its own");
    let again = delete(acme);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no uploaded input image"),
        "acme's upload is gone: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        submit(acme).await.unwrap_err().code(),
        tonic::Code::InvalidArgument,
        "acme no longer renders from it"
    );
    let blob = dir.path().join("blobs").join(&sha256[..2]).join(&sha256);
    assert!(blob.exists(), "globex's upload keeps the picture");
    // A job of globex's that no worker can take (its model is registered,
    // not served) starts from it: globex cannot delete it until that job
    // is over.
    let args = register_unserved_model_args(dir.path(), "idle");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&hallmark_as(&url, Some(operator), &args));
    let mut queued = synthetic_spec(1, 0);
    queued.model_id = "idle".into();
    queued.init_image_sha256 = sha256.clone();
    queued.strength = 0.5;
    let queued = client(Some(globex))
        .await
        .submit(SubmitJobRequest {
            spec: Some(queued),
            queue_unservable: true,
        })
        .await
        .unwrap()
        .into_inner();
    let busy = delete(globex);
    assert!(
        String::from_utf8_lossy(&busy.stderr)
            .contains(&format!("is in use by job {}", queued.job_id)),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    ok(&hallmark_as(
        &url,
        Some(globex),
        &["cancel", &queued.job_id],
    ));
    ok(&delete(globex));
    assert!(!blob.exists(), "the last uploader's deletion purges it");
}

/// An input its last uploader takes back while a job an operator submitted
/// for another tenant starts from it is kept for that job, then purged as
/// soon as the job ends — canceled, or closed by the reaper — not at the
/// next input sweep (a minute apart with no retention set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_taken_back_during_another_tenants_job_is_purged_when_that_job_ends() {
    use hallmark_proto::v1::{Chunk, InputRef, JobRef, SubmitJobRequest};

    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = token_config(dir.path(), &["tenant:acme", "worker", "operator"]);
    let [acme, worker, operator] = [0, 1, 2].map(|i| tokens[i].as_str());
    let db = fresh_database().await;
    let blobs = dir.path().join("blobs");
    let spec =
        CoordinatorSpec::new(&db, None, blobs.clone()).with("HALLMARK_CONFIG", config.display());
    let _c = spec.start().await;
    let url = spec.url();
    // A slow worker: each job still runs when its input is taken back.
    let _w = start_worker(&url, "w", 3_000, &["--token", worker]);
    // The worker's registration sealed: the first reap pass, and the input
    // sweep after it, have run; the next sweep is a minute away.
    wait_for_count(
        &db,
        "the first reap pass",
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'register_worker' AND seq IS NOT NULL",
        |n| n >= 1,
    )
    .await;
    let client = |token: &str| jobs_as(&url, Some(token));
    for (photo, cancel) in [("coffee.png", true), ("rocket.jpg", false)] {
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("data/images")
                .join(photo),
        )
        .unwrap();
        let sha256 = client(acme)
            .await
            .upload_input(tokio_stream::iter(vec![Chunk { data: bytes }]))
            .await
            .unwrap()
            .into_inner()
            .sha256;
        let blob = blobs.join(&sha256[..2]).join(&sha256);
        let mut job = synthetic_spec(1, 0);
        job.tenant = "globex".into();
        job.init_image_sha256 = sha256.clone();
        job.strength = 0.5;
        let job_id = client(operator)
            .await
            .submit(SubmitJobRequest {
                spec: Some(job),
                queue_unservable: false,
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        // acme's deletion goes through; globex's job keeps the picture.
        client(acme)
            .await
            .delete_input(InputRef {
                sha256: sha256.clone(),
            })
            .await
            .unwrap();
        let purged = format!(
            "SELECT COUNT(*) FROM inputs WHERE sha256 = '{sha256}' AND purged_at IS NOT NULL"
        );
        assert_eq!(scalar(&db, &purged).await, 0, "{photo}: kept for the job");
        assert!(blob.exists(), "{photo}");
        if cancel {
            client(operator)
                .await
                .cancel_job(JobRef {
                    job_id: job_id.clone(),
                })
                .await
                .unwrap();
        } else {
            ok(&hallmark_as(&url, Some(operator), &["watch", &job_id]));
        }
        eventually(
            &format!("{photo} purged once its job ended"),
            Duration::from_secs(10),
            || {
                let n = scalar(&db, &purged);
                async move { n.await == 1 }
            },
        )
        .await;
        assert!(!blob.exists(), "{photo}: the blob is deleted with it");
    }
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'purge_input'"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_travel_over_tls_to_a_coordinator_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_server_cert(&dir.path().join("tls"));
    let (config, tokens) = token_config(dir.path(), &["tenant:acme", "worker"]);
    let [tenant, worker] = [0, 1].map(|i| tokens[i].as_str());
    let db = fresh_database().await;
    // Half a TLS identity, or tokens switched on with none, stop the
    // coordinator at start, naming the setting.
    let start_fails = |envs: &[(&str, &std::path::Path)], what: &str| {
        let mut cmd = std::process::Command::new(bin("hallmark-coordinator"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--database-url")
            .arg(&db)
            .arg("--blob-dir")
            .arg(dir.path().join("blobs"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(what),
            "{what}: {stderr}"
        );
    };
    start_fails(
        &[("HALLMARK_TLS_CERT", &tls.server_chain)],
        "tls_cert and tls_key go together",
    );
    start_fails(
        &[("HALLMARK_TLS_CLIENT_CA", &tls.root_cert)],
        "tls_client_ca asks callers for certificates",
    );
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# fingerprints\nnot-a-fingerprint\n").unwrap();
    start_fails(
        &[("HALLMARK_TLS_REVOKED_CERTS", &revoked)],
        "tls_revoked_certs lists client certificates to refuse, which needs tls_client_ca",
    );
    start_fails(
        &[
            ("HALLMARK_TLS_CERT", &tls.server_chain),
            ("HALLMARK_TLS_KEY", &tls.server_key),
            ("HALLMARK_TLS_CLIENT_CA", &tls.root_cert),
            ("HALLMARK_TLS_REVOKED_CERTS", &revoked),
        ],
        "line 2: \"not-a-fingerprint\" is not a SHA-256 fingerprint",
    );
    let no_tokens = dir.path().join("no-tokens.toml");
    std::fs::write(&no_tokens, "auth = \"tokens\"\n").unwrap();
    start_fails(&[("HALLMARK_CONFIG", &no_tokens)], "no auth_tokens");
    let port = free_port();
    let http_addr = format!("127.0.0.1:{}", free_port());
    let health_addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(bin("hallmark-coordinator"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--database-url")
        .arg(&db)
        .arg("--blob-dir")
        .arg(dir.path().join("blobs"))
        .env("HALLMARK_CONFIG", &config)
        .env("HALLMARK_TLS_CERT", &tls.server_chain)
        .env("HALLMARK_TLS_KEY", &tls.server_key)
        .env("HALLMARK_HTTP_LISTEN", &http_addr)
        .env("HALLMARK_HEALTH_LISTEN", &health_addr);
    let _c = Proc::spawn("tls-coordinator", &mut cmd);
    let url = format!("https://127.0.0.1:{port}");
    let root = tls.root_cert.to_str().unwrap();
    let cli = |url: &str, ca: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("hallmark"));
        cmd.arg("--coordinator")
            .arg(url)
            .args(args)
            .env("HALLMARK_LOG", "warn")
            .env("HALLMARK_TOKEN", tenant)
            .env_remove("HALLMARK_TLS_CA");
        if let Some(ca) = ca {
            cmd.env("HALLMARK_TLS_CA", ca);
        }
        cmd.output().unwrap()
    };
    eventually(
        "the coordinator answers over TLS",
        Duration::from_secs(30),
        || {
            let up = cli(&url, Some(root), &["--json", "jobs"]).status.success();
            async move { up }
        },
    )
    .await;
    // A probe that speaks no TLS (the kubelet's) asks health in plain text
    // on its own port, without a token; it answers nothing else, and the
    // TLS port answers no plain text.
    let plain = channel(&format!("http://{health_addr}")).await;
    assert_serving(plain.clone(), "hallmark.v1.Jobs").await;
    let other = hallmark_proto::v1::jobs_client::JobsClient::new(plain)
        .list_jobs(hallmark_proto::v1::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");
    let plain_main = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    let plain_refused = match plain_main {
        Err(_) => true,
        Ok(ch) => tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(plain_refused, "the TLS port answered plain text");
    let _w = start_worker(
        &url,
        "tls-worker",
        0,
        &["--token", worker, "--tls-ca", root],
    );
    wait_for_count(&db, "the worker", "SELECT COUNT(*) FROM workers", |n| {
        n == 1
    })
    .await;

    let out = dir.path().join("out");
    ok(&cli(
        &url,
        Some(root),
        &[
            "submit",
            "--watch",
            "--prompt",
            "over the wire",
            "--width",
            "192",
            "--height",
            "192",
        ],
    ));
    let listed = json_of(&cli(&url, Some(root), &["--json", "jobs"]));
    let job_id = listed[0]["job_id"].as_str().unwrap();
    assert_eq!(listed[0]["state"], "succeeded");
    ok(&cli(
        &url,
        Some(root),
        &["download", job_id, "-o", out.to_str().unwrap()],
    ));
    assert!(out.join("00000.png").exists());

    // The soft-binding API serves HTTPS with the same certificate: a
    // verifier finds the image's manifest by its content.
    let alg = hallmark_provenance::credentials::SOFT_BINDING_ALG;
    let image = std::fs::read(out.join("00000.png")).unwrap();
    let (status, body) = https(
        &http_addr,
        "localhost",
        &tls.root_cert,
        "POST",
        &format!("/matches/byContent?alg={alg}"),
        &image,
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let matches: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let manifest = matches["matches"][0]["manifestId"].as_str().unwrap();
    let (status, _) = https(
        &http_addr,
        "localhost",
        &tls.root_cert,
        "GET",
        &format!("/lineage/{manifest}"),
        b"",
    )
    .unwrap();
    assert_eq!(status, 200);
    // HTTP/2 too, chosen by ALPN: the same lineage.
    let (alpn, status, body) = https_h2_get(
        &http_addr,
        "localhost",
        &tls.root_cert,
        &format!("/lineage/{manifest}"),
    )
    .await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let lineage: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let chain = lineage["chain"].as_array().unwrap();
    assert_eq!(chain.last().unwrap()["manifestId"], manifest, "{lineage:#}");
    // Not under roots that did not issue it, and not as plain HTTP.
    let other = tls_server_cert(&dir.path().join("other-ca"));
    let err = https(
        &http_addr,
        "localhost",
        &other.root_cert,
        "GET",
        "/services/supportedAlgorithms",
        b"",
    )
    .unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    let mut plain = std::net::TcpStream::connect(&http_addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut plain,
        b"GET /services/supportedAlgorithms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered");

    // Without the root that issued the certificate the client does not
    // trust it; plain HTTP/2 to the TLS port gets nowhere.
    refused(&cli(&url, None, &["jobs"]), "cannot reach the coordinator");
    let plain = cli(&format!("http://127.0.0.1:{port}"), None, &["jobs"]);
    assert!(!plain.status.success(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_added_and_revoked_by_editing_the_file_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = token_config(dir.path(), &["tenant:acme"]);
    let old = tokens[0].as_str();
    // The old token expires far ahead: its expiry is published until the
    // token is gone.
    let expiring = std::fs::read_to_string(&config).unwrap().replace(
        "= \"tenant:acme\"",
        "= { role = \"tenant:acme\", expires = \"2099-01-01T00:00:00Z\" }",
    );
    std::fs::write(&config, expiring).unwrap();
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_CONFIG", config.display())
        .with("HALLMARK_AUTH_RELOAD_INTERVAL_MS", 100)
        .with("HALLMARK_METRICS_LISTEN", &metrics);
    let _c = spec.start().await;
    let url = spec.url();
    let works = |token: &str| hallmark_as(&url, Some(token), &["jobs"]).status.success();
    assert!(works(old));
    let acme_expiry = || {
        Scrape::get(&metrics).sum(
            "hallmark_auth_token_expiry_timestamp_seconds",
            &[("role", "tenant:acme")],
        )
    };
    assert_eq!(acme_expiry(), Some(4_070_908_800.0));

    // The old token revoked, a new one added: the running coordinator
    // follows the file.
    let (new, new_digest) = new_token("tenant:globex");
    std::fs::write(
        &config,
        format!("auth = \"tokens\"\n[auth_tokens]\n\"{new_digest}\" = \"tenant:globex\"\n"),
    )
    .unwrap();
    eventually("the edit takes effect", Duration::from_secs(10), || {
        let done = works(&new) && !works(old);
        async move { done }
    })
    .await;
    refused(&hallmark_as(&url, Some(old), &["jobs"]), "not known");
    assert_eq!(
        acme_expiry(),
        Some(f64::INFINITY),
        "a revoked role reads +Inf"
    );

    // A broken edit, or one turning auth off, keeps the tokens in force.
    for edit in [
        "auth = \"tokens\"\n[auth_tokens]\n\"not-hex\" = \"tenant:x\"\n".to_string(),
        "auth = \"off\"\n".to_string(),
    ] {
        std::fs::write(&config, edit).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(works(&new));
        refused(&hallmark_as(&url, None, &["jobs"]), "needs a token");
    }
}

/// A submit with no token at all.
fn submit_raw(url: &str, token: Option<&str>) -> Output {
    hallmark_as(
        url,
        token,
        &["submit", "--model", "synthetic-v1", "--prompt", "x"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_token_drives_only_its_own_workers_and_expired_tokens_are_refused() {
    use hallmark_proto::client::BearerToken;
    use hallmark_proto::v1::complete_message::Body;
    use hallmark_proto::v1::workers_client::WorkersClient;
    use hallmark_proto::v1::{
        CompleteHeader, CompleteMessage, FailRequest, LeaseRequest, ListWorkersRequest,
        ModelCapability, RegisterWorkerRequest,
    };

    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = token_config(
        dir.path(),
        &["tenant:acme", "worker:pool-a", "worker:pool-b", "operator"],
    );
    let [acme, pool_a, pool_b, operator] = [0, 1, 2, 3].map(|i| tokens[i].as_str());
    // An expiring token, its entry appended the way deploy/README.md does
    // (`2>> auth.toml`), and one whose entry says it has expired.
    let later = hallmark(&[
        "token",
        "new",
        "--role",
        "tenant:later",
        "--expires-in",
        "30d",
    ]);
    ok(&later);
    let later_token = String::from_utf8(later.stdout).unwrap().trim().to_string();
    let (stale, stale_digest) = new_token("tenant:acme");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&String::from_utf8(later.stderr).unwrap());
    toml.push_str(&format!(
        "\"{stale_digest}\" = {{ role = \"tenant:acme\", expires = \"2026-01-01T00:00:00Z\" }}\n"
    ));
    std::fs::write(&config, toml).unwrap();

    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_CONFIG", config.display())
        .with("HALLMARK_METRICS_LISTEN", &metrics);
    let _c = spec.start().await;
    let url = spec.url();

    ok(&hallmark_as(&url, Some(&later_token), &["jobs"]));
    // Each role's first expiry is published for an alert ahead of it.
    let scrape = Scrape::get(&metrics);
    let expiry = |role: &str| {
        scrape.sum(
            "hallmark_auth_token_expiry_timestamp_seconds",
            &[("role", role)],
        )
    };
    let in_30_days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 30.0 * 86400.0;
    assert!(
        expiry("tenant:later").is_some_and(|t| (t - in_30_days).abs() < 3600.0),
        "{}",
        scrape.text
    );
    assert_eq!(
        expiry("tenant:acme"),
        Some(1_767_225_600.0),
        "{}",
        scrape.text
    );
    assert_eq!(expiry("worker:pool-a"), None, "{}", scrape.text);
    refused(
        &hallmark_as(&url, Some(&stale), &["jobs"]),
        "expired at 2026-01-01T00:00:00Z",
    );

    let workers = |token: &str| {
        let url = url.clone();
        let bearer = BearerToken::new(Some(token)).unwrap();
        async move { WorkersClient::new(bearer.on(channel(&url).await)) }
    };
    let (mut a, mut b) = (workers(pool_a).await, workers(pool_b).await);
    let worker_a = a
        .register(RegisterWorkerRequest {
            name: "a".into(),
            hostname: "test".into(),
            engines: vec!["synthetic".into()],
            models: vec![ModelCapability {
                model_id: "synthetic-v1".into(),
                weights_sha256: hallmark_provenance::sha256_hex(b"hallmark-synthetic:synthetic-v1"),
                refines_only: false,
                inpaints_only: false,
            }],
            max_pixels: 1 << 20,
            max_batch: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    ok(&submit(&url, acme, "synthetic-v1", &[]));
    let lease = |worker_id: &str| LeaseRequest {
        worker_id: worker_id.into(),
        want: 1,
        wait_ms: 5_000,
        ..Default::default()
    };
    let leased = a.lease(lease(&worker_a)).await.unwrap().into_inner().leases;
    assert_eq!(leased.len(), 1);
    let (task_id, fencing_token) = (leased[0].task_id.clone(), leased[0].fencing_token);

    // With pool B's token, worker A is unknown: no renewing (or draining)
    // its leases, no failing or completing its task.
    let e = b.lease(lease(&worker_a)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("unknown worker"), "{e:?}");
    let fail = |hand_back| FailRequest {
        worker_id: worker_a.clone(),
        task_id: task_id.clone(),
        fencing_token,
        message: "not mine".into(),
        hand_back,
        for_good: false,
    };
    let e = b.fail(fail(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let header = CompleteMessage {
        body: Some(Body::Header(CompleteHeader {
            worker_id: worker_a.clone(),
            task_id: task_id.clone(),
            fencing_token,
            size: 4,
            ..Default::default()
        })),
    };
    let e = b
        .complete(tokio_stream::iter(vec![header]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let held = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE id = '{task_id}' AND state = 'leased' AND worker_id = '{worker_a}' AND attempts = 1"
    );
    assert_eq!(
        scalar(&db, &held).await,
        1,
        "pool B touched worker A's lease"
    );

    // The operator sees which token each worker registered with; pool A's
    // own token hands the task back.
    let listed = workers(operator)
        .await
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        listed
            .iter()
            .map(|w| (w.worker_id.as_str(), w.principal.as_str()))
            .collect::<Vec<_>>(),
        [(worker_a.as_str(), "worker:pool-a")]
    );
    a.fail(fail(true)).await.unwrap();
    assert_eq!(
        scalar(
            &db,
            &format!("SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE id = '{task_id}' AND state = 'ready'")
        )
        .await,
        1
    );
}

/// Waits until `token`'s caller sees the job end; its last state.
fn job_state_as(url: &str, token: &str, job_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = hallmark_as(url, Some(token), &["--json", "status", job_id]);
        let state = json_of(&out)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if matches!(state.as_str(), "succeeded" | "failed" | "canceled") {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} did not end: {state}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `hallmark up` with one local worker on `state`, listening on `listen`.
fn hallmark_up(state: &std::path::Path, listen: &str, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("hallmark"));
    cmd.args([
        "up",
        "--listen",
        listen,
        "--workers",
        "1",
        "--render-ms",
        "50",
    ])
    .arg("--state-dir")
    .arg(state)
    .args(extra)
    .env("HALLMARK_LOG", "warn");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_farm_that_others_join_checks_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let up = |file: &std::path::Path, listen: &str| {
        hallmark_up(&state, listen, &["--auth-tokens", file.to_str().unwrap()])
    };
    // Files it cannot use are refused, naming what is wrong, before the
    // farm makes anything.
    let bad = dir.path().join("bad.toml");
    for (text, says) in [
        (None, "no such file"),
        (Some("auth = \"off\"\n"), "needs auth = \"tokens\""),
        (Some("[auth_tokens]\n"), "no auth = \"tokens\" line"),
        (
            Some("auth = \"tokens\"\ndatabase_url = \"postgres://x\"\n"),
            "database_url",
        ),
        (Some("auth = \"tokens\"\n[auth_tokens]\n"), "no auth_tokens"),
        (
            Some("auth = \"tokens\"\n[auth_tokens]\n\"abc\" = \"tenant:x\"\n"),
            "not a SHA-256 digest",
        ),
    ] {
        match text {
            Some(t) => std::fs::write(&bad, t).unwrap(),
            None => {
                let _ = std::fs::remove_file(&bad);
            }
        }
        let out = up(&bad, "127.0.0.1:0").output().unwrap();
        refused(&out, says);
        refused(&out, "--auth-tokens");
        assert!(!state.exists(), "a refused start made {}", state.display());
    }

    let (file, tokens) = token_config(dir.path(), &["tenant:acme", "worker:pool", "operator"]);
    let (acme, pool, operator) = (&tokens[0], &tokens[1], &tokens[2]);
    let with_reload = std::fs::read_to_string(&file).unwrap().replacen(
        "[auth_tokens]",
        "auth_reload_interval_ms = 100\n[auth_tokens]",
        1,
    );
    std::fs::write(&file, with_reload).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _farm = Proc::spawn("hallmark up", &mut up(&file, &format!("127.0.0.1:{port}")));
    eventually("the farm answers", Duration::from_secs(30), || {
        let up = hallmark_as(&url, Some(acme), &["jobs"]).status.success();
        async move { up }
    })
    .await;
    let principals = || {
        let out = hallmark_as(&url, Some(operator), &["--json", "workers"]);
        let mut p: Vec<String> = json_of(&out)
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["live"] == true)
            .map(|w| w["principal"].as_str().unwrap().to_string())
            .collect();
        p.sort();
        p
    };
    // The farm serves as soon as it listens; its own worker registers
    // right after.
    eventually(
        "the farm's own worker registers",
        Duration::from_secs(20),
        || {
            let local = principals() == ["worker:local"];
            async move { local }
        },
    )
    .await;
    refused(&hallmark_as(&url, None, &["jobs"]), "needs a token");
    refused(
        &hallmark_as(&url, Some("not-a-listed-token"), &["jobs"]),
        "not known",
    );
    refused(
        &hallmark_as(&url, Some(acme), &["workers"]),
        "not allowed for tenant:acme",
    );

    // The farm's own worker renders with the token it made for itself.
    let job = json_of(&submit(
        &url,
        acme,
        "synthetic-v1",
        &["--images-per-prompt", "3"],
    ));
    let job_id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(job_state_as(&url, acme, &job_id), "succeeded");

    // An outside worker joins with its pool's token, under that role.
    let ca = state.join("ca");
    let ca_file = |name: &str| ca.join(name).to_str().unwrap().to_string();
    let outside = start_worker(
        &url,
        "outside",
        0,
        &[
            "--token",
            pool,
            "--cert-chain",
            &ca_file("signer.pem"),
            "--private-key",
            &ca_file("signer.key"),
            "--trust-anchors",
            &ca_file("root.pem"),
        ],
    );
    eventually("the outside worker joins", Duration::from_secs(20), || {
        let both = principals() == ["worker:local", "worker:pool"];
        async move { both }
    })
    .await;
    drop(outside);

    // The file edited: acme's token revoked, globex's added. The farm
    // follows it, and its own worker keeps its token through the reload.
    let (globex, globex_digest) = new_token("tenant:globex");
    let kept: String = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("tenant:acme"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &file,
        format!("{kept}\"{globex_digest}\" = \"tenant:globex\"\n"),
    )
    .unwrap();
    eventually("the edit takes effect", Duration::from_secs(10), || {
        let done = hallmark_as(&url, Some(&globex), &["jobs"]).status.success()
            && !hallmark_as(&url, Some(acme), &["jobs"]).status.success();
        async move { done }
    })
    .await;
    refused(&hallmark_as(&url, Some(acme), &["jobs"]), "not known");
    // Longer than a lease without a heartbeat would last.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = json_of(&submit(
        &url,
        &globex,
        "synthetic-v1",
        &["--images-per-prompt", "3"],
    ));
    let job_id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(job_state_as(&url, &globex, &job_id), "succeeded");
    assert!(
        principals().contains(&"worker:local".to_string()),
        "the farm's own worker is still live after the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_farm_over_tls_admits_only_callers_with_its_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let up = |listen: &str, extra: &[&str]| hallmark_up(&state, listen, extra);
    // A name no certificate can hold, or TLS options without --tls, are
    // refused before anything is made.
    refused(
        &up("127.0.0.1:0", &["--tls", "--tls-name", "gpu_farm"])
            .output()
            .unwrap(),
        "--tls-name \"gpu_farm\"",
    );
    refused(
        &up("127.0.0.1:0", &["--tls-client-certs"]).output().unwrap(),
        "--tls",
    );
    assert!(!state.exists(), "a refused start made {}", state.display());

    // Client certificates are issued before the farm first starts: the CA
    // they come from is the one the farm then serves with.
    let certs = dir.path().join("certs");
    let issue = |name: &str, out: &std::path::Path, state_dir: &std::path::Path| {
        let out = hallmark(&[
            "--json",
            "tls",
            "client-cert",
            name,
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
        ]);
        let v = json_of(&out);
        let path = |k: &str| v[k].as_str().unwrap().to_string();
        (path("certificate"), path("key"))
    };
    let cli_cert = issue("cli", &certs, &state);
    let worker_cert = issue("gpu-1", &certs, &state);
    refused(
        &hallmark(&[
            "tls",
            "client-cert",
            "cli",
            "-o",
            certs.to_str().unwrap(),
            "--state-dir",
            &state_arg,
        ]),
        "exists already",
    );
    // One from another farm's CA.
    let stranger = dir.path().join("stranger");
    let stranger_cert = issue("stranger", &stranger, &stranger);
    let ca = state.join("tls").join("ca.pem");
    let ca_before = std::fs::read_to_string(&ca).unwrap();

    let port = free_port();
    let http_addr = format!("127.0.0.1:{}", free_port());
    let _farm = Proc::spawn(
        "hallmark up --tls",
        &mut up(
            &format!("127.0.0.1:{port}"),
            &[
                "--tls",
                "--tls-name",
                "farm.test",
                "--tls-client-certs",
                "--http-listen",
                &http_addr,
            ],
        ),
    );
    let url = format!("https://127.0.0.1:{port}");
    let ca_arg = ca.to_str().unwrap().to_string();
    let call = |url: &str, cert: Option<&(String, String)>, roots: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("hallmark"));
        cmd.arg("--coordinator")
            .arg(url)
            .args(args)
            .env("HALLMARK_LOG", "warn")
            .env_remove("HALLMARK_TOKEN")
            .env_remove("HALLMARK_TLS_CA")
            .env_remove("HALLMARK_TLS_CLIENT_CERT")
            .env_remove("HALLMARK_TLS_CLIENT_KEY");
        if let Some(r) = roots {
            cmd.env("HALLMARK_TLS_CA", r);
        }
        if let Some((c, k)) = cert {
            cmd.env("HALLMARK_TLS_CLIENT_CERT", c)
                .env("HALLMARK_TLS_CLIENT_KEY", k);
        }
        cmd.output().unwrap()
    };
    eventually("the farm answers over TLS", Duration::from_secs(30), || {
        let up = call(&url, Some(&cli_cert), Some(&ca_arg), &["jobs"])
            .status
            .success();
        async move { up }
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        ca_before,
        "the farm kept the CA it found"
    );
    // Its certificate names what it was asked to, beside loopback.
    let server = std::fs::read_to_string(state.join("tls").join("server.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(server.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .expect("the server certificate names its hosts")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap()).to_string(),
                _ => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string(),
            },
            other => format!("{other:?}"),
        })
        .collect();
    for want in ["localhost", "127.0.0.1", "::1", "farm.test"] {
        assert!(sans.iter().any(|s| s == want), "{want} not in {sans:?}");
    }
    // Its soft-binding API is HTTPS under the same CA, and public: no
    // client certificate is asked for.
    let (status, body) = https(
        &http_addr,
        "farm.test",
        &ca,
        "GET",
        "/services/supportedAlgorithms",
        b"",
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Turned away: no client certificate, one from another CA, half a
    // client identity, the farm's certificate unverified, plain HTTP/2.
    for (what, out, says) in [
        (
            "no client certificate",
            call(&url, None, Some(&ca_arg), &["jobs"]),
            "HALLMARK_TLS_CLIENT_CERT",
        ),
        (
            "another CA's certificate",
            call(&url, Some(&stranger_cert), Some(&ca_arg), &["jobs"]),
            "may not accept the client certificate",
        ),
        (
            "the system's roots",
            call(&url, Some(&cli_cert), None, &["jobs"]),
            "cannot reach the coordinator",
        ),
        (
            "plain HTTP/2",
            call(
                &format!("http://127.0.0.1:{port}"),
                Some(&cli_cert),
                None,
                &["jobs"],
            ),
            "",
        ),
    ] {
        assert!(!out.status.success(), "{what}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{what}: {stderr}");
    }
    let mut half = std::process::Command::new(bin("hallmark"));
    half.args(["--coordinator", &url, "jobs"])
        .env("HALLMARK_TLS_CA", &ca_arg)
        .env("HALLMARK_TLS_CLIENT_CERT", &cli_cert.0)
        .env_remove("HALLMARK_TLS_CLIENT_KEY");
    refused(
        &half.output().unwrap(),
        "tls_client_cert and tls_client_key",
    );

    // The farm's own worker renders with the certificate the farm issued it.
    let watched = ok(&call(
        &url,
        Some(&cli_cert),
        Some(&ca_arg),
        &[
            "--json",
            "submit",
            "--watch",
            "--prompt",
            "over mutual TLS",
            "--width",
            "192",
            "--height",
            "192",
        ],
    ));
    let last: Value = serde_json::from_str(watched.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "succeeded", "{watched}");

    // An outside worker joins with a certificate from the farm's CA; one
    // with none never registers.
    let workers = || {
        json_of(&call(
            &url,
            Some(&cli_cert),
            Some(&ca_arg),
            &["--json", "workers"],
        ))
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["live"] == true)
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
    };
    let _bare = start_worker(&url, "bare", 0, &["--tls-ca", &ca_arg]);
    let mut joined = start_worker(
        &url,
        "gpu-1",
        0,
        &[
            "--tls-ca",
            &ca_arg,
            "--tls-cert",
            &worker_cert.0,
            "--tls-key",
            &worker_cert.1,
        ],
    );
    eventually("the outside worker joins", Duration::from_secs(20), || {
        let joined = workers().contains("gpu-1");
        async move { joined }
    })
    .await;
    // Time for the bare worker's retries.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        workers(),
        ["gpu-1", "local-0"].map(String::from).into_iter().collect(),
        "only workers with a certificate from the farm's CA register"
    );

    // Each worker is known by the certificate it registered with, and only
    // a connection presenting that certificate drives it: another holder
    // of a farm certificate (no tokens here) cannot renew or fail its
    // leases.
    let listed = json_of(&call(
        &url,
        Some(&cli_cert),
        Some(&ca_arg),
        &["--json", "workers"],
    ));
    let by_name = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name && w["live"] == true)
            .unwrap()
            .clone()
    };
    let gpu = by_name("gpu-1");
    assert_eq!(gpu["client_certificate"], "CN=gpu-1", "{listed:#}");
    assert_eq!(by_name("local-0")["client_certificate"], "CN=local");
    let gpu_id = gpu["worker_id"].as_str().unwrap().to_string();
    let as_holder = |cert: &(String, String)| {
        let tls = hallmark_proto::client::ClientTls {
            ca: Some(ca.clone()),
            identity: Some((cert.0.clone().into(), cert.1.clone().into())),
            server_name: None,
        };
        let url = url.clone();
        async move {
            let channel = hallmark_proto::client::endpoint(&url, &tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            hallmark_proto::v1::workers_client::WorkersClient::new(channel)
        }
    };
    let lease = hallmark_proto::v1::LeaseRequest {
        worker_id: gpu_id.clone(),
        want: 0,
        ..Default::default()
    };
    let mut other = as_holder(&cli_cert).await;
    let refused_lease = other.lease(lease.clone()).await.unwrap_err();
    assert_eq!(
        refused_lease.code(),
        tonic::Code::NotFound,
        "{refused_lease:?}"
    );
    let refused_fail = other
        .fail(hallmark_proto::v1::FailRequest {
            worker_id: gpu_id.clone(),
            task_id: "t-none".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused_fail.code(),
        tonic::Code::NotFound,
        "{refused_fail:?}"
    );
    // Its own certificate drives it.
    let mut own = as_holder(&worker_cert).await;
    own.lease(lease).await.unwrap();

    // A certificate revoked by name is refused within the reload interval;
    // the others keep working.
    let temp = issue("temp", &certs, &state);
    ok(&call(&url, Some(&temp), Some(&ca_arg), &["jobs"]));
    let out = hallmark(&["tls", "revoke", "temp", "--state-dir", &state_arg]);
    assert!(ok(&out).contains("revoked temp"), "{out:?}");
    refused(
        &hallmark(&["tls", "revoke", "nobody", "--state-dir", &state_arg]),
        "no client certificate named",
    );
    eventually(
        "the revocation takes effect",
        Duration::from_secs(20),
        || {
            let out = call(&url, Some(&temp), Some(&ca_arg), &["jobs"]);
            let gone = !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("has been revoked");
            async move { gone }
        },
    )
    .await;
    ok(&call(&url, Some(&cli_cert), Some(&ca_arg), &["jobs"]));

    // A worker whose certificate is revoked stops, saying why, rather than
    // retrying for ever.
    ok(&hallmark(&[
        "tls",
        "revoke",
        "gpu-1",
        "--state-dir",
        &state_arg,
    ]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let how = loop {
        if let Some(how) = joined.exited() {
            break how;
        }
        assert!(Instant::now() < deadline, "the revoked worker still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        how.contains("no longer accepts this worker's credentials")
            && how.contains("has been revoked"),
        "{how}"
    );

    // The list may instead be a CRL the client CA signed (as an external
    // PKI publishes it): it revokes by issuer and serial number.
    let revoked_by_crl = issue("crl-listed", &certs, &state);
    ok(&call(&url, Some(&revoked_by_crl), Some(&ca_arg), &["jobs"]));
    let serial = {
        let pem = std::fs::read(&revoked_by_crl.0).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        pem.parse_x509().unwrap().raw_serial().to_vec()
    };
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &ca_before,
        rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(state.join("tls").join("ca.key")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(7),
        crl_number: 1u64.into(),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: serial.into(),
            revocation_time: now,
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    std::fs::write(state.join("tls").join("revoked.txt"), crl.pem().unwrap()).unwrap();
    eventually("the CRL takes effect", Duration::from_secs(20), || {
        let out = call(&url, Some(&revoked_by_crl), Some(&ca_arg), &["jobs"]);
        let gone = !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("has been revoked");
        async move { gone }
    })
    .await;
    ok(&call(&url, Some(&cli_cert), Some(&ca_arg), &["jobs"]));
}

//! Harness for the end-to-end and fault tests: real `hallmark-coordinator`,
//! `hallmark-worker` and `hallmark` processes against a real Postgres and
//! Redis (and a private `redis-server` where a test must stop it).
//!
//! The binaries come from the same target directory as the test; build them
//! first (`cargo build --bins`, which the README's test command does).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hallmark_proto::v1::jobs_client::JobsClient;
use hallmark_proto::v1::workers_client::WorkersClient;
use hallmark_proto::v1::{Job, JobRef};
use hallmark_provenance::credentials::ca;
use hallmark_provenance::credentials::{SigningAlgorithm, ca::CaFiles};
use tonic::transport::Channel;

/// A built binary of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --bins`",
        path.display()
    );
    path
}

/// Postgres server URL without a database name.
pub fn postgres_base() -> String {
    std::env::var("HALLMARK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The shared Redis used by tests that do not stop it.
pub fn redis_url() -> String {
    std::env::var("HALLMARK_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh, empty Postgres database; its URL.
pub async fn fresh_database() -> String {
    sqlx::any::install_default_drivers();
    let base = postgres_base();
    let admin = sqlx::AnyPool::connect(&format!("{base}/postgres"))
        .await
        .expect("postgres is reachable (start it, or set HALLMARK_TEST_POSTGRES)");
    let name = format!("hallmark_e2e_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    format!("{base}/{name}")
}

/// Runs one query returning a single BIGINT.
pub async fn scalar(db_url: &str, sql: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(db_url).await.expect("connect");
    let v: i64 = sqlx::query_scalar(sql)
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
    v
}

/// A free TCP port on loopback for a test server to listen on.
///
/// Drawn below the kernel's ephemeral range, so no outgoing connection (to
/// Postgres, Redis, a coordinator) can be holding it when the server binds,
/// and never the same port twice in one test process.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 20000;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    if ephemeral_low > LOW + 1000 {
        let span = u64::from(ephemeral_low - LOW);
        let mut x = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        for _ in 0..span {
            // xorshift64*: a spread of candidates that differs per process.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = LOW + (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11).rem_euclid(span) as u16;
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    given.insert(port);
    port
}

/// A child process killed (SIGKILL) when dropped. Its stderr goes to a
/// log file (shown when it dies before it should), or to the test's own
/// stderr with `HALLMARK_TEST_LOGS` set.
pub struct Proc {
    pub child: Child,
    pub name: String,
    log: Option<tempfile::NamedTempFile>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let log = if std::env::var_os("HALLMARK_TEST_LOGS").is_some() {
            None
        } else {
            Some(tempfile::NamedTempFile::new().expect("a log file for a test process"))
        };
        let stderr = match &log {
            Some(f) => Stdio::from(f.reopen().expect("reopen the log file")),
            None => Stdio::inherit(),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name: name.into(),
            log,
        }
    }

    /// `None` while the process runs; once it has exited, how it ended and
    /// the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().expect("wait on a test process")?;
        let tail = match &self.log {
            Some(f) => {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            }
            None => "(its stderr went to the test's stderr)".into(),
        };
        Some(format!(
            "{} exited ({status}); its log ends:\n{tail}",
            self.name
        ))
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for a coordinator process.
#[derive(Clone)]
pub struct CoordinatorSpec {
    pub port: u16,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub blob_dir: PathBuf,
    /// Extra `HALLMARK_*` settings.
    pub env: Vec<(String, String)>,
}

impl CoordinatorSpec {
    pub fn new(database_url: &str, redis_url: Option<String>, blob_dir: PathBuf) -> Self {
        Self {
            port: free_port(),
            database_url: database_url.into(),
            redis_url,
            blob_dir,
            // Small pools: coordinators of parallel tests share one Postgres.
            env: vec![("HALLMARK_DATABASE_MAX_CONNECTIONS".into(), "8".into())],
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }

    /// Starts the process and waits until it answers gRPC.
    pub async fn start(&self) -> Proc {
        let mut cmd = Command::new(bin("hallmark-coordinator"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--database-url")
            .arg(&self.database_url)
            .arg("--blob-dir")
            .arg(&self.blob_dir);
        if let Some(r) = &self.redis_url {
            cmd.arg("--redis-url").arg(r);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut p = Proc::spawn("coordinator", &mut cmd);
        wait_for_grpc_of(&self.url(), &mut p).await;
        p
    }
}

/// The test CA every worker of this test process signs with (made once).
pub fn test_ca() -> &'static CaFiles {
    static CA: std::sync::OnceLock<(tempfile::TempDir, CaFiles)> = std::sync::OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir for the test CA");
        let files = ca::init(
            &dir.path().join("ca"),
            "Hallmark e2e",
            SigningAlgorithm::Es256,
        )
        .expect("make the test CA");
        (dir, files)
    })
    .1
}

/// PEM files of a TLS server certificate for `localhost` and 127.0.0.1 and
/// the test root that issued it.
pub struct TlsFiles {
    pub root_cert: PathBuf,
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
}

/// Makes a test root and a TLS server certificate under `dir`, with the
/// CA `hallmark up --tls` uses.
pub fn tls_server_cert(dir: &std::path::Path) -> TlsFiles {
    let ca = hallmark_client::tls::FarmTlsCa::open_or_init(dir).expect("TLS CA");
    let server = ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()])
        .expect("server certificate");
    TlsFiles {
        root_cert: ca.cert,
        server_chain: server.chain,
        server_key: server.key,
    }
}

/// Stamps a synthetic picture for `lease` as a worker of `worker_id` would
/// (watermark with the development key, sign with [`test_ca`]).
pub fn stamp_for(
    lease: &hallmark_proto::v1::TaskLease,
    worker_id: &str,
) -> hallmark_worker::stamp::StampedImage {
    use hallmark_worker::stamp::{ModelFacts, StampSettings};
    let ca = test_ca();
    let stamping = hallmark_worker::Stamping::new(
        hallmark_worker::StampConfig::from_settings(StampSettings {
            identity: ca.identity(None).expect("test CA identity"),
            trust_anchors: Some(&ca.root_cert),
            watermark_key: hallmark_provenance::watermark::DEVELOPMENT_KEY,
            prompt_policy: "hash",
            training_mining: "notAllowed",
            output_format: "png",
        })
        .expect("stamp settings"),
    )
    .expect("signer");
    let pixels = hallmark_provenance::watermark::attacks::smooth_field(
        lease.width,
        lease.height,
        lease.seed as u32,
    );
    stamping
        .stamp(
            lease,
            worker_id,
            &ModelFacts::default(),
            &pixels.into(),
            None,
            None,
        )
        .expect("stamp")
}

/// A worker process with the synthetic engine, signing with [`test_ca`].
pub fn start_worker(coordinator: &str, name: &str, render_ms: u64, extra: &[&str]) -> Proc {
    let ca = test_ca();
    let mut cmd = Command::new(bin("hallmark-worker"));
    // An error it exits with ends its log, without anyhow's backtrace.
    cmd.env("RUST_LIB_BACKTRACE", "0")
        .env("HALLMARK_SIGNING_CERT_CHAIN", &ca.signer_chain)
        .env("HALLMARK_SIGNING_PRIVATE_KEY", &ca.signer_key)
        .env("HALLMARK_TRUST_ANCHORS", &ca.root_cert)
        .arg("--coordinator")
        .arg(coordinator)
        .arg("--name")
        .arg(name)
        .arg("--render-ms")
        .arg(render_ms.to_string())
        .args(extra);
    Proc::spawn(name, &mut cmd)
}

/// Runs the `hallmark` CLI to completion.
pub fn hallmark(args: &[&str]) -> Output {
    Command::new(bin("hallmark"))
        .args(args)
        .env("HALLMARK_LOG", "warn")
        .output()
        .expect("run hallmark")
}

/// The arguments of `hallmark models register` for a synthetic model `id`
/// whose weights (a file written in `dir`) no worker serves.
pub fn register_unserved_model_args(dir: &std::path::Path, id: &str) -> Vec<String> {
    let weights = dir.join(format!("{id}.safetensors"));
    std::fs::write(&weights, format!("weights of {id}, served by no worker")).unwrap();
    [
        "models",
        "register",
        "--id",
        id,
        "--family",
        "synthetic",
        "--weights",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([weights.to_string_lossy().into_owned()])
    .collect()
}

/// `hallmark --coordinator URL ARGS…` presenting `token` (`None`: no token,
/// whatever this process's environment holds).
pub fn hallmark_as(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    hallmark_command(url, token, args)
        .output()
        .expect("run hallmark")
}

/// The command [`hallmark_as`] runs, for a caller to add to (its
/// environment) before running it.
pub fn hallmark_command(url: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("hallmark"));
    cmd.arg("--coordinator")
        .arg(url)
        .args(args)
        .env("HALLMARK_LOG", "warn")
        .env_remove("HALLMARK_TOKEN")
        .env_remove("HALLMARK_TENANT");
    if let Some(t) = token {
        cmd.env("HALLMARK_TOKEN", t);
    }
    cmd
}

/// A new token for `role` from `hallmark token new`: (token, its digest).
pub fn new_token(role: &str) -> (String, String) {
    let out = hallmark(&["--json", "token", "new", "--role", role]);
    ok(&out);
    let v = json_of(&out);
    assert_eq!(v["role"], role);
    let field = |k: &str| v[k].as_str().expect("token new prints token and sha256");
    (field("token").to_string(), field("sha256").to_string())
}

/// Waits until a gRPC server answers at `url`.
pub async fn wait_for_grpc(url: &str) {
    wait_until_serving(url, None).await
}

/// Waits until the gRPC server `process` started answers at `url`; fails
/// with its log if it exits first.
pub async fn wait_for_grpc_of(url: &str, process: &mut Proc) {
    wait_until_serving(url, Some(process)).await
}

async fn wait_until_serving(url: &str, mut process: Option<&mut Proc>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = Channel::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
        {
            // An answer from the server itself (NOT_FOUND, or UNAUTHENTICATED
            // with auth on) means it is up and migrated. A connection that
            // fails is not one: the port can accept connections while the
            // process is still starting, and then exit.
            match JobsClient::new(ch)
                .get_job(JobRef {
                    job_id: "ping".into(),
                })
                .await
            {
                Ok(_) => return,
                Err(s)
                    if !matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    return;
                }
                Err(_) => {}
            }
        }
        if let Some(p) = process.as_deref_mut()
            && let Some(how) = p.exited()
        {
            panic!("the server for {url} did not come up: {how}");
        }
        assert!(
            Instant::now() < deadline,
            "coordinator at {url} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that `grpc.health.v1` on `channel` says `service` ("" for the
/// server as a whole) is serving.
pub async fn assert_serving(channel: Channel, service: &str) {
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{service:?}"
    );
}

/// The stores a benchmark's `--store` names: postgres, sqlite or both.
pub fn stores_named(store: &str) -> anyhow::Result<Vec<&'static str>> {
    Ok(match store {
        "both" => vec!["postgres", "sqlite"],
        "postgres" => vec!["postgres"],
        "sqlite" => vec!["sqlite"],
        other => anyhow::bail!("--store {other:?}: use postgres, sqlite or both"),
    })
}

/// The p50 and p99 of latencies in microseconds, in milliseconds (0 for
/// none): the benchmarks' latency figures.
pub fn percentiles_ms(mut us: Vec<u64>) -> (f64, f64) {
    us.sort_unstable();
    let pct = |p: f64| {
        us.get(((us.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    (pct(0.50), pct(0.99))
}

/// A fresh store for a benchmark: a new Postgres database (8 connections),
/// or for "sqlite" a new file in `dir` (one connection, as the embedded
/// farm has).
pub async fn bench_store(
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<hallmark_coordinator::store::Store> {
    use hallmark_coordinator::store::Store;
    Ok(match name {
        "postgres" => Store::connect(&fresh_database().await, 8).await?,
        _ => {
            let url = format!("sqlite://{}", dir.join("bench.db").display());
            Store::connect(&url, 1).await?
        }
    })
}

/// A connected channel to the coordinator at `url`.
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

pub async fn jobs_client(url: &str) -> JobsClient<Channel> {
    JobsClient::new(channel(url).await)
}

pub async fn workers_client(url: &str) -> WorkersClient<Channel> {
    WorkersClient::new(channel(url).await)
}

/// Polls the job until it ends (or `timeout`), tolerating a coordinator
/// that is down for a while; returns the last state seen.
pub async fn wait_for_job(url: &str, job_id: &str, timeout: Duration) -> Job {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(ch) = Channel::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
            && let Ok(j) = JobsClient::new(ch)
                .get_job(JobRef {
                    job_id: job_id.into(),
                })
                .await
        {
            let j = j.into_inner();
            if matches!(j.state.as_str(), "succeeded" | "failed" | "canceled") {
                return j;
            }
            last = Some(j);
        }
        if Instant::now() > deadline {
            panic!("job {job_id} did not finish in {timeout:?}; last seen: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `cond` holds, polling.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until at least `n` live workers are registered at `url`.
pub async fn wait_for_workers(url: &str, n: usize) {
    let w = workers_client(url).await;
    eventually("workers registered", Duration::from_secs(20), || {
        let mut w = w.clone();
        async move {
            w.list_workers(hallmark_proto::v1::ListWorkersRequest {})
                .await
                .map(|r| r.into_inner().workers.iter().filter(|w| w.live).count() >= n)
                .unwrap_or(false)
        }
    })
    .await;
}

/// Waits until the single-number query `sql` on `db` satisfies `want`.
pub async fn wait_for_count(db: &str, what: &str, sql: &str, want: impl Fn(i64) -> bool) {
    eventually(what, Duration::from_secs(30), || {
        let v = scalar(db, sql);
        let ok = &want;
        async move { ok(v.await) }
    })
    .await;
}

/// A private `redis-server` this test may stop and restart.
pub struct PrivateRedis {
    pub port: u16,
    proc: Option<Proc>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = free_port();
        let mut r = Self { port, proc: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        self.proc = Some(Proc::spawn("redis", &mut cmd));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start (is it installed?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A synthetic-engine job of `n` prompts (64×64, seed 11), optionally upscaled.
pub fn synthetic_spec(n: usize, upscale: u32) -> hallmark_proto::v1::JobSpec {
    hallmark_proto::v1::JobSpec {
        engine: "synthetic".into(),
        model_id: "synthetic-v1".into(),
        prompts: (0..n)
            .map(|i| hallmark_proto::v1::PromptItem {
                prompt: format!("p{i}"),
                ..Default::default()
            })
            .collect(),
        width: 192,
        height: 192,
        steps: 4,
        guidance: 5.0,
        scheduler: "euler".into(),
        upscale,
        seed: Some(11),
        ..Default::default()
    }
}

/// Writes a prompt file with `n` prompts.
pub fn prompt_file(dir: &std::path::Path, n: usize) -> PathBuf {
    let path = dir.join("prompts.txt");
    let text: String = (0..n)
        .map(|i| format!("prompt number {i}: a lighthouse at dusk\n"))
        .collect();
    std::fs::write(&path, text).expect("write prompts");
    path
}

/// moto's S3-compatible server on a free port, with one bucket, `hallmark`.
/// The binary comes from `HALLMARK_TEST_MOTO_SERVER` (default
/// `~/.cache/hallmark/moto-venv/bin/moto_server`); `scripts/services.sh`
/// installs it.
pub struct Moto {
    pub port: u16,
    _proc: Proc,
}

impl Moto {
    pub fn start() -> Self {
        let bin = installed_tool(
            "HALLMARK_TEST_MOTO_SERVER",
            ".cache/hallmark/moto-venv/bin/moto_server",
            "run scripts/services.sh (it installs moto's S3 server)",
        );
        let port = free_port();
        let proc = Proc::spawn(
            "moto",
            Command::new(&bin).args(["-H", "127.0.0.1", "-p", &port.to_string()]),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Create the bucket with a plain S3 PUT (moto accepts unsigned requests).
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect moto");
        write!(s, "PUT /hallmark HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("create bucket");
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
        Self { port, _proc: proc }
    }

    pub fn bucket_url(&self) -> String {
        "s3://hallmark/blobs".into()
    }

    /// `object_store` options that reach this server.
    pub fn options(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_virtual_hosted_style_request", "false".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Asserts that a finished command succeeded (showing its output when it
/// did not) and returns its stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hallmark --json verify ARGS…`: its exit code and its report.
pub fn verify_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = hallmark(&[&["--json", "verify"], args].concat());
    (out.status.code().unwrap_or(-1), json_of(&out))
}

/// A command's stdout as JSON (what `--json` prints).
pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The CLIP vocabulary committed under `tests/data`.
pub fn clip_vocab() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/clip/bpe_simple_vocab_16e6.txt.gz")
}

/// `hallmark models init-tiny DIR --arch ARCH --seed 3`.
pub fn init_tiny(dir: &std::path::Path, arch: &str) {
    ok(&hallmark(&[
        "models",
        "init-tiny",
        dir.to_str().unwrap(),
        "--arch",
        arch,
        "--seed",
        "3",
        "--clip-vocab",
        clip_vocab().to_str().unwrap(),
    ]));
}

/// A minimal HTTP/1.1 exchange: (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let reply = http_request(addr, method, path, &[], body);
    (reply.status, reply.body)
}

/// An HTTP answer.
pub struct HttpReply {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The value of the header `name` (any case), if it was sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// An HTTP/1.1 exchange with extra request headers.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let s = std::net::TcpStream::connect(addr).expect("connect to the HTTP API");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    exchange(s, addr, method, path, headers, body)
}

/// A TLS client (the ring provider) trusting only the PEM roots in `roots`.
fn tls_client_config(roots: &std::path::Path) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(roots).unwrap() {
        store.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth()
}

/// The same exchange over TLS, trusting only the PEM roots in `roots` and
/// checking the certificate names `host`; a failed handshake is the error.
pub fn https(
    addr: &str,
    host: &str,
    roots: &std::path::Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let config = tls_client_config(roots);
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).expect("connect to the HTTPS API");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Complete the handshake first, so a refused certificate is an error
    // here rather than a panic in the exchange.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    let reply = exchange(tls, addr, method, path, &[], body);
    Ok((reply.status, reply.body))
}

/// A GET over HTTP/2 on TLS (ALPN offering only `h2`), trusting only the
/// PEM roots in `roots`: the protocol the server chose, the status and the
/// body.
pub async fn https_h2_get(
    addr: &str,
    host: &str,
    roots: &std::path::Path,
    path: &str,
) -> (Option<Vec<u8>>, u16, Vec<u8>) {
    let mut config = tls_client_config(roots);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the HTTPS API");
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (client, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("HTTP/2 connection ready");
    let request = ::http::Request::get(format!("https://{host}{path}"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).expect("HTTP/2 request");
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("HTTP/2 answer in time")
        .expect("HTTP/2 answer");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("HTTP/2 body");
        bytes.extend_from_slice(&chunk);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    (alpn, status, bytes)
}

fn exchange(
    mut s: impl Read + Write,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        // A TLS peer may close without its close_notify once it has answered.
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty(),
            "reading the response: {e}"
        );
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    HttpReply { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + n]);
        b = &b[line + 2 + n + 2..];
    }
}

/// One scrape of a Prometheus endpoint: every sample as (metric, labels, value).
pub struct Scrape {
    pub samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// `GET /metrics` at `addr` (host:port); panics unless it answers 200
    /// with the Prometheus text format.
    pub fn get(addr: &str) -> Self {
        let (status, body) = http(addr, "GET", "/metrics", b"");
        let text = String::from_utf8(body).expect("metrics are UTF-8");
        assert_eq!(status, 200, "GET /metrics: {text}");
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("bad sample line {l:?}")))
            .collect();
        Self { samples, text }
    }

    /// The sum of the samples of `metric` whose labels include `labels`;
    /// `None` when there is no such sample.
    pub fn sum(&self, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for (name, have, value) in &self.samples {
            if name == metric
                && labels
                    .iter()
                    .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += value;
            }
        }
        found
    }
}

/// `name{k="v",…} value` → its parts (label values unescaped).
fn parse_sample(line: &str) -> Option<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut labels = std::collections::BTreeMap::new();
    let (name, rest) = match line.find('{') {
        Some(open) => {
            let mut chars = line[open + 1..].char_indices();
            let mut key = String::new();
            let close = loop {
                let (i, c) = chars.next()?;
                match c {
                    '}' => break open + 1 + i,
                    ',' | ' ' => {}
                    '=' => {
                        if chars.next()?.1 != '"' {
                            return None;
                        }
                        let mut value = String::new();
                        loop {
                            match chars.next()?.1 {
                                '\\' => value.push(chars.next()?.1),
                                '"' => break,
                                c => value.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            };
            (&line[..open], &line[close + 1..])
        }
        None => line.split_once(' ')?,
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name.to_string(), labels, value))
}

/// A tool `scripts/services.sh` installs under `~/.cache/hallmark`
/// (`under_cache`), or the one the variable `env` names; panics with `hint`
/// when it is missing.
pub fn installed_tool(env: &str, under_cache: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(under_cache)))
        .unwrap_or_else(|| panic!("set HOME or {env}"));
    assert!(
        path.is_file(),
        "{} is missing: {hint} (or set {env})",
        path.display()
    );
    path
}

/// Prometheus's `promtool`, unpacked by `scripts/services.sh`.
pub fn promtool() -> PathBuf {
    installed_tool(
        "HALLMARK_PROMTOOL",
        ".cache/hallmark/prometheus/usr/bin/promtool",
        "scripts/services.sh unpacks promtool",
    )
}

/// Lints a scrape with Prometheus's own `promtool check metrics` (unpacked
/// by `scripts/services.sh`; `HALLMARK_PROMTOOL` to use another): it must
/// parse, and break none of Prometheus's naming and typing rules.
pub fn promtool_check(scrape: &Scrape) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(scrape.text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        scrape.text
    );
}

/// `hallmark submit ARGS` to `url` (which must exit 0), then waits until
/// the job succeeds (or panics with its last state); the job id.
pub async fn submit_and_finish(url: &str, args: &[&str], timeout: Duration) -> String {
    let out = ok(&hallmark(
        &[&["--coordinator", url, "--json", "submit"], args].concat(),
    ));
    let submitted: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("submit printed no JSON ({e}): {out}"));
    let job_id = submitted["job_id"]
        .as_str()
        .expect("submit prints the job id")
        .to_string();
    let job = wait_for_job(url, &job_id, timeout).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    job_id
}

/// [`submit_and_finish`], then downloads the job into `out_dir`; the job id.
pub async fn run_job(
    url: &str,
    args: &[&str],
    out_dir: &std::path::Path,
    timeout: Duration,
) -> String {
    let job_id = submit_and_finish(url, args, timeout).await;
    ok(&hallmark(&[
        "--coordinator",
        url,
        "download",
        &job_id,
        "-o",
        out_dir.to_str().expect("UTF-8 path"),
    ]));
    job_id
}

/// A photograph of the test data (`tests/data/images/NAME`).
pub fn photo(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/images")
        .join(name)
}

/// An image file's pixels as RGB.
pub fn rgb(p: &std::path::Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// Runs `hallmark render --prompt x` on an embedded farm under `dir`, with
/// `common` and then each case's flags, and asserts that every case is
/// refused, its error holding the case's text, with nothing written.
pub fn assert_renders_refused(dir: &std::path::Path, common: &[&str], cases: &[(&[&str], &str)]) {
    let state = dir.join("state");
    let out_dir = dir.join("out");
    for (extra, expect) in cases {
        let mut args = vec![
            "render",
            "--state-dir",
            state.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
            "--prompt",
            "x",
        ];
        args.extend_from_slice(common);
        args.extend_from_slice(extra);
        let out = hallmark(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(expect), "{extra:?}: {err}");
        assert!(!out_dir.exists(), "{extra:?}: nothing written");
    }
}

//! The deployment files are tested, not only written. The Kubernetes
//! manifests pass the API's schemas (kubernetes-validate, strict) and hang
//! together (selectors, the autoscaler's target and model); the coordinator
//! and the worker they describe — command, arguments, environment from
//! ConfigMaps, Secrets and the downward API, mounted files, ports, probes,
//! metrics annotations — run here as real processes with exactly that
//! configuration and render a job through S3-compatible blob storage; so do
//! the compose file's services. The Prometheus configuration and rules go
//! through promtool, the rules through their unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hallmark_e2e::*;
use serde::Deserialize;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy")
}

fn succeeded(out: &Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed: {text}");
    text
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_docs_of(&text, &path.display().to_string())
}

/// The documents of a YAML stream (`what` names it in a failure; a
/// duplicated key is one).
fn yaml_docs_of(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(text).collect())
        .unwrap_or_default()
}

/// A process as a deployment file describes it.
#[derive(Debug, Default)]
struct Launch {
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

/// What the deployment's world is here: each `from` (a mount path, an
/// address) replaced by its `to` in every argument and variable.
#[derive(Default)]
struct Rewrite(Vec<(String, String)>);

impl Rewrite {
    fn add(&mut self, from: impl Into<String>, to: impl Into<String>) {
        self.0.push((from.into(), to.into()));
        // Longest first, so /etc/hallmark/trust wins over /etc/hallmark.
        self.0
            .sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    }

    /// One pass over `s`: a replacement is never rewritten again.
    fn apply(&self, s: &str) -> String {
        let mut out = String::new();
        let mut i = 0;
        'scan: while i < s.len() {
            for (from, to) in &self.0 {
                if s[i..].starts_with(from.as_str()) {
                    out.push_str(to);
                    i += from.len();
                    continue 'scan;
                }
            }
            let c = s[i..].chars().next().expect("a char");
            out.push(c);
            i += c.len_utf8();
        }
        out
    }
}

/// Container ports, each mapped to a free port here (`0.0.0.0:P` →
/// `127.0.0.1:P'`), since this machine runs every container on one network.
#[derive(Default)]
struct Ports(BTreeMap<u16, u16>);

impl Ports {
    fn map(&mut self, port: u16) -> u16 {
        *self.0.entry(port).or_insert_with(free_port)
    }

    /// Adds a rewrite of every `0.0.0.0:P` found in `values` to its local port.
    fn rewrite_listens<'a>(&mut self, values: impl Iterator<Item = &'a String>, rw: &mut Rewrite) {
        for v in values {
            if let Some(rest) = v.split("0.0.0.0:").nth(1) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let port: u16 = digits.parse().expect("a port after 0.0.0.0:");
                let local = self.map(port);
                rw.add(format!("0.0.0.0:{port}"), format!("127.0.0.1:{local}"));
            }
        }
    }
}

impl Launch {
    fn rewritten(&self, rw: &Rewrite) -> Launch {
        Launch {
            program: self.program.clone(),
            args: self.args.iter().map(|a| rw.apply(a)).collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), rw.apply(v)))
                .collect(),
        }
    }

    /// The command, with only the described environment (and a PATH that
    /// finds the built binaries, a HOME of its own).
    fn command(&self, home: &Path) -> Command {
        let bins = bin("hallmark");
        let bin_dir = bins.parent().expect("binaries directory");
        let program = match self.program.as_str() {
            p @ ("hallmark" | "hallmark-coordinator" | "hallmark-worker") => bin(p),
            other => PathBuf::from(other),
        };
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("HOME", home)
            .args(&self.args)
            .envs(&self.env);
        cmd
    }
}

/// Every `HALLMARK_*` variable given to a coordinator is one of its
/// settings: a misspelt one would be ignored (with only a warning).
fn assert_coordinator_settings(env: &BTreeMap<String, String>, source: &str) {
    let unknown =
        hallmark_coordinator::CoordinatorConfig::unrecognised_variables(env.keys().cloned());
    assert!(
        unknown.is_empty(),
        "{source}: {unknown:?} are not coordinator settings"
    );
}

/// Every `HALLMARK_*` variable given to a worker is one its flags read.
fn assert_worker_settings(env: &BTreeMap<String, String>, source: &str) {
    let help = succeeded(
        &Command::new(bin("hallmark-worker"))
            .arg("--help")
            .output()
            .unwrap(),
        "hallmark-worker --help",
    );
    for key in env
        .keys()
        .filter(|k| k.starts_with("HALLMARK_") && *k != "HALLMARK_LOG")
    {
        assert!(
            help.contains(&format!("[env: {key}")),
            "{source}: {key} is read by no worker flag"
        );
    }
}

// ---------------------------------------------------------------- Kubernetes

/// The objects a deployment describes: deploy/k8s as kustomize applies it,
/// or the Helm chart as `helm template` renders it.
struct Cluster {
    /// Where they come from, for messages.
    source: String,
    docs: Vec<Value>,
}

/// `helm`, installed by `scripts/services.sh`.
fn helm() -> PathBuf {
    installed_tool(
        "HALLMARK_HELM",
        ".cache/hallmark/deploy-venv/bin/helm",
        "scripts/services.sh installs helm",
    )
}

/// `helm template RELEASE deploy/helm/hallmark` in the `hallmark`
/// namespace, with `values` (YAML) over the chart's defaults.
fn helm_template(release: &str, values: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    Command::new(helm())
        .args(["template", release])
        .arg(deploy_dir().join("helm/hallmark"))
        .args(["--namespace", "hallmark", "--values"])
        .arg(&file)
        .output()
        .unwrap()
}

impl Cluster {
    fn helm(release: &str, values: &str) -> Self {
        let source = format!("the Helm chart as release {release}");
        let out = helm_template(release, values);
        let rendered = succeeded(&out, &format!("helm template {release}"));
        Self {
            docs: yaml_docs_of(&rendered, &source),
            source,
        }
    }

    fn kustomize() -> Self {
        let dir = deploy_dir().join("k8s");
        let kustomization = yaml_docs(&dir.join("kustomization.yaml")).remove(0);
        let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
            .collect();
        assert_eq!(listed, present, "kustomization.yaml lists every manifest");
        let docs = listed
            .iter()
            .flat_map(|f| yaml_docs(&dir.join(f)))
            .collect();
        Self {
            source: "deploy/k8s".into(),
            docs,
        }
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {}", self.source))
    }

    fn all(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    fn container(&self, deployment: &str, name: &str) -> &Value {
        self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in {deployment}"))
    }

    fn config_map(&self, name: &str) -> BTreeMap<String, String> {
        self.get("ConfigMap", name)["data"]
            .as_mapping()
            .expect("ConfigMap data")
            .iter()
            .map(|(k, v)| (text(k), text(v)))
            .collect()
    }
}

/// What the operator creates beside the manifests (deploy/README.md):
/// Secrets, the trust ConfigMap, the models volume.
struct Provided {
    secrets: BTreeMap<(String, String), String>,
    /// Files of Secret and ConfigMap volumes, by object name then key.
    files: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Directories standing in for PersistentVolumeClaims, by claim name.
    claims: BTreeMap<String, PathBuf>,
}

/// The launch of `container` of a Deployment's pod `pod_name`, with its
/// volumes made here under `root`.
fn pod_launch(
    cluster: &Cluster,
    deployment: &str,
    container: &str,
    pod_name: &str,
    provided: &Provided,
    root: &Path,
    rw: &mut Rewrite,
) -> (Launch, Value) {
    let pod = &cluster.get("Deployment", deployment)["spec"]["template"]["spec"];
    let c = cluster.container(deployment, container).clone();
    let mut command = strings(&c["command"]);
    let mut launch = Launch {
        program: command.remove(0),
        args: command.into_iter().chain(strings(&c["args"])).collect(),
        env: BTreeMap::new(),
    };
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        launch
            .env
            .extend(cluster.config_map(&text(&from["configMapRef"]["name"])));
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = text(&e["name"]);
        let from = &e["valueFrom"];
        let value = if !e["value"].is_null() {
            Some(text(&e["value"]))
        } else if !from["secretKeyRef"].is_null() {
            let r = &from["secretKeyRef"];
            let key = (text(&r["name"]), text(&r["key"]));
            let value = provided.secrets.get(&key).cloned();
            assert!(
                value.is_some() || r["optional"] == true,
                "{deployment} needs secret {key:?}, which deploy/README.md does not name"
            );
            value
        } else if !from["configMapKeyRef"].is_null() {
            let r = &from["configMapKeyRef"];
            cluster
                .config_map(&text(&r["name"]))
                .get(&text(&r["key"]))
                .cloned()
        } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
            Some(pod_name.to_string())
        } else {
            panic!("{deployment}: cannot resolve {e:?}")
        };
        if let Some(v) = value {
            launch.env.insert(name, v);
        }
    }
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let name = text(&m["name"]);
        let v = volumes
            .iter()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{deployment}: no volume {name}"));
        let local = root.join(&name);
        let object = if !v["configMap"].is_null() {
            Some(text(&v["configMap"]["name"]))
        } else if !v["secret"].is_null() {
            Some(text(&v["secret"]["secretName"]))
        } else {
            None
        };
        if let Some(object) = object {
            let files = provided
                .files
                .get(&object)
                .unwrap_or_else(|| panic!("{deployment} mounts {object}, which is not provided"));
            std::fs::create_dir_all(&local).unwrap();
            // Only the keys `items` projects, at their paths; all without.
            let source = if v["configMap"].is_null() {
                &v["secret"]
            } else {
                &v["configMap"]
            };
            let items: Vec<(String, String)> = match source["items"].as_sequence() {
                Some(items) => items
                    .iter()
                    .map(|i| (text(&i["key"]), text(&i["path"])))
                    .collect(),
                None => files.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in items {
                let bytes = files.get(&key).unwrap_or_else(|| {
                    panic!("{deployment} mounts key {key} of {object}, which is not provided")
                });
                std::fs::write(local.join(path), bytes).unwrap();
            }
            rw.add(text(&m["mountPath"]), local.to_string_lossy());
        } else if !v["emptyDir"].is_null() {
            std::fs::create_dir_all(&local).unwrap();
            rw.add(text(&m["mountPath"]), local.to_string_lossy());
        } else if !v["persistentVolumeClaim"].is_null() {
            let claim = text(&v["persistentVolumeClaim"]["claimName"]);
            cluster.get("PersistentVolumeClaim", &claim);
            let dir = &provided.claims[&claim];
            rw.add(text(&m["mountPath"]), dir.to_string_lossy());
        } else {
            panic!("{deployment}: volume {name} of an unexpected kind");
        }
    }
    (launch, c)
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| m.iter().map(|(k, v)| (text(k), text(v))).collect())
        .unwrap_or_default()
}

fn port_named(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}")) as u16
}

/// Holds `files` (in `dir`) to the Kubernetes API's schemas, strictly.
fn assert_pass_api_schemas(dir: &Path, files: &[String], source: &str) {
    let validate = installed_tool(
        "HALLMARK_KUBERNETES_VALIDATE",
        ".cache/hallmark/deploy-venv/bin/kubernetes-validate",
        "scripts/services.sh installs kubernetes-validate",
    );
    // An older Kubernetes (1.30, still common on managed clusters) and the
    // newest the schemas know.
    for version in ["1.30", "1.37"] {
        let out = Command::new(&validate)
            .current_dir(dir)
            .args(["--strict", "--quiet", "-k", version])
            .args(files)
            .output()
            .unwrap();
        let report = succeeded(
            &out,
            &format!("kubernetes-validate of {source} against {version}"),
        );
        assert!(!report.contains("WARN"), "{source}: {report}");
    }
}

#[test]
fn the_kubernetes_manifests_pass_the_api_schemas() {
    let dir = deploy_dir().join("k8s");
    let files: Vec<String> = strings(&yaml_docs(&dir.join("kustomization.yaml"))[0]["resources"]);
    assert_pass_api_schemas(&dir, &files, "deploy/k8s");
}

/// The argument after `flag` in a container's `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// Whether `selector` (matchLabels) picks pods labelled `pod`.
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// The models an autoscaler's external metric selects: `matchLabels`'
/// `model`, or a `matchExpressions` `model In [..]`.
fn metric_models(metric: &Value) -> Vec<String> {
    let selector = &metric["selector"];
    if !selector["matchLabels"]["model"].is_null() {
        return vec![text(&selector["matchLabels"]["model"])];
    }
    let exprs = selector["matchExpressions"]
        .as_sequence()
        .expect("the metric selects models");
    assert_eq!(exprs.len(), 1, "one expression, on the model: {exprs:?}");
    assert_eq!(exprs[0]["key"], "model");
    assert_eq!(exprs[0]["operator"], "In");
    strings(&exprs[0]["values"])
}

/// The objects hang together: each Deployment's selector picks its own
/// pods and no other Deployment's, the coordinator's Service and
/// disruption budget pick its pods only, and each worker pool
/// (`(deployment, models it serves)`) has an autoscaler on that Deployment
/// following exactly those models' ready tasks, one GPU per worker and a
/// grace period that outlasts its drain.
fn assert_objects_fit(cluster: &Cluster, coordinator: &str, pools: &[(&str, &[&str])]) {
    let source = &cluster.source;
    let pods: BTreeMap<String, BTreeMap<String, String>> = cluster
        .all("Deployment")
        .map(|d| {
            (
                text(&d["metadata"]["name"]),
                labels(&d["spec"]["template"]["metadata"]["labels"]),
            )
        })
        .collect();
    let mut deployments: Vec<&str> = pools.iter().map(|(d, _)| *d).collect();
    deployments.push(coordinator);
    assert_eq!(
        pods.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        deployments.iter().copied().collect::<BTreeSet<_>>(),
        "{source}: the Deployments"
    );
    for name in &deployments {
        let selector = labels(&cluster.get("Deployment", name)["spec"]["selector"]["matchLabels"]);
        for (other, pod) in &pods {
            assert_eq!(
                selects(&selector, pod),
                other == name,
                "{source}: {name}'s selector picks its own pods only (checked against {other}'s)"
            );
        }
    }
    for kind in ["Service", "PodDisruptionBudget"] {
        let object = cluster.get(kind, coordinator);
        let selector = if kind == "Service" {
            labels(&object["spec"]["selector"])
        } else {
            labels(&object["spec"]["selector"]["matchLabels"])
        };
        for (other, pod) in &pods {
            assert_eq!(
                selects(&selector, pod),
                other == coordinator,
                "{source}: the {kind} selects the coordinator's pods only (checked against {other}'s)"
            );
        }
    }
    let adapter = yaml_docs(&deploy_dir().join("prometheus/adapter-rules.yaml")).remove(0);
    let rule = &adapter["externalRules"][0];
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/rules.yml")).unwrap();
    assert_eq!(
        cluster.all("HorizontalPodAutoscaler").count(),
        pools.len(),
        "{source}: one autoscaler per pool"
    );
    for (deployment, models) in pools {
        // The autoscaler scales the pool's Deployment on the models it serves.
        let hpa = cluster.get("HorizontalPodAutoscaler", deployment);
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], *deployment);
        let worker = cluster.container(deployment, "worker");
        let args = strings(&worker["args"]);
        let served: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--model-path")
            .map(|w| w[1].split('=').next().unwrap())
            .collect();
        assert_eq!(served, *models, "{source}: what {deployment} serves");
        let metric = &hpa["spec"]["metrics"][0]["external"]["metric"];
        assert_eq!(
            metric_models(metric),
            *models,
            "{source}: {deployment}'s autoscaler follows its models"
        );
        // The external metric is the one prometheus-adapter serves from the recording rule.
        assert_eq!(rule["name"]["as"], metric["name"]);
        assert!(rules.contains(&format!("record: {}", text(&rule["seriesQuery"]))));
        // One GPU per worker; the grace period outlasts the drain.
        assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], 1);
        let drain: u64 = flag_value(&args, "--drain-secs")
            .expect("--drain-secs")
            .parse()
            .unwrap();
        let grace = cluster.get("Deployment", deployment)["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            grace > drain,
            "{source}: {deployment}'s grace {grace}s must outlast the {drain}s drain"
        );
    }
}

#[test]
fn the_kubernetes_objects_select_and_scale_each_other() {
    assert_objects_fit(
        &Cluster::kustomize(),
        "hallmark-coordinator",
        &[("hallmark-worker-sd15", &["sd15"])],
    );
}

/// The names of a farm's objects in one deployment description.
struct FarmObjects<'a> {
    coordinator: &'a str,
    /// The coordinator's Service (what the workers dial).
    service: &'a str,
    worker: &'a str,
    /// The models volume's claim.
    models_claim: &'a str,
    /// gRPC over mutual TLS, from the Secrets `hallmark-coordinator-tls`
    /// and `hallmark-worker-tls`.
    tls: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_manifests_run_a_farm_as_written() {
    run_farm_as_written(
        &Cluster::kustomize(),
        &FarmObjects {
            coordinator: "hallmark-coordinator",
            service: "hallmark-coordinator",
            worker: "hallmark-worker-sd15",
            models_claim: "hallmark-models",
            tls: false,
        },
    )
    .await;
}

/// Runs the coordinator and the worker `cluster` describes as real
/// processes with exactly that configuration (the Secrets and files
/// deploy/README.md has the operator make), and renders a job with them.
async fn run_farm_as_written(cluster: &Cluster, names: &FarmObjects<'_>) {
    let source = cluster.source.as_str();
    let dir = tempfile::tempdir().unwrap();
    // With mutual TLS (`names.tls`): the coordinator's kubernetes.io/tls
    // Secret and the pool's, as a cert-manager issuer would make them, and
    // a client certificate for the CLI.
    let tls = names.tls.then(|| {
        let tls_dir = dir.path().join("tls-ca");
        let server = tls_server_cert(&tls_dir);
        let ca = hallmark_client::tls::FarmTlsCa::open_or_init(&tls_dir).unwrap();
        let issued = dir.path().join("issued");
        let pool = ca.issue_client("sd15-pool", &issued).unwrap();
        let cli = ca.issue_client("operator-laptop", &issued).unwrap();
        let lost = ca.issue_client("lost-laptop", &issued).unwrap();
        ca.revoke("lost-laptop").unwrap();
        let revoked = std::fs::read(ca.revoked_list().unwrap()).unwrap();
        let read = |p: &Path| std::fs::read(p).unwrap();
        let secret = |chain: &Path, key: &Path| {
            vec![
                ("tls.crt", read(chain)),
                ("tls.key", read(key)),
                ("ca.crt", read(&server.root_cert)),
            ]
        };
        let files = [
            (
                "hallmark-coordinator-tls",
                secret(&server.server_chain, &server.server_key),
            ),
            ("hallmark-worker-tls", secret(&pool.chain, &pool.key)),
            ("hallmark-revoked-certs", vec![("revoked.txt", revoked)]),
        ];
        (files, server.root_cert.clone(), cli, lost)
    });
    let moto = Moto::start();
    let db = fresh_database().await;
    let ca = test_ca();
    let models = dir.path().join("models-volume");
    init_tiny(&models.join("sd15"), "sd1");
    init_tiny(&models.join("realesrgan-x4"), "esrgan-x4");
    // The callers' tokens, made as deploy/README.md makes them: each token
    // on stdout, its auth.toml line appended from stderr.
    let mut auth_toml = String::from("[auth_tokens]\n");
    let mut token_new = |role: &str| {
        let out = hallmark(&["token", "new", "--role", role]);
        let token = ok(&out);
        auth_toml.push_str(&String::from_utf8_lossy(&out.stderr));
        token
    };
    let worker_token = token_new("worker");
    let operator = token_new("operator:alice").trim().to_string();
    let tenant = token_new("tenant:acme").trim().to_string();
    // Exactly the Secret keys and files deploy/README.md tells the operator to create.
    let secret =
        |name: &str, key: &str, value: String| ((name.to_string(), key.to_string()), value);
    let provided = Provided {
        secrets: [
            secret("hallmark-secrets", "database-url", db.clone()),
            secret("hallmark-secrets", "redis-url", redis_url()),
            secret(
                "hallmark-secrets",
                "watermark-key",
                "k8s-test-watermark-key".into(),
            ),
            secret("hallmark-secrets", "blob-url", moto.bucket_url()),
            secret("hallmark-blob-store", "aws-access-key-id", "test".into()),
            secret(
                "hallmark-blob-store",
                "aws-secret-access-key",
                "test".into(),
            ),
            secret("hallmark-blob-store", "aws-region", "us-east-1".into()),
            secret(
                "hallmark-blob-store",
                "aws-endpoint",
                format!("http://127.0.0.1:{}", moto.port),
            ),
            secret("hallmark-blob-store", "aws-allow-http", "true".into()),
            secret("hallmark-auth", "worker-token", worker_token),
        ]
        .into_iter()
        .collect(),
        files: [
            (
                "hallmark-auth",
                vec![("auth.toml", auth_toml.clone().into_bytes())],
            ),
            (
                "hallmark-trust",
                vec![("root.pem", std::fs::read(&ca.root_cert).unwrap())],
            ),
            (
                "hallmark-signing",
                vec![
                    ("signer.pem", std::fs::read(&ca.signer_chain).unwrap()),
                    ("signer.key", std::fs::read(&ca.signer_key).unwrap()),
                ],
            ),
        ]
        .into_iter()
        .chain(tls.iter().flat_map(|(files, ..)| files.clone()))
        .map(|(object, files)| {
            (
                object.to_string(),
                files.into_iter().map(|(k, b)| (k.to_string(), b)).collect(),
            )
        })
        .collect(),
        claims: [(names.models_claim.to_string(), models)]
            .into_iter()
            .collect(),
    };

    let mut ports = Ports::default();
    let mut rw = Rewrite::default();
    let (coordinator, c_spec) = pod_launch(
        cluster,
        names.coordinator,
        "coordinator",
        &format!("{}-7d9f-abcde", names.coordinator),
        &provided,
        &dir.path().join("coordinator-pod"),
        &mut rw,
    );
    let worker_pod = format!("{}-6c8b-fghij", names.worker);
    let mut worker_rw = Rewrite::default();
    let (worker, w_spec) = pod_launch(
        cluster,
        names.worker,
        "worker",
        &worker_pod,
        &provided,
        &dir.path().join("worker-pod"),
        &mut worker_rw,
    );
    // Services resolve to the coordinator's ports here.
    let service = cluster.get("Service", names.service);
    for p in service["spec"]["ports"].as_sequence().unwrap() {
        let target = port_named(&c_spec, &text(&p["targetPort"]));
        let local = ports.map(target);
        worker_rw.add(
            format!("{}:{}", names.service, text(&p["port"])),
            format!("127.0.0.1:{local}"),
        );
    }
    ports.rewrite_listens(coordinator.env.values().chain(&coordinator.args), &mut rw);
    ports.rewrite_listens(worker.env.values().chain(&worker.args), &mut worker_rw);

    assert_coordinator_settings(&coordinator.env, &format!("{source} coordinator"));
    assert_worker_settings(&worker.env, &format!("{source} worker"));
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut coordinator_proc = Proc::spawn(
        "k8s-coordinator",
        &mut coordinator.rewritten(&rw).command(&home),
    );
    let grpc = ports.map(port_named(&c_spec, "grpc"));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{grpc}");
    // The probes ask gRPC health in plain text on the health port, which
    // the coordinator serves as configured (so TLS on the gRPC port does
    // not break them).
    let health_url = format!(
        "http://127.0.0.1:{}",
        ports.map(port_named(&c_spec, "health"))
    );
    wait_for_grpc_of(
        if tls.is_some() { &health_url } else { &url },
        &mut coordinator_proc,
    )
    .await;
    // The CLI as an operator's machine runs it: over TLS with the CA and
    // a client certificate of its own.
    let hallmark_as = |url: &str, token: Option<&str>, args: &[&str]| {
        let mut cmd = hallmark_command(url, token, args);
        if let Some((_, root, cli, _)) = &tls {
            cmd.env("HALLMARK_TLS_CA", root)
                .env("HALLMARK_TLS_CLIENT_CERT", &cli.chain)
                .env("HALLMARK_TLS_CLIENT_KEY", &cli.key);
        }
        cmd.output().unwrap()
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        let p = &c_spec[probe]["grpc"];
        assert_eq!(
            p["port"].as_u64(),
            Some(u64::from(port_named(&c_spec, "health")))
        );
        assert_serving(
            channel(&health_url).await,
            p["service"].as_str().unwrap_or_default(),
        )
        .await;
    }
    // Prometheus finds the metrics where the annotations say.
    let scrape_at = |spec: &Value, deployment: &str| {
        let annotations = labels(
            &cluster.get("Deployment", deployment)["spec"]["template"]["metadata"]["annotations"],
        );
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        let port: u16 = annotations["prometheus.io/port"].parse().unwrap();
        assert_eq!(port, port_named(spec, "metrics"));
        port
    };
    let c_metrics = format!(
        "127.0.0.1:{}",
        ports.map(scrape_at(&c_spec, names.coordinator))
    );
    assert_eq!(
        Scrape::get(&c_metrics).sum("hallmark_census_up", &[]),
        Some(1.0)
    );

    // The worker: as written, but on this machine's CPU (no GPU here).
    assert_eq!(
        worker.env.get("HALLMARK_DEVICE").map(String::as_str),
        Some("cuda")
    );
    let mut worker = worker.rewritten(&worker_rw);
    worker.env.insert("HALLMARK_DEVICE".into(), "cpu".into());
    worker.env.insert("HALLMARK_DTYPE".into(), "f32".into());
    let _worker = Proc::spawn("k8s-worker", &mut worker.command(&home));
    // With auth on: no token, no worker list; the operator's shows the
    // worker, which got in with the Secret's worker token.
    let refused = hallmark_as(&url, None, &["workers"]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("needs a token"),
        "{refused:?}"
    );
    let workers = || {
        let out = hallmark_as(&url, Some(operator.as_str()), &["--json", "workers"]);
        json_of(&out).as_array().cloned().unwrap_or_default()
    };
    eventually("the worker registers", Duration::from_secs(60), || {
        let n = workers().len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(
        workers()[0]["name"],
        worker_pod.as_str(),
        "named after its pod"
    );
    if let Some((_, root, _, lost)) = &tls {
        assert_eq!(
            workers()[0]["client_certificate"],
            "CN=sd15-pool",
            "bound to its pool's client certificate"
        );
        // A certificate on the revoked list the ConfigMap mounts is
        // turned away, token or not.
        let out = hallmark_command(&url, Some(operator.as_str()), &["workers"])
            .env("HALLMARK_TLS_CA", root)
            .env("HALLMARK_TLS_CLIENT_CERT", &lost.chain)
            .env("HALLMARK_TLS_CLIENT_KEY", &lost.key)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("revoked"),
            "{out:?}"
        );
    }

    let out_dir = dir.path().join("out");
    let submitted = hallmark_as(
        &url,
        Some(tenant.as_str()),
        &[
            "--json",
            "submit",
            "--watch",
            "--prompt",
            "a lighthouse at dusk",
            "--engine",
            "diffusion",
            "--model",
            "sd15",
            "--width",
            "192",
            "--height",
            "192",
            "--steps",
            "2",
            "--upscale",
            "4",
        ],
    );
    let job = ok(&submitted);
    let job_id = job
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["job_id"].as_str().map(str::to_string))
        .expect("submit printed the job");
    ok(&hallmark_as(
        &url,
        Some(tenant.as_str()),
        &["download", &job_id, "-o", out_dir.to_str().unwrap()],
    ));
    assert_eq!(
        image::image_dimensions(out_dir.join("00000-upscalex4.png")).unwrap(),
        (768, 768)
    );
    let w_metrics = format!("127.0.0.1:{}", ports.map(scrape_at(&w_spec, names.worker)));
    assert_eq!(
        Scrape::get(&w_metrics).sum("hallmark_worker_tasks_total", &[("outcome", "completed")]),
        Some(2.0)
    );
}

// ---------------------------------------------------------------------- Helm

/// Two pools, one serving two models, as a release not named hallmark (so
/// every object name comes from the release's).
const TWO_POOLS: &str = r#"
workers:
  - name: sd15
    models:
      - {id: sd15, path: /models/sd15}
  - name: sdxl
    models:
      - {id: sdxl, path: /models/sdxl}
      - {id: sdxl-refiner, path: /models/sdxl-refiner}
    maxBatch: 4
    autoscaling: {maxReplicas: 4, readyTasksPerReplica: 8}
"#;

#[test]
fn the_helm_chart_lints_and_renders_objects_that_pass_the_api_schemas() {
    let lint = Command::new(helm())
        .args(["lint", "--strict"])
        .arg(deploy_dir().join("helm/hallmark"))
        .output()
        .unwrap();
    succeeded(&lint, "helm lint --strict");
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (release, values) in [
        ("hallmark", ""),
        ("render", TWO_POOLS),
        (
            "secure",
            "tls: {enabled: true, clientCerts: true, revokedCertsConfigMap: revoked}\n",
        ),
    ] {
        let rendered = succeeded(
            &helm_template(release, values),
            &format!("helm template {release}"),
        );
        let name = format!("{release}.yaml");
        std::fs::write(dir.path().join(&name), rendered).unwrap();
        files.push(name);
    }
    assert_pass_api_schemas(dir.path(), &files, "the Helm chart");
}

#[test]
fn the_helm_chart_s_objects_select_and_scale_each_other() {
    assert_objects_fit(
        &Cluster::helm("hallmark", ""),
        "hallmark-coordinator",
        &[("hallmark-worker-sd15", &["sd15"])],
    );
    let cluster = Cluster::helm("render", TWO_POOLS);
    assert_objects_fit(
        &cluster,
        "render-hallmark-coordinator",
        &[
            ("render-hallmark-worker-sd15", &["sd15"]),
            ("render-hallmark-worker-sdxl", &["sdxl", "sdxl-refiner"]),
        ],
    );
    // The pools' own settings win over workerDefaults; the rest is shared.
    let batch = |deployment: &str| {
        let args = strings(&cluster.container(deployment, "worker")["args"]);
        flag_value(&args, "--max-batch").unwrap().to_string()
    };
    assert_eq!(batch("render-hallmark-worker-sdxl"), "4");
    assert_eq!(batch("render-hallmark-worker-sd15"), "8");
    let hpa = cluster.get("HorizontalPodAutoscaler", "render-hallmark-worker-sdxl");
    assert_eq!(hpa["spec"]["maxReplicas"], 4);
    assert_eq!(hpa["spec"]["minReplicas"], 1);
    // Workers dial this release's coordinator Service.
    let worker_config = cluster.config_map("render-hallmark-worker");
    cluster.get("Service", "render-hallmark-coordinator");
    assert_eq!(
        worker_config["HALLMARK_COORDINATOR"],
        "http://render-hallmark-coordinator:7070"
    );
}

/// What a container is given, each variable as where its value comes from
/// (`=value`, `secret NAME/KEY`, `field PATH`, a ConfigMap's value), its
/// mounts as what they mount.
fn container_description(cluster: &Cluster, deployment: &str, container: &str) -> Value {
    let c = cluster.container(deployment, container);
    let pod = &cluster.get("Deployment", deployment)["spec"]["template"]["spec"];
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_sequence().into_iter().flatten() {
        for (k, v) in cluster.config_map(&text(&from["configMapRef"]["name"])) {
            env.insert(k, format!("={v}"));
        }
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let from = &e["valueFrom"];
        let value = if !e["value"].is_null() {
            format!("={}", text(&e["value"]))
        } else if !from["secretKeyRef"].is_null() {
            let r = &from["secretKeyRef"];
            format!(
                "secret {}/{} optional={}",
                text(&r["name"]),
                text(&r["key"]),
                r["optional"] == true
            )
        } else {
            format!("field {}", text(&from["fieldRef"]["fieldPath"]))
        };
        env.insert(text(&e["name"]), value);
    }
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    let mounts: BTreeMap<String, Value> = c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|m| {
            let v = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .expect("a mounted volume")
                .clone();
            (text(&m["mountPath"]), v)
        })
        .collect();
    let mut d = serde_yaml::Mapping::new();
    let mut put = |key: &str, v: Value| {
        d.insert(key.into(), v);
    };
    for key in [
        "command",
        "args",
        "ports",
        "resources",
        "readinessProbe",
        "livenessProbe",
        "securityContext",
    ] {
        put(key, c[key].clone());
    }
    for key in [
        "securityContext",
        "terminationGracePeriodSeconds",
        "nodeSelector",
        "tolerations",
    ] {
        put(&format!("pod.{key}"), pod[key].clone());
    }
    put("env", serde_yaml::to_value(&env).unwrap());
    put("mounts", serde_yaml::to_value(&mounts).unwrap());
    Value::Mapping(d)
}

/// The chart's defaults, as release `hallmark`, describe the farm
/// deploy/k8s does: the same commands, settings, secrets, mounts, ports,
/// probes, resources and pod security, so the two cannot drift apart.
#[test]
fn the_helm_chart_s_defaults_describe_the_farm_deploy_k8s_does() {
    let kustomized = Cluster::kustomize();
    let charted = Cluster::helm("hallmark", "");
    for (deployment, container) in [
        ("hallmark-coordinator", "coordinator"),
        ("hallmark-worker-sd15", "worker"),
    ] {
        let want = container_description(&kustomized, deployment, container);
        let got = container_description(&charted, deployment, container);
        assert_eq!(
            got,
            want,
            "{deployment}: the chart (left) and deploy/k8s (right) differ:\n{}\n---\n{}",
            serde_yaml::to_string(&got).unwrap(),
            serde_yaml::to_string(&want).unwrap()
        );
    }
    let hpa = |c: &Cluster| {
        let mut spec = c.get("HorizontalPodAutoscaler", "hallmark-worker-sd15")["spec"].clone();
        // One model: matchLabels in one, matchExpressions in the other.
        spec["metrics"][0]["external"]["metric"]["selector"] = Value::Null;
        spec
    };
    assert_eq!(hpa(&charted), hpa(&kustomized));
    assert_eq!(
        charted.get("PersistentVolumeClaim", "hallmark-models")["spec"],
        kustomized.get("PersistentVolumeClaim", "hallmark-models")["spec"]
    );
}

#[test]
fn the_helm_chart_refuses_values_that_cannot_run_naming_them() {
    for (values, says) in [
        (
            "workers:\n  - {name: a, models: [{id: sd15, path: /models/sd15}]}\n  - {name: a, models: [{id: sdxl, path: /models/sdxl}]}\n",
            "workers[1].name: \"a\" names two pools",
        ),
        (
            "workers:\n  - {name: a, models: [{id: sd15, path: /models/sd15}], drainSecs: 120}\n",
            "workers[0]: terminationGracePeriodSeconds (90) must outlast drainSecs (120)",
        ),
        (
            "workers:\n  - {name: a, models: [{id: sd15}]}\n",
            "workers.0.models.0: path is required",
        ),
        (
            "workers:\n  - {name: a, models: []}\n",
            "workers.0.models: Array must have at least 1 items",
        ),
        (
            "workers:\n  - {name: GPU_A, models: [{id: sd15, path: /models/sd15}]}\n",
            "workers.0.name: Does not match pattern",
        ),
        (
            "workers:\n  - {name: a, models: [{id: sd15, path: /models/sd15}], autoscaling: {minReplicas: 5, maxReplicas: 2}}\n",
            "workers[0].autoscaling: minReplicas (5) is above maxReplicas (2)",
        ),
        ("workers: []\n", "workers: Array must have at least 1 items"),
        (
            "coordinator: {auth: maybe}\n",
            "coordinator.auth must be one of the following",
        ),
    ] {
        let out = helm_template("hallmark", values);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "values {values:?}: expected a refusal saying {says:?}, got {out:?}"
        );
    }
}

/// With `tls.enabled` and `tls.clientCerts`, the coordinator serves
/// gRPC over TLS from its Secret and asks for client certificates; the
/// workers verify it by the CA alone (the only key of that Secret they
/// mount) and present their pool's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_runs_a_farm_over_mutual_tls_as_written() {
    let values =
        "tls: {enabled: true, clientCerts: true, revokedCertsConfigMap: hallmark-revoked-certs}\n";
    let refused = helm_template("render", "tls: {clientCerts: true}\n");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("tls.clientCerts asks callers for client certificates over TLS, which needs tls.enabled: true"),
        "{refused:?}"
    );
    let refused = helm_template(
        "render",
        "tls: {enabled: true, revokedCertsConfigMap: revoked}\n",
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("tls.revokedCertsConfigMap lists client certificates to refuse, which needs tls.enabled and tls.clientCerts: true"),
        "{refused:?}"
    );
    let cluster = Cluster::helm("render", values);
    let worker_tls = cluster.get("Deployment", "render-hallmark-worker-sd15")["spec"]["template"]
        ["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .expect("the workers mount the coordinator's CA")
        .clone();
    let keys: Vec<String> = worker_tls["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| text(&i["key"]))
        .collect();
    assert_eq!(
        keys,
        ["ca.crt"],
        "the workers see no key of the coordinator's"
    );
    run_farm_as_written(
        &cluster,
        &FarmObjects {
            coordinator: "render-hallmark-coordinator",
            service: "render-hallmark-coordinator",
            worker: "render-hallmark-worker-sd15",
            models_claim: "hallmark-models",
            tls: true,
        },
    )
    .await;
}

/// The chart's objects run a farm too; as a release named otherwise, the
/// workers find the coordinator by the release's Service name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_runs_a_farm_as_written() {
    run_farm_as_written(
        &Cluster::helm("render", ""),
        &FarmObjects {
            coordinator: "render-hallmark-coordinator",
            service: "render-hallmark-coordinator",
            worker: "render-hallmark-worker-sd15",
            models_claim: "hallmark-models",
            tls: false,
        },
    )
    .await;
}

// ------------------------------------------------------------------- compose

/// `${VAR}`, `${VAR:-default}` and `${VAR:?message}` as compose
/// interpolates them from `vars`.
fn interpolate(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let inner = &rest[start + 2..end];
        let (name, fallback) = match inner.find(":-").or_else(|| inner.find(":?")) {
            Some(i) => (&inner[..i], Some((&inner[i..i + 2], &inner[i + 2..]))),
            None => (inner, None),
        };
        match (vars.get(name), fallback) {
            (Some(v), _) if !v.is_empty() => out.push_str(v),
            (_, Some((":-", default))) => out.push_str(default),
            (_, Some((_, message))) => panic!("compose would refuse to start: {message}"),
            (None, None) | (Some(_), None) => {}
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn service_launch(service: &Value, vars: &BTreeMap<&str, &str>) -> Launch {
    let mut command = strings(&service["command"]);
    let env = service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (text(k), interpolate(&text(v), vars)))
                .collect()
        })
        .unwrap_or_default();
    Launch {
        program: command.remove(0),
        args: command,
        env,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_runs_a_farm_as_written() {
    let compose = yaml_docs(&deploy_dir().join("compose.yaml")).remove(0);
    let services = &compose["services"];
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let vars: BTreeMap<&str, &str> =
        [("HALLMARK_WATERMARK_KEY", "compose-test-watermark-key")].into();
    let db = fresh_database().await;

    // Named volumes are directories here; the hosts are this machine.
    let mut rw = Rewrite::default();
    for name in compose["volumes"].as_mapping().unwrap().keys() {
        let name = text(name);
        std::fs::create_dir_all(dir.path().join(&name)).unwrap();
        for s in services.as_mapping().unwrap().values() {
            for v in strings(&s["volumes"]) {
                let parts: Vec<&str> = v.split(':').collect();
                if parts[0] == name {
                    rw.add(parts[1], dir.path().join(&name).to_string_lossy());
                }
            }
        }
    }
    let postgres_url = text(&services["coordinator"]["environment"]["HALLMARK_DATABASE_URL"]);
    rw.add(postgres_url, db);
    rw.add("redis:6379", redis_url().trim_start_matches("redis://"));
    let mut ports = Ports::default();
    let coordinator = service_launch(&services["coordinator"], &vars);
    assert_coordinator_settings(&coordinator.env, "compose coordinator");
    assert_worker_settings(
        &service_launch(&services["worker"], &vars).env,
        "compose worker",
    );
    ports.rewrite_listens(coordinator.env.values(), &mut rw);
    let grpc = ports.map(7070);
    rw.add("coordinator:7070", format!("127.0.0.1:{grpc}"));

    // The CA job makes the signing identity once and leaves it on a re-run.
    let ca = service_launch(&services["ca"], &vars).rewritten(&rw);
    for run in 0..2 {
        succeeded(
            &ca.command(&home).output().unwrap(),
            &format!("the ca service (run {run})"),
        );
    }
    let ca_dir = dir.path().join("ca");
    for f in ["root.pem", "signer.pem", "signer.key"] {
        assert!(ca_dir.join(f).is_file(), "the ca service made {f}");
    }

    let mut coordinator_proc = Proc::spawn(
        "compose-coordinator",
        &mut coordinator.rewritten(&rw).command(&home),
    );
    let url = format!("http://127.0.0.1:{grpc}");
    wait_for_grpc_of(&url, &mut coordinator_proc).await;
    // Scaled to two workers: each listens on its own metrics port here.
    let worker = service_launch(&services["worker"], &vars);
    let mut workers = Vec::new();
    let mut worker_metrics = Vec::new();
    for i in 0..2 {
        let mut own = Rewrite(rw.0.clone());
        let mut own_ports = Ports::default();
        own_ports.rewrite_listens(worker.env.values(), &mut own);
        worker_metrics.push(format!("127.0.0.1:{}", own_ports.map(9465)));
        workers.push(Proc::spawn(
            &format!("compose-worker-{i}"),
            &mut worker.rewritten(&own).command(&home),
        ));
    }
    wait_for_workers(&url, 2).await;
    let prompts = prompt_file(dir.path(), 6);
    // The outputs are signed by the CA the ca service made, and verify against it.
    let out_dir = dir.path().join("out");
    run_job(
        &url,
        &[
            prompts.to_str().unwrap(),
            "--upscale",
            "2",
            "--width",
            "192",
            "--height",
            "192",
        ],
        &out_dir,
        Duration::from_secs(60),
    )
    .await;
    let report = ok(&Command::new(bin("hallmark"))
        .args([
            "--json",
            "verify",
            out_dir.to_str().unwrap(),
            "--trust-anchors",
        ])
        .arg(ca_dir.join("root.pem"))
        .env("HALLMARK_WATERMARK_KEY", vars["HALLMARK_WATERMARK_KEY"])
        .output()
        .unwrap());
    let files: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    assert_eq!(files.len(), 12);
    let completed: f64 = worker_metrics
        .iter()
        .map(|m| {
            Scrape::get(m)
                .sum("hallmark_worker_tasks_total", &[("outcome", "completed")])
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(
        completed, 12.0,
        "the two workers' metrics add up to the job"
    );

    // Prometheus's configuration names these services and ports.
    let prometheus = yaml_docs(&deploy_dir().join("prometheus/prometheus.yml")).remove(0);
    let jobs = prometheus["scrape_configs"].as_sequence().unwrap();
    let coordinator_target = text(&jobs[0]["static_configs"][0]["targets"][0]);
    assert_eq!(
        coordinator_target,
        format!(
            "coordinator:{}",
            coordinator.env["HALLMARK_METRICS_LISTEN"]
                .rsplit(':')
                .next()
                .unwrap()
        )
    );
    assert_eq!(
        jobs[1]["dns_sd_configs"][0]["port"]
            .as_u64()
            .map(|p| p.to_string()),
        worker.env["HALLMARK_METRICS_LISTEN"]
            .rsplit(':')
            .next()
            .map(str::to_string)
    );
    for s in strings(&services["prometheus"]["volumes"]) {
        assert_eq!(
            s, "./prometheus:/etc/prometheus:ro",
            "the config folder beside compose.yaml"
        );
    }
}

// ---------------------------------------------------------------- Prometheus

#[test]
fn the_prometheus_configuration_and_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy_dir().join("prometheus");
    let run = |args: &[&str]| {
        let out = Command::new(promtool())
            .current_dir(&dir)
            .args(args)
            .output()
            .unwrap();
        succeeded(&out, &format!("promtool {}", args.join(" ")))
    };
    run(&["check", "config", "prometheus.yml"]);
    let rules = run(&["check", "rules", "rules.yml"]);
    assert!(rules.contains("SUCCESS: 12 rules found"), "{rules}");
    run(&["test", "rules", "rules.test.yml"]);
}

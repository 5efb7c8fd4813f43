//! The store's behaviour, run against both backends: every test here runs
//! once on Postgres (a fresh database per test) and once on SQLite.
//!
//! Postgres comes from `HALLMARK_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432`); `.ci/run` makes sure it is up.

use std::collections::HashSet;

use hallmark_coordinator::blobs::BlobError;
use hallmark_coordinator::spec::{self, ExpandedJob, Limits};
use hallmark_coordinator::stamps::CheckedStamp;
use hallmark_coordinator::store::{
    ArtifactKey, AttemptEnd, Census, ClientCert, Completion, DeletedInput, InputRecorded,
    JobControl, LeasePolicy, ModelWorkers, NewJob, PurgedInput, Store, StoreError, WorkerCaps,
    WorkerRegistration,
};
use hallmark_proto::v1::{
    Dataset, JobSpec, Model, ModelCapability, PromptItem, TaskLease, WeightFile,
};
use hallmark_provenance::ledger::{ChainCheck, Checkpoint};
use hallmark_provenance::merkle::{self, Frontier, Hash};

const POLICY: LeasePolicy = LeasePolicy {
    base_ms: 10_000,
    ms_per_megapixel_step: 0,
};
const SHA: &str = "1111111111111111111111111111111111111111111111111111111111111111";

struct Db {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

async fn postgres() -> Db {
    let base = std::env::var("HALLMARK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("hallmark_store_{}", uuid::Uuid::new_v4().simple());
    let admin = Store::connect_admin(&format!("{base}/postgres")).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    let store = Store::connect(&format!("{base}/{name}"), 8)
        .await
        .expect("connect postgres store");
    Db { store, _dir: None }
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::connect(&url, 1).await.expect("connect sqlite store");
    Db {
        store,
        _dir: Some(dir),
    }
}

trait AdminConnect {
    async fn connect_admin(url: &str) -> sqlx::AnyPool;
}

impl AdminConnect for Store {
    async fn connect_admin(url: &str) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(url)
            .await
            .expect("postgres is reachable (start it, or set HALLMARK_TEST_POSTGRES)")
    }
}

macro_rules! both_stores {
    ($(async fn $name:ident($s:ident: &Store) $body:block)*) => {
        mod on_postgres { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { let db = postgres().await; super::$name(&db.store).await; })* }
        mod on_sqlite { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { let db = sqlite().await; super::$name(&db.store).await; })* }
        $(async fn $name($s: &Store) $body)*
    };
}

fn job(prompts: usize, upscale: u32) -> ExpandedJob {
    job_for("default", 0, prompts, upscale)
}

fn job_for(tenant: &str, priority: i32, prompts: usize, upscale: u32) -> ExpandedJob {
    let spec = JobSpec {
        engine: "synthetic".into(),
        model_id: "m1".into(),
        prompts: (0..prompts)
            .map(|i| PromptItem {
                prompt: format!("prompt {i}"),
                ..Default::default()
            })
            .collect(),
        width: 192,
        height: 192,
        steps: 4,
        guidance: 7.0,
        scheduler: "euler".into(),
        upscale,
        tenant: tenant.into(),
        priority,
        max_attempts: 2,
        seed: Some(1),
        ..Default::default()
    };
    spec::expand(
        &spec,
        &Limits {
            max_items: 10_000,
            max_side: 2048,
            max_steps: 100,
            default_max_attempts: 3,
        },
        0,
    )
    .unwrap()
}

async fn worker(s: &Store, id: &str, max_batch: u32) -> WorkerCaps {
    worker_serving(s, id, max_batch, &["m1"], 1 << 24).await
}

async fn worker_serving(
    s: &Store,
    id: &str,
    max_batch: u32,
    models: &[&str],
    max_pixels: u64,
) -> WorkerCaps {
    let models: Vec<(String, ModelCapability)> = models
        .iter()
        .map(|m| {
            let model = ModelCapability {
                model_id: m.to_string(),
                weights_sha256: SHA.into(),
                refines_only: false,
                inpaints_only: false,
            };
            ("synthetic".to_string(), model)
        })
        .collect();
    let reg = WorkerRegistration {
        worker_id: id,
        name: id,
        hostname: "host",
        engines: &["synthetic".into()],
        models: &models,
        max_pixels,
        max_batch,
        principal: "",
        client_cert: None,
    };
    s.register_worker(&reg, 0).await.unwrap();
    s.worker_caps(id).await.unwrap()
}

async fn submit(s: &Store, id: &str, j: &ExpandedJob, cap: u32) {
    s.check_servable(j, false).await.unwrap();
    let new = NewJob {
        id,
        job: j,
        spec_json: "{}",
        tenant_cap: cap,
        submitted_by: "",
    };
    s.submit(&new, &POLICY, 1).await.unwrap();
}

async fn lease(s: &Store, w: &WorkerCaps, want: u32, now: i64) -> Vec<TaskLease> {
    s.lease(w, want, "", now - 1_000, 3, now).await.unwrap()
}

fn done(w: &WorkerCaps, l: &TaskLease) -> Completion {
    Completion {
        worker_id: w.worker_id.clone(),
        task_id: l.task_id.clone(),
        fencing_token: l.fencing_token,
        sha256: hallmark_provenance::sha256_hex(l.task_id.as_bytes()),
        size: 10,
        media_type: "image/png".into(),
        width: 192,
        height: 192,
        stamp: CheckedStamp {
            watermark_id: hallmark_provenance::sha256_hex(l.task_id.as_bytes())[..16].to_string(),
            manifest: format!("manifest of {}", l.task_id).into_bytes(),
            manifest_label: format!("urn:c2pa:{}", l.task_id),
        },
    }
}

/// A 64×64 PNG input whose sha256 is `byte` 32 times.
fn input_image(byte: &str) -> hallmark_proto::v1::InputImage {
    hallmark_proto::v1::InputImage {
        sha256: byte.repeat(32),
        media_type: "image/png".into(),
        width: 64,
        height: 64,
        size: 99,
    }
}

/// A blob publication (or deletion) that succeeds.
async fn published() -> Result<(), BlobError> {
    Ok(())
}

async fn count(s: &Store, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(s.pool())
        .await
        .unwrap()
}

/// The census's task counts as (state, stage, count), all for model m1.
async fn census_tasks(s: &Store, live_since: i64) -> (Vec<(String, String, u64)>, Census) {
    let census = s.census(live_since).await.unwrap();
    let tasks = census
        .tasks
        .iter()
        .map(|t| {
            assert_eq!(
                (t.engine.as_str(), t.model_id.as_str()),
                ("synthetic", "m1")
            );
            (t.state.clone(), t.stage.clone(), t.count)
        })
        .collect();
    (tasks, census)
}

fn counts(rows: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    rows.iter()
        .map(|(a, b, n)| (a.to_string(), b.to_string(), *n))
        .collect()
}

both_stores! {
    async fn the_census_counts_open_work_by_state_stage_and_model(s: &Store) {
        let (tasks, census) = census_tasks(s, 0).await;
        assert!(tasks.is_empty());
        assert_eq!((census.running_jobs, census.live_workers, census.unsealed_audit_entries), (0, 0, 0));
        let w = worker(s, "w1", 2).await;
        submit(s, "j1", &job(3, 2), 0).await;
        let (tasks, census) = census_tasks(s, 0).await;
        assert_eq!(tasks, counts(&[("ready", "generate", 3), ("waiting", "upscale", 3)]));
        assert_eq!((census.running_jobs, census.paused_jobs), (1, 0));
        // Registered at 0: live for a cut-off at 0, not for one after.
        assert_eq!(census.live_workers, 1);
        assert_eq!(
            census.model_workers,
            [ModelWorkers { engine: "synthetic".into(), model_id: "m1".into(), live: 1 }]
        );
        let later = s.census(1).await.unwrap();
        assert_eq!((later.live_workers, later.model_workers.len()), (0, 0));
        let unsealed = count(s, "SELECT COUNT(*) FROM audit_events WHERE seq IS NULL").await;
        assert!(unsealed >= 2, "the registration and the submit at least");
        assert_eq!(census.unsealed_audit_entries, unsealed as u64);

        let leases = lease(s, &w, 2, 100).await;
        s.complete(&done(&w, &leases[0]), 110).await.unwrap();
        let (tasks, _) = census_tasks(s, 0).await;
        assert_eq!(
            tasks,
            counts(&[("leased", "generate", 1), ("ready", "generate", 1), ("ready", "upscale", 1), ("waiting", "upscale", 2)])
        );

        // Another tenant's job is counted apart.
        submit(s, "j2", &job_for("acme", 0, 2, 0), 0).await;
        let census = s.census(0).await.unwrap();
        let acme: Vec<_> = census.tasks.iter().filter(|t| t.tenant == "acme").map(|t| (t.state.as_str(), t.count)).collect();
        assert_eq!(acme, [("ready", 2)]);
        assert!(census.tasks.iter().all(|t| t.tenant == "acme" || t.tenant == "default"));
        s.control("j2", JobControl::Cancel, 115).await.unwrap();

        s.control("j1", JobControl::Pause, 120).await.unwrap();
        let (tasks, census) = census_tasks(s, 0).await;
        // Pausing holds the ready tasks and takes back the leased one.
        assert_eq!(tasks, counts(&[("held", "generate", 2), ("held", "upscale", 1), ("waiting", "upscale", 2)]));
        assert_eq!((census.running_jobs, census.paused_jobs), (0, 1));

        s.seal_audit(100).await.unwrap();
        assert_eq!(s.census(0).await.unwrap().unsealed_audit_entries, 0);
        // A finished job's tasks are history, not open work.
        s.control("j1", JobControl::Cancel, 130).await.unwrap();
        let (tasks, census) = census_tasks(s, 0).await;
        assert!(tasks.is_empty(), "{tasks:?}");
        assert_eq!((census.running_jobs, census.paused_jobs), (0, 0));
    }

    async fn an_input_unused_past_its_retention_is_purged_and_an_upload_restores_it(s: &Store) {
        let input = input_image("cd");
        let sha = input.sha256.as_str();
        // A failed publication records nothing.
        let refused = s
            .record_input(&input, "acme", 5, async { Err(BlobError::Missing("disk".into())) })
            .await;
        assert!(matches!(refused, Err(StoreError::Blob(_))), "{refused:?}");
        assert!(s.find_input(sha).await.unwrap().is_none());
        assert_eq!(s.record_input(&input, "acme", 5, published()).await.unwrap(), InputRecorded::New);
        assert_eq!(s.record_input(&input, "acme", 6, published()).await.unwrap(), InputRecorded::Known);

        let img2img = |prompts| {
            let mut j = job(prompts, 0);
            for item in &mut j.items {
                item.init_image = Some(spec::InitImage { sha256: sha.into(), strength: 0.5, mask: None, outpaint: None });
            }
            j
        };
        let submit_at = |id: &'static str, j: ExpandedJob, now: i64| async move {
            let new = NewJob { id, job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
            s.submit(&new, &POLICY, now).await
        };
        // Submitted at 100: used then. Its unfinished tasks keep it past any cutoff.
        submit_at("j1", img2img(1), 100).await.unwrap();
        let removals = std::sync::atomic::AtomicUsize::new(0);
        let remove = || async {
            removals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        assert!(s.unused_inputs(10_000, 10, None).await.unwrap().is_empty());
        assert_eq!(s.purge_input(sha, 10_000, 10_000, remove).await.unwrap(), None);
        // Its task fails for good, and the job with it: no unfinished task
        // starts from the input.
        let w = worker(s, "w1", 1).await;
        let l = lease(s, &w, 1, 200).await.remove(0);
        s.fail("w1", &l.task_id, l.fencing_token, "bad", AttemptEnd::FailedForGood, 210).await.unwrap();
        s.reap(220).await.unwrap();
        // Used at 100: not unused since before 100, unused since before 101.
        assert!(s.unused_inputs(100, 10, None).await.unwrap().is_empty());
        assert_eq!(s.purge_input(sha, 100, 10_000, remove).await.unwrap(), None);
        assert_eq!(s.unused_inputs(101, 10, None).await.unwrap(), [(100, sha.to_string())]);
        // A blob that cannot be deleted yet: the input is purged all the
        // same, its blob marked, and removed by a later pass, once.
        let stuck = s
            .purge_input(sha, 101, 10_000, || async { Err(BlobError::Missing("locked".into())) })
            .await
            .unwrap();
        assert!(
            matches!(&stuck, Some(PurgedInput { last_used_at: 100, blob_kept: false, blob_pending: Some(e), .. }) if e.contains("locked")),
            "{stuck:?}"
        );
        assert!(s.find_input(sha).await.unwrap().is_none());
        assert_eq!(s.pending_input_blobs(10).await.unwrap(), [sha]);
        assert_eq!(removals.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(s.remove_input_blob(sha, remove).await.unwrap());
        assert_eq!(removals.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(s.pending_input_blobs(10).await.unwrap().is_empty());
        assert!(!s.remove_input_blob(sha, remove).await.unwrap(), "removed once");
        assert_eq!(s.purge_input(sha, 20_000, 20_000, remove).await.unwrap(), None, "purged once");
        assert!(s.find_input(sha).await.unwrap().is_none());
        assert!(!s.blob_known(sha).await.unwrap(), "workers cannot fetch a purged input");
        assert_eq!(s.input_purged_at(sha).await.unwrap(), Some(10_000));
        assert_eq!(s.input_purged_at(&"ef".repeat(32)).await.unwrap(), None);

        // A job naming it is refused, and writes nothing; so is retrying
        // the job whose failed task starts from it.
        let jobs = count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await;
        let err = submit_at("j2", img2img(1), 11_000).await.unwrap_err();
        assert!(matches!(&err, StoreError::Spec(e) if e.message.contains("is no longer stored")), "{err}");
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await, jobs);
        let retry = s.control("j1", JobControl::RetryFailed, 11_000).await;
        assert!(matches!(&retry, Err(StoreError::Refused(m)) if m.contains("cannot retry job j1: input image")), "{retry:?}");

        // Uploaded again: restored, and usable.
        assert_eq!(s.record_input(&input, "acme", 12_000, published()).await.unwrap(), InputRecorded::Restored);
        assert_eq!(s.input_purged_at(sha).await.unwrap(), None);
        submit_at("j2", img2img(1), 12_500).await.unwrap();
        let uploads: Vec<String> = sqlx::query_scalar(
            "SELECT body FROM audit_events WHERE subject = $1 AND kind IN ('upload_input', 'purge_input') ORDER BY id",
        )
        .bind(sha)
        .fetch_all(s.pool())
        .await
        .unwrap();
        assert_eq!(uploads.len(), 3, "{uploads:?}");
        assert!(uploads[0].contains("\"restored\":false"), "{uploads:?}");
        assert!(uploads[1].contains("\"blob_kept\":false"), "{uploads:?}");
        assert!(uploads[2].contains("\"restored\":true"), "{uploads:?}");

        // An input that is also an artifact keeps its blob when purged.
        let l = lease(s, &w, 1, 13_000).await.remove(0);
        let c = done(&w, &l);
        s.complete(&c, 13_100).await.unwrap();
        let same = hallmark_proto::v1::InputImage { sha256: c.sha256.clone(), ..input.clone() };
        s.record_input(&same, "acme", 13_200, published()).await.unwrap();
        let kept = s.purge_input(&c.sha256, 20_000, 20_000, remove).await.unwrap().unwrap();
        assert!(kept.blob_kept);
        assert_eq!(removals.load(std::sync::atomic::Ordering::SeqCst), 1, "no deletion");
        assert!(s.blob_known(&c.sha256).await.unwrap(), "still an artifact");
    }

    async fn a_mask_is_leased_with_its_task_and_kept_while_the_task_is_open(s: &Store) {
        let (init, mask) = (input_image("ab"), input_image("ef"));
        for i in [&init, &mask] {
            assert_eq!(s.record_input(i, "acme", 5, published()).await.unwrap(), InputRecorded::New);
        }
        // Two masked items, blurred and cropped (with no padding: a crop
        // still, not the whole image), and one plain img2img item.
        let mut j = job(3, 0);
        for (i, item) in j.items.iter_mut().enumerate() {
            item.init_image = Some(spec::InitImage {
                sha256: init.sha256.clone(),
                strength: 0.5,
                mask: (i < 2).then(|| mask.sha256.clone()),
                outpaint: None,
            });
        }
        for item in &mut j.items {
            item.mask_use = spec::MaskUse { blur: 6, crop: Some(0) };
        }
        // A mask is an input the job uses: a purged one refuses the job.
        let new = NewJob { id: "j1", job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        s.submit(&new, &POLICY, 100).await.unwrap();
        let remove = || async { Ok(()) };
        assert!(s.unused_inputs(10_000, 10, None).await.unwrap().is_empty(), "both in use");
        assert_eq!(s.purge_input(&mask.sha256, 10_000, 10_000, remove).await.unwrap(), None);
        let taken = s.delete_input(&mask.sha256, None, "operator", 10_000, remove).await;
        assert!(matches!(&taken, Err(StoreError::Refused(m)) if m.contains("in use by job j1")), "{taken:?}");

        // The lease names it; the worker holding the lease may fetch it.
        let w = worker(s, "w1", 2).await;
        let leases = lease(s, &w, 2, 200).await;
        assert_eq!(leases.len(), 2, "masked items batch together");
        assert!(leases.iter().all(|l| l.mask_sha256 == mask.sha256 && l.parent_sha256 == init.sha256));
        assert!(leases.iter().all(|l| (l.mask_blur, l.mask_crop) == (6, Some(0))));
        assert!(s.base_image_leased_to(&mask.sha256, "").await.unwrap());
        // The unmasked item renders apart, and no mask setting reaches it.
        let plain = lease(s, &w, 2, 201).await;
        assert_eq!(plain.len(), 1);
        assert_eq!(
            (plain[0].mask_sha256.as_str(), plain[0].mask_blur, plain[0].mask_crop, plain[0].outpaint),
            ("", 0, None, None)
        );
        // An outpainting job's tasks carry its margins, its blur and crop:
        // the worker makes their mask.
        let mut o = job(2, 0);
        let margins = spec::Outpaint { left: 64, top: 0, right: 32, bottom: 8 };
        for item in &mut o.items {
            item.init_image =
                Some(spec::InitImage { sha256: init.sha256.clone(), strength: 1.0, mask: None, outpaint: Some(margins) });
        }
        for item in &mut o.items {
            item.mask_use = spec::MaskUse { blur: 4, crop: None };
        }
        let new = NewJob { id: "jo", job: &o, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        s.submit(&new, &POLICY, 202).await.unwrap();
        let wo = worker(s, "w-out", 2).await;
        let outs = lease(s, &wo, 2, 203).await;
        assert_eq!(outs.len(), 2, "outpainted items batch together");
        for l in &outs {
            let m = l.outpaint.expect("the margins");
            assert_eq!((m.left, m.top, m.right, m.bottom, l.mask_blur, l.mask_sha256.as_str()), (64, 0, 32, 8, 4, ""));
        }
        for l in &leases {
            s.fail("w1", &l.task_id, l.fencing_token, "bad", AttemptEnd::FailedForGood, 210).await.unwrap();
        }
        s.reap(220).await.unwrap();
        assert!(!s.base_image_leased_to(&mask.sha256, "").await.unwrap());
        // Its tasks ended: purged like any unused input; then the job that
        // inpaints through it cannot be retried.
        assert!(s.purge_input(&mask.sha256, 101, 10_000, remove).await.unwrap().is_some());
        let retry = s.control("j1", JobControl::RetryFailed, 11_000).await;
        assert!(
            matches!(&retry, Err(StoreError::Refused(m)) if m.contains(&mask.sha256) && m.contains("--mask")),
            "{retry:?}"
        );
        let new = NewJob { id: "j2", job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        let err = s.submit(&new, &POLICY, 11_000).await.unwrap_err();
        assert!(matches!(&err, StoreError::Spec(e) if e.field == "mask_sha256"), "{err}");
    }

    async fn unused_inputs_come_in_pages_that_go_on_past_the_last_one(s: &Store) {
        // Four inputs, two last used at the same time (then by hash).
        for (byte, used) in [("e1", 30), ("e2", 10), ("e3", 20), ("e0", 20)] {
            s.record_input(&input_image(byte), "", used, published()).await.unwrap();
        }
        let sha = |byte: &str| byte.repeat(32);
        let first = s.unused_inputs(1_000, 2, None).await.unwrap();
        assert_eq!(first, [(10, sha("e2")), (20, sha("e0"))]);
        let second = s.unused_inputs(1_000, 2, first.last()).await.unwrap();
        assert_eq!(second, [(20, sha("e3")), (30, sha("e1"))]);
        assert!(s.unused_inputs(1_000, 2, second.last()).await.unwrap().is_empty());
        // The cutoff still applies.
        assert_eq!(s.unused_inputs(20, 10, None).await.unwrap(), [(10, sha("e2"))]);
        // The listing pages the other way: most recently used first.
        let listed = |page: Vec<(hallmark_proto::v1::InputImage, i64, i64)>| {
            page.into_iter().map(|(i, _, used)| (used, i.sha256)).collect::<Vec<_>>()
        };
        let first = listed(s.list_inputs(None, 2, None).await.unwrap());
        assert_eq!(first, [(30, sha("e1")), (20, sha("e0"))]);
        let second = listed(s.list_inputs(None, 2, first.last()).await.unwrap());
        assert_eq!(second, [(20, sha("e3")), (10, sha("e2"))]);
        assert!(s.list_inputs(None, 2, second.last()).await.unwrap().is_empty());
    }

    async fn deleting_an_input_takes_back_an_upload_and_the_last_one_purges_it(s: &Store) {
        let input = input_image("da");
        let sha = input.sha256.as_str();
        s.record_input(&input, "acme", 5, published()).await.unwrap();
        s.record_input(&input, "globex", 6, published()).await.unwrap();
        let removals = std::sync::atomic::AtomicUsize::new(0);
        let remove = || async {
            removals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        let removed = || removals.load(std::sync::atomic::Ordering::SeqCst);
        // Not this tenant's upload, or no such input: not found.
        let other = s.delete_input(sha, Some("initech"), "tenant:initech", 10, remove).await;
        assert!(matches!(other, Err(StoreError::NotFound(_))), "{other:?}");
        let unknown = s.delete_input(&"db".repeat(32), None, "", 10, remove).await;
        assert!(matches!(unknown, Err(StoreError::NotFound(_))), "{unknown:?}");

        // While acme's job starts from it, acme cannot take it back.
        let mut j = job_for("acme", 0, 1, 0);
        j.items[0].init_image = Some(spec::InitImage { sha256: sha.into(), strength: 0.5, mask: None, outpaint: None });
        let new = NewJob { id: "j1", job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        s.submit(&new, &POLICY, 20).await.unwrap();
        let busy = s.delete_input(sha, Some("acme"), "tenant:acme", 30, remove).await;
        assert!(matches!(&busy, Err(StoreError::Refused(m)) if m.contains("in use by job j1")), "{busy:?}");
        assert!(s.input_owned_by(sha, "acme").await.unwrap(), "a refused deletion changes nothing");
        // globex takes back its own; acme still holds the picture.
        let kept = s.delete_input(sha, Some("globex"), "tenant:globex", 40, remove).await.unwrap();
        assert_eq!(kept, DeletedInput { purged: false, blob_pending: None });
        assert!(!s.input_owned_by(sha, "globex").await.unwrap());
        assert!(s.find_input(sha).await.unwrap().is_some());
        assert_eq!(removed(), 0);
        // Once acme's job is over, acme's deletion is the last: purged.
        s.control("j1", JobControl::Cancel, 50).await.unwrap();
        let purged = s.delete_input(sha, Some("acme"), "tenant:acme", 60, remove).await.unwrap();
        assert_eq!(purged, DeletedInput { purged: true, blob_pending: None });
        assert!(s.find_input(sha).await.unwrap().is_none());
        assert_eq!(s.input_purged_at(sha).await.unwrap(), Some(60));
        assert_eq!(removed(), 1);
        let again = s.delete_input(sha, Some("acme"), "tenant:acme", 70, remove).await;
        assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
        let entries: Vec<(String, String)> = sqlx::query_as(
            "SELECT actor, body FROM audit_events WHERE subject = $1 AND kind = 'delete_input' ORDER BY id",
        )
        .bind(sha)
        .fetch_all(s.pool())
        .await
        .unwrap();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[0].0, "tenant:globex");
        assert!(entries[0].1.contains("\"purged\":false"), "{entries:?}");
        assert!(entries[1].1.contains("\"purged\":true"), "{entries:?}");

        // An operator takes back every tenant's upload at once.
        let both = hallmark_proto::v1::InputImage { sha256: "dc".repeat(32), ..input.clone() };
        s.record_input(&both, "acme", 80, published()).await.unwrap();
        s.record_input(&both, "globex", 81, published()).await.unwrap();
        s.delete_input(&both.sha256, None, "operator", 90, remove).await.unwrap();
        assert_eq!(s.input_purged_at(&both.sha256).await.unwrap(), Some(90));
        assert_eq!(removed(), 2);
        // The last uploader takes it back while a job an operator submitted
        // for another tenant starts from it: kept until that job no longer
        // needs it, then purged by the sweep whatever the retention.
        let operator_job = |id: &'static str, sha: &str, now: i64| {
            let mut j = job_for("globex", 0, 1, 0);
            j.items[0].init_image = Some(spec::InitImage { sha256: sha.into(), strength: 0.5, mask: None, outpaint: None });
            async move {
                let new = NewJob { id, job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "operator" };
                s.submit(&new, &POLICY, now).await.unwrap();
            }
        };
        let shared = hallmark_proto::v1::InputImage { sha256: "de".repeat(32), ..input.clone() };
        s.record_input(&shared, "acme", 91, published()).await.unwrap();
        operator_job("j2", &shared.sha256, 92).await;
        let waiting = s.delete_input(&shared.sha256, Some("acme"), "tenant:acme", 93, remove).await.unwrap();
        assert_eq!(waiting, DeletedInput { purged: false, blob_pending: None });
        assert!(s.deleted_inputs_now_unused(10).await.unwrap().is_empty(), "j2 still starts from it");
        s.control("j2", JobControl::Cancel, 94).await.unwrap();
        assert_eq!(s.deleted_inputs_now_unused(10).await.unwrap(), [shared.sha256.as_str()]);
        let purged = s.purge_input(&shared.sha256, i64::MAX, 95, remove).await.unwrap().unwrap();
        assert_eq!(purged.last_used_at, 92);
        assert!(s.deleted_inputs_now_unused(10).await.unwrap().is_empty());
        assert_eq!(s.input_purged_at(&shared.sha256).await.unwrap(), Some(95));
        assert_eq!(removed(), 3);
        // Uploaded again meanwhile, it is wanted again: the sweep leaves it.
        let again = hallmark_proto::v1::InputImage { sha256: "df".repeat(32), ..input.clone() };
        s.record_input(&again, "acme", 96, published()).await.unwrap();
        operator_job("j3", &again.sha256, 97).await;
        s.delete_input(&again.sha256, Some("acme"), "tenant:acme", 98, remove).await.unwrap();
        s.record_input(&again, "initech", 99, published()).await.unwrap();
        s.control("j3", JobControl::Cancel, 100).await.unwrap();
        assert!(s.deleted_inputs_now_unused(10).await.unwrap().is_empty(), "uploaded again: wanted");

        // A blob the store will not delete yet: deleted all the same, the
        // blob left to a later pass.
        let locked = hallmark_proto::v1::InputImage { sha256: "dd".repeat(32), ..input.clone() };
        s.record_input(&locked, "acme", 101, published()).await.unwrap();
        let deleted = s
            .delete_input(&locked.sha256, Some("acme"), "tenant:acme", 110, || async {
                Err(BlobError::Missing("object lock".into()))
            })
            .await
            .unwrap();
        assert!(deleted.purged && deleted.blob_pending.is_some_and(|e| e.contains("object lock")));
        assert_eq!(s.pending_input_blobs(10).await.unwrap(), [locked.sha256.as_str()]);
    }

    async fn an_upload_during_a_purges_blob_removal_waits_then_restores_the_input(s: &Store) {
        let input = input_image("ce");
        s.record_input(&input, "", 5, published()).await.unwrap();
        let mut j = job(1, 0);
        j.items[0].init_image = Some(spec::InitImage { sha256: input.sha256.clone(), strength: 0.5, mask: None, outpaint: None });
        let order = std::sync::Mutex::new(Vec::new());
        // The purge has committed; it holds the input's row while it
        // deletes the blob. An upload of the same picture meanwhile waits,
        // then stores the blob again: the deletion cannot undo it.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let purge = s.purge_input(&input.sha256, 1_000, 1_000, || async {
            released.await.ok();
            order.lock().unwrap().push("removed");
            Ok(())
        });
        let upload = || {
            s.record_input(&input, "", 1_100, async {
                order.lock().unwrap().push("published");
                Ok(())
            })
        };
        let racing = async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let waited = tokio::time::timeout(std::time::Duration::from_millis(400), upload()).await;
            assert!(waited.is_err(), "the upload went on while the purge removed the blob: {waited:?}");
            release.send(()).unwrap();
            upload().await
        };
        let (purged, uploaded) = tokio::join!(purge, racing);
        assert_eq!(purged.unwrap().unwrap().blob_pending, None);
        assert_eq!(uploaded.unwrap(), InputRecorded::Restored);
        assert_eq!(*order.lock().unwrap(), ["removed", "published"]);
        assert!(s.pending_input_blobs(10).await.unwrap().is_empty());
        // Restored: a job starts from it.
        let new = NewJob { id: "j1", job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        s.submit(&new, &POLICY, 1_200).await.unwrap();
    }

    async fn a_purge_that_dies_before_removing_its_blob_leaves_it_to_a_later_pass(s: &Store) {
        let input = input_image("cf");
        let sha = input.sha256.as_str();
        s.record_input(&input, "", 5, published()).await.unwrap();
        let removals = std::sync::atomic::AtomicUsize::new(0);
        let remove = || async {
            removals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        // The purging coordinator dies while it deletes the blob (its
        // future dropped there: the removal's transaction rolls back).
        let dies = |cutoff: i64| {
            tokio::time::timeout(
                std::time::Duration::from_millis(300),
                s.purge_input(sha, cutoff, cutoff, std::future::pending::<Result<(), BlobError>>),
            )
        };
        assert!(dies(1_000).await.is_err());
        // The input is purged — a job naming it is refused, nothing
        // written — and its blob is still marked for removal.
        assert_eq!(s.input_purged_at(sha).await.unwrap(), Some(1_000));
        assert_eq!(s.pending_input_blobs(10).await.unwrap(), [sha]);
        let mut j = job(1, 0);
        j.items[0].init_image = Some(spec::InitImage { sha256: sha.into(), strength: 0.5, mask: None, outpaint: None });
        let new = NewJob { id: "j1", job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
        let refused = s.submit(&new, &POLICY, 1_100).await;
        assert!(matches!(&refused, Err(StoreError::Spec(e)) if e.message.contains("is no longer stored")), "{refused:?}");
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await, 0);
        // A later pass removes it, once.
        assert!(s.remove_input_blob(sha, remove).await.unwrap());
        assert!(!s.remove_input_blob(sha, remove).await.unwrap());
        assert_eq!(removals.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Dying again, then an upload: restored with its blob; the mark is
        // cleared, so the later pass removes nothing.
        assert_eq!(s.record_input(&input, "", 2_000, published()).await.unwrap(), InputRecorded::Restored);
        assert!(dies(3_000).await.is_err());
        assert_eq!(s.record_input(&input, "", 3_100, published()).await.unwrap(), InputRecorded::Restored);
        assert!(s.pending_input_blobs(10).await.unwrap().is_empty());
        assert!(!s.remove_input_blob(sha, remove).await.unwrap());
        assert_eq!(removals.load(std::sync::atomic::Ordering::SeqCst), 1);
        s.submit(&new, &POLICY, 3_200).await.unwrap();
    }

    async fn img2img_tasks_start_from_the_uploaded_input(s: &Store) {
        let input = hallmark_proto::v1::InputImage {
            sha256: "ab".repeat(32),
            media_type: "image/png".into(),
            width: 640,
            height: 480,
            size: 1234,
        };
        assert!(s.find_input(&input.sha256).await.unwrap().is_none());
        assert!(!s.blob_known(&input.sha256).await.unwrap());
        s.record_input(&input, "acme", 5, published()).await.unwrap();
        // A second upload of the same bytes keeps the first row.
        s.record_input(&input, "globex", 6, published()).await.unwrap();
        assert_eq!(s.find_input(&input.sha256.to_ascii_uppercase()).await.unwrap(), Some(input.clone()));
        assert!(s.blob_known(&input.sha256).await.unwrap(), "workers may fetch an input");
        // Each uploader owns it; nobody else does, and a bare upload names none.
        assert!(s.input_owned_by(&input.sha256, "acme").await.unwrap());
        assert!(s.input_owned_by(&input.sha256.to_ascii_uppercase(), "globex").await.unwrap());
        assert!(!s.input_owned_by(&input.sha256, "initech").await.unwrap());
        s.record_input(&input, "", 7, published()).await.unwrap();
        let mut owners = s.blob_tenants(&input.sha256).await.unwrap();
        owners.sort();
        assert_eq!(owners, ["acme", "globex"]);

        let w = worker(s, "w1", 4).await;
        let mut j = job(2, 2);
        for item in &mut j.items {
            item.init_image = Some(spec::InitImage { sha256: input.sha256.clone(), strength: 0.75, mask: None, outpaint: None });
        }
        submit(s, "j1", &j, 0).await;
        submit(s, "j2", &job(1, 0), 0).await;
        let generate = lease(s, &w, 4, 100).await;
        assert_eq!(generate.len(), 2, "one job's generate tasks lease together");
        for g in &generate {
            assert_eq!((g.job_id.as_str(), g.stage.as_str()), ("j1", "generate"));
            assert_eq!(g.parent_sha256, input.sha256);
            assert_eq!(g.strength, 0.75);
        }
        s.complete(&done(&w, &generate[0]), 110).await.unwrap();
        let base = s.find_artifact(ArtifactKey::Sha256(&done(&w, &generate[0]).sha256)).await.unwrap().unwrap();
        assert_eq!(base.record.parent_sha256, input.sha256, "the image names its init image");
        let up = lease(s, &w, 1, 120).await.remove(0);
        assert_eq!(up.stage, "upscale");
        assert_eq!(up.parent_sha256, done(&w, &generate[0]).sha256, "an upscale starts from its base");
        assert_eq!(up.strength, 0.0);
        s.complete(&done(&w, &generate[1]), 130).await.unwrap();
        s.complete(&done(&w, &up), 130).await.unwrap();
        // The rest of j1 (item 1's upscale), then the text-to-image job.
        let mut plain = None;
        for now in [140, 150, 160] {
            for l in lease(s, &w, 4, now).await {
                if l.job_id == "j2" {
                    plain = Some(l);
                } else {
                    s.complete(&done(&w, &l), now + 1).await.unwrap();
                }
            }
        }
        let plain = plain.expect("the text-to-image job is leased");
        assert_eq!((plain.parent_sha256.as_str(), plain.strength), ("", 0.0));
    }

    async fn artifacts_resolve_by_watermark_sha256_and_manifest_label(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(1, 2), 0).await;
        let g = lease(s, &w, 1, 100).await.remove(0);
        s.complete(&done(&w, &g), 110).await.unwrap();
        let u = lease(s, &w, 1, 120).await.remove(0);
        s.complete(&done(&w, &u), 130).await.unwrap();
        let up = done(&w, &u);
        for key in [
            ArtifactKey::WatermarkId(&up.stamp.watermark_id),
            ArtifactKey::Sha256(&up.sha256),
            ArtifactKey::ManifestLabel(&up.stamp.manifest_label),
        ] {
            let found = s.find_artifact(key.clone()).await.unwrap().unwrap_or_else(|| panic!("{key:?}"));
            assert_eq!(found.record.task_id, u.task_id);
            assert_eq!(found.record.stage, "upscale");
            assert_eq!(found.record.parent_sha256, done(&w, &g).sha256, "links to its base image");
            assert_eq!(found.record.prompt, "prompt 0");
            assert_eq!(found.manifest, up.stamp.manifest);
        }
        assert!(s.find_artifact(ArtifactKey::WatermarkId("00000000000000ff")).await.unwrap().is_none());
    }

    async fn stale_lease_completion_is_refused(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(1, 0), 0).await;
        let l = lease(s, &w, 1, 100).await.remove(0);
        let mut stale = done(&w, &l);
        stale.fencing_token -= 1;
        assert!(matches!(s.complete(&stale, 200).await, Err(StoreError::Refused(_))));
        s.complete(&done(&w, &l), 200).await.unwrap();
        // A second completion of the same lease is refused too: one artifact per task.
        assert!(matches!(s.complete(&done(&w, &l), 300).await, Err(StoreError::Refused(_))));
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await, 1);
    }

    async fn a_finished_job_reports_when_its_last_task_finished(s: &Store) {
        let w = worker(s, "w1", 2).await;
        submit(s, "j1", &job(2, 0), 0).await;
        let leases = lease(s, &w, 2, 100).await;
        assert_eq!(leases.len(), 2);
        s.complete(&done(&w, &leases[0]), 110).await.unwrap();
        let running = s.get_job("j1", 120, 0).await.unwrap();
        assert_eq!((running.state.as_str(), running.finished_at_ms), ("running", 0));
        s.complete(&done(&w, &leases[1]), 150).await.unwrap();
        // Before the reap records it, the state and the finish time are derived.
        let finished = s.get_job("j1", 200, 0).await.unwrap();
        assert_eq!((finished.state.as_str(), finished.finished_at_ms), ("succeeded", 150));
        // The reap, later, records the same time, not its own.
        assert_eq!(
            s.reap(5_000).await.unwrap().finished_jobs,
            vec![("j1".to_string(), "succeeded".to_string())]
        );
        let stored = s.get_job("j1", 6_000, 0).await.unwrap();
        assert_eq!((stored.state.as_str(), stored.finished_at_ms), ("succeeded", 150));
    }

    async fn expired_lease_is_released_with_a_new_token(s: &Store) {
        let w1 = worker(s, "w1", 1).await;
        let w2 = worker(s, "w2", 1).await;
        submit(s, "j1", &job(1, 0), 0).await;
        let first = lease(s, &w1, 1, 100).await.remove(0);
        assert!(lease(s, &w2, 1, 200).await.is_empty(), "a leased task is not leased twice");
        let out = s.reap(100 + 10_001).await.unwrap();
        assert_eq!((out.expired, out.requeued), (1, 1));
        let second = lease(s, &w2, 1, 20_000).await.remove(0);
        assert_eq!(second.task_id, first.task_id);
        assert!(second.fencing_token > first.fencing_token);
        assert!(matches!(s.complete(&done(&w1, &first), 20_001).await, Err(StoreError::Refused(_))));
        s.complete(&done(&w2, &second), 20_002).await.unwrap();
    }

    async fn upscale_is_ready_as_soon_as_its_own_base_succeeds(s: &Store) {
        let w = worker(s, "w1", 1).await;
        let mut j = job(3, 2);
        j.upscale_method = "hires-fix".into();
        submit(s, "j1", &j, 0).await;
        let g0 = lease(s, &w, 1, 100).await.remove(0);
        assert_eq!((g0.stage.as_str(), g0.item_index), ("generate", 0));
        assert_eq!(g0.upscale_method, "", "only upscale tasks carry the method");
        s.complete(&done(&w, &g0), 110).await.unwrap();
        // Item 0's upscale now comes before the remaining generates: no stage barrier.
        let next = lease(s, &w, 1, 120).await.remove(0);
        assert_eq!((next.stage.as_str(), next.item_index), ("upscale", 0));
        assert_eq!(next.parent_sha256, done(&w, &g0).sha256);
        assert_eq!(next.upscale, 2);
        assert_eq!(next.upscale_method, "hires-fix");
    }

    async fn a_refine_stage_runs_between_generate_and_upscale_on_its_own_model(s: &Store) {
        let w = worker(s, "w1", 1).await;
        let mut j = job(2, 2);
        j.refine = Some(spec::Refine { model_id: "r1".into(), strength: 0.5 });
        // Nobody has heard of the refiner yet: refused, naming it.
        let err = s.check_servable(&j, false).await.unwrap_err().to_string();
        assert!(err.contains("\"r1\""), "{err}");
        let r = worker_serving(s, "w2", 1, &["r1"], 1 << 24).await;
        submit(s, "j1", &j, 0).await;
        let view = s.get_job("j1", 1, 0).await.unwrap();
        let stages: Vec<_> = view.stages.iter().map(|st| (st.stage.as_str(), st.ready, st.waiting)).collect();
        assert_eq!(stages, [("generate", 2, 0), ("refine", 0, 2), ("upscale", 0, 2)]);

        assert!(lease(s, &r, 1, 100).await.is_empty(), "no refine is ready before its base");
        let g0 = lease(s, &w, 1, 100).await.remove(0);
        assert_eq!((g0.stage.as_str(), g0.model_id.as_str(), g0.strength), ("generate", "m1", 0.0));
        s.complete(&done(&w, &g0), 110).await.unwrap();
        // The refine of item 0 is ready at once, for the refiner's worker only.
        let g1 = lease(s, &w, 1, 120).await.remove(0);
        assert_eq!((g1.stage.as_str(), g1.item_index), ("generate", 1));
        let r0 = lease(s, &r, 1, 120).await.remove(0);
        assert_eq!((r0.stage.as_str(), r0.item_index, r0.model_id.as_str()), ("refine", 0, "r1"));
        assert_eq!((r0.parent_sha256.as_str(), r0.strength, r0.width), (done(&w, &g0).sha256.as_str(), 0.5, 192));
        assert_eq!(r0.upscale, 1);
        s.complete(&done(&r, &r0), 130).await.unwrap();
        s.complete(&done(&w, &g1), 131).await.unwrap();
        // The upscale starts from the refined image, on the job's model.
        let u0 = lease(s, &w, 1, 140).await.remove(0);
        assert_eq!((u0.stage.as_str(), u0.item_index, u0.model_id.as_str()), ("upscale", 0, "m1"));
        assert_eq!(u0.parent_sha256, done(&r, &r0).sha256);
        s.complete(&done(&w, &u0), 150).await.unwrap();
        // The refiner's worker gone, the job says which model it waits for.
        s.touch_worker("w1", "", 2_000).await.unwrap();
        let view = s.get_job("j1", 2_000, 1_000).await.unwrap();
        assert!(view.waiting_reason.contains("model \"r1\""), "{}", view.waiting_reason);
        // The lineage runs generate → refine → upscale.
        let arts = s.list_artifacts("j1").await.unwrap();
        let by_stage = |st: &str| arts.iter().find(|a| a.item_index == 0 && a.stage == st).unwrap();
        assert_eq!(by_stage("refine").parent_sha256, by_stage("generate").sha256);
        assert_eq!(by_stage("refine").model_id, "r1");
        assert_eq!(by_stage("upscale").parent_sha256, by_stage("refine").sha256);

        // A generate that fails for good fails its refine and its upscale.
        let w3 = worker(s, "w3", 1).await;
        submit(s, "j2", &j, 0).await;
        for (wk, now) in [(&w, 3_000), (&w3, 3_010)] {
            let l = lease(s, wk, 1, now).await.remove(0);
            assert_eq!((l.job_id.as_str(), l.item_index), ("j2", 0));
            s.fail(&wk.worker_id, &l.task_id, l.fencing_token, "boom", AttemptEnd::Failed, now + 1).await.unwrap();
        }
        let view = s.get_job("j2", 3_100, 0).await.unwrap();
        let failed: Vec<_> = view.stages.iter().map(|st| (st.stage.as_str(), st.failed)).collect();
        assert_eq!(failed, [("generate", 1), ("refine", 1), ("upscale", 1)]);
        s.control("j2", JobControl::RetryFailed, 3_200).await.unwrap();
        let view = s.get_job("j2", 3_300, 0).await.unwrap();
        let open: Vec<_> = view.stages.iter().map(|st| (st.stage.as_str(), st.ready, st.waiting)).collect();
        assert_eq!(open, [("generate", 2, 0), ("refine", 0, 2), ("upscale", 0, 2)]);
    }

    async fn a_job_s_latest_ready_stage_is_leased_first_across_the_models_a_worker_serves(s: &Store) {
        // Up to 256²: the ×2 upscales (384²) do not fit it.
        let base = worker_serving(s, "base", 4, &["m1"], 1 << 16).await;
        let both = worker_serving(s, "both", 4, &["m1", "r1"], 1 << 24).await;
        let mut j = job(4, 2);
        j.refine = Some(spec::Refine { model_id: "r1".into(), strength: 0.5 });
        submit(s, "j1", &j, 0).await;
        let generates = lease(s, &base, 4, 100).await;
        assert_eq!(generates.len(), 4);
        // Items 2 and 3 done; 0 and 1 handed back: ready generates rank
        // before the ready refines by item, after them by stage.
        for l in &generates {
            if l.item_index >= 2 {
                s.complete(&done(&base, l), 110).await.unwrap();
            } else {
                s.fail("base", &l.task_id, l.fencing_token, "", AttemptEnd::HandedBack, 110).await.unwrap();
            }
        }
        let stage_items = |leased: &[TaskLease]| leased.iter().map(|l| (l.stage.clone(), l.item_index)).collect::<Vec<_>>();
        let refines = lease(s, &both, 4, 120).await;
        assert_eq!(stage_items(&refines), [("refine".into(), 2), ("refine".into(), 3)], "the latest stage, one model's batch");
        for l in &refines {
            s.complete(&done(&both, l), 130).await.unwrap();
        }
        // Upscales of m1 are ready now, ahead of its generates, but too large for base.
        assert_eq!(stage_items(&lease(s, &base, 4, 140).await), [("generate".into(), 0), ("generate".into(), 1)]);
        assert_eq!(stage_items(&lease(s, &both, 4, 150).await), [("upscale".into(), 2), ("upscale".into(), 3)]);
        assert!(lease(s, &both, 4, 160).await.is_empty());
    }

    async fn compatible_tasks_are_leased_together_up_to_the_batch(s: &Store) {
        let w = worker(s, "w1", 4).await;
        let mut j = job(6, 0);
        j.items[5].width = 256; // a different size is not batched with the rest
        submit(s, "j1", &j, 0).await;
        let batch = lease(s, &w, 8, 100).await;
        assert_eq!(batch.len(), 4, "capped by the worker's max batch");
        assert!(batch.iter().all(|l| l.width == 192 && !l.prompt.is_empty()));
        let rest = lease(s, &w, 8, 100).await;
        assert_eq!(rest.len(), 1);
        let last = lease(s, &w, 8, 100).await;
        assert_eq!((last.len(), last[0].width), (1, 256));
    }

    async fn failed_task_goes_to_another_worker_then_fails_for_good(s: &Store) {
        let w1 = worker(s, "w1", 1).await;
        let w2 = worker(s, "w2", 1).await;
        submit(s, "j1", &job(1, 2), 0).await;
        let l = lease(s, &w1, 1, 100).await.remove(0);
        let out = s.fail("w1", &l.task_id, l.fencing_token, "boom", AttemptEnd::Failed, 110).await.unwrap();
        assert_eq!(out.state, "ready");
        // w1 just failed it: it stays off the task while others can take it.
        assert!(lease(s, &w1, 1, 120).await.is_empty());
        let l2 = lease(s, &w2, 1, 130).await.remove(0);
        assert_eq!(l2.task_id, l.task_id);
        let out = s.fail("w2", &l2.task_id, l2.fencing_token, "boom again", AttemptEnd::Failed, 140).await.unwrap();
        assert_eq!(out.state, "failed", "budget of 2 attempts spent");
        let job = s.get_job("j1", 150, 0).await.unwrap();
        assert_eq!(job.state, "failed");
        assert!(job.errors.iter().any(|e| e.contains("boom")), "{:?}", job.errors);
        assert_eq!(job.stages[1].failed, 1, "the upscale fails with its base");
        s.control("j1", JobControl::RetryFailed, 160).await.unwrap();
        let job = s.get_job("j1", 170, 0).await.unwrap();
        assert_eq!((job.stages[0].ready, job.stages[1].waiting), (1, 1));
    }

    async fn a_task_at_fault_fails_for_good_at_its_first_attempt(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(1, 2), 0).await;
        let l = lease(s, &w, 1, 100).await.remove(0);
        assert_eq!(l.attempt, 1, "a budget of 2 attempts, one used");
        let out = s
            .fail("w1", &l.task_id, l.fencing_token, "a refiner cannot draw from noise", AttemptEnd::FailedForGood, 110)
            .await
            .unwrap();
        assert_eq!(out.state, "failed", "no retry can help");
        let job = s.get_job("j1", 120, 0).await.unwrap();
        assert_eq!(job.state, "failed");
        assert!(job.errors.iter().any(|e| e.contains("cannot draw from noise")), "{:?}", job.errors);
        assert_eq!(job.stages[1].failed, 1, "the upscale fails with its base");
        assert!(job.finished_at_ms > 0);
        s.seal_audit(1000).await.unwrap();
        let page = s.audit_page(0, 1000, None).await.unwrap();
        let fail = page.entries.iter().rev().find(|e| e.kind == "fail").expect("the failure is in the ledger");
        assert!(fail.body.contains("\"for_good\":true"), "{}", fail.body);
    }

    async fn a_worker_that_keeps_failing_a_job_gets_no_more_of_it(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(5, 0), 0).await;
        submit(s, "j2", &job(1, 0), 0).await;
        // Limit 3 failures; cooldown already over (cooldown_since = now).
        for t in 0..3 {
            let l = s.lease(&w, 1, "", 100 + t, 3, 100 + t).await.unwrap().remove(0);
            assert_eq!(l.job_id, "j1");
            s.fail("w1", &l.task_id, l.fencing_token, "bad gpu", AttemptEnd::Failed, 100 + t).await.unwrap();
        }
        let next = s.lease(&w, 1, "", 200, 3, 200).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].job_id, "j2", "j1 now skips this worker; other jobs still reach it");
        assert!(s.lease(&w, 1, "", 300, 3, 300).await.unwrap().is_empty());
    }

    async fn hand_back_does_not_charge_an_attempt(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(1, 0), 0).await;
        for i in 0..5 {
            let l = lease(s, &w, 1, 100 + i).await.remove(0);
            assert_eq!(l.attempt, 1);
            s.fail("w1", &l.task_id, l.fencing_token, "", AttemptEnd::HandedBack, 100 + i).await.unwrap();
        }
    }

    async fn pause_and_cancel_revoke_held_leases(s: &Store) {
        let w = worker(s, "w1", 2).await;
        submit(s, "j1", &job(4, 0), 0).await;
        let leases = lease(s, &w, 2, 100).await;
        let held: Vec<(String, i64, f32)> = leases.iter().map(|l| (l.task_id.clone(), l.fencing_token, 0.0)).collect();
        s.control("j1", JobControl::Pause, 110).await.unwrap();
        let (revoked, _) = s.heartbeat("w1", &held, 120).await.unwrap();
        assert_eq!(revoked.len(), 2);
        assert!(revoked.iter().all(|r| r.reason == "job paused"));
        assert!(lease(s, &w, 2, 130).await.is_empty(), "a paused job leases nothing");
        assert!(matches!(s.complete(&done(&w, &leases[0]), 140).await, Err(StoreError::Refused(_))));
        s.control("j1", JobControl::Resume, 150).await.unwrap();
        let again = lease(s, &w, 2, 160).await;
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].attempt, 1, "a pause does not charge the attempt");
        s.control("j1", JobControl::Cancel, 170).await.unwrap();
        let held: Vec<(String, i64, f32)> = again.iter().map(|l| (l.task_id.clone(), l.fencing_token, 0.0)).collect();
        let (revoked, _) = s.heartbeat("w1", &held, 180).await.unwrap();
        assert!(revoked.iter().all(|r| r.reason == "job canceled"));
        assert_eq!(s.get_job("j1", 190, 0).await.unwrap().state, "canceled");
        assert!(matches!(s.control("j1", JobControl::Resume, 200).await, Err(StoreError::Refused(_))));
    }

    async fn heartbeat_extends_held_and_returns_forgotten_leases(s: &Store) {
        let w = worker(s, "w1", 2).await;
        submit(s, "j1", &job(2, 0), 0).await;
        let leases = lease(s, &w, 2, 100).await;
        // The worker only knows the first lease (the reply of the second was lost).
        let held = vec![(leases[0].task_id.clone(), leases[0].fencing_token, 0.5)];
        let (revoked, requeued) = s.heartbeat("w1", &held, 9_000).await.unwrap();
        assert!(revoked.is_empty() && requeued);
        let job = s.get_job("j1", 9_001, 0).await.unwrap();
        assert_eq!(job.stages[0].progress, 0.25, "half of one of two running tasks");
        // Extended from 9 000: survives a reap that would have expired the original lease.
        assert_eq!(s.reap(15_000).await.unwrap().requeued, 0);
        let other = lease(s, &w, 2, 15_001).await;
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].task_id, leases[1].task_id);
    }

    async fn priority_first_then_round_robin_between_tenants(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "a1", &job_for("alice", 0, 4, 0), 0).await;
        submit(s, "b1", &job_for("bob", 0, 4, 0), 0).await;
        submit(s, "u1", &job_for("carol", 5, 1, 0), 0).await;
        let mut order = Vec::new();
        for t in 0..5 {
            let l = lease(s, &w, 1, 100 + t * 10).await.remove(0);
            order.push(l.job_id.clone());
            s.complete(&done(&w, &l), 101 + t * 10).await.unwrap();
        }
        assert_eq!(order[0], "u1", "higher priority first");
        assert_eq!(&order[1..], ["a1", "b1", "a1", "b1"], "then tenants take turns");
    }

    async fn tenant_cap_limits_running_tasks(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job_for("capped", 0, 5, 0), 2).await;
        assert_eq!(lease(s, &w, 1, 100).await.len(), 1);
        assert_eq!(lease(s, &w, 1, 101).await.len(), 1);
        assert!(lease(s, &w, 1, 102).await.is_empty(), "cap of 2 reached");
        let job = s.get_job("j1", 103, 0).await.unwrap();
        assert_eq!(job.waiting_reason, "", "tasks are running, so it is not stuck");
    }

    async fn a_worker_leases_its_own_models_tasks_past_other_models_backlogs(s: &Store) {
        let busy = worker(s, "wa", 4).await;
        // Up to 256²: b-large's 512² does not fit it.
        let idle = worker_serving(s, "wb", 4, &["m2"], 1 << 16).await;
        // Ahead of b's job: a's backlog, and a job of b's model too large for wb.
        for (id, model, priority, side, prompts) in [("a1", "m1", 9, 192, 6), ("a2", "m1", 8, 192, 6), ("b-large", "m2", 9, 512, 2), ("b", "m2", 0, 192, 3)] {
            let mut j = job_for("default", priority, prompts, 0);
            j.model_id = model.into();
            for item in &mut j.items {
                (item.width, item.height) = (side, side);
            }
            let new = NewJob { id, job: &j, spec_json: "{}", tenant_cap: 0, submitted_by: "" };
            s.submit(&new, &POLICY, 1).await.unwrap();
        }
        let jobs_of = |leased: &[TaskLease]| leased.iter().map(|l| l.job_id.clone()).collect::<Vec<_>>();
        assert_eq!(jobs_of(&lease(s, &idle, 4, 100).await), ["b", "b", "b"]);
        assert!(lease(s, &idle, 4, 101).await.is_empty(), "nothing else of its model fits it");
        assert_eq!(jobs_of(&lease(s, &busy, 4, 102).await), ["a1"; 4]);
        assert_eq!(jobs_of(&lease(s, &busy, 4, 103).await), ["a1"; 2]);
        assert_eq!(jobs_of(&lease(s, &busy, 4, 104).await), ["a2"; 4]);
    }

    async fn a_model_that_only_refines_is_refused_where_it_would_draw_from_noise(s: &Store) {
        worker(s, "w1", 1).await;
        // A worker declares r1 a refiner (its folder says so).
        let engines = ["synthetic".to_string()];
        let refiner = ModelCapability { model_id: "r1".into(), weights_sha256: SHA.into(), refines_only: true, inpaints_only: false };
        let models = [("synthetic".to_string(), refiner)];
        let reg = WorkerRegistration { worker_id: "w2", name: "w2", hostname: "h", engines: &engines, models: &models, max_pixels: 1 << 20, max_batch: 1, principal: "", client_cert: None };
        s.register_worker(&reg, 1).await.unwrap();
        let listed = s.list_models().await.unwrap();
        let flag = |id: &str| listed.iter().find(|m| m.model_id == id).unwrap().refines_only;
        assert!(flag("r1") && !flag("m1"));
        // As the job's own model it would draw from noise: refused, naming
        // it, however the job is queued, and nothing is written.
        let mut own = job(1, 0);
        own.model_id = "r1".into();
        for queue_unservable in [false, true] {
            let err = s.check_servable(&own, queue_unservable).await.unwrap_err();
            assert!(matches!(err, StoreError::Spec(_)), "{err}");
            assert!(err.to_string().contains("model \"r1\" refines images"), "{err}");
        }
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await, 0);
        // From an init image (img2img), or as another job's refine model, it refines.
        own.items[0].init_image = Some(spec::InitImage { sha256: SHA.into(), strength: 0.5, mask: None, outpaint: None });
        s.check_servable(&own, false).await.unwrap();
        let mut refined = job(1, 0);
        refined.refine = Some(spec::Refine { model_id: "r1".into(), strength: 0.5 });
        s.check_servable(&refined, false).await.unwrap();
        // A registration says so from the folder, and a later one of other
        // weights under the same id undoes it.
        let mut m = Model {
            model_id: "r2".into(),
            family: "sdxl".into(),
            weights: vec![WeightFile { path: "unet.safetensors".into(), sha256: SHA.into(), size: 3 }],
            refines_only: true,
            ..Default::default()
        };
        s.register_model(&m, "", 2).await.unwrap();
        assert!(s.list_models().await.unwrap().iter().any(|m| m.model_id == "r2" && m.refines_only));
        m.refines_only = false;
        s.register_model(&m, "", 3).await.unwrap();
        assert!(s.list_models().await.unwrap().iter().any(|m| m.model_id == "r2" && !m.refines_only));
    }

    async fn a_model_that_only_inpaints_is_refused_where_it_would_render_without_a_mask(s: &Store) {
        worker(s, "w1", 1).await;
        // A worker declares i1 an inpainting model (its folder says so).
        let engines = ["synthetic".to_string()];
        let inpainter = ModelCapability { model_id: "i1".into(), weights_sha256: SHA.into(), refines_only: false, inpaints_only: true };
        let models = [("synthetic".to_string(), inpainter)];
        let reg = WorkerRegistration { worker_id: "w2", name: "w2", hostname: "h", engines: &engines, models: &models, max_pixels: 1 << 20, max_batch: 1, principal: "", client_cert: None };
        s.register_worker(&reg, 1).await.unwrap();
        let listed = s.list_models().await.unwrap();
        let flag = |id: &str| listed.iter().find(|m| m.model_id == id).unwrap().inpaints_only;
        assert!(flag("i1") && !flag("m1"));
        let masked = || spec::InitImage { sha256: SHA.into(), strength: 0.5, mask: Some(SHA.into()), outpaint: None };
        let refused = |j: &ExpandedJob, field: &str| {
            let (j, field) = (j.clone(), field.to_string());
            async move {
                for queue_unservable in [false, true] {
                    let err = s.check_servable(&j, queue_unservable).await.unwrap_err();
                    assert!(matches!(&err, StoreError::Spec(e) if e.field == field), "{err}");
                    assert!(err.to_string().contains("model \"i1\" is an inpainting model"), "{err}");
                }
            }
        };
        // Text to image, img2img without a mask, one item of two without:
        // refused, naming the model.
        let mut own = job(2, 0);
        own.model_id = "i1".into();
        refused(&own, "model_id").await;
        own.items[0].init_image = Some(masked());
        own.items[1].init_image = Some(spec::InitImage { mask: None, ..masked() });
        refused(&own, "model_id").await;
        // An outpaint renders every item with an init image through the
        // mask it makes: it serves.
        let mut outpainted = own.clone();
        let margins = Some(spec::Outpaint { left: 8, top: 0, right: 8, bottom: 0 });
        for item in &mut outpainted.items {
            item.init_image = Some(spec::InitImage { mask: None, outpaint: margins, ..masked() });
        }
        s.check_servable(&outpainted, false).await.unwrap();
        // Every item inpainted: it serves; unless a hires fix re-renders
        // the outputs without a mask.
        own.items[1].init_image = Some(masked());
        s.check_servable(&own, false).await.unwrap();
        let mut hires = own.clone();
        hires.upscale = 2;
        hires.upscale_method = "hires-fix".into();
        refused(&hires, "model_id").await;
        // A refine stage has no mask.
        let mut refined = job(1, 0);
        refined.refine = Some(spec::Refine { model_id: "i1".into(), strength: 0.5 });
        refused(&refined, "refine.model_id").await;
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await, 0);
        // A registration from the folder says so too.
        let m = Model {
            model_id: "i2".into(),
            family: "sd15".into(),
            weights: vec![WeightFile { path: "unet.safetensors".into(), sha256: SHA.into(), size: 3 }],
            inpaints_only: true,
            ..Default::default()
        };
        s.register_model(&m, "", 2).await.unwrap();
        assert!(s.list_models().await.unwrap().iter().any(|m| m.model_id == "i2" && m.inpaints_only));
    }

    async fn unservable_and_unknown_models_are_refused_without_rows(s: &Store) {
        let j = job(2, 0);
        assert!(matches!(s.check_servable(&j, false).await, Err(StoreError::NotFound(_))));
        worker(s, "w1", 1).await;
        let mut big = job(1, 4);
        big.items[0].width = 2048;
        big.items[0].height = 2048;
        let err = s.check_servable(&big, false).await.unwrap_err().to_string();
        assert!(err.contains("pixels"), "{err}");
        s.check_servable(&big, true).await.unwrap();
        assert_eq!(count(s, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await, 0);
    }

    async fn waiting_job_says_why(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(1, 0), 0).await;
        s.touch_worker(&w.worker_id, "", 0).await.unwrap();
        // The only worker was last seen at 0; with liveness from 1 000, none is live.
        let job = s.get_job("j1", 2_000, 1_000).await.unwrap();
        assert!(job.waiting_reason.contains("no live worker"), "{}", job.waiting_reason);
    }

    async fn registry_links_models_to_datasets_and_checks_worker_weights(s: &Store) {
        let d = Dataset { name: "laion".into(), version: "5b".into(), uri: "s3://x".into(), content_sha256: SHA.into(), license: "cc".into(), created_at_ms: 0 };
        s.register_dataset(&d, "", 1).await.unwrap();
        let mut m = Model {
            model_id: "sd15".into(),
            family: "sd15".into(),
            weights: vec![WeightFile { path: "unet.safetensors".into(), sha256: SHA.into(), size: 3 }],
            license: "openrail".into(),
            training_datasets: vec!["laion@5b".into()],
            ..Default::default()
        };
        s.register_model(&m, "", 2).await.unwrap();
        m.training_datasets = vec!["nope@1".into()];
        assert!(matches!(s.register_model(&m, "", 3).await, Err(StoreError::NotFound(_))));
        let models = s.list_models().await.unwrap();
        assert_eq!(models[0].training_datasets, ["laion@5b"]);
        let digest = hallmark_provenance::weights_digest([("unet.safetensors", SHA)]);
        let good = ModelCapability { model_id: "sd15".into(), weights_sha256: digest, refines_only: false, inpaints_only: false };
        let engines = ["diffusion".to_string()];
        let models = [("diffusion".to_string(), good)];
        let mut reg = WorkerRegistration { worker_id: "w1", name: "w1", hostname: "h", engines: &engines, models: &models, max_pixels: 1 << 20, max_batch: 1, principal: "worker:pool-a", client_cert: None };
        s.register_worker(&reg, 4).await.unwrap();
        // The token it registered with is kept for the lease calls' check.
        assert_eq!(s.worker_caps("w1").await.unwrap().principal, "worker:pool-a");
        assert_eq!(s.list_workers(0).await.unwrap()[0].principal, "worker:pool-a");
        assert_eq!(s.worker_caps("w1").await.unwrap().client_cert_sha256, "");
        // The client certificate it connected with (mutual TLS) is kept too.
        let cert = ClientCert { sha256: "cd".repeat(32), subject: "CN=gpu-1".into() };
        let with_cert = WorkerRegistration { worker_id: "w3", name: "w3", client_cert: Some(&cert), ..reg };
        s.register_worker(&with_cert, 6).await.unwrap();
        assert_eq!(s.worker_caps("w3").await.unwrap().client_cert_sha256, cert.sha256);
        let listed = s.list_workers(0).await.unwrap();
        let w3 = listed.iter().find(|w| w.worker_id == "w3").unwrap();
        assert_eq!(w3.client_certificate, "CN=gpu-1");
        let bad = ModelCapability { model_id: "sd15".into(), weights_sha256: SHA.into(), refines_only: false, inpaints_only: false };
        let models = [("diffusion".to_string(), bad)];
        reg.worker_id = "w2";
        reg.models = &models;
        let err = s.register_worker(&reg, 5).await.unwrap_err();
        assert!(err.to_string().contains("mismatched weights"), "{err}");
    }

    async fn the_audit_ledger_records_each_action_and_seals_one_chain(s: &Store) {
        let w = worker(s, "w1", 2).await;
        submit(s, "j1", &job(2, 0), 0).await;
        let leases = lease(s, &w, 2, 100).await;
        assert_eq!(leases.len(), 2);
        s.complete(&done(&w, &leases[0]), 110).await.unwrap();
        // A refused (repeated) completion records nothing.
        assert!(s.complete(&done(&w, &leases[0]), 111).await.is_err());
        s.fail("w1", &leases[1].task_id, leases[1].fencing_token, "out of memory", AttemptEnd::Failed, 120)
            .await
            .unwrap();
        // Appending never touches the chain: nothing is sealed yet.
        let page = s.audit_page(0, 100, None).await.unwrap();
        assert!(page.entries.is_empty());
        assert_eq!((page.unsealed, page.head.seq), (5, 0));

        // Sealers racing (replicas) still build one chain, entry by entry.
        let mut sealers = Vec::new();
        for _ in 0..4 {
            let s = s.clone();
            sealers.push(tokio::spawn(async move {
                while s.audit_page(0, 1, None).await.unwrap().unsealed > 0 {
                    s.seal_audit(1).await.unwrap();
                }
            }));
        }
        for h in sealers {
            h.await.unwrap();
        }
        let page = s.audit_page(0, 100, None).await.unwrap();
        let kinds: Vec<&str> = page.entries.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["register_worker", "submit", "dispatch", "complete", "fail"]);
        let mut check = ChainCheck::default();
        for e in &page.entries {
            check.push(e).unwrap();
        }
        assert_eq!(check.head(), page.head);
        let body = |i: usize| serde_json::from_str::<serde_json::Value>(&page.entries[i].body).unwrap();
        let mut ids: Vec<&str> = leases.iter().map(|l| l.task_id.as_str()).collect();
        ids.sort();
        let dispatched: Vec<(String, i64)> = body(2)["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t[0].as_str().unwrap().to_string(), t[1].as_i64().unwrap()))
            .collect();
        assert_eq!(dispatched.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), ids);
        assert!(dispatched.iter().all(|t| leases.iter().any(|l| l.task_id == t.0 && l.fencing_token == t.1)));
        assert_eq!((page.entries[2].actor.as_str(), page.entries[2].job_id.as_str()), ("w1", "j1"));
        assert_eq!(page.entries[3].subject, leases[0].task_id);
        assert_eq!(body(3)["sha256"], done(&w, &leases[0]).sha256.as_str());
        assert_eq!(body(4)["message"], "out of memory");
        assert_eq!(page.entries[1].actor, "default", "a submission names its tenant");

        // Later entries continue the chain from the head.
        s.control("j1", JobControl::Cancel, 200).await.unwrap();
        assert_eq!(s.seal_audit(100).await.unwrap(), 1);
        let more = s.audit_page(5, 100, None).await.unwrap();
        assert_eq!(more.entries.len(), 1);
        assert_eq!(more.entries[0].kind, "cancel");
        check.push(&more.entries[0]).unwrap();
        // A job's own entries, for reading.
        let j1 = s.audit_page(0, 100, Some("j1")).await.unwrap();
        assert_eq!(j1.entries.len(), 5, "every entry but the worker's registration");

        // An entry changed in the database no longer checks out.
        sqlx::query("UPDATE audit_events SET body = '{}' WHERE seq = 4")
            .execute(s.pool())
            .await
            .unwrap();
        let mut check = ChainCheck::default();
        let fault = s.audit_page(0, 100, None).await.unwrap().entries.iter().try_for_each(|e| check.push(e));
        assert!(
            matches!(fault, Err(hallmark_provenance::ledger::LedgerFault::Altered { seq: 4, .. })),
            "{fault:?}"
        );
    }

    async fn registrations_and_expiries_are_in_the_ledger(s: &Store) {
        let w = worker(s, "w1", 1).await;
        s.register_dataset(
            &Dataset { name: "laion".into(), version: "5b".into(), uri: "s3://d".into(), content_sha256: SHA.into(), license: "cc-by".into(), created_at_ms: 0 },
            "operator:alice",
            1,
        )
        .await
        .unwrap();
        s.register_model(
            &Model {
                model_id: "m2".into(),
                family: "sd15".into(),
                weights: vec![WeightFile { path: "unet.safetensors".into(), sha256: SHA.into(), size: 3 }],
                training_datasets: vec!["laion@5b".into()],
                ..Default::default()
            },
            "operator:bob",
            2,
        )
        .await
        .unwrap();
        submit(s, "j1", &job(1, 0), 0).await;
        let l = lease(s, &w, 1, 100).await.remove(0);
        let out = s.reap(100 + 10_001).await.unwrap();
        assert_eq!(out.requeued, 1);
        s.seal_audit(100).await.unwrap();
        let page = s.audit_page(0, 100, None).await.unwrap();
        let kinds: Vec<&str> = page.entries.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["register_worker", "register_dataset", "register_model", "submit", "dispatch", "expire"]);
        let model: serde_json::Value = serde_json::from_str(&page.entries[2].body).unwrap();
        assert_eq!(model["weights"][0]["sha256"], SHA);
        assert_eq!(model["training_datasets"][0], "laion@5b");
        assert_eq!(page.entries[1].subject, "laion@5b");
        assert_eq!((page.entries[1].actor.as_str(), page.entries[2].actor.as_str()), ("operator:alice", "operator:bob"));
        let expired: serde_json::Value = serde_json::from_str(&page.entries[5].body).unwrap();
        assert_eq!((page.entries[5].subject.as_str(), expired["token"].as_i64()), (l.task_id.as_str(), Some(l.fencing_token)));
        assert_eq!(expired["state"], "ready");
    }

    async fn the_ledger_tree_grows_with_the_chain_and_proves_its_entries(s: &Store) {
        let w = worker(s, "w1", 1).await;
        for j in ["j1", "j2", "j3"] {
            submit(s, j, &job(2, 0), 0).await;
        }
        for now in [100, 200, 300] {
            let l = lease(s, &w, 1, now).await.remove(0);
            s.complete(&done(&w, &l), now + 1).await.unwrap();
        }
        s.control("j2", JobControl::Cancel, 400).await.unwrap();
        // Sealed two at a time: each seal grows the tree from where it was.
        while s.seal_audit(2).await.unwrap() > 0 {}
        let entries = s.audit_page(0, 1000, None).await.unwrap().entries;
        let n = entries.len() as u64;
        assert!(n >= 11, "{n}");
        let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_of_hex(&e.hash).unwrap()).collect();
        let root_of = |size: u64| {
            let mut f = Frontier::default();
            for l in &leaves[..size as usize] {
                f.push(*l);
            }
            f.root().unwrap()
        };
        assert_eq!(s.audit_tree_head().await.unwrap(), (n, Some(root_of(n))));
        assert_eq!(s.audit_frontier(n - 3).await.unwrap().root(), Some(root_of(n - 3)));

        // Each of a job's entries comes with the path to the root, for the
        // whole tree and for an earlier one; nobody else's entries come.
        for size in [n, n - 3] {
            let proofs = s.audit_inclusion_proofs("j2", None, 0, 100, size).await.unwrap();
            let expected: Vec<u64> = entries.iter().filter(|e| e.job_id == "j2" && e.seq <= size).map(|e| e.seq).collect();
            assert_eq!(proofs.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(), expected);
            for (e, path) in &proofs {
                let leaf = &leaves[e.seq as usize - 1];
                assert_eq!(merkle::root_from_inclusion(e.seq - 1, size, leaf, path), Some(root_of(size)), "entry {}", e.seq);
            }
            assert_eq!(
                s.audit_entries_after("j2", size).await.unwrap(),
                entries.iter().filter(|e| e.job_id == "j2" && e.seq > size).count() as u64
            );
        }
        let first = s.audit_inclusion_proofs("j2", None, 0, 1, n).await.unwrap();
        let next = s.audit_inclusion_proofs("j2", None, first[0].0.seq, 1, n).await.unwrap();
        assert!(next[0].0.seq > first[0].0.seq);
        // One entry by its kind and subject: an artifact's completion.
        let completion = entries.iter().find(|e| e.kind == "complete").unwrap();
        let only = s
            .audit_inclusion_proofs(&completion.job_id, Some(("complete", &completion.subject)), 0, 10, n)
            .await
            .unwrap();
        assert_eq!(only.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(), [completion.seq]);
        for old in 1..=n {
            let p = s.audit_consistency_proof(old, n).await.unwrap();
            assert!(merkle::verify_consistency(old, n, &root_of(old), &root_of(n), &p), "{old}");
        }
        for refused in [
            s.audit_inclusion_proofs("j1", None, 0, 10, n + 1).await.map(|_| ()),
            s.audit_consistency_proof(0, n).await.map(|_| ()),
            s.audit_consistency_proof(2, n + 1).await.map(|_| ()),
        ] {
            assert!(matches!(refused, Err(StoreError::Refused(_))), "{refused:?}");
        }

        // A chain sealed before the tree existed: sealing leaves new entries
        // to the catch-up, which builds the same tree a batch at a time.
        sqlx::query("DELETE FROM audit_tree").execute(s.pool()).await.unwrap();
        sqlx::query("UPDATE audit_head SET tree_size = 0").execute(s.pool()).await.unwrap();
        submit(s, "j4", &job(1, 0), 500).await;
        assert_eq!(s.seal_audit(100).await.unwrap(), 1);
        assert_eq!(s.audit_tree_head().await.unwrap(), (0, None));
        let mut grown = Vec::new();
        loop {
            match s.grow_audit_tree(4).await.unwrap() {
                0 => break,
                k => grown.push(k),
            }
        }
        assert!(grown.iter().all(|k| *k <= 4) && grown.len() >= 3, "{grown:?}");
        assert_eq!(grown.iter().sum::<u64>(), n + 1);
        let entries = s.audit_page(0, 1000, None).await.unwrap().entries;
        let leaves: Vec<Hash> = entries.iter().map(|e| merkle::leaf_of_hex(&e.hash).unwrap()).collect();
        let mut f = Frontier::default();
        for l in &leaves {
            f.push(*l);
        }
        assert_eq!(s.audit_tree_head().await.unwrap(), (n + 1, f.root()));
        // Caught up, sealing grows it again.
        s.control("j4", JobControl::Cancel, 600).await.unwrap();
        s.seal_audit(100).await.unwrap();
        assert_eq!(s.audit_tree_head().await.unwrap().0, n + 2);

        // A stored node changed or deleted is refused, named.
        let needed = merkle::nodes_needed(|node| {
            merkle::inclusion_proof(0, n + 2, node);
        });
        let node = needed.iter().find(|id| id.level == 1).expect("a level-1 sibling");
        let at = format!("WHERE level = {} AND idx = {}", node.level, node.index);
        sqlx::query(&format!("UPDATE audit_tree SET hash = 'zz' {at}")).execute(s.pool()).await.unwrap();
        let e = s.audit_inclusion_proofs("", None, 0, 10, n + 2).await.map(|_| ()).unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt(m) if m.contains(&format!("node 1/{}", node.index))), "{e:?}");
        sqlx::query(&format!("DELETE FROM audit_tree {at}")).execute(s.pool()).await.unwrap();
        let e = s.audit_inclusion_proofs("", None, 0, 10, n + 2).await.map(|_| ()).unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt(m) if m.contains("lacks node 1/")), "{e:?}");
    }

    async fn a_tree_rebuilt_from_the_chain_finds_and_repairs_what_the_stored_one_got_wrong(s: &Store) {
        let w = worker(s, "w1", 1).await;
        submit(s, "j1", &job(3, 0), 0).await;
        for now in [100, 200, 300] {
            let l = lease(s, &w, 1, now).await.remove(0);
            s.complete(&done(&w, &l), now + 1).await.unwrap();
        }
        while s.seal_audit(3).await.unwrap() > 0 {}
        let entries = s.audit_page(0, 1000, None).await.unwrap().entries;
        let n = entries.len() as u64;
        assert!(n >= 8, "{n}");
        let (_, root) = s.audit_tree_head().await.unwrap();
        let mid = n / 2;
        let signed = Checkpoint {
            seq: mid,
            hash: entries[mid as usize - 1].hash.clone(),
            at_ms: 0,
            root: s.audit_frontier(mid).await.unwrap().root().map(|r| merkle::to_hex(&r)),
        };
        let hold = [signed.clone()];
        // Intact: every node counted once, nothing differs, the checkpoint held.
        let c = s.check_audit_tree(&hold, None, 1000).await.unwrap();
        assert!(c.intact() && !c.repaired, "{c:?}");
        assert_eq!((c.entries, c.root, c.held.as_slice()), (n, root, [mid].as_slice()));
        assert_eq!(c.nodes as i64, count(s, "SELECT COUNT(*) FROM audit_tree").await);

        // A node changed, one not a hash, one deleted, two stray beyond the tree.
        let exec = |sql: String| {
            let pool = s.pool().clone();
            async move {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            }
        };
        let other = "cd".repeat(32);
        exec(format!("UPDATE audit_tree SET hash = '{other}' WHERE level = 1 AND idx = 1")).await;
        exec("UPDATE audit_tree SET hash = 'zz' WHERE level = 2 AND idx = 0".into()).await;
        exec("DELETE FROM audit_tree WHERE level = 1 AND idx = 2".into()).await;
        // A leaf row (leaves are read from the entries) and a node past the tree.
        exec(format!("INSERT INTO audit_tree (level, idx, hash) VALUES (0, 1, '{other}'), (3, {n}, '{other}')")).await;
        let c = s.check_audit_tree(&hold, None, 1000).await.unwrap();
        assert_eq!((c.wrong, c.missing, c.extra, c.repaired), (2, 1, 2, false), "{c:?}");
        let said = c.examples.join("\n");
        for what in [
            format!("node 1/1 (entries 3 to 4) is stored as {other}, not "),
            "node 2/0 (entries 1 to 4) is stored as zz".to_string(),
            "node 1/2 (entries 5 to 6) is missing".to_string(),
            format!("2 stored row(s) are not nodes of the tree of {n} entries"),
        ] {
            assert!(said.contains(&what), "{what:?} in {said}");
        }
        // Checking wrote nothing; the proofs through those nodes still fail.
        assert_eq!(s.check_audit_tree(&hold, None, 1000).await.unwrap(), c);
        assert!(s.audit_inclusion_proofs("j1", None, 0, 100, n).await.is_err());

        // Repaired: the stored tree is the rebuilt one, and says so in the ledger.
        let r = s.check_audit_tree(&hold, Some("operator:ops"), 2000).await.unwrap();
        assert_eq!((r.wrong, r.missing, r.extra, r.repaired), (2, 1, 2, true), "{r:?}");
        let after = s.check_audit_tree(&hold, None, 2000).await.unwrap();
        assert!(after.intact(), "{after:?}");
        assert_eq!(after.nodes as i64, count(s, "SELECT COUNT(*) FROM audit_tree").await);
        assert_eq!(s.audit_tree_head().await.unwrap(), (n, root));
        for (e, path) in s.audit_inclusion_proofs("j1", None, 0, 100, n).await.unwrap() {
            let leaf = merkle::leaf_of_hex(&e.hash).unwrap();
            assert_eq!(merkle::root_from_inclusion(e.seq - 1, n, &leaf, &path), root, "entry {}", e.seq);
        }
        assert_eq!(s.seal_audit(10).await.unwrap(), 1);
        let page = s.audit_page(n, 10, None).await.unwrap().entries;
        assert_eq!((page[0].kind.as_str(), page[0].actor.as_str()), ("repair_tree", "operator:ops"));
        let body: serde_json::Value = serde_json::from_str(&page[0].body).unwrap();
        assert_eq!((body["wrong"].as_u64(), body["missing"].as_u64(), body["extra"].as_u64()), (Some(2), Some(1), Some(2)));
        assert_eq!(s.audit_tree_head().await.unwrap().0, n + 1, "the tree grows on from the repaired edge");
        assert!(s.check_audit_tree(&hold, None, 3000).await.unwrap().intact());

        // A checkpoint the chain does not lead to: refused, nothing written.
        exec(format!("UPDATE audit_tree SET hash = '{other}' WHERE level = 1 AND idx = 1")).await;
        let forged = Checkpoint { root: Some("ab".repeat(32)), ..signed.clone() };
        let e = s.check_audit_tree(&[forged], Some("operator:ops"), 3000).await.unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt(m) if m.contains(&format!("not to those signed at entry {mid}"))), "{e:?}");
        assert_eq!(s.check_audit_tree(&hold, None, 3000).await.unwrap().wrong, 1);
        // An entry changed: the chain itself does not check out.
        exec("UPDATE audit_events SET actor = 'someone' WHERE seq = 2".into()).await;
        let e = s.check_audit_tree(&hold, Some("operator:ops"), 3000).await.unwrap_err();
        assert!(matches!(&e, StoreError::Corrupt(m) if m.contains("chain does not check out") && m.contains("entry 2")), "{e:?}");
        let repairs = count(s, "SELECT COUNT(*) FROM audit_events WHERE kind = 'repair_tree'").await;
        assert_eq!(repairs, 1, "a refused repair is not recorded");
    }

    async fn concurrent_leasing_never_leases_a_task_twice(s: &Store) {
        let mut workers = Vec::new();
        for i in 0..8 {
            workers.push(worker(s, &format!("w{i}"), 3).await);
        }
        submit(s, "j1", &job(200, 0), 0).await;
        let mut handles = Vec::new();
        for w in workers {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = s.lease(&w, 3, "", 0, 3, 100).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|l| l.task_id));
                }
            }));
        }
        let mut seen = HashSet::new();
        for h in handles {
            for id in h.await.unwrap() {
                assert!(seen.insert(id.clone()), "task {id} leased twice");
            }
        }
        assert_eq!(seen.len(), 200);
    }
}

/// Brings `pool` to the schema before the input retention migration
/// (0011), writes an input used by two jobs and one never used, then lets
/// `Store::connect` run the rest: each input's last use is its newest job
/// starting from it (a later stage naming the same hash does not count),
/// else its upload.
async fn the_retention_migration_dates_each_input_by_its_newest_job(
    pool: sqlx::AnyPool,
    mut before: sqlx::migrate::Migrator,
    store_url: &str,
) {
    migrate_before(&pool, &mut before, 11).await;
    let (a, b) = ("a1".repeat(32), "b2".repeat(32));
    let mut sql = vec![
        "INSERT INTO tenants (name) VALUES ('acme')".to_string(),
        format!(
            "INSERT INTO inputs (sha256, media_type, width, height, size, created_at) VALUES ('{a}', 'image/png', 8, 8, 1, 10)"
        ),
        format!(
            "INSERT INTO inputs (sha256, media_type, width, height, size, created_at) VALUES ('{b}', 'image/png', 8, 8, 1, 20)"
        ),
    ];
    for (job, created, rank) in [("j1", 50, 0), ("j2", 80, 0), ("j3", 900, 1)] {
        sql.push(format!(
            "INSERT INTO jobs (id, tenant, priority, state, engine, model_id, items, spec_json, labels_json, created_at) \
             VALUES ('{job}', 'acme', 0, 'succeeded', 'synthetic', 'm', 1, '{{}}', '{{}}', {created})"
        ));
        sql.push(format!(
            "INSERT INTO items (job_id, item_index, prompt, negative_prompt, seed, width, height, steps, guidance, scheduler) \
             VALUES ('{job}', 0, 'p', '', 1, 64, 64, 4, 7.0, 'euler')"
        ));
        sql.push(format!(
            "INSERT INTO tasks (id, job_id, item_index, stage, stage_rank, state, tenant, engine, model_id, pixels, upscale, batch_key, parent_sha256, max_attempts, lease_ttl_ms) \
             VALUES ('{job}/0', '{job}', 0, 'generate', {rank}, 'succeeded', 'acme', 'synthetic', 'm', 4096, 1, 'k', '{a}', 1, 1000)"
        ));
    }
    for statement in sql {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    let store = Store::connect(store_url, 2).await.unwrap();
    let dated: Vec<(String, i64)> =
        sqlx::query_as("SELECT sha256, last_used_at FROM inputs ORDER BY sha256")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(dated, [(a.clone(), 80), (b.clone(), 20)]);
    assert_eq!(store.input_purged_at(&a).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_migration_dates_inputs_on_postgres() {
    let (pool, url) = unmigrated_postgres().await;
    the_retention_migration_dates_each_input_by_its_newest_job(
        pool,
        sqlx::migrate!("../migrations/postgres"),
        &url,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_migration_dates_inputs_on_sqlite() {
    let (pool, url, _dir) = unmigrated_sqlite().await;
    the_retention_migration_dates_each_input_by_its_newest_job(
        pool,
        sqlx::migrate!("../migrations/sqlite"),
        &url,
    )
    .await;
}

/// Runs `migrator`'s migrations before `version` on `pool`.
async fn migrate_before(
    pool: &sqlx::AnyPool,
    migrator: &mut sqlx::migrate::Migrator,
    version: i64,
) {
    migrator.migrations = std::borrow::Cow::Owned(
        migrator
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect(),
    );
    migrator.run(pool).await.unwrap();
}

/// A ledger sealed before 0014, its tree storing its leaves too (as the
/// sealer did then): the migration drops the leaf rows, and the tree —
/// leaves now read from the entries — is intact, proves every entry and
/// grows on.
async fn the_leaf_migration_keeps_the_tree_whole(
    pool: sqlx::AnyPool,
    mut before: sqlx::migrate::Migrator,
    store_url: &str,
) {
    use hallmark_provenance::ledger::{self, EntryFields};
    migrate_before(&pool, &mut before, 14).await;
    let n = 13u64;
    let mut prev = ledger::GENESIS.to_string();
    let mut frontier = Frontier::default();
    for seq in 1..=n {
        let body = format!("{{\"i\":{seq}}}");
        let fields = EntryFields {
            at_ms: seq as i64,
            kind: "register_dataset",
            job_id: "",
            subject: "d",
            actor: "",
            body: &body,
        };
        let hash = ledger::entry_hash(seq, &prev, &fields);
        sqlx::query(
            "INSERT INTO audit_events (at, kind, job_id, subject, actor, body, seq, prev_hash, hash) \
             VALUES ($1, 'register_dataset', '', 'd', '', $2, $3, $4, $5)",
        )
        .bind(seq as i64)
        .bind(&body)
        .bind(seq as i64)
        .bind(&prev)
        .bind(&hash)
        .execute(&pool)
        .await
        .unwrap();
        for (id, node) in frontier.push(merkle::leaf_of_hex(&hash).unwrap()) {
            sqlx::query("INSERT INTO audit_tree (level, idx, hash) VALUES ($1, $2, $3)")
                .bind(i64::from(id.level))
                .bind(id.index as i64)
                .bind(merkle::to_hex(&node))
                .execute(&pool)
                .await
                .unwrap();
        }
        prev = hash;
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, tree_size = $1 WHERE id = 1")
        .bind(n as i64)
        .bind(&prev)
        .execute(&pool)
        .await
        .unwrap();
    let s = Store::connect(store_url, 2).await.unwrap();
    assert_eq!(
        count(&s, "SELECT COUNT(*) FROM audit_tree WHERE level = 0").await,
        0
    );
    assert_eq!(
        count(&s, "SELECT COUNT(*) FROM audit_tree").await,
        (n - n.count_ones() as u64) as i64
    );
    let root = frontier.root();
    assert_eq!(s.audit_tree_head().await.unwrap(), (n, root));
    let check = s.check_audit_tree(&[], None, 0).await.unwrap();
    assert!(check.intact(), "{check:?}");
    let proofs = s.audit_inclusion_proofs("", None, 0, 100, n).await.unwrap();
    assert_eq!(proofs.len() as u64, n);
    for (e, path) in proofs {
        let leaf = merkle::leaf_of_hex(&e.hash).unwrap();
        assert_eq!(
            merkle::root_from_inclusion(e.seq - 1, n, &leaf, &path),
            root,
            "entry {}",
            e.seq
        );
    }
    // The sealer grows the migrated tree from its edge (an odd size: a leaf on it).
    s.register_dataset(
        &Dataset {
            name: "e".into(),
            version: "1".into(),
            content_sha256: SHA.into(),
            ..Default::default()
        },
        "operator:ops",
        99,
    )
    .await
    .unwrap();
    assert_eq!(s.seal_audit(10).await.unwrap(), 1);
    assert!(s.check_audit_tree(&[], None, 0).await.unwrap().intact());
    assert_eq!(s.audit_tree_head().await.unwrap().0, n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaf_migration_keeps_the_tree_whole_on_postgres() {
    let (pool, url) = unmigrated_postgres().await;
    the_leaf_migration_keeps_the_tree_whole(pool, sqlx::migrate!("../migrations/postgres"), &url)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaf_migration_keeps_the_tree_whole_on_sqlite() {
    let (pool, url, _dir) = unmigrated_sqlite().await;
    the_leaf_migration_keeps_the_tree_whole(pool, sqlx::migrate!("../migrations/sqlite"), &url)
        .await;
}

/// A new Postgres database with no schema yet, and its URL.
async fn unmigrated_postgres() -> (sqlx::AnyPool, String) {
    let base = std::env::var("HALLMARK_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("hallmark_store_{}", uuid::Uuid::new_v4().simple());
    let admin = Store::connect_admin(&format!("{base}/postgres")).await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{base}/{name}");
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    (pool, url)
}

/// A new SQLite file with no schema yet, its URL, and the folder holding it.
async fn unmigrated_sqlite() -> (sqlx::AnyPool, String, tempfile::TempDir) {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let pool = sqlx::AnyPool::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    (pool, url, dir)
}

/// An index a `CONCURRENTLY` build left invalid (0015's, the coordinator
/// killed part-way) is rebuilt when a coordinator next connects: its
/// migration's `IF NOT EXISTS` would skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_a_failed_concurrent_build_left_invalid_is_rebuilt_on_connect() {
    let (pool, url) = unmigrated_postgres().await;
    let valid = |pool: sqlx::AnyPool| async move {
        sqlx::query_scalar::<_, bool>(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'tasks_ready_model'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    Store::connect(&url, 2).await.unwrap();
    assert!(valid(pool.clone()).await);
    sqlx::query(
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'tasks_ready_model'::regclass",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(!valid(pool.clone()).await);
    let s = Store::connect(&url, 2).await.unwrap();
    assert!(valid(pool.clone()).await, "rebuilt");
    // And used: a lease goes through it.
    let w = worker(&s, "w1", 1).await;
    submit(&s, "j1", &job(2, 0), 0).await;
    assert_eq!(lease(&s, &w, 1, 100).await.len(), 1);
}

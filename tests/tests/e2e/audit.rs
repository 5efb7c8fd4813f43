//! The audit ledger end to end: a real coordinator on Postgres records what
//! a farm did, `hallmark audit verify` re-hashes the chain in its own
//! process, and every kind of tampering with the database it can be asked
//! to catch — an artifact swapped, an entry edited, an entry removed, the
//! whole chain recomputed — makes it exit 1 naming where.

use std::time::Duration;

use hallmark_e2e::*;
use hallmark_provenance::ledger::{self, EntryFields};
use hallmark_provenance::merkle;
use serde_json::Value;
use sqlx::Row;

fn audit(args: &[&str]) -> (i32, Value) {
    let out = hallmark(&[&["--json", "audit"], args].concat());
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "audit printed no JSON (exit {code}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, report)
}

fn problems(report: &Value) -> String {
    report["problems"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

async fn execute(pool: &sqlx::AnyPool, sql: &str) {
    sqlx::query(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The hash of ledger row `r` as entry `seq` after `prev`, with `body`.
fn hash_row(r: &sqlx::any::AnyRow, seq: i64, prev: &str, body: &str) -> String {
    ledger::entry_hash(
        seq as u64,
        prev,
        &EntryFields {
            at_ms: r.get("at"),
            kind: &r.get::<String, _>("kind"),
            job_id: &r.get::<String, _>("job_id"),
            subject: &r.get::<String, _>("subject"),
            actor: &r.get::<String, _>("actor"),
            body,
        },
    )
}

/// Edits entry `edited` and recomputes the whole chain around it, as
/// someone with the database and this source (but no key) could; the new
/// head's hash.
async fn rewrite_chain(pool: &sqlx::AnyPool, edited: i64) -> String {
    let rows = sqlx::query(
        "SELECT seq, at, kind, job_id, subject, actor, body FROM audit_events \
         WHERE seq IS NOT NULL ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut prev = ledger::GENESIS.to_string();
    let mut tx = pool.begin().await.unwrap();
    for r in &rows {
        let seq: i64 = r.get("seq");
        let mut body: String = r.get("body");
        if seq == edited {
            body = body.replace('"', "'");
        }
        let hash = hash_row(r, seq, &prev, &body);
        sqlx::query("UPDATE audit_events SET body = $1, prev_hash = $2, hash = $3 WHERE seq = $4")
            .bind(&body)
            .bind(&prev)
            .bind(&hash)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .unwrap();
        prev = hash;
    }
    sqlx::query("UPDATE audit_head SET hash = $1")
        .bind(&prev)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    prev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_ledger_catches_every_kind_of_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;
    let prompts = prompt_file(dir.path(), 4);
    let job_id = submit_and_finish(
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
        Duration::from_secs(60),
    )
    .await;
    // The finish is recorded by a reap pass, and sealed by the next.
    wait_for_count(
        &db,
        "the job's finish sealed",
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'finish' AND seq IS NOT NULL",
        |n| n == 1,
    )
    .await;

    let (code, report) = audit(&["--coordinator", &url, "verify", "--job", &job_id]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["job"]["submitted"], true);
    assert_eq!(
        report["job"]["completions"], 8,
        "4 generates and 4 upscales"
    );
    assert_eq!(report["job"]["artifacts"], 8);
    assert!(report["job"]["dispatches"].as_u64().unwrap() >= 2);
    let head = report["head"].as_str().unwrap().to_string();
    let entries = report["entries"].as_u64().unwrap();
    assert_eq!(head.split(':').next().unwrap(), entries.to_string());

    // The log reads back what happened, in order, with the worker named.
    let out = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "audit",
        "log",
        "--job",
        &job_id,
    ]);
    let kinds: Vec<Value> = ok(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kinds[0]["kind"], "submit");
    assert_eq!(kinds.last().unwrap()["kind"], "finish");
    let completes: Vec<&Value> = kinds.iter().filter(|e| e["kind"] == "complete").collect();
    assert_eq!(completes.len(), 8);
    assert!(
        completes
            .iter()
            .all(|e| !e["actor"].as_str().unwrap().is_empty()),
        "every completion names its worker"
    );

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();

    // 1. An artifact row swapped for another image.
    let task: String = sqlx::query_scalar(
        "SELECT task_id FROM artifacts WHERE stage = 'upscale' ORDER BY task_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let real: String = sqlx::query_scalar("SELECT sha256 FROM artifacts WHERE task_id = $1")
        .bind(&task)
        .fetch_one(&pool)
        .await
        .unwrap();
    let fake = "ee".repeat(32);
    execute(
        &pool,
        &format!("UPDATE artifacts SET sha256 = '{fake}' WHERE task_id = '{task}'"),
    )
    .await;
    let (code, report) = audit(&["--coordinator", &url, "verify", "--job", &job_id]);
    assert_eq!(code, 1, "{report:#}");
    let p = problems(&report);
    assert!(
        p.contains(&task) && p.contains(&fake) && p.contains(&real),
        "{p}"
    );
    // The chain itself is intact: without --job it checks out.
    assert_eq!(audit(&["--coordinator", &url, "verify"]).0, 0);
    execute(
        &pool,
        &format!("UPDATE artifacts SET sha256 = '{real}' WHERE task_id = '{task}'"),
    )
    .await;

    // 2. A sealed entry edited in place: the completion made to name the fake.
    let seq: i64 =
        sqlx::query_scalar("SELECT seq FROM audit_events WHERE kind = 'complete' AND subject = $1")
            .bind(&task)
            .fetch_one(&pool)
            .await
            .unwrap();
    let body: String = sqlx::query_scalar("SELECT body FROM audit_events WHERE seq = $1")
        .bind(seq)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET body = $1 WHERE seq = $2")
        .bind(body.replace(&real, &fake))
        .bind(seq)
        .execute(&pool)
        .await
        .unwrap();
    let (code, report) = audit(&["--coordinator", &url, "verify"]);
    assert_eq!(code, 1, "{report:#}");
    let p = problems(&report);
    assert!(
        p.contains(&format!("ledger entry {seq} (complete of {task})"))
            && p.contains("changed after it was sealed"),
        "{p}"
    );
    sqlx::query("UPDATE audit_events SET body = $1 WHERE seq = $2")
        .bind(&body)
        .bind(seq)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(audit(&["--coordinator", &url, "verify"]).0, 0);

    // 3. The whole chain recomputed after the edit, as someone with the
    // database and this source could: consistent, but not with the anchor.
    rewrite_chain(&pool, i64::try_from(entries).unwrap() / 2).await;
    assert_eq!(
        audit(&["--coordinator", &url, "verify"]).0,
        0,
        "a recomputed chain is consistent in itself"
    );
    let (code, report) = audit(&["--coordinator", &url, "verify", "--anchor", &head]);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains("rewritten since the anchor was taken"),
        "{report:#}"
    );

    // 4. An entry removed.
    execute(&pool, "DELETE FROM audit_events WHERE seq = 2").await;
    let (code, report) = audit(&["--coordinator", &url, "verify"]);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains("ledger entry 3 follows entry 1"),
        "{report:#}"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_render_leaves_a_sealed_ledger_to_audit() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    // Nothing rendered yet: a clear refusal, not an empty "intact" ledger.
    let out = hallmark(&["audit", "--state-dir", state, "verify"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no embedded farm state"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out_dir = dir.path().join("out");
    ok(&hallmark(&[
        "render",
        "--prompt",
        "a ledger of light",
        "--images-per-prompt",
        "2",
        "--width",
        "192",
        "--height",
        "192",
        "--state-dir",
        state,
        "-o",
        out_dir.to_str().unwrap(),
    ]));
    let (code, report) = audit(&["--state-dir", state, "verify", "--require-signed"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        report["unsealed"], 0,
        "the farm sealed everything as it stopped"
    );
    // Signed with the farm's own (local test CA) identity, up to the head.
    assert_eq!(report["checkpoint"]["trusted"], true, "{report:#}");
    assert_eq!(report["checkpoint"]["signer"], "Hallmark local");
    assert_eq!(report["checkpoint"]["seq"], report["entries"], "{report:#}");
    let out = hallmark(&["--json", "audit", "--state-dir", state, "log"]);
    let kinds: Vec<String> = ok(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for kind in ["register_worker", "submit", "dispatch", "complete"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    assert_eq!(kinds.iter().filter(|k| *k == "complete").count(), 2);
    assert_eq!(report["entries"].as_u64().unwrap() as usize, kinds.len());

    // The job's own entries prove into the signed root, on one machine too.
    let entries: Vec<Value> = ok(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    let job = entries
        .iter()
        .find(|e| e["kind"] == "submit")
        .and_then(|e| e["job_id"].as_str().map(str::to_string))
        .expect("a submission in the log");
    let (code, proof) = audit(&[
        "--state-dir",
        state,
        "prove",
        "--job",
        &job,
        "--require-signed",
    ]);
    assert_eq!(code, 0, "{proof:#}");
    assert_eq!(
        proof["proven"].as_u64().unwrap() as usize,
        entries
            .iter()
            .filter(|e| e["job_id"] == job.as_str())
            .count(),
        "{proof:#}"
    );
    assert_eq!(proof["job"]["artifacts"], 2, "{proof:#}");
    assert_eq!(
        proof["checkpoint"]["root"].as_str().map(str::len),
        Some(64),
        "{proof:#}"
    );
}

/// Runs another job and waits until it is the `n`th finish sealed, then a
/// second more, in which a coordinator would sign the head.
async fn another_job_sealed(url: &str, prompts: &std::path::Path, db: &str, n: i64) {
    submit_and_finish(url, &[prompts.to_str().unwrap()], Duration::from_secs(60)).await;
    wait_for_count(
        db,
        &format!("finish number {n} sealed"),
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'finish' AND seq IS NOT NULL",
        |c| c == n,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

/// A coordinator on Postgres that signs a checkpoint at every seal, one
/// worker, and a three-prompt job finished, its last entry sealed and signed.
struct SigningFarm {
    db: String,
    metrics: String,
    spec: CoordinatorSpec,
    coordinator: Proc,
    _worker: Proc,
    url: String,
    prompts: std::path::PathBuf,
}

/// A coordinator on `db` signing with [`test_ca`] at every seal.
fn signing_spec(db: &str, blobs: std::path::PathBuf) -> CoordinatorSpec {
    let ca = test_ca();
    CoordinatorSpec::new(db, None, blobs)
        .with("HALLMARK_SIGNING_CERT_CHAIN", ca.signer_chain.display())
        .with("HALLMARK_SIGNING_PRIVATE_KEY", ca.signer_key.display())
        .with("HALLMARK_LEDGER_CHECKPOINT_INTERVAL_MS", 0)
}

async fn signing_farm_after_one_job(dir: &std::path::Path) -> SigningFarm {
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = signing_spec(&db, dir.join("blobs")).with("HALLMARK_METRICS_LISTEN", &metrics);
    let coordinator = spec.start().await;
    let url = spec.url();
    let worker = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;
    let prompts = prompt_file(dir, 3);
    submit_and_finish(&url, &[prompts.to_str().unwrap()], Duration::from_secs(60)).await;
    // The finish sealed, and the head it ends on signed.
    wait_for_count(
        &db,
        "the head signed after the finish",
        "SELECT COUNT(*) FROM audit_checkpoints c JOIN audit_head h ON c.seq = h.seq \
         WHERE EXISTS (SELECT 1 FROM audit_events WHERE kind = 'finish' AND seq IS NOT NULL)",
        |n| n == 1,
    )
    .await;
    SigningFarm {
        db,
        metrics,
        spec,
        coordinator,
        _worker: worker,
        url,
        prompts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_checkpoint_catches_a_chain_recomputed_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let SigningFarm {
        db,
        metrics,
        spec,
        coordinator,
        _worker,
        url,
        prompts,
    } = signing_farm_after_one_job(dir.path()).await;
    let root = ca.root_cert.to_str().unwrap();
    let verify = |extra: &[&str]| {
        audit(
            &[
                &["--coordinator", &url, "verify", "--trust-anchors", root][..],
                extra,
            ]
            .concat(),
        )
    };
    let (code, report) = verify(&["--require-signed"]);
    assert_eq!(code, 0, "{report:#}");
    let checkpoint = &report["checkpoint"];
    assert_eq!(checkpoint["trusted"], true, "{report:#}");
    assert_eq!(checkpoint["signer"], "Hallmark e2e");
    let signed_seq = checkpoint["seq"].as_u64().unwrap();
    assert_eq!(
        report["head"].as_str().unwrap(),
        format!("{signed_seq}:{}", checkpoint["hash"].as_str().unwrap())
    );

    // Another deployment's roots do not vouch for the signer; a ledger with
    // no checkpoint is refused under --require-signed.
    let other = tempfile::tempdir().unwrap();
    let other_ca = hallmark_provenance::credentials::ca::init(
        other.path(),
        "Someone Else",
        hallmark_provenance::credentials::SigningAlgorithm::Es256,
    )
    .unwrap();
    let (code, report) = audit(&[
        "--coordinator",
        &url,
        "verify",
        "--trust-anchors",
        other_ca.root_cert.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains("does not chain to the trust anchors"),
        "{report:#}"
    );

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    // A checkpoint whose signature does not match what it states.
    execute(
        &pool,
        &format!("UPDATE audit_checkpoints SET at = at + 1 WHERE seq = {signed_seq}"),
    )
    .await;
    let (code, report) = verify(&[]);
    assert_eq!(code, 1, "{report:#}");
    assert!(problems(&report).contains("does not verify"), "{report:#}");
    execute(
        &pool,
        &format!("UPDATE audit_checkpoints SET at = at - 1 WHERE seq = {signed_seq}"),
    )
    .await;
    assert_eq!(verify(&["--require-signed"]).0, 0);

    // The whole chain recomputed around an edit, as someone with the
    // database and this source (but not the key) could: consistent in
    // itself, but not with what the coordinator signed — and no anchor of
    // the auditor's own is needed to see it.
    let prev = rewrite_chain(&pool, 2).await;
    let (code, report) = verify(&[]);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains(&format!(
            "ledger entry {signed_seq} now hashes to {prev}, but the coordinator signed"
        )) && problems(&report).contains("rewritten after it was signed"),
        "{report:#}"
    );

    // Nor does the coordinator sign the forged chain as it grows on it.
    another_job_sealed(&url, &prompts, &db, 2).await;
    assert_eq!(
        scalar(&db, "SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints").await,
        signed_seq as i64,
        "a checkpoint was signed over the rewritten chain"
    );
    assert_eq!(verify(&[]).0, 1);
    // Each refusal is counted for the HallmarkAuditCheckpointRefused alert
    // (and the checkpoints signed before: one at least, more when the
    // first job's entries were sealed over several passes).
    let scrape = Scrape::get(&metrics);
    assert!(
        scrape.sum("hallmark_audit_checkpoints_signed_total", &[]) >= Some(1.0)
            && scrape.sum("hallmark_audit_checkpoint_refusals_total", &[]) >= Some(1.0),
        "{}",
        scrape.text
    );

    // A checkpoint of the forged head signed with someone else's key, then
    // a restarted coordinator: it resumes from its own checkpoint, not the
    // newer foreign one, so it still signs nothing over the forged chain;
    // the auditor is told whose signature the newest checkpoint bears.
    let forged_head: (i64, String) = {
        let r = sqlx::query("SELECT seq, hash FROM audit_head")
            .fetch_one(&pool)
            .await
            .unwrap();
        (r.get("seq"), r.get("hash"))
    };
    let forged = ledger::Checkpoint {
        seq: forged_head.0 as u64,
        hash: forged_head.1,
        at_ms: 1,
        root: None,
    };
    let foreign = hallmark_provenance::credentials::detached::sign_detached(
        &other_ca.identity(None).unwrap(),
        &forged.payload(),
    )
    .unwrap();
    sqlx::query("INSERT INTO audit_checkpoints (seq, hash, at, signature) VALUES ($1, $2, $3, $4)")
        .bind(forged.seq as i64)
        .bind(&forged.hash)
        .bind(forged.at_ms)
        .bind(foreign)
        .execute(&pool)
        .await
        .unwrap();
    drop(coordinator);
    let _restarted = spec.start().await;
    another_job_sealed(&url, &prompts, &db, 3).await;
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT COUNT(*) FROM audit_checkpoints WHERE seq > {signed_seq} AND seq <> {}",
                forged.seq
            )
        )
        .await,
        0,
        "the restarted coordinator signed the forged chain"
    );
    let (code, report) = verify(&[]);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains("\"Someone Else\", whose certificate does not chain"),
        "{report:#}"
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_checkpoints_catch_a_rewrite_that_deletes_the_databases_copies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let SigningFarm {
        db,
        metrics,
        spec,
        coordinator,
        _worker,
        url,
        prompts,
    } = signing_farm_after_one_job(dir.path()).await;

    // Every checkpoint the database keeps is also a file in the blob store,
    // one an auditor can check on its own.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    let kept = sqlx::query("SELECT seq, hash, at FROM audit_checkpoints ORDER BY seq")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!kept.is_empty());
    let published = dir.path().join("blobs/ledger-checkpoints");
    for r in &kept {
        let seq: i64 = r.get("seq");
        let file = published.join(ledger::Checkpoint::published_name(seq as u64));
        let bytes = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("checkpoint {seq} was not published ({e})"));
        let (c, signature) = ledger::Checkpoint::from_published(&bytes).unwrap();
        assert_eq!(
            (c.seq as i64, c.hash.clone(), c.at_ms),
            (seq, r.get::<String, _>("hash"), r.get::<i64, _>("at"))
        );
        let root = std::fs::read_to_string(&ca.root_cert).unwrap();
        let v = hallmark_provenance::credentials::detached::verify_detached(
            &signature,
            &c.payload(),
            Some(&root),
        )
        .unwrap();
        assert_eq!(v.trusted, Some(true));
    }
    let signed_seq = scalar(&db, "SELECT MAX(seq) FROM audit_checkpoints").await;
    // The auditor keeps a copy of the newest, somewhere else.
    let copy = dir.path().join("auditor-copy.json");
    std::fs::copy(
        published.join(ledger::Checkpoint::published_name(signed_seq as u64)),
        &copy,
    )
    .unwrap();

    // Someone with the database rewrites the chain around an edit and
    // deletes every checkpoint it holds, then restarts the coordinator so
    // no replica remembers what it signed.
    drop(coordinator);
    let prev = rewrite_chain(&pool, 2).await;
    execute(&pool, "DELETE FROM audit_checkpoints").await;
    let _restarted = spec.start().await;
    let root = ca.root_cert.to_str().unwrap();
    let verify = || {
        audit(&[
            "--coordinator",
            &url,
            "verify",
            "--trust-anchors",
            root,
            "--require-signed",
        ])
    };
    // The auditor is still shown the coordinator's signature, from the
    // published copy, and the chain no longer passes through it.
    let (code, report) = verify();
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains(&format!(
            "ledger entry {signed_seq} now hashes to {prev}, but the coordinator signed"
        )),
        "{report:#}"
    );
    // Nor does the restarted coordinator sign the forged chain as it grows:
    // it resumes from the published checkpoint, not from the genesis.
    another_job_sealed(&url, &prompts, &db, 2).await;
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM audit_checkpoints").await,
        0,
        "the restarted coordinator signed the forged chain"
    );
    assert!(
        Scrape::get(&metrics).sum("hallmark_audit_checkpoint_refusals_total", &[]) >= Some(1.0)
    );
    assert_eq!(verify().0, 1);

    // With the blob store's copies gone too, the coordinator has nothing
    // signed to show; the auditor's own copy still catches the rewrite.
    std::fs::remove_dir_all(&published).unwrap();
    let (code, report) = verify();
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains("no checkpoint signed by a trusted certificate"),
        "{report:#}"
    );
    let copy_arg = copy.to_str().unwrap();
    let with_copy = |file: &str| {
        audit(&[
            "--coordinator",
            &url,
            "verify",
            "--trust-anchors",
            root,
            "--require-signed",
            "--checkpoint",
            file,
        ])
    };
    let (code, report) = with_copy(copy_arg);
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains(&format!(
            "ledger entry {signed_seq} now hashes to {prev}, but the coordinator signed"
        )) && !problems(&report).contains("no checkpoint signed"),
        "{report:#}"
    );
    assert_eq!(report["own_checkpoints"][0]["trusted"], true, "{report:#}");
    // A copy whose contents were changed does not verify, and says which
    // file it was; a file that is not there is an error naming it.
    let edited = dir.path().join("edited.json");
    let text = std::fs::read_to_string(&copy).unwrap();
    let at = ledger::Checkpoint::from_published(text.as_bytes())
        .unwrap()
        .0
        .at_ms;
    std::fs::write(
        &edited,
        text.replace(&at.to_string(), &(at + 1).to_string()),
    )
    .unwrap();
    let (code, report) = with_copy(edited.to_str().unwrap());
    assert_eq!(code, 1, "{report:#}");
    assert!(
        problems(&report).contains(&format!(
            "{}: the checkpoint at entry {signed_seq}",
            edited.display()
        )) && problems(&report).contains("does not verify"),
        "{report:#}"
    );
    let missing = hallmark(&[
        "--coordinator",
        &url,
        "audit",
        "verify",
        "--checkpoint",
        "no-such-checkpoint.json",
    ]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("--checkpoint no-such-checkpoint.json"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_time_stamped_and_wait_for_their_authority() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let db = fresh_database().await;
    let signing = signing_spec(&db, dir.path().join("blobs"));
    // An authority it could not use is refused at start, naming the setting.
    let mut refused = Proc::spawn(
        "coordinator with an https authority",
        std::process::Command::new(bin("hallmark-coordinator"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &db,
                "--blob-dir",
            ])
            .arg(dir.path().join("blobs"))
            .envs(signing.env.iter().cloned())
            .env("HALLMARK_LEDGER_TSA_URL", "https://tsa.example/")
            .env("RUST_BACKTRACE", "0"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let how = loop {
        if let Some(how) = refused.exited() {
            break how;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator started with an https time-stamp authority"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !how.contains("exit status: 0")
            && how.contains("ledger_tsa_url")
            && how.contains("http://"),
        "{how}"
    );
    // One that cannot be reached does not keep the coordinator from
    // starting, but nothing is signed without its time-stamp.
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = signing
        .with(
            "HALLMARK_LEDGER_TSA_URL",
            format!("http://127.0.0.1:{}/tsa", free_port()),
        )
        .with("HALLMARK_METRICS_LISTEN", &metrics);
    let _coordinator = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;
    let prompts = prompt_file(dir.path(), 2);
    another_job_sealed(&url, &prompts, &db, 1).await;
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM audit_checkpoints").await,
        0
    );
    assert!(
        Scrape::get(&metrics).sum("hallmark_audit_checkpoint_refusals_total", &[]) >= Some(1.0)
    );
    let (code, report) = audit(&["--coordinator", &url, "verify", "--require-signed"]);
    assert_eq!(code, 1, "{report:#}");

    // A working authority: each checkpoint carries its time, which the
    // auditor is shown beside the checkpoint's own.
    let tsa = hallmark_provenance::credentials::local_tsa::start(
        ca,
        "Hallmark e2e",
        &dir.path().join("tsa"),
    )
    .unwrap();
    let db = fresh_database().await;
    let spec = signing_spec(&db, dir.path().join("blobs-2")).with("HALLMARK_LEDGER_TSA_URL", &tsa);
    let _stamped = spec.start().await;
    let url = spec.url();
    let _w2 = start_worker(&url, "w2", 0, &[]);
    wait_for_workers(&url, 1).await;
    another_job_sealed(&url, &prompts, &db, 1).await;
    wait_for_count(
        &db,
        "the head signed",
        "SELECT COUNT(*) FROM audit_checkpoints c JOIN audit_head h ON c.seq = h.seq",
        |n| n == 1,
    )
    .await;
    let root = ca.root_cert.to_str().unwrap();
    let (code, report) = audit(&[
        "--coordinator",
        &url,
        "verify",
        "--require-signed",
        "--trust-anchors",
        root,
    ]);
    assert_eq!(code, 0, "{report:#}");
    let checkpoint = &report["checkpoint"];
    let stamped = hallmark_coordinator::auth::parse_time_ms(
        checkpoint["timestamp"]
            .as_str()
            .expect("the checkpoint is time-stamped"),
    )
    .unwrap();
    let own = checkpoint["at_ms"].as_i64().unwrap();
    assert!((stamped - own).abs() < 60_000, "{report:#}");
    // The authority's certificate comes from the same root.
    assert_eq!(checkpoint["timestamp_trusted"], true, "{report:#}");
    let text = hallmark(&[
        "--coordinator",
        &url,
        "audit",
        "verify",
        "--trust-anchors",
        root,
    ]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("time-stamped by its authority at"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

/// Waits until a signed checkpoint covers `job`'s finish.
async fn checkpoint_covers_finish(db: &str, job: &str) {
    wait_for_count(
        db,
        &format!("a checkpoint past job {job}'s finish"),
        &format!(
            "SELECT COUNT(*) FROM audit_checkpoints WHERE root IS NOT NULL AND seq >= \
             (SELECT COALESCE(MAX(seq), 1000000000) FROM audit_events WHERE kind = 'finish' AND job_id = '{job}')"
        ),
        |n| n >= 1,
    )
    .await;
}

/// A tenant proves its own job's entries into the signed Merkle root
/// without reading anyone else's, and holds a later ledger to a checkpoint
/// it kept; an entry changed, a leaf re-hashed to match, or the whole chain
/// and tree rebuilt without the key are each caught, naming the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_proves_its_jobs_entries_in_the_signed_ledger_without_reading_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (config, tokens) = super::auth::token_config(
        dir.path(),
        &[
            "tenant:acme",
            "tenant:globex",
            "worker:pool",
            "operator:ops",
        ],
    );
    let [acme, globex, worker, operator] = [0, 1, 2, 3].map(|i| tokens[i].as_str());
    let db = fresh_database().await;
    let spec =
        signing_spec(&db, dir.path().join("blobs")).with("HALLMARK_CONFIG", config.display());
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &["--token", worker]);
    // Submissions wait for a worker that can hold them.
    eventually("the worker registers", Duration::from_secs(20), || {
        let out = hallmark_as(&url, Some(operator), &["--json", "workers"]);
        let one = out.status.success() && json_of(&out).as_array().is_some_and(|w| w.len() == 1);
        async move { one }
    })
    .await;
    let job_of = |out: &std::process::Output| json_of(out)["job_id"].as_str().unwrap().to_string();
    let acme_job = job_of(&super::auth::submit(&url, acme, "synthetic-v1", &[]));
    let globex_job = job_of(&super::auth::submit(&url, globex, "synthetic-v1", &[]));
    checkpoint_covers_finish(&db, &acme_job).await;
    checkpoint_covers_finish(&db, &globex_job).await;

    let root = test_ca().root_cert.display().to_string();
    let kept = dir.path().join("kept.json");
    let kept = kept.to_str().unwrap();
    // A `hallmark --json` call as `token`: its exit code, its report (Null
    // when it printed none) and its output.
    let run = |token: &str, args: &[&str]| {
        let out = hallmark_as(&url, Some(token), &[&["--json"][..], args].concat());
        let report = serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), report, out)
    };
    let prove = |token: &str, job: &str, extra: &[&str]| {
        let args = [
            &["audit", "prove", "--job", job, "--trust-anchors", &root][..],
            extra,
        ];
        run(token, &args.concat())
    };
    let (code, report, _) = prove(
        acme,
        &acme_job,
        &["--require-signed", "--save-checkpoint", kept],
    );
    assert_eq!(code, 0, "{report:#}");
    let signed = report["checkpoint"]["seq"].as_i64().unwrap();
    assert_eq!(report["checkpoint"]["trusted"], true, "{report:#}");
    assert_eq!(
        report["proven"].as_i64().unwrap(),
        scalar(
            &db,
            &format!(
                "SELECT COUNT(*) FROM audit_events WHERE job_id = '{acme_job}' AND seq <= {signed}"
            )
        )
        .await,
        "{report:#}"
    );
    assert_eq!(report["job"]["submitted"], true, "{report:#}");
    assert_eq!(report["job"]["artifacts"], 1, "{report:#}");
    assert_eq!(report["job"]["completions"], 1, "{report:#}");
    assert!(std::fs::metadata(kept).is_ok(), "the checkpoint was kept");

    // Whoever holds one of its images checks that the signed ledger
    // recorded making exactly those bytes (`hallmark verify` online).
    let files = dir.path().join("files");
    ok(&hallmark_as(
        &url,
        Some(acme),
        &["download", &acme_job, "-o", files.to_str().unwrap()],
    ));
    let image = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a downloaded image");
    let verify = || {
        let out = hallmark_as(
            &url,
            Some(globex),
            &[
                "--json",
                "verify",
                image.to_str().unwrap(),
                "--trust-anchors",
                &root,
            ],
        );
        (out.status.code().unwrap_or(-1), json_of(&out))
    };
    let completion = scalar(
        &db,
        &format!("SELECT seq FROM audit_events WHERE job_id = '{acme_job}' AND kind = 'complete'"),
    )
    .await;
    let (code, verified) = verify();
    assert_eq!(code, 0, "{verified:#}");
    assert_eq!(verified["status"], "verified", "{verified:#}");
    let ledger = &verified["repository"]["ledger"];
    assert_eq!(ledger["proven"], true, "{verified:#}");
    assert_eq!(ledger["entry_seq"], completion, "{verified:#}");
    assert_eq!(ledger["trusted"], true, "{verified:#}");
    // Another tenant's job is not found; a tenant still cannot read the
    // whole ledger.
    let (_, _, out) = prove(globex, &acme_job, &[]);
    super::auth::refused(&out, "not found");
    super::auth::refused(
        &hallmark_as(&url, Some(acme), &["audit", "verify"]),
        "not allowed",
    );

    // The ledger grows; the kept checkpoint is held to the newer one.
    let later = job_of(&super::auth::submit(&url, globex, "synthetic-v1", &[]));
    checkpoint_covers_finish(&db, &later).await;
    let (code, report, _) = prove(acme, &acme_job, &["--checkpoint", kept]);
    assert_eq!(code, 0, "{report:#}");
    assert!(
        report["checkpoint"]["seq"].as_i64().unwrap() > signed,
        "{report:#}"
    );
    assert_eq!(report["own_checkpoints"][0]["seq"], signed, "{report:#}");

    // A stored tree node changed under the coordinator: it signs no root
    // over it (the stored edge no longer leads to the root it signed).
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    let last = scalar(&db, "SELECT MAX(seq) FROM audit_checkpoints").await;
    // (The lowest stored node on its edge: a leaf is read from its entry.)
    let edge = merkle::Frontier::ids(last as u64)
        .into_iter()
        .rfind(|id| id.level > 0)
        .unwrap();
    let at = format!("WHERE level = {} AND idx = {}", edge.level, edge.index);
    let saved: String = sqlx::query(&format!("SELECT hash FROM audit_tree {at}"))
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("hash");
    execute(
        &pool,
        &format!("UPDATE audit_tree SET hash = '{}' {at}", "ab".repeat(32)),
    )
    .await;
    let more = job_of(&super::auth::submit(&url, globex, "synthetic-v1", &[]));
    wait_for_count(
        &db,
        "the next job's finish sealed",
        &format!("SELECT COUNT(*) FROM audit_events WHERE kind = 'finish' AND job_id = '{more}' AND seq IS NOT NULL"),
        |n| n == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        scalar(&db, "SELECT MAX(seq) FROM audit_checkpoints").await,
        last,
        "a root was signed over a changed tree"
    );
    // `audit check-tree` (operators only) rebuilds the tree from the chain
    // and finds the node, and those grown on it since; `--repair` rewrites
    // them, the rebuilt tree held to the root signed last, and signing
    // resumes.
    let check_tree =
        |token: &str, extra: &[&str]| run(token, &[&["audit", "check-tree"][..], extra].concat());
    super::auth::refused(&check_tree(acme, &["--repair"]).2, "not allowed");
    let (code, found, _) = check_tree(operator, &[]);
    assert_eq!(code, 1, "{found:#}");
    assert_eq!(found["held_seq"], last, "{found:#}");
    assert_eq!(found["repaired"], false, "{found:#}");
    assert_eq!(
        (found["missing"].as_u64(), found["extra"].as_u64()),
        (Some(0), Some(0)),
        "{found:#}"
    );
    let wrong = found["wrong"].as_u64().unwrap();
    assert!(wrong >= 1, "{found:#}");
    assert!(
        found["examples"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("node {}/{} ", edge.level, edge.index)),
        "{found:#}"
    );
    let (code, repaired, _) = check_tree(operator, &["--repair"]);
    assert_eq!(code, 0, "{repaired:#}");
    assert_eq!(
        (repaired["repaired"].as_bool(), repaired["wrong"].as_u64()),
        (Some(true), Some(wrong)),
        "{repaired:#}"
    );
    let (code, intact, _) = check_tree(operator, &[]);
    assert_eq!((code, intact["wrong"].as_u64()), (0, Some(0)), "{intact:#}");
    checkpoint_covers_finish(&db, &more).await;
    assert_eq!(
        scalar(
            &db,
            &format!("SELECT COUNT(*) FROM audit_tree {at} AND hash = '{saved}'")
        )
        .await,
        1,
        "the rebuilt tree has the node as it was"
    );

    // One of the job's entries changed: it no longer hashes to itself.
    let complete: i64 = scalar(
        &db,
        &format!("SELECT seq FROM audit_events WHERE job_id = '{acme_job}' AND kind = 'complete'"),
    )
    .await;
    execute(
        &pool,
        &format!("UPDATE audit_events SET actor = 'someone' WHERE seq = {complete}"),
    )
    .await;
    // Proving fails, naming each of `said`.
    let fails_saying = |extra: &[&str], said: &[&str]| {
        let (code, report, _) = prove(acme, &acme_job, extra);
        assert_eq!(code, 1, "{report:#}");
        for what in said {
            assert!(problems(&report).contains(what), "{what:?} in {report:#}");
        }
    };
    let entry = format!("ledger entry {complete} (complete of");
    fails_saying(&[], &[&entry, "does not hash to its recorded"]);
    // The tree is not rebuilt from a chain that does not check out.
    let (code, _, out) = check_tree(operator, &["--repair"]);
    assert_ne!(code, 0);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("chain does not check out") && said.contains(&entry),
        "{said}"
    );
    // Its hash recomputed to match: now its leaf is not in the signed tree.
    let r = sqlx::query(
        "SELECT at, kind, job_id, subject, actor, body, prev_hash FROM audit_events WHERE seq = $1",
    )
    .bind(complete)
    .fetch_one(&pool)
    .await
    .unwrap();
    let rehashed = hash_row(
        &r,
        complete,
        &r.get::<String, _>("prev_hash"),
        &r.get::<String, _>("body"),
    );
    execute(
        &pool,
        &format!("UPDATE audit_events SET hash = '{rehashed}' WHERE seq = {complete}"),
    )
    .await;
    fails_saying(&[], &[&entry, "its Merkle path leads elsewhere"]);
    // The image's own credentials still verify, but the ledger no longer
    // vouches for its completion.
    let (code, verified) = verify();
    assert_eq!(code, 1, "{verified:#}");
    assert_eq!(verified["status"], "ledger_mismatch", "{verified:#}");
    assert!(
        verified["summary"]
            .as_str()
            .unwrap()
            .contains("its Merkle path leads elsewhere"),
        "{verified:#}"
    );

    // The whole chain recomputed and the tree rebuilt from it, as someone
    // with the database but not the key could: every proof is consistent
    // with the rebuilt tree, but not with the signed roots.
    let submitted: i64 = scalar(
        &db,
        &format!("SELECT seq FROM audit_events WHERE job_id = '{acme_job}' AND kind = 'submit'"),
    )
    .await;
    rewrite_chain(&pool, submitted).await;
    execute(&pool, "DELETE FROM audit_tree").await;
    execute(&pool, "UPDATE audit_head SET tree_size = 0").await;
    wait_for_count(
        &db,
        "the tree rebuilt from the rewritten chain",
        "SELECT COUNT(*) FROM audit_head WHERE tree_size = seq AND seq > 0",
        |n| n == 1,
    )
    .await;
    fails_saying(
        &["--checkpoint", kept],
        &[
            &format!("ledger entry {submitted} (submit of"),
            "its Merkle path leads elsewhere",
            &format!("the ledger signed at entry {signed} is not a prefix"),
        ],
    );
    // Nor from one that leads elsewhere than the root signed last.
    let (code, _, out) = check_tree(operator, &[]);
    assert_ne!(code, 0);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("the entries were changed, not only the tree"),
        "{said}"
    );
    pool.close().await;
}

/// The signer's last check before it signs: the stored tree over the
/// entries since its last checkpoint must have the root those entries lead
/// to. A node the sealer stored after that checkpoint — off its edge, which
/// the check before it covers — is changed: no root is signed until
/// `hallmark audit check-tree --repair` rewrites it from the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_root_is_signed_over_a_tree_node_changed_since_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca();
    let running = hallmark_coordinator::start(hallmark_coordinator::CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        database_url: format!("sqlite://{}", dir.path().join("farm.db").display()),
        blob_dir: dir.path().join("blobs"),
        signing_cert_chain: Some(ca.signer_chain.clone()),
        signing_private_key: Some(ca.signer_key.clone()),
        ledger_checkpoint_interval_ms: 0,
        // Sealing and signing happen when this test says, not on a timer.
        reap_interval_ms: 3_600_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("http://{}", running.addr);
    let state = running.state.clone();
    let register = |datasets: std::ops::Range<i64>| {
        let state = state.clone();
        async move {
            for i in datasets {
                let d = hallmark_proto::v1::Dataset {
                    name: format!("d{i}"),
                    version: "1".into(),
                    content_sha256: "0".repeat(64),
                    ..Default::default()
                };
                state
                    .store
                    .register_dataset(&d, "operator:ops", i)
                    .await
                    .unwrap();
            }
        }
    };
    let signed = || {
        let state = state.clone();
        async move {
            let (c, _) = state.store.latest_checkpoint().await.unwrap().unwrap();
            c
        }
    };
    register(0..3).await;
    state.seal_ledger().await.unwrap();
    let first = state.store.audit_head().await.unwrap().seq;
    assert_eq!(signed().await.seq, first);

    // Sealed (the tree grows) but not signed yet; then a node of the new
    // part of the tree is changed.
    register(3..9).await;
    state.store.seal_audit(100).await.unwrap();
    let grown = state.store.audit_tree_size().await.unwrap();
    assert!(grown > first);
    let old_edge = merkle::Frontier::ids(first);
    let node = merkle::Frontier::ids(grown)
        .into_iter()
        .rfind(|id| id.level > 0 && !old_edge.contains(id))
        .unwrap();
    sqlx::query("UPDATE audit_tree SET hash = $1 WHERE level = $2 AND idx = $3")
        .bind("ab".repeat(32))
        .bind(i64::from(node.level))
        .bind(node.index as i64)
        .execute(state.store.pool())
        .await
        .unwrap();
    state.seal_ledger().await.unwrap();
    assert_eq!(
        signed().await.seq,
        first,
        "a root was signed over a tree changed since the last checkpoint"
    );

    let out = hallmark_as(&url, None, &["--json", "audit", "check-tree", "--repair"]);
    let report = json_of(&out);
    assert!(out.status.success(), "{report:#}");
    assert_eq!(
        (
            report["wrong"].as_u64(),
            report["held_seq"].as_u64(),
            report["repaired"].as_bool()
        ),
        (Some(1), Some(first), Some(true)),
        "{report:#}"
    );
    // Repaired, the tree (and the repair's own entry) is signed.
    state.seal_ledger().await.unwrap();
    let c = signed().await;
    assert_eq!(c.seq, state.store.audit_head().await.unwrap().seq);
    assert_eq!(c.seq, grown + 1);
    let (_, root) = state.store.audit_tree_head().await.unwrap();
    assert_eq!(c.root, root.map(|r| merkle::to_hex(&r)));
    drop(state);
    running.stop().await.unwrap();
}

/// With authentication off nothing checks who calls, and the ledger named
/// no one for a cancel. The CLI now says who runs it (`USER@HOST`), and
/// the ledger names that, marked unverified; odd characters in it are
/// written as `_`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_off_the_ledger_names_who_the_cli_says_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    let as_user = |user: &str, args: &[&str]| {
        let out = hallmark_command(&url, None, args)
            .env("USER", user)
            .output()
            .expect("run hallmark");
        ok(&out)
    };
    // A model registered, and served by no worker: the job waits.
    let args = register_unserved_model_args(dir.path(), "idle");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    as_user("dave", &args);
    let prompts = prompt_file(dir.path(), 2);
    let submitted = as_user(
        "alice",
        &[
            "--json",
            "submit",
            prompts.to_str().unwrap(),
            "--model",
            "idle",
            "--queue-unservable",
        ],
    );
    let job_id = serde_json::from_str::<Value>(&submitted).unwrap()["job_id"]
        .as_str()
        .expect("submit prints the job id")
        .to_string();
    as_user("bob smith\u{e9}", &["cancel", &job_id]);
    wait_for_count(
        &db,
        "the cancel sealed",
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'cancel' AND job_id = '{job_id}' AND seq IS NOT NULL"
        ),
        |n| n == 1,
    )
    .await;
    let log = as_user("carol", &["--json", "audit", "log", "--job", &job_id]);
    let actors: Vec<(String, String)> = log
        .lines()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            (
                e["kind"].as_str().unwrap().to_string(),
                e["actor"].as_str().unwrap().to_string(),
            )
        })
        .filter(|(kind, _)| kind == "submit" || kind == "cancel")
        .collect();
    let host = hallmark_proto::client::hostname();
    // Entries seal in order: the registration before the cancel.
    let all = as_user("carol", &["--json", "audit", "log"]);
    let registered = all
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["kind"] == "register_model")
        .expect("the registration is logged");
    assert_eq!(registered["actor"], format!("unverified:dave@{host}"));
    assert_eq!(
        actors,
        [
            ("submit".to_string(), format!("unverified:alice@{host}")),
            (
                "cancel".to_string(),
                format!("unverified:bob_smith_@{host}")
            ),
        ]
    );
}

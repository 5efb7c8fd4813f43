//! `hallmark-ledger-bench`: what the audit ledger's Merkle tree costs the
//! sealer, and what its proofs cost the coordinator.
//!
//! On a fresh Postgres database and a fresh SQLite file it appends ledger
//! entries (rows as the farm's actions append them), then, alternately and
//! twice, seals a batch with the tree following (the normal path) and a
//! batch with no tree (the sealing before the tree, the in-run baseline),
//! and reports entries sealed per second for each and their ratio; then the
//! whole chain's catch-up into the tree, as after the upgrade (leaves per
//! second), and the cost of a job's inclusion proofs and of consistency
//! proofs.
//!
//! `cargo run --release -p hallmark-e2e --bin hallmark-ledger-bench -- --entries 20000`

use std::time::Instant;

use clap::Parser;
use hallmark_coordinator::store::Store;
use hallmark_provenance::merkle;

#[derive(Parser, Debug)]
struct Args {
    /// Entries sealed per timed batch.
    #[arg(long, default_value_t = 20_000)]
    entries: u32,
    /// Entries per sealing transaction (the coordinator's batch).
    #[arg(long, default_value_t = 2000)]
    seal_batch: u32,
    /// postgres, sqlite or both.
    #[arg(long, default_value = "both")]
    store: String,
}

/// Every tenth entry is the proven job's.
const JOB: &str = "bench-job";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stores = hallmark_e2e::stores_named(&args.store)?;
    println!(
        "hallmark-ledger-bench: {} entries per timed batch, {} per sealing transaction",
        args.entries, args.seal_batch
    );
    for name in stores {
        let dir = tempfile::tempdir()?;
        let store = hallmark_e2e::bench_store(name, dir.path()).await?;
        run(name, &store, &args).await?;
    }
    Ok(())
}

async fn run(name: &str, store: &Store, args: &Args) -> anyhow::Result<()> {
    // One entry sealed with the tree, so both modes start from a chain.
    append(store, 1, 0).await?;
    store.seal_audit(args.seal_batch).await?;
    let mut with_tree = Vec::new();
    let mut without = Vec::new();
    for round in 0..2 {
        for follow in [true, false] {
            // Attached: the tree holds every entry, so sealing grows it.
            // Detached: no tree (as before it existed), so sealing leaves it.
            if follow {
                catch_up(store, args.seal_batch).await?;
            } else {
                sqlx::query("DELETE FROM audit_tree")
                    .execute(store.pool())
                    .await?;
                sqlx::query("UPDATE audit_head SET tree_size = 0 WHERE id = 1")
                    .execute(store.pool())
                    .await?;
            }
            append(store, args.entries, round * 2 + i64::from(follow)).await?;
            let started = Instant::now();
            let mut sealed = 0;
            while sealed < u64::from(args.entries) {
                sealed += store.seal_audit(args.seal_batch).await?;
            }
            let rate = sealed as f64 / started.elapsed().as_secs_f64();
            if follow {
                with_tree.push(rate);
            } else {
                without.push(rate);
            }
        }
    }
    // The whole chain joins the tree, as after the upgrade.
    let started = Instant::now();
    let grown = catch_up(store, args.seal_batch).await?;
    let catch_up_rate = grown as f64 / started.elapsed().as_secs_f64();
    let (size, _) = store.audit_tree_head().await?;
    anyhow::ensure!(
        size == store.audit_head().await?.seq,
        "the tree did not catch up"
    );

    // A job's proofs: every tenth entry is its.
    let started = Instant::now();
    let mut proven = 0;
    let mut after = 0;
    loop {
        let page = store
            .audit_inclusion_proofs(JOB, None, after, 500, size)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = last.seq;
        proven += page.len();
    }
    let per_proof_us = started.elapsed().as_secs_f64() * 1e6 / proven as f64;
    let started = Instant::now();
    let olds = [1, size / 3, size / 2, size - 1];
    for old in olds {
        let p = store.audit_consistency_proof(old, size).await?;
        anyhow::ensure!(p.len() <= 2 * 64, "a long proof");
    }
    let consistency_ms = started.elapsed().as_secs_f64() * 1e3 / olds.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{name:<9} seal with tree {:.0} / {:.0} entries/s, without {:.0} / {:.0} (ratio {:.2}); catch-up {:.0} leaves/s; \
         {proven} inclusion proofs in a tree of {size}: {per_proof_us:.0} µs each; consistency proof {consistency_ms:.1} ms",
        with_tree[0],
        with_tree[1],
        without[0],
        without[1],
        mean(&with_tree) / mean(&without),
        catch_up_rate,
    );
    // The proofs lead to the tree's root (a bench that measured wrong
    // answers would be worthless).
    let (_, root) = store.audit_tree_head().await?;
    let proofs = store.audit_inclusion_proofs(JOB, None, 0, 3, size).await?;
    for (e, path) in proofs {
        let leaf = merkle::leaf_of_hex(&e.hash).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            merkle::root_from_inclusion(e.seq - 1, size, &leaf, &path) == root,
            "entry {}'s proof does not lead to the root",
            e.seq
        );
    }
    Ok(())
}

/// Grows the tree to the chain's head; the leaves added.
async fn catch_up(store: &Store, batch: u32) -> anyhow::Result<u64> {
    let mut grown = 0;
    loop {
        match store.grow_audit_tree(batch).await? {
            0 => return Ok(grown),
            n => grown += n,
        }
    }
}

/// Appends `n` entries shaped like dispatch entries, every tenth the job's.
async fn append(store: &Store, n: u32, salt: i64) -> anyhow::Result<()> {
    let mut tx = store.pool().begin().await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut sql = String::from(
            "INSERT INTO audit_events (at, kind, job_id, subject, actor, body) VALUES ",
        );
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p = i * 3;
                format!(
                    "({}, 'dispatch', ${}, ${}, 'w-1', ${})",
                    salt,
                    p + 1,
                    p + 2,
                    p + 3
                )
            })
            .collect();
        sql.push_str(&rows.join(", "));
        let mut q = sqlx::query(&sql);
        for i in chunk {
            let job = if i % 10 == 0 { JOB } else { "other-job" };
            q = q
                .bind(job)
                .bind(format!("t-{salt}-{i}"))
                .bind(format!(r#"{{"tasks":[["t-{salt}-{i}",{i}]]}}"#));
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

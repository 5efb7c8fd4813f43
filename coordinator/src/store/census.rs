//! A census of the farm's open work, read for the metrics endpoint: tasks of
//! unfinished jobs by state, stage, tenant and model, open jobs, live workers (in all
//! and per model they serve) and the audit entries waiting to be sealed.
//!
//! Every count reads rows that indexes reach directly (running and paused
//! jobs, the unsealed ledger entries), so a scrape costs the open work, not
//! the farm's whole history.

use sqlx::Row;

use super::{Result, Store};

/// How many open tasks share one state, stage, engine, model and tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskCount {
    /// `waiting`, `ready`, `held` or `leased`.
    pub state: String,
    pub stage: String,
    pub tenant: String,
    pub engine: String,
    pub model_id: String,
    pub count: u64,
}

/// How many live workers serve one engine and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelWorkers {
    pub engine: String,
    pub model_id: String,
    pub live: u64,
}

/// The farm's open work at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Tasks of running and paused jobs not yet finished, grouped.
    pub tasks: Vec<TaskCount>,
    pub running_jobs: u64,
    pub paused_jobs: u64,
    /// Workers seen since `live_since`.
    pub live_workers: u64,
    /// Those workers per engine and model they serve (a worker serving two
    /// models counts for each).
    pub model_workers: Vec<ModelWorkers>,
    pub unsealed_audit_entries: u64,
}

impl Store {
    /// Counts the open work; workers seen since `live_since` are live.
    pub async fn census(&self, live_since: i64) -> Result<Census> {
        let rows = sqlx::query(
            "SELECT t.state, t.stage, t.tenant, t.engine, t.model_id, COUNT(*) AS n \
             FROM jobs j JOIN tasks t ON t.job_id = j.id \
             WHERE j.state IN ('running', 'paused') \
             AND t.state IN ('waiting', 'ready', 'held', 'leased') \
             GROUP BY t.state, t.stage, t.tenant, t.engine, t.model_id \
             ORDER BY t.state, t.stage, t.tenant, t.engine, t.model_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut census = Census::default();
        for r in rows {
            census.tasks.push(TaskCount {
                state: r.try_get("state")?,
                stage: r.try_get("stage")?,
                tenant: r.try_get("tenant")?,
                engine: r.try_get("engine")?,
                model_id: r.try_get("model_id")?,
                count: r.try_get::<i64, _>("n")? as u64,
            });
        }
        for r in sqlx::query(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE state IN ('running', 'paused') GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let n = r.try_get::<i64, _>("n")? as u64;
            match r.try_get::<String, _>("state")?.as_str() {
                "running" => census.running_jobs = n,
                _ => census.paused_jobs = n,
            }
        }
        census.live_workers =
            sqlx::query("SELECT COUNT(*) AS n FROM workers WHERE last_seen_at >= $1")
                .bind(live_since)
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>("n")? as u64;
        for r in sqlx::query(
            "SELECT m.engine, m.model_id, COUNT(*) AS n FROM workers w \
             JOIN worker_models m ON m.worker_id = w.id WHERE w.last_seen_at >= $1 \
             GROUP BY m.engine, m.model_id ORDER BY m.engine, m.model_id",
        )
        .bind(live_since)
        .fetch_all(&self.pool)
        .await?
        {
            census.model_workers.push(ModelWorkers {
                engine: r.try_get("engine")?,
                model_id: r.try_get("model_id")?,
                live: r.try_get::<i64, _>("n")? as u64,
            });
        }
        census.unsealed_audit_entries =
            sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE seq IS NULL")
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>("n")? as u64;
        Ok(census)
    }
}

//! Human and `--json` renderings of jobs, artifacts, workers and the registry.

use hallmark_coordinator::auth::format_time_ms;
use hallmark_proto::v1::{Artifact, Dataset, Job, Model, StoredInput, WorkerInfo};
use serde_json::{Value, json};

pub fn job_json(j: &Job) -> Value {
    json!({
        "job_id": j.job_id, "state": j.state, "tenant": j.tenant, "priority": j.priority,
        "engine": j.engine, "model_id": j.model_id, "items": j.items,
        "stages": j.stages.iter().map(|s| json!({
            "stage": s.stage, "total": s.total, "waiting": s.waiting, "ready": s.ready,
            "leased": s.leased, "succeeded": s.succeeded, "failed": s.failed, "canceled": s.canceled,
            "progress": s.progress, "model_id": s.model_id,
        })).collect::<Vec<_>>(),
        "created_at_ms": j.created_at_ms, "finished_at_ms": j.finished_at_ms,
        "queue_position": j.queue_position, "waiting_reason": j.waiting_reason,
        "eta_ms": j.eta_ms, "labels": j.labels, "errors": j.errors,
    })
}

pub fn artifact_json(a: &Artifact) -> Value {
    json!({
        "sha256": a.sha256, "job_id": a.job_id, "task_id": a.task_id, "item_index": a.item_index,
        "stage": a.stage, "model_id": a.model_id, "parent_sha256": a.parent_sha256,
        "worker_id": a.worker_id, "size": a.size, "media_type": a.media_type,
        "width": a.width, "height": a.height, "created_at_ms": a.created_at_ms,
        "seed": a.seed, "prompt": a.prompt, "mask_sha256": a.mask_sha256,
    })
}

pub fn worker_json(w: &WorkerInfo) -> Value {
    json!({
        "worker_id": w.worker_id, "name": w.name, "hostname": w.hostname, "engines": w.engines,
        "models": w.models, "max_pixels": w.max_pixels, "max_batch": w.max_batch,
        "last_seen_ms": w.last_seen_ms, "live": w.live, "leased_tasks": w.leased_tasks,
        "loaded_model": w.loaded_model, "principal": w.principal,
        "client_certificate": w.client_certificate,
    })
}

pub fn model_json(m: &Model) -> Value {
    json!({
        "model_id": m.model_id, "family": m.family, "license": m.license,
        "parent_model_id": m.parent_model_id, "training_datasets": m.training_datasets,
        "weights": m.weights.iter().map(|w| json!({"path": w.path, "sha256": w.sha256, "size": w.size})).collect::<Vec<_>>(),
        "config_json": m.config_json, "created_at_ms": m.created_at_ms,
        "refines_only": m.refines_only,
        "inpaints_only": m.inpaints_only,
    })
}

pub fn dataset_json(d: &Dataset) -> Value {
    json!({
        "name": d.name, "version": d.version, "uri": d.uri, "content_sha256": d.content_sha256,
        "license": d.license, "created_at_ms": d.created_at_ms,
    })
}

pub fn input_json(i: &StoredInput) -> Value {
    let image = i.image.clone().unwrap_or_default();
    json!({
        "sha256": image.sha256, "media_type": image.media_type,
        "width": image.width, "height": image.height, "size": image.size,
        "uploaded_at_ms": i.uploaded_at_ms, "last_used_at_ms": i.last_used_at_ms,
        "purge_after_ms": i.purge_after_ms,
    })
}

/// `SHA256  W×H  SIZE bytes  last used TIME  purged after TIME|never`.
pub fn input_text(i: &StoredInput) -> String {
    let image = i.image.clone().unwrap_or_default();
    let purge = if i.purge_after_ms == 0 {
        "kept until deleted".to_string()
    } else {
        format!("purged after {}", format_time_ms(i.purge_after_ms))
    };
    format!(
        "{}  {}×{}  {} bytes  last used {}  {purge}",
        image.sha256,
        image.width,
        image.height,
        image.size,
        format_time_ms(i.last_used_at_ms)
    )
}

/// One line per stage: `generate  180/200 done, 4 running, 0 failed`.
pub fn job_text(j: &Job) -> String {
    let mut s = format!(
        "job {}  {}  tenant {}  model {}  {} items\n",
        j.job_id, j.state, j.tenant, j.model_id, j.items
    );
    for st in &j.stages {
        s.push_str(&format!(
            "  {:<9} {:>6}/{:<6} done ({:>3.0}%)  {:>4} running  {:>4} ready  {:>4} waiting  {:>4} failed  {:>4} canceled\n",
            st.stage,
            st.succeeded,
            st.total,
            st.progress * 100.0,
            st.leased,
            st.ready,
            st.waiting,
            st.failed,
            st.canceled
        ));
        if !st.model_id.is_empty() && st.model_id != j.model_id {
            s.insert_str(s.len() - 1, &format!("  model {}", st.model_id));
        }
    }
    if j.state == "running" && j.queue_position > 0 {
        s.push_str(&format!(
            "  queue position: {} ready tasks ahead\n",
            j.queue_position
        ));
    }
    if !j.waiting_reason.is_empty() {
        s.push_str(&format!("  waiting: {}\n", j.waiting_reason));
    }
    if j.eta_ms > 0 && j.state == "running" {
        s.push_str(&format!("  eta: {}\n", human_ms(j.eta_ms)));
    }
    for e in &j.errors {
        s.push_str(&format!("  error: {e}\n"));
    }
    s
}

pub fn human_ms(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}.{}s", secs, ms % 1000 / 100)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the Unix epoch.
pub fn utc(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01, by 400-year eras of 146097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let secs = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century divisible by 400).
        assert_eq!(super::utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(super::utc(1_796_515_199_999), "2026-12-05T23:59:59.999Z");
        assert_eq!(super::utc(-1), "1969-12-31T23:59:59.999Z");
    }
}

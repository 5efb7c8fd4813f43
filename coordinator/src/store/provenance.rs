//! The manifest repository's reads: an artifact by watermark id, sha256 or
//! manifest label, with the manifest it was signed with and the facts the
//! lineage needs.

use hallmark_proto::v1::ArtifactRecord;
use sqlx::Row;

use super::{Result, Store};

/// How a stored artifact is looked up.
#[derive(Debug, Clone)]
pub enum ArtifactKey<'a> {
    WatermarkId(&'a str),
    Sha256(&'a str),
    ManifestLabel(&'a str),
}

/// An artifact row with its manifest; `record.prompt` is filled here and
/// cleared by the caller for other tenants.
#[derive(Debug, Clone)]
pub struct StoredArtifact {
    pub record: ArtifactRecord,
    pub manifest: Vec<u8>,
}

impl Store {
    pub async fn find_artifact(&self, key: ArtifactKey<'_>) -> Result<Option<StoredArtifact>> {
        let (column, value) = match key {
            ArtifactKey::WatermarkId(v) => ("a.watermark_id", v.to_ascii_lowercase()),
            ArtifactKey::Sha256(v) => ("a.sha256", v.to_ascii_lowercase()),
            ArtifactKey::ManifestLabel(v) => ("a.manifest_label", v.to_string()),
        };
        let sql = format!(
            "SELECT a.task_id, a.job_id, a.item_index, a.stage, a.model_id, a.worker_id, \
             a.watermark_id, a.media_type, a.width, a.height, a.created_at, a.parent_sha256, \
             a.manifest_label, a.sha256, a.manifest, a.mask_sha256, j.tenant, i.prompt, i.seed \
             FROM artifacts a JOIN jobs j ON j.id = a.job_id \
             JOIN items i ON i.job_id = a.job_id AND i.item_index = a.item_index \
             WHERE {column} = $1 ORDER BY a.created_at LIMIT 1"
        );
        let Some(r) = sqlx::query(&sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let record = ArtifactRecord {
            sha256: r.try_get("sha256")?,
            job_id: r.try_get("job_id")?,
            task_id: r.try_get("task_id")?,
            item_index: r.try_get::<i64, _>("item_index")? as u64,
            stage: r.try_get("stage")?,
            model_id: r.try_get("model_id")?,
            worker_id: r.try_get("worker_id")?,
            watermark_id: r
                .try_get::<Option<String>, _>("watermark_id")?
                .unwrap_or_default(),
            media_type: r.try_get("media_type")?,
            width: r.try_get::<i64, _>("width")? as u32,
            height: r.try_get::<i64, _>("height")? as u32,
            created_at_ms: r.try_get("created_at")?,
            parent_sha256: r
                .try_get::<Option<String>, _>("parent_sha256")?
                .unwrap_or_default(),
            manifest_label: r
                .try_get::<Option<String>, _>("manifest_label")?
                .unwrap_or_default(),
            tenant: r.try_get("tenant")?,
            seed: r.try_get::<i64, _>("seed")? as u64,
            prompt: r.try_get("prompt")?,
            mask_sha256: r
                .try_get::<Option<String>, _>("mask_sha256")?
                .unwrap_or_default(),
        };
        let manifest: Option<Vec<u8>> = r.try_get("manifest")?;
        Ok(Some(StoredArtifact {
            record,
            manifest: manifest.unwrap_or_default(),
        }))
    }
}

//! Registry: models (with weight hashes, parent model and training datasets)
//! and datasets, the roots of every artifact's lineage.

use hallmark_proto::v1::{Dataset, Model, WeightFile};
use sqlx::Row;

use super::audit::{self, AuditEvent, kind};
use super::{Result, Store, StoreError};

fn check_sha256(field: &str, value: &str) -> Result<()> {
    if !hallmark_provenance::is_sha256_hex(value) {
        return Err(StoreError::Refused(format!(
            "{field}: {value:?} is not a sha256 (64 hex digits)"
        )));
    }
    Ok(())
}

impl Store {
    /// Registers (or updates) a dataset.
    /// `actor` is who registers it, for the audit ledger (empty: unknown).
    pub async fn register_dataset(&self, d: &Dataset, actor: &str, now: i64) -> Result<Dataset> {
        if d.name.trim().is_empty() || d.version.trim().is_empty() {
            return Err(StoreError::Refused(
                "dataset name and version are required".into(),
            ));
        }
        check_sha256("content_sha256", &d.content_sha256)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO datasets (name, version, uri, content_sha256, license, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name, version) DO UPDATE SET uri = excluded.uri, content_sha256 = excluded.content_sha256, license = excluded.license",
        )
        .bind(&d.name)
        .bind(&d.version)
        .bind(&d.uri)
        .bind(d.content_sha256.to_ascii_lowercase())
        .bind(&d.license)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new(
            kind::REGISTER_DATASET,
            format!("{}@{}", d.name, d.version),
            serde_json::json!({
                "uri": d.uri,
                "content_sha256": d.content_sha256.to_ascii_lowercase(),
                "license": d.license,
            }),
        )
        .actor(actor);
        audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        Ok(Dataset {
            created_at_ms: now,
            content_sha256: d.content_sha256.to_ascii_lowercase(),
            ..d.clone()
        })
    }

    pub async fn list_datasets(&self) -> Result<Vec<Dataset>> {
        let rows = sqlx::query(
            "SELECT name, version, uri, content_sha256, license, created_at FROM datasets ORDER BY name, version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Dataset {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    uri: r.try_get("uri")?,
                    content_sha256: r.try_get("content_sha256")?,
                    license: r.try_get("license")?,
                    created_at_ms: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Registers (or replaces) a model with its weight files and training
    /// datasets; the parent model and datasets must already be registered.
    /// `actor` is who registers it, for the audit ledger (empty: unknown).
    pub async fn register_model(&self, m: &Model, actor: &str, now: i64) -> Result<Model> {
        if m.model_id.trim().is_empty() {
            return Err(StoreError::Refused("model_id is required".into()));
        }
        if m.weights.is_empty() {
            return Err(StoreError::Refused(
                "a model needs at least one weight file with its sha256".into(),
            ));
        }
        for w in &m.weights {
            check_sha256(&format!("weights[{}].sha256", w.path), &w.sha256)?;
        }
        let mut tx = self.pool.begin().await?;
        if !m.parent_model_id.is_empty() {
            let found = sqlx::query("SELECT id FROM models WHERE id = $1")
                .bind(&m.parent_model_id)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(StoreError::NotFound(format!(
                    "parent model {:?} is not registered",
                    m.parent_model_id
                )));
            }
        }
        sqlx::query(
            "INSERT INTO models (id, family, license, parent_model_id, config_json, created_at, refines_only, inpaints_only) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET family = excluded.family, license = excluded.license, \
             parent_model_id = excluded.parent_model_id, config_json = excluded.config_json, \
             refines_only = excluded.refines_only, inpaints_only = excluded.inpaints_only",
        )
        .bind(&m.model_id)
        .bind(&m.family)
        .bind(&m.license)
        .bind((!m.parent_model_id.is_empty()).then_some(m.parent_model_id.as_str()))
        .bind(if m.config_json.is_empty() { "{}" } else { m.config_json.as_str() })
        .bind(now)
        .bind(i64::from(m.refines_only))
        .bind(i64::from(m.inpaints_only))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM model_weights WHERE model_id = $1")
            .bind(&m.model_id)
            .execute(&mut *tx)
            .await?;
        for w in &m.weights {
            sqlx::query(
                "INSERT INTO model_weights (model_id, path, sha256, size) VALUES ($1, $2, $3, $4)",
            )
            .bind(&m.model_id)
            .bind(&w.path)
            .bind(w.sha256.to_ascii_lowercase())
            .bind(w.size as i64)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM model_datasets WHERE model_id = $1")
            .bind(&m.model_id)
            .execute(&mut *tx)
            .await?;
        for key in &m.training_datasets {
            let (name, version) = key.rsplit_once('@').ok_or_else(|| {
                StoreError::Refused(format!(
                    "training dataset {key:?} must be written name@version"
                ))
            })?;
            let found = sqlx::query("SELECT name FROM datasets WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(StoreError::NotFound(format!(
                    "training dataset {key:?} is not registered (`hallmark datasets register` first)"
                )));
            }
            sqlx::query("INSERT INTO model_datasets (model_id, dataset_name, dataset_version) VALUES ($1, $2, $3)")
                .bind(&m.model_id)
                .bind(name)
                .bind(version)
                .execute(&mut *tx)
                .await?;
        }
        let event = AuditEvent::new(
            kind::REGISTER_MODEL,
            &m.model_id,
            serde_json::json!({
                "family": m.family,
                "license": m.license,
                "parent_model_id": m.parent_model_id,
                "weights": m.weights.iter().map(|w| serde_json::json!({
                    "path": w.path,
                    "sha256": w.sha256.to_ascii_lowercase(),
                    "size": w.size,
                })).collect::<Vec<_>>(),
                "weights_sha256": hallmark_provenance::weights_digest(
                    m.weights.iter().map(|w| (w.path.as_str(), w.sha256.as_str())),
                ),
                "training_datasets": m.training_datasets,
                "config_sha256": hallmark_provenance::sha256_hex(m.config_json.as_bytes()),
                "refines_only": m.refines_only,
                "inpaints_only": m.inpaints_only,
            }),
        )
        .actor(actor);
        audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        Ok(Model {
            created_at_ms: now,
            ..m.clone()
        })
    }

    pub async fn list_models(&self) -> Result<Vec<Model>> {
        let rows = sqlx::query(
            "SELECT id, family, license, parent_model_id, config_json, created_at, refines_only, inpaints_only \
             FROM models ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get("id")?;
            let weights = sqlx::query(
                "SELECT path, sha256, size FROM model_weights WHERE model_id = $1 ORDER BY path",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|w| {
                Ok(WeightFile {
                    path: w.try_get("path")?,
                    sha256: w.try_get("sha256")?,
                    size: w.try_get::<i64, _>("size")? as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
            let datasets = sqlx::query(
                "SELECT dataset_name, dataset_version FROM model_datasets WHERE model_id = $1 ORDER BY dataset_name",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|d| Ok(format!("{}@{}", d.try_get::<String, _>("dataset_name")?, d.try_get::<String, _>("dataset_version")?)))
            .collect::<Result<Vec<_>>>()?;
            out.push(Model {
                model_id: id,
                family: r.try_get("family")?,
                weights,
                license: r.try_get("license")?,
                parent_model_id: r
                    .try_get::<Option<String>, _>("parent_model_id")?
                    .unwrap_or_default(),
                training_datasets: datasets,
                config_json: r.try_get("config_json")?,
                created_at_ms: r.try_get("created_at")?,
                refines_only: r.try_get::<i64, _>("refines_only")? != 0,
                inpaints_only: r.try_get::<i64, _>("inpaints_only")? != 0,
            });
        }
        Ok(out)
    }
}

//! The worker's metrics, exported for Prometheus on `--metrics-listen`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const TASKS: &str = "hallmark_worker_tasks_total";
pub const BATCH_TASKS: &str = "hallmark_worker_batch_tasks";
pub const RENDER_SECONDS: &str = "hallmark_worker_render_seconds";
pub const STAMP_SECONDS: &str = "hallmark_worker_stamp_seconds";
pub const UPLOAD_SECONDS: &str = "hallmark_worker_upload_seconds";
pub const BUSY: &str = "hallmark_worker_busy";
pub const LEASE_ERRORS: &str = "hallmark_worker_lease_errors_total";
pub const MODEL_LOAD_SECONDS: &str = "hallmark_worker_model_load_seconds";
pub const MODEL_EVICTIONS: &str = "hallmark_worker_model_evictions_total";
pub const MODELS_LOADED: &str = "hallmark_worker_models_loaded";
pub const MODEL_CACHE_BYTES: &str = "hallmark_worker_model_cache_bytes";

/// Gives every metric its help text (call once the recorder is installed).
pub fn describe() {
    describe_counter!(
        TASKS,
        "Leased tasks by how they ended here: completed, failed, dropped (lease lost or revoked) or handed_back (shutdown)."
    );
    describe_histogram!(BATCH_TASKS, "Tasks per leased batch.");
    describe_histogram!(
        RENDER_SECONDS,
        Unit::Seconds,
        "Engine time of one batch, by engine and stage."
    );
    describe_histogram!(
        STAMP_SECONDS,
        Unit::Seconds,
        "Watermark, encode and sign time of one image."
    );
    describe_histogram!(
        UPLOAD_SECONDS,
        Unit::Seconds,
        "Time of one Complete call (a batch's uploads, recorded in one transaction)."
    );
    describe_gauge!(
        BUSY,
        "Batches in hand (rendering, stamping or uploading): 0 to 2 per worker in the process (one renders while the last is stamped and uploaded)."
    );
    describe_histogram!(
        MODEL_LOAD_SECONDS,
        Unit::Seconds,
        "Diffusion models loaded into the cache (weights re-hashed, then read), by model: the count is the loads."
    );
    describe_counter!(
        MODEL_EVICTIONS,
        "Models evicted from the cache to fit its budget (--model-cache-gb)."
    );
    describe_gauge!(MODELS_LOADED, "Diffusion models held in the cache.");
    describe_gauge!(
        MODEL_CACHE_BYTES,
        Unit::Bytes,
        "Weight bytes of the models held in the cache."
    );
    describe_counter!(
        LEASE_ERRORS,
        "Lease calls that failed (coordinator unreachable or erroring); the worker backs off."
    );
}

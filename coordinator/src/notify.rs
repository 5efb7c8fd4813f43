//! Wake-ups and job events.
//!
//! In-process, a [`tokio::sync::Notify`] wakes lease calls waiting for work
//! and a broadcast channel carries "job changed" events to `watch` streams.
//! With Redis configured, both are also published on Redis channels so every
//! coordinator replica hears them, and worker presence keys are kept there.
//! Redis only carries hints: when it is down, publishes are dropped, waiting
//! lease calls fall back to their poll interval, and the subscriber
//! reconnects with back-off (DESIGN invariant 1).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, broadcast, mpsc};

const WAKE_CHANNEL: &str = "hallmark:wake";
const JOB_CHANNEL: &str = "hallmark:job";

enum Outgoing {
    Wake,
    Job(String),
    Presence(String, u64),
}

/// Wake-ups and job events for this replica, mirrored to Redis when configured.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    wake: Notify,
    jobs: broadcast::Sender<String>,
    redis: Option<mpsc::UnboundedSender<Outgoing>>,
    replica: String,
}

impl Notifier {
    /// A notifier for a single node: in-process only.
    pub fn local() -> Self {
        Self::build(None, String::new())
    }

    /// A notifier that also publishes to and listens on Redis at `url`.
    pub fn with_redis(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let replica = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let notifier = Self::build(Some(tx), replica);
        tokio::spawn(publisher(client.clone(), rx));
        tokio::spawn(subscriber(client, notifier.clone()));
        Ok(notifier)
    }

    fn build(redis: Option<mpsc::UnboundedSender<Outgoing>>, replica: String) -> Self {
        let (jobs, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                wake: Notify::new(),
                jobs,
                redis,
                replica,
            }),
        }
    }

    /// Tasks became ready: wake lease calls here and on every replica.
    pub fn tasks_ready(&self) {
        self.inner.wake.notify_waiters();
        self.send(Outgoing::Wake);
    }

    /// A job's progress changed: tell watchers here and on every replica.
    pub fn job_changed(&self, job_id: &str) {
        let _ = self.inner.jobs.send(job_id.to_string());
        self.send(Outgoing::Job(job_id.to_string()));
    }

    /// Records in Redis that a worker is alive, for `ttl_ms`.
    pub fn worker_seen(&self, worker_id: &str, ttl_ms: u64) {
        self.send(Outgoing::Presence(worker_id.to_string(), ttl_ms));
    }

    /// The wake-up that lease calls wait on.
    pub fn wake(&self) -> &Notify {
        &self.inner.wake
    }

    /// Job ids, as they change.
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<String> {
        self.inner.jobs.subscribe()
    }

    fn send(&self, msg: Outgoing) {
        if let Some(tx) = &self.inner.redis {
            let _ = tx.send(msg);
        }
    }
}

/// Publishes outgoing hints, coalescing bursts; drops them while Redis is down.
async fn publisher(client: redis::Client, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut backoff = Duration::from_millis(100);
    while let Some(first) = rx.recv().await {
        let mut wake = false;
        let mut jobs = std::collections::BTreeSet::new();
        let mut presence = Vec::new();
        let mut take = |m: Outgoing| match m {
            Outgoing::Wake => wake = true,
            Outgoing::Job(id) => {
                jobs.insert(id);
            }
            Outgoing::Presence(id, ttl) => presence.push((id, ttl)),
        };
        take(first);
        while let Ok(m) = rx.try_recv() {
            take(m);
        }
        if conn.is_none() {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis unavailable; dropping hints");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let mut pipe = redis::pipe();
        if wake {
            pipe.cmd("PUBLISH").arg(WAKE_CHANNEL).arg("").ignore();
        }
        for id in jobs {
            pipe.cmd("PUBLISH").arg(JOB_CHANNEL).arg(id).ignore();
        }
        for (id, ttl) in presence {
            pipe.cmd("SET")
                .arg(format!("hallmark:worker:{id}"))
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        let sent: redis::RedisResult<()> =
            tokio::time::timeout(Duration::from_secs(2), pipe.query_async(c))
                .await
                .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "publish timed out").into()));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "redis publish failed; will reconnect");
            conn = None;
        }
    }
}

/// Listens for other replicas' hints; reconnects with back-off.
async fn subscriber(client: redis::Client, notifier: Notifier) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&[WAKE_CHANNEL, JOB_CHANNEL]).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    tracing::info!("subscribed to redis wake-ups and job events");
                    // Anything published while we were away is lost: look again.
                    notifier.inner.wake.notify_waiters();
                    let mut stream = pubsub.on_message();
                    while let Some(msg) = stream.next().await {
                        match msg.get_channel_name() {
                            WAKE_CHANNEL => notifier.inner.wake.notify_waiters(),
                            JOB_CHANNEL => {
                                if let Ok(id) = msg.get_payload::<String>() {
                                    let _ = notifier.inner.jobs.send(id);
                                }
                            }
                            _ => {}
                        }
                    }
                    tracing::warn!("redis subscription lost; falling back to polling");
                }
            }
            Err(e) => tracing::debug!(error = %e, "redis subscribe failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("redis", &self.inner.redis.is_some())
            .field("replica", &self.inner.replica)
            .finish()
    }
}

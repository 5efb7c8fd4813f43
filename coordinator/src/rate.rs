//! Rate limits: token buckets of each tenant's submitted items and uploaded
//! input bytes, and of each client's requests to the public HTTP API.
//!
//! A bucket holds up to one minute's allowance (items — prompts × images —
//! for submits, bytes for input uploads, requests for the API) and refills
//! continuously; a job, an upload or a request is admitted when the bucket
//! holds all of it. With
//! Redis the bucket is shared by every replica (a script updates it
//! atomically, on Redis's clock); without Redis, or while Redis cannot be
//! reached, each replica keeps its own bucket. A limit is a hint in
//! DESIGN's sense: losing Redis loosens it, it never loses work.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Items (prompts × images) of submitted jobs.
    SubmitItems,
    /// Bytes of uploaded input images.
    UploadBytes,
    /// Requests of one client address to the soft-binding HTTP API.
    ApiRequests,
}

impl Quota {
    fn key(self) -> &'static str {
        match self {
            Quota::SubmitItems => "submit",
            Quota::UploadBytes => "upload",
            Quota::ApiRequests => "api",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Quota::SubmitItems => "items",
            Quota::UploadBytes => "bytes",
            Quota::ApiRequests => "requests",
        }
    }

    /// "the job has" / "the upload is", before the amount.
    fn subject(self) -> &'static str {
        match self {
            Quota::SubmitItems => "the job has",
            Quota::UploadBytes => "the upload is",
            Quota::ApiRequests => "the request costs",
        }
    }

    /// Whose bucket it is.
    fn holder(self) -> &'static str {
        match self {
            Quota::SubmitItems | Quota::UploadBytes => "tenant",
            Quota::ApiRequests => "client",
        }
    }
}

/// Why a submission or an upload was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum RateRefusal {
    /// The bucket cannot hold this much: it can never pass.
    TooLarge {
        quota: Quota,
        /// The tenant or client address whose bucket it is.
        holder: String,
        amount: u64,
        limit: u64,
    },
    /// Not now: the bucket refills enough in `retry_after`.
    Exhausted {
        quota: Quota,
        holder: String,
        amount: u64,
        limit: u64,
        available: u64,
        retry_after: Duration,
    },
}

impl fmt::Display for RateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateRefusal::TooLarge {
                quota,
                holder,
                amount,
                limit,
            } => {
                let unit = quota.unit();
                write!(
                    f,
                    "{} {amount} {unit}, over {} {holder:?}'s limit of {limit} {unit} per minute; ",
                    quota.subject(),
                    quota.holder()
                )?;
                match quota {
                    Quota::SubmitItems => write!(f, "split it into jobs of at most {limit}"),
                    Quota::UploadBytes => write!(f, "upload a smaller image"),
                    Quota::ApiRequests => write!(f, "the API's limit is too low to serve it"),
                }
            }
            RateRefusal::Exhausted {
                quota,
                holder,
                amount,
                limit,
                available,
                retry_after,
            } => {
                let unit = quota.unit();
                write!(
                    f,
                    "{} {holder:?} is over its limit of {limit} {unit} per minute ({available} available now, {} {amount}); retry in {}s",
                    quota.holder(),
                    quota.subject(),
                    retry_after.as_secs().max(1)
                )
            }
        }
    }
}

impl std::error::Error for RateRefusal {}

/// The rate buckets of one replica, in Redis when configured.
pub struct RateLimiter {
    redis: Option<redis::Client>,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// After Redis fails, it is not tried again before this: a submit
    /// during an outage does not wait on a dead connection each time.
    redis_retry_at: Mutex<Option<std::time::Instant>>,
    local: Mutex<HashMap<String, Bucket>>,
}

/// How long Redis is left alone after it failed.
pub const REDIS_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Takes `ARGV[2]` items from the bucket in `KEYS[1]` holding at most
/// `ARGV[1]`, refilled at `ARGV[1]` per minute since its last use (Redis's
/// clock); a negative count gives items back. Returns {admitted, tokens
/// left as text}.
const TAKE: &str = r"
local cap = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - at) * cap / 60000)
local ok = 0
if want <= tokens then
  tokens = math.min(cap, tokens - want)
  ok = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return {ok, tostring(tokens)}
";

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    /// Refills to `now_ms`, then takes `want` (gives back when negative)
    /// if the bucket holds it. Returns whether it did, and what is left.
    fn take(&mut self, limit: u64, want: f64, now_ms: i64) -> (bool, f64) {
        let cap = limit as f64;
        let elapsed = (now_ms - self.at_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * cap / 60_000.0).min(cap);
        self.at_ms = now_ms.max(self.at_ms);
        if want <= self.tokens {
            self.tokens = (self.tokens - want).min(cap);
            (true, self.tokens)
        } else {
            (false, self.tokens)
        }
    }
}

fn key(quota: Quota, holder: &str) -> String {
    format!("hallmark:rate:{}:{holder}", quota.key())
}

impl RateLimiter {
    /// Buckets in this process only.
    pub fn local() -> Self {
        Self {
            redis: None,
            connection: tokio::sync::Mutex::new(None),
            redis_retry_at: Mutex::new(None),
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Buckets shared through Redis at `url`.
    pub fn with_redis(url: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            redis: Some(redis::Client::open(url)?),
            ..Self::local()
        })
    }

    /// Admits `amount` of `holder`'s (a tenant's or a client address's)
    /// `quota` under `limit` per minute (0: no limit), or says why not and
    /// when to try again.
    pub async fn admit(
        &self,
        quota: Quota,
        holder: &str,
        amount: u64,
        limit: u64,
        now_ms: i64,
    ) -> Result<(), RateRefusal> {
        if limit == 0 {
            return Ok(());
        }
        if amount > limit {
            return Err(RateRefusal::TooLarge {
                quota,
                holder: holder.to_string(),
                amount,
                limit,
            });
        }
        let bucket = key(quota, holder);
        let (admitted, left) = self.take(&bucket, limit, amount as f64, now_ms).await;
        if admitted {
            return Ok(());
        }
        let missing = amount as f64 - left;
        let retry_after = Duration::from_millis((missing * 60_000.0 / limit as f64).ceil() as u64);
        Err(RateRefusal::Exhausted {
            quota,
            holder: holder.to_string(),
            amount,
            limit,
            available: left.floor() as u64,
            retry_after,
        })
    }

    /// Gives back what [`admit`](Self::admit) took for a job or an upload
    /// that was then not written.
    pub async fn refund(&self, quota: Quota, tenant: &str, amount: u64, limit: u64, now_ms: i64) {
        if limit > 0 {
            self.take(&key(quota, tenant), limit, -(amount as f64), now_ms)
                .await;
        }
    }

    /// Takes from the bucket named `bucket` (its Redis key).
    async fn take(&self, bucket: &str, limit: u64, want: f64, now_ms: i64) -> (bool, f64) {
        let resting = || {
            let retry_at = self.redis_retry_at.lock().expect("rate retry lock");
            retry_at.is_some_and(|at| std::time::Instant::now() < at)
        };
        if self.redis.is_some() && !resting() {
            match self.take_in_redis(bucket, limit, want).await {
                Ok(r) => return r,
                Err(e) => {
                    tracing::warn!(error = %e, bucket, "rate limit: Redis unavailable, using this replica's bucket");
                    *self.redis_retry_at.lock().expect("rate retry lock") =
                        Some(std::time::Instant::now() + REDIS_RETRY_AFTER);
                }
            }
        }
        let mut buckets = self.local.lock().expect("rate buckets lock");
        let bucket = buckets.entry(bucket.to_string()).or_insert(Bucket {
            tokens: limit as f64,
            at_ms: now_ms,
        });
        bucket.take(limit, want, now_ms)
    }

    async fn take_in_redis(
        &self,
        bucket: &str,
        limit: u64,
        want: f64,
    ) -> redis::RedisResult<(bool, f64)> {
        let client = self.redis.as_ref().expect("checked by the caller");
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            let conn = tokio::time::timeout(
                Duration::from_secs(2),
                client.get_multiplexed_async_connection(),
            )
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::IoError, "connect timed out"))
            })??;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("just set");
        let script = redis::Script::new(TAKE);
        let mut invocation = script.key(bucket);
        invocation.arg(limit).arg(want);
        let call = invocation.invoke_async::<(i64, String)>(conn);
        let result = match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(r) => r,
            Err(_) => Err((redis::ErrorKind::IoError, "rate limit script timed out").into()),
        };
        match result {
            Ok((ok, left)) => Ok((ok == 1, left.parse().unwrap_or(0.0))),
            Err(e) => {
                // Reconnect next time.
                *slot = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bucket_admits_a_minutes_items_refills_over_time_and_refunds() {
        let l = RateLimiter::local();
        l.admit(Quota::SubmitItems, "acme", 6, 10, 0).await.unwrap();
        let err = l
            .admit(Quota::SubmitItems, "acme", 6, 10, 1_000)
            .await
            .unwrap_err();
        let RateRefusal::Exhausted {
            available,
            retry_after,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        // 4 left plus 1 s of refill at 10 per minute (0.17): 1.83 more
        // items take 11 s.
        assert_eq!(*available, 4);
        assert_eq!(retry_after.as_millis(), 11_000);
        assert!(err.to_string().contains("10 items per minute"), "{err}");
        // Another tenant has its own bucket; no limit admits anything.
        l.admit(Quota::SubmitItems, "other", 10, 10, 1_000)
            .await
            .unwrap();
        l.admit(Quota::SubmitItems, "acme", 1_000, 0, 1_000)
            .await
            .unwrap();
        // 12 s later the bucket holds 4.17 + 2.
        l.admit(Quota::SubmitItems, "acme", 6, 10, 13_000)
            .await
            .unwrap();
        assert!(
            l.admit(Quota::SubmitItems, "acme", 1, 10, 13_000)
                .await
                .is_err()
        );
        l.refund(Quota::SubmitItems, "acme", 3, 10, 13_000).await;
        l.admit(Quota::SubmitItems, "acme", 3, 10, 13_000)
            .await
            .unwrap();
        // A full minute refills to the cap, never past it.
        l.admit(Quota::SubmitItems, "acme", 10, 10, 600_000)
            .await
            .unwrap();
        assert!(
            l.admit(Quota::SubmitItems, "acme", 1, 10, 600_000)
                .await
                .is_err()
        );
        // A job larger than a minute's allowance can never pass.
        assert!(matches!(
            l.admit(Quota::SubmitItems, "acme", 11, 10, 10_000_000)
                .await,
            Err(RateRefusal::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn upload_bytes_have_their_own_bucket_beside_the_items() {
        let l = RateLimiter::local();
        l.admit(Quota::SubmitItems, "acme", 10, 10, 0)
            .await
            .unwrap();
        // The items are spent; the bytes are not.
        l.admit(Quota::UploadBytes, "acme", 600, 1_000, 0)
            .await
            .unwrap();
        let err = l
            .admit(Quota::UploadBytes, "acme", 600, 1_000, 0)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("limit of 1000 bytes per minute (400 available now, the upload is 600)"),
            "{err}"
        );
        let big = l
            .admit(Quota::UploadBytes, "acme", 1_001, 1_000, 0)
            .await
            .unwrap_err();
        assert!(matches!(big, RateRefusal::TooLarge { .. }));
        assert!(big.to_string().contains("upload a smaller image"), "{big}");
        l.refund(Quota::UploadBytes, "acme", 600, 1_000, 0).await;
        l.admit(Quota::UploadBytes, "acme", 600, 1_000, 0)
            .await
            .unwrap();
    }
}

//! Metrics for Prometheus, shared by the coordinator and the worker.
//!
//! Code records through the `metrics` facade (`counter!`, `gauge!`,
//! `histogram!`); with no recorder installed those calls do nothing. A
//! process that exports metrics takes the process-wide [`recorder`] (the
//! embedded farm runs a coordinator and its workers in one process, so
//! every caller gets the same one) and [`serve`]s `GET /metrics` on a
//! listener of its own, apart from the public APIs.
//!
//! Before each scrape the endpoint lets a [`Refresh`] bring up to date the
//! gauges that are read rather than counted (the coordinator's census of
//! open work in the database), so a scrape shows the farm at that moment.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Why the recorder could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TelemetryError {
    #[error("installing the Prometheus metrics recorder: {0}")]
    Install(String),
}

/// Upper bounds of every `*_seconds` histogram: from half a millisecond (a
/// lease statement) to ten minutes (a large diffusion batch).
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];
/// Upper bounds of every `*_tasks` histogram (how many tasks one batch held).
const TASKS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// The process-wide Prometheus recorder, installed on the first call.
pub fn recorder() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, TelemetryError>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_tasks".into()), TASKS_BUCKETS)
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| TelemetryError::Install(e.to_string()))
        })
        .clone()
}

/// Brings read-at-scrape gauges up to date before the endpoint renders.
pub trait Refresh: Send + Sync + 'static {
    fn refresh(&self) -> BoxFuture<'_, ()>;
}

#[derive(Clone)]
struct Endpoint {
    handle: PrometheusHandle,
    refresh: Option<Arc<dyn Refresh>>,
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; the
/// address it serves on.
pub fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    refresh: Option<Arc<dyn Refresh>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Endpoint { handle, refresh });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(addr)
}

async fn scrape(State(endpoint): State<Endpoint>) -> Response {
    if let Some(refresh) = &endpoint.refresh {
        refresh.refresh().await;
    }
    endpoint.handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoint.handle.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct Scrapes(AtomicU64);

    impl Refresh for Scrapes {
        fn refresh(&self) -> BoxFuture<'_, ()> {
            Box::pin(async move {
                let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
                metrics::gauge!("telemetry_test_scrapes").set(n as f64);
            })
        }
    }

    fn get(addr: SocketAddr) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    }

    fn line<'a>(reply: &'a str, series: &str) -> Option<&'a str> {
        reply
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_endpoint_renders_what_was_recorded_and_refreshes_before_each_scrape() {
        let handle = recorder().unwrap();
        // A second taker gets the same recorder, not an error.
        let again = recorder().unwrap();
        metrics::counter!("telemetry_test_total", "stage" => "generate").increment(3);
        metrics::histogram!("telemetry_test_seconds").record(0.003);
        metrics::histogram!("telemetry_test_batch_tasks").record(5.0);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = serve(
            listener,
            handle,
            Some(Arc::new(Scrapes(AtomicU64::new(0)))),
            async move {
                let _ = stopped.await;
            },
        )
        .unwrap();

        let first = tokio::task::spawn_blocking(move || get(addr))
            .await
            .unwrap();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("text/plain; version=0.0.4"), "{first}");
        assert_eq!(
            line(&first, "telemetry_test_total{stage=\"generate\"}"),
            Some("telemetry_test_total{stage=\"generate\"} 3")
        );
        assert_eq!(
            line(&first, "telemetry_test_scrapes"),
            Some("telemetry_test_scrapes 1")
        );
        // Seconds get the seconds buckets; batch sizes the task-count ones.
        assert!(
            line(&first, "telemetry_test_seconds_bucket{le=\"0.005\"}")
                .is_some_and(|l| l.ends_with(" 1")),
            "{first}"
        );
        assert!(
            line(&first, "telemetry_test_seconds_bucket{le=\"0.0025\"}")
                .is_some_and(|l| l.ends_with(" 0")),
            "{first}"
        );
        assert!(
            line(&first, "telemetry_test_batch_tasks_bucket{le=\"8\"}")
                .is_some_and(|l| l.ends_with(" 1")),
            "{first}"
        );

        metrics::counter!("telemetry_test_total", "stage" => "generate").increment(2);
        let second = tokio::task::spawn_blocking(move || get(addr))
            .await
            .unwrap();
        assert_eq!(
            line(&second, "telemetry_test_total{stage=\"generate\"}"),
            Some("telemetry_test_total{stage=\"generate\"} 5")
        );
        assert_eq!(
            line(&second, "telemetry_test_scrapes"),
            Some("telemetry_test_scrapes 2")
        );
        // The second taker's handle reads the same recorder.
        assert!(
            again
                .render()
                .contains("telemetry_test_total{stage=\"generate\"} 5")
        );
        let _ = stop.send(());
    }
}

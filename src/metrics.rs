//! Prometheus metrics and the `/metrics` + `/healthz` listener (off unless
//! `daemon.metrics_listen` is set; loopback only). Without an installed recorder (the
//! `backfill` command), recording is a no-op.

use crate::domain::ChunkKind;
use crate::error::{Error, Result, Retryability};
use axum::routing::get;
use axum::Router;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::time::Duration;

/// One chunk archived: counts its bytes and fragments and how long it took.
pub fn chunk_archived(stream: &str, kind: ChunkKind, bytes: u64, fragments: u64, took: Duration) {
    let stream = stream.to_string();
    if kind == ChunkKind::Mkv {
        counter!("kvs_archiver_mkv_fragments_archived_total", "stream" => stream.clone())
            .increment(fragments);
    }
    counter!("kvs_archiver_chunks_archived_total", "stream" => stream.clone()).increment(1);
    counter!("kvs_archiver_bytes_archived_total", "stream" => stream.clone()).increment(bytes);
    histogram!("kvs_archiver_chunk_seconds", "stream" => stream.clone()).record(took.as_secs_f64());
    histogram!("kvs_archiver_chunk_bytes", "stream" => stream).record(bytes as f64);
}

/// Histogram buckets, chosen per metric: without them the exporter writes summaries,
/// which cannot be aggregated across streams or instances.
const BUCKETS: [(&str, &[f64]); 4] = [
    // Time to GetClip's first byte: tens of milliseconds, seconds when KVS is loaded.
    (
        "kvs_archiver_getclip_first_byte_seconds",
        &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
    ),
    // CompleteMultipartUpload or the last PutObject after the clip's last byte.
    (
        "kvs_archiver_upload_finish_seconds",
        &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
    ),
    // A whole clip, GetClip to the ledger: up to 100 MB at anything from 1 to 100 MB/s.
    (
        "kvs_archiver_chunk_seconds",
        &[
            0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ],
    ),
    // Clip sizes, up to GetClip's 100 MB cap.
    (
        "kvs_archiver_chunk_bytes",
        &[1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 7.5e7, 1e8],
    ),
];

/// One failed attempt at a chunk: counted by its kind, and as a throttle or a retry when it
/// is one.
pub fn chunk_failed(stream: &str, error: &Error) {
    let stream = stream.to_string();
    match error.retryability() {
        Retryability::Throttled => {
            counter!("kvs_archiver_throttles_total", "stream" => stream.clone()).increment(1)
        }
        Retryability::Transient | Retryability::Unreachable => {
            counter!("kvs_archiver_retries_total", "stream" => stream.clone()).increment(1)
        }
        Retryability::Permanent => {}
    }
    counter!("kvs_archiver_chunk_failures_total", "stream" => stream, "kind" => error.kind())
        .increment(1);
}

/// A request retried inside an operation (ListFragments page, part upload, …).
pub fn operation_retried(operation: &str, why: Retryability) {
    let reason = match why {
        Retryability::Throttled => "throttled",
        Retryability::Transient => "transient",
        Retryability::Unreachable => "unreachable",
        Retryability::Permanent => "permanent",
    };
    counter!("kvs_archiver_operation_retries_total", "operation" => operation.to_string(), "reason" => reason)
        .increment(1);
}

/// Time to GetClip's first byte.
pub fn getclip_latency(stream: &str, took: Duration) {
    histogram!("kvs_archiver_getclip_first_byte_seconds", "stream" => stream.to_string())
        .record(took.as_secs_f64());
}

/// Time to complete an upload.
pub fn upload_latency(stream: &str, took: Duration) {
    histogram!("kvs_archiver_upload_finish_seconds", "stream" => stream.to_string())
        .record(took.as_secs_f64());
}

/// Fragments listed after the range around them was planned or archived.
pub fn late_fragments(stream: &str, count: u64) {
    counter!("kvs_archiver_late_fragments_total", "stream" => stream.to_string()).increment(count);
}

/// Fragments KVS deleted before they were archived.
pub fn fragments_expired(stream: &str, count: u64) {
    counter!("kvs_archiver_fragments_expired_total", "stream" => stream.to_string())
        .increment(count);
}

/// A firing that found the stream's pass still running, merged into the next pass.
pub fn coalesced_firing(stream: &str) {
    counter!("kvs_archiver_coalesced_firings_total", "stream" => stream.to_string()).increment(1);
}

/// Chunks by state, as the ledger counts them: a gauge per state.
pub fn chunks_by_state(stream: &str, counts: &[(crate::ledger::ChunkState, i64)]) {
    for state in crate::ledger::ChunkState::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        gauge!("kvs_archiver_chunks", "stream" => stream.to_string(), "state" => state.as_str())
            .set(n as f64);
    }
}

/// Seconds behind the live edge, time left before the oldest unarchived fragment expires,
/// and whether that is inside the alarm.
pub fn stream_health(stream: &str, lag_secs: Option<f64>, expiry_secs: Option<f64>, at_risk: bool) {
    let stream = stream.to_string();
    if let Some(lag) = lag_secs {
        gauge!("kvs_archiver_archive_lag_seconds", "stream" => stream.clone()).set(lag);
    }
    gauge!("kvs_archiver_oldest_unarchived_expiry_seconds", "stream" => stream.clone())
        .set(expiry_secs.unwrap_or(f64::INFINITY));
    gauge!("kvs_archiver_at_risk", "stream" => stream).set(if at_risk { 1.0 } else { 0.0 });
}

/// Installs the Prometheus recorder and serves it on `addr`.
/// Every series carries `archiver_instance` (the instance id; Prometheus keeps
/// `instance` for the scrape target): several daemons share one fleet.
pub async fn serve(addr: SocketAddr, instance: &str) -> Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new().add_global_label("archiver_instance", instance);
    for (name, buckets) in BUCKETS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| Error::Usage(format!("metrics: buckets of {name}: {e}")))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| Error::Usage(format!("metrics: cannot install the recorder: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("daemon.metrics_listen {addr}: cannot listen: {e}")))?;
    let render = handle.clone();
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(render.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics listener stopped");
        }
    });
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(handle)
}

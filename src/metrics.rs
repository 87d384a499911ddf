//! Prometheus metrics and the `/metrics` + `/healthz` listener (off unless
//! `daemon.metrics_listen` is set; loopback only). Without [`serve`] (the `backfill`
//! command), recording is a no-op.
//!
//! The registry is this module's own: a map of series under one lock, written a few times
//! per chunk and rendered in Prometheus's text format. The exporter crates bring a
//! lock-free registry, summaries and a clock source this daemon has no use for, and
//! sixteen crates to the README's first build (docs/PERFORMANCE.md, "Build").

use crate::domain::ChunkKind;
use crate::error::{Error, Result, Retryability};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The process's series, once [`serve`] installed it.
static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// A series: the metric's name and its labels, in the order written.
type SeriesKey = (&'static str, Vec<(&'static str, String)>);

/// Every series recorded, and the label every one of them carries.
struct Registry {
    /// `archiver_instance`'s value.
    instance: String,
    series: Mutex<BTreeMap<SeriesKey, Value>>,
}

/// A series' value.
#[derive(Clone)]
enum Value {
    /// Only grows: a count since the process started.
    Counter(u64),
    /// The last value set.
    Gauge(f64),
    /// Cumulative counts per bucket of [`BUCKETS`] (the last one `+Inf`), and the sum.
    Histogram { counts: Vec<u64>, sum: f64 },
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Counter(_) => "counter",
            Value::Gauge(_) => "gauge",
            Value::Histogram { .. } => "histogram",
        }
    }
}

/// Applies `change` to the series, creating it with `new` first; a no-op without a registry.
fn record(
    name: &'static str,
    labels: &[(&'static str, &str)],
    new: impl FnOnce() -> Value,
    change: impl FnOnce(&mut Value),
) {
    let Some(registry) = REGISTRY.get() else {
        return;
    };
    let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
    // A panic while the lock was held left at worst one series half-updated: keep serving.
    let mut series = registry.series.lock().unwrap_or_else(|e| e.into_inner());
    change(series.entry((name, labels)).or_insert_with(new));
}

fn counter(name: &'static str, labels: &[(&'static str, &str)], by: u64) {
    record(
        name,
        labels,
        || Value::Counter(0),
        |v| {
            if let Value::Counter(n) = v {
                *n += by;
            }
        },
    );
}

fn gauge(name: &'static str, labels: &[(&'static str, &str)], to: f64) {
    record(name, labels, || Value::Gauge(to), |v| *v = Value::Gauge(to));
}

/// Observes `x` in `name`'s buckets (every histogram has its own, in [`BUCKETS`]).
fn histogram(name: &'static str, labels: &[(&'static str, &str)], x: f64) {
    let Some(bounds) = buckets_of(name) else {
        return;
    };
    let new = || Value::Histogram {
        counts: vec![0; bounds.len() + 1],
        sum: 0.0,
    };
    record(name, labels, new, |v| {
        if let Value::Histogram { counts, sum } = v {
            let first = bounds
                .iter()
                .position(|le| x <= *le)
                .unwrap_or(bounds.len());
            for count in &mut counts[first..] {
                *count += 1;
            }
            *sum += x;
        }
    });
}

fn buckets_of(name: &str) -> Option<&'static [f64]> {
    BUCKETS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// A sample value as Prometheus writes it (`+Inf`, not Rust's `inf`).
fn number(x: f64) -> String {
    match x {
        f64::INFINITY => "+Inf".to_string(),
        f64::NEG_INFINITY => "-Inf".to_string(),
        x if x.is_nan() => "NaN".to_string(),
        x => x.to_string(),
    }
}

/// `{archiver_instance="…",k="v",…}` plus `extra`, values escaped as the format asks.
fn label_set(
    instance: &str,
    labels: &[(&'static str, String)],
    extra: Option<(&str, &str)>,
) -> String {
    let mut out = String::from("{");
    let pairs = std::iter::once(("archiver_instance", instance))
        .chain(labels.iter().map(|(k, v)| (*k, v.as_str())))
        .chain(extra);
    for (i, (key, value)) in pairs.enumerate() {
        let value = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{}{key}=\"{value}\"", if i == 0 { "" } else { "," });
    }
    out.push('}');
    out
}

/// The registry in Prometheus's text exposition format, one `# TYPE` line per metric.
fn render(registry: &Registry) -> String {
    // A copy, so that recording waits for the copy, not for the formatting: with 1,000
    // streams a scrape is ~70,000 lines.
    let series = registry
        .series
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut out = String::new();
    let mut typed = "";
    for ((name, labels), value) in series.iter() {
        if *name != typed {
            let _ = writeln!(out, "# TYPE {name} {}", value.kind());
            typed = name;
        }
        let instance = &registry.instance;
        match value {
            Value::Counter(n) => {
                let _ = writeln!(out, "{name}{} {n}", label_set(instance, labels, None));
            }
            Value::Gauge(x) => {
                let _ = writeln!(
                    out,
                    "{name}{} {}",
                    label_set(instance, labels, None),
                    number(*x)
                );
            }
            Value::Histogram { counts, sum } => {
                let bounds = buckets_of(name).unwrap_or_default();
                let les = bounds
                    .iter()
                    .map(|b| number(*b))
                    .chain(["+Inf".to_string()]);
                for (le, count) in les.zip(counts) {
                    let set = label_set(instance, labels, Some(("le", &le)));
                    let _ = writeln!(out, "{name}_bucket{set} {count}");
                }
                let set = label_set(instance, labels, None);
                let _ = writeln!(out, "{name}_sum{set} {}", number(*sum));
                let _ = writeln!(out, "{name}_count{set} {}", counts.last().unwrap_or(&0));
            }
        }
    }
    out
}

/// One chunk archived: counts its bytes and fragments and how long it took.
pub fn chunk_archived(stream: &str, kind: ChunkKind, bytes: u64, fragments: u64, took: Duration) {
    let labels = [("stream", stream)];
    if kind == ChunkKind::Mkv {
        counter(
            "kvs_archiver_mkv_fragments_archived_total",
            &labels,
            fragments,
        );
    }
    counter("kvs_archiver_chunks_archived_total", &labels, 1);
    counter("kvs_archiver_bytes_archived_total", &labels, bytes);
    histogram("kvs_archiver_chunk_seconds", &labels, took.as_secs_f64());
    histogram("kvs_archiver_chunk_bytes", &labels, bytes as f64);
}

/// Histogram buckets, chosen per metric (histograms, unlike summaries, aggregate across
/// streams and instances).
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
    match error.retryability() {
        Retryability::Throttled => {
            counter("kvs_archiver_throttles_total", &[("stream", stream)], 1)
        }
        Retryability::Transient | Retryability::Unreachable => {
            counter("kvs_archiver_retries_total", &[("stream", stream)], 1);
        }
        Retryability::Permanent => {}
    }
    let labels = [("stream", stream), ("kind", error.kind())];
    counter("kvs_archiver_chunk_failures_total", &labels, 1);
}

/// A request retried inside an operation (ListFragments page, part upload, …).
pub fn operation_retried(operation: &str, why: Retryability) {
    let reason = match why {
        Retryability::Throttled => "throttled",
        Retryability::Transient => "transient",
        Retryability::Unreachable => "unreachable",
        Retryability::Permanent => "permanent",
    };
    let labels = [("operation", operation), ("reason", reason)];
    counter("kvs_archiver_operation_retries_total", &labels, 1);
}

/// Time to GetClip's first byte.
pub fn getclip_latency(stream: &str, took: Duration) {
    let labels = [("stream", stream)];
    histogram(
        "kvs_archiver_getclip_first_byte_seconds",
        &labels,
        took.as_secs_f64(),
    );
}

/// Time to complete an upload.
pub fn upload_latency(stream: &str, took: Duration) {
    let labels = [("stream", stream)];
    histogram(
        "kvs_archiver_upload_finish_seconds",
        &labels,
        took.as_secs_f64(),
    );
}

/// Fragments listed after the range around them was planned or archived.
pub fn late_fragments(stream: &str, count: u64) {
    counter(
        "kvs_archiver_late_fragments_total",
        &[("stream", stream)],
        count,
    );
}

/// Fragments KVS deleted before they were archived.
pub fn fragments_expired(stream: &str, count: u64) {
    counter(
        "kvs_archiver_fragments_expired_total",
        &[("stream", stream)],
        count,
    );
}

/// A firing that found the stream's pass still running, merged into the next pass.
pub fn coalesced_firing(stream: &str) {
    counter(
        "kvs_archiver_coalesced_firings_total",
        &[("stream", stream)],
        1,
    );
}

/// Chunks by state, as the ledger counts them: a gauge per state.
pub fn chunks_by_state(stream: &str, counts: &[(crate::ledger::ChunkState, i64)]) {
    for state in crate::ledger::ChunkState::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        let labels = [("stream", stream), ("state", state.as_str())];
        gauge("kvs_archiver_chunks", &labels, n as f64);
    }
}

/// Seconds behind the live edge, time left before the oldest unarchived fragment expires,
/// and whether that is inside the alarm.
pub fn stream_health(stream: &str, lag_secs: Option<f64>, expiry_secs: Option<f64>, at_risk: bool) {
    let labels = [("stream", stream)];
    if let Some(lag) = lag_secs {
        gauge("kvs_archiver_archive_lag_seconds", &labels, lag);
    }
    let expiry = expiry_secs.unwrap_or(f64::INFINITY);
    gauge(
        "kvs_archiver_oldest_unarchived_expiry_seconds",
        &labels,
        expiry,
    );
    gauge(
        "kvs_archiver_at_risk",
        &labels,
        if at_risk { 1.0 } else { 0.0 },
    );
}

/// Starts recording and serves the series on `addr`.
/// Every series carries `archiver_instance` (the instance id; Prometheus keeps
/// `instance` for the scrape target): several daemons share one fleet.
pub async fn serve(addr: SocketAddr, instance: &str) -> Result<()> {
    let registry = Registry {
        instance: instance.to_string(),
        series: Mutex::default(),
    };
    if REGISTRY.set(registry).is_err() {
        return Err(Error::Usage(
            "metrics: the listener was started twice".to_string(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("daemon.metrics_listen {addr}: cannot listen: {e}")))?;
    let scrape = || std::future::ready(REGISTRY.get().map(render).unwrap_or_default());
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| std::future::ready("ok\n")));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics listener stopped");
        }
    });
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a scrape would say: Prometheus's own text parser reads it back.
    #[tokio::test]
    async fn a_scrape_is_prometheus_text_with_cumulative_histograms() {
        // This is the unit tests' only serve: before it, no registry, so nothing records.
        assert!(REGISTRY.get().is_none(), "no registry before serve");
        serve("127.0.0.1:0".parse().unwrap(), "host-1")
            .await
            .unwrap();
        chunk_archived(
            "cam-1",
            ChunkKind::Clip,
            3_000_000,
            40,
            Duration::from_secs(4),
        );
        chunk_archived(
            "cam-1",
            ChunkKind::Clip,
            60_000_000,
            200,
            Duration::from_secs(90),
        );
        stream_health("cam-1", Some(12.5), None, false);
        operation_retried("List\"Fragments\\", Retryability::Throttled);
        let text = render(REGISTRY.get().unwrap());
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |name: &str| {
            let sample = scrape.samples.iter().find(|s| s.metric == name);
            let sample = sample.unwrap_or_else(|| panic!("{name} in {text}"));
            assert_eq!(sample.labels.get("archiver_instance"), Some("host-1"));
            sample.value.clone()
        };
        use prometheus_parse::Value as V;
        assert!(matches!(value("kvs_archiver_chunks_archived_total"), V::Counter(n) if n == 2.0));
        assert!(matches!(value("kvs_archiver_bytes_archived_total"), V::Counter(n) if n == 63e6));
        assert!(matches!(value("kvs_archiver_archive_lag_seconds"), V::Gauge(x) if x == 12.5));
        let expiry = value("kvs_archiver_oldest_unarchived_expiry_seconds");
        assert!(
            matches!(expiry, V::Gauge(x) if x == f64::INFINITY),
            "{text}"
        );
        let V::Histogram(buckets) = value("kvs_archiver_chunk_bytes") else {
            panic!("a histogram: {text}");
        };
        let counts: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        assert_eq!(counts.first(), Some(&(1e5, 0.0)), "{text}");
        assert!(
            counts.contains(&(5e6, 1.0)) && counts.contains(&(1e8, 2.0)),
            "{text}"
        );
        assert_eq!(counts.last(), Some(&(f64::INFINITY, 2.0)), "{text}");
        assert!(text.contains("kvs_archiver_chunk_bytes_sum{archiver_instance=\"host-1\",stream=\"cam-1\"} 63000000\n"), "{text}");
        // Escaped as the format asks (the parser keeps label values as written).
        let retried = scrape
            .samples
            .iter()
            .find(|s| s.metric.contains("operation_retries"));
        assert!(retried.is_some(), "{text}");
        assert!(
            text.contains(r#"operation="List\"Fragments\\",reason="throttled"} 1"#),
            "{text}"
        );
    }
}

//! `kvs-archiver serve`: a read-only web page of the archive. One page per stream with a
//! coverage timeline ([`timeline`]) from 30 days down to minutes; clicking an object plays
//! it in the page: from S3 through a presigned URL (a redirect), from a directory
//! destination streamed by this server with HTTP range requests.
//!
//! It listens on loopback unless told otherwise, and elsewhere only with a bearer token
//! (`Authorization: Bearer`, or `?token=` once, which sets a cookie so the video element,
//! which cannot send headers, is let in too). Server-rendered HTML and SVG, a little plain
//! JavaScript, everything embedded in the binary.

pub mod timeline;

use crate::config::StreamConfig;
use crate::domain::{rfc3339, EpochMs};
use crate::error::{Error, Result};
use crate::export::GAP_REPORT_MS;
use crate::ledger::ChunkState;
use crate::sink::Sink;
use crate::worker::Archiver;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use timeline::{escape, Span, SpanClass};

const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");
const DAY_MS: i64 = 86_400_000;
/// The widest view: what KVS can hold is at most a few years, but a page beyond a month
/// says little; narrower views come from zooming.
const WIDEST_MS: i64 = 30 * DAY_MS;
/// Below this many archived chunks in view, their fragments are read so that gaps
/// inside an object show.
const FRAGMENT_DETAIL_CHUNKS: usize = 200;
const TOKEN_COOKIE: &str = "kvs_archiver_token";

struct Shared {
    archiver: Archiver,
    token: Option<String>,
}

type AppState = Arc<Shared>;

/// Serves the page on `listen` until `shutdown` fires. Refuses to listen beyond
/// loopback without a token.
pub async fn serve(
    archiver: Archiver,
    listen: SocketAddr,
    token: Option<String>,
    shutdown: crate::shutdown::Shutdown,
) -> Result<()> {
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(Error::Usage(format!(
            "serve --listen {listen}: beyond loopback the page needs a bearer token; set KVS_ARCHIVER_SERVE_TOKEN (or --token-file) or listen on 127.0.0.1"
        )));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Usage(format!("serve --listen {listen}: cannot listen: {e}")))?;
    let bound = listener.local_addr().unwrap_or(listen);
    let state: AppState = Arc::new(Shared { archiver, token });
    let app = axum::Router::new()
        .route("/", axum::routing::get(index))
        .route("/streams/{name}", axum::routing::get(stream_page))
        .route("/media/{*key}", axum::routing::get(media))
        .route(
            "/assets/page.js",
            axum::routing::get(|| async { asset(PAGE_JS, "text/javascript") }),
        )
        .route(
            "/assets/page.css",
            axum::routing::get(|| async { asset(PAGE_CSS, "text/css") }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state);
    // Printed (not only logged) so a user, or a test, knows where to point a browser.
    println!("serving the archive on http://{bound}/");
    tracing::info!(%bound, "serving the archive page");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.soft.cancelled().await })
        .await
        .map_err(|e| Error::Usage(format!("serve: {e}")))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a request's `Host` names this machine's loopback: without a token, a page
/// on another site must not reach the server through a name rebound to 127.0.0.1.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        if !loopback_host(request.headers()) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "without a token this page answers only to localhost and 127.0.0.1\n",
            )
                .into_response();
        }
        return next.run(request).await;
    };
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            c.trim()
                .strip_prefix(&format!("{TOKEN_COOKIE}="))
                .map(str::to_string)
        })
        .next();
    if bearer.is_some_and(|b| same_token(b, token)) || cookie.is_some_and(|c| same_token(&c, token))
    {
        return next.run(request).await;
    }
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    if query.get("token").is_some_and(|t| same_token(t, token)) {
        // Once: the cookie carries it from now on, and the URL loses it.
        let rest: Vec<(&String, &String)> = query
            .iter()
            .filter(|(k, _)| k.as_str() != "token")
            .collect();
        let target = match serde_urlencoded::to_string(&rest) {
            Ok(rest) if !rest.is_empty() => format!("{}?{rest}", request.uri().path()),
            _ => request.uri().path().to_string(),
        };
        let mut response = Redirect::to(&target).into_response();
        if let Ok(value) = HeaderValue::from_str(&format!(
            "{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
        )) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this page needs the token: open it with ?token=... or send Authorization: Bearer\n",
    )
        .into_response()
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title><link rel="stylesheet" href="/assets/page.css"></head><body>{body}<script src="/assets/page.js"></script></body></html>"#
    ))
}

fn failure(status: StatusCode, message: String) -> Response {
    (
        status,
        page(
            "kvs-archiver",
            &format!("<p class=\"error\">{}</p>", escape(&message)),
        ),
    )
        .into_response()
}

async fn index(State(state): State<AppState>) -> Response {
    let config = &state.archiver.config;
    let status = match state.archiver.ledger.status().await {
        Ok(status) => status,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut rows = String::new();
    for stream in &config.streams {
        let label = stream.label();
        let s = status.iter().find(|s| s.stream == label);
        rows.push_str(&format!(
            "<tr><td><a href=\"/streams/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td></tr>",
            escape(&label),
            s.map_or(0, |s| s.done),
            s.map_or(0, |s| s.failed),
            s.map_or(0, |s| s.expired),
            s.and_then(|s| s.archived_through_ms).map_or("-".into(), rfc3339),
        ));
    }
    page(
        "kvs-archiver",
        &format!(
            "<h1>kvs-archiver</h1><p>{}</p><table><tr><th>stream</th><th>objects</th><th>failed</th><th>expired</th><th>archived through</th></tr>{rows}</table>",
            escape(&state.archiver.sink.describe())
        ),
    )
    .into_response()
}

/// The chunks of a stream around `[from, to]`, as timeline spans.
async fn spans(
    archiver: &Archiver,
    stream: &StreamConfig,
    from: EpochMs,
    to: EpochMs,
) -> Result<(Vec<Span>, Option<(EpochMs, EpochMs)>)> {
    let ledger = archiver.ledger.as_ref();
    let label = stream.label();
    let source = stream.timestamp_source;
    let mut spans = Vec::new();
    let done = ledger.done_in(&label, source, from - DAY_MS, to).await?;
    let detailed = done.len() <= FRAGMENT_DETAIL_CHUNKS;
    for chunk in done {
        let class = SpanClass::of_kind(chunk.plan.kind);
        let estimated_end = (chunk.plan.end_ms
            + (chunk.plan.duration_ms / u64::from(chunk.plan.fragment_count.max(1))) as i64)
            .max(chunk.plan.start_ms + chunk.plan.duration_ms as i64);
        if !detailed {
            if estimated_end >= from {
                spans.push(Span {
                    start_ms: chunk.plan.start_ms,
                    end_ms: estimated_end,
                    class,
                    object_key: Some(chunk.object_key),
                    offset_ms: 0,
                    note: None,
                });
            }
            continue;
        }
        // Runs of fragments without a gap: a gap inside an object shows as one.
        let mut offset = 0u64;
        let mut run: Option<Span> = None;
        for f in ledger.fragments_of(chunk.id).await? {
            let end = f.start_ms + f.duration_ms as i64;
            match run.as_mut() {
                Some(r) if f.start_ms - r.end_ms <= GAP_REPORT_MS => r.end_ms = end,
                _ => {
                    spans.extend(run.take());
                    run = Some(Span {
                        start_ms: f.start_ms,
                        end_ms: end,
                        class,
                        object_key: Some(chunk.object_key.clone()),
                        offset_ms: offset,
                        note: None,
                    });
                }
            }
            offset += f.duration_ms;
        }
        spans.extend(run);
    }
    // Objects are read from a day earlier (one may reach into the view); fragment runs
    // that end before it are not the view's.
    spans.retain(|s| s.end_ms >= from);
    let summary = ledger.range_summary(&label, source, from, to).await?;
    let progress = ledger.progress(&label, source).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let alarm = archiver.config.daemon.retention_alarm.as_millis() as i64;
    let at_risk = |start: EpochMs| {
        progress
            .retention_ms
            .is_some_and(|retention| start < now - retention + alarm)
    };
    let unarchived = summary.failed.into_iter().chain(summary.expired).chain(
        ledger
            .claimable(&label, source, from, to, now)
            .await?
            .into_iter()
            .filter(|c| c.state == ChunkState::Planned),
    );
    for chunk in unarchived {
        let class = match chunk.state {
            ChunkState::Expired => SpanClass::Expired,
            _ if at_risk(chunk.plan.start_ms) => SpanClass::AtRisk,
            ChunkState::Failed => SpanClass::Failed,
            _ => SpanClass::Pending,
        };
        spans.push(Span {
            start_ms: chunk.plan.start_ms,
            end_ms: (chunk.plan.start_ms + chunk.plan.duration_ms as i64).max(chunk.plan.end_ms),
            class,
            object_key: None,
            offset_ms: 0,
            note: chunk
                .last_error
                .map(|e| format!("{}: {e}", chunk.object_key)),
        });
    }
    // Planning covered from the first chunk to where the daemon's planning reached (or,
    // for backfills only, the last chunk).
    let first = spans.iter().map(|s| s.start_ms).min();
    let last = spans.iter().map(|s| s.end_ms).max();
    let planned = first.zip(progress.planned_through_ms.max(last));
    Ok((spans, planned))
}

async fn stream_page(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let archiver = &state.archiver;
    let Some(stream) = archiver.config.stream(&name).cloned() else {
        return failure(
            StatusCode::NOT_FOUND,
            format!("no stream {name} in the configuration"),
        );
    };
    let now = chrono::Utc::now().timestamp_millis();
    // Within years 1970..2200, so the zoom arithmetic cannot overflow.
    let number = |k: &str| {
        query
            .get(k)
            .and_then(|v| v.parse::<EpochMs>().ok())
            .map(|t| t.clamp(0, 7_258_118_400_000))
    };
    let (from, to, found) = match (number("from"), number("to")) {
        (Some(from), Some(to)) if to > from => {
            let to = to.min(from + WIDEST_MS).max(from + 60_000);
            (from, to, spans(archiver, &stream, from, to).await)
        }
        _ => {
            // The archive's extent within the last 30 days, a little wider; its spans
            // are the ones just read (one scan of the ledger, not two).
            let found = spans(archiver, &stream, now - WIDEST_MS, now).await;
            let (from, to) = match &found {
                Ok((all, _)) if !all.is_empty() => {
                    let first = all.iter().map(|s| s.start_ms).min().unwrap_or(now - DAY_MS);
                    let last = all.iter().map(|s| s.end_ms).max().unwrap_or(now);
                    let pad = ((last - first) / 50).max(60_000);
                    (first - pad, last + pad)
                }
                _ => (now - DAY_MS, now),
            };
            (from, to, found)
        }
    };
    let (spans, planned) = match found {
        Ok(found) => found,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut failures = String::new();
    for s in &spans {
        *counts.entry(s.class.as_str()).or_default() += 1;
        if let Some(note) = &s.note {
            failures.push_str(&format!(
                "<li data-class=\"{}\">{} .. {}: {}</li>",
                s.class.as_str(),
                rfc3339(s.start_ms),
                rfc3339(s.end_ms),
                escape(note)
            ));
        }
    }
    let legend: String = [
        ("archived", "archived"),
        ("late", "late fragment"),
        ("mkv", "Matroska"),
        ("pending", "not archived yet"),
        ("failed", "failed"),
        ("expired", "expired (deleted by KVS first)"),
        ("at-risk", "at risk"),
        ("no-media", "KVS had no media"),
        ("unplanned", "not planned yet"),
    ]
    .iter()
    .map(|(class, text)| {
        format!(
            "<span class=\"key\"><i class=\"{class}\"></i>{text}{}</span>",
            counts
                .get(class)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )
    })
    .collect();
    let zoom = |span: i64| {
        let center = (from + to) / 2;
        format!(
            "/streams/{}?from={}&to={}",
            escape(&name),
            center - span / 2,
            center + span / 2
        )
    };
    let shift = |by: i64| {
        format!(
            "/streams/{}?from={}&to={}",
            escape(&name),
            from + by,
            to + by
        )
    };
    let presets: String = [
        ("30 days", 30 * DAY_MS),
        ("7 days", 7 * DAY_MS),
        ("1 day", DAY_MS),
        ("6 hours", DAY_MS / 4),
        ("1 hour", 3_600_000),
        ("10 minutes", 600_000),
    ]
    .iter()
    .map(|(text, span)| format!("<a href=\"{}\">{text}</a>", zoom(*span)))
    .collect();
    let body = format!(
        r#"<h1><a href="/">kvs-archiver</a> / {name}</h1>
<nav><a id="earlier" href="{earlier}">&larr; earlier</a> <a id="zoom-out" href="{out}">zoom out</a> <a id="zoom-in" href="{zin}">zoom in</a> <a id="later" href="{later}">later &rarr;</a> | {presets}</nav>
<p class="window">{from_text} .. {to_text} (UTC)</p>
{svg}
<p class="legend">{legend}</p>
<video id="player" controls muted playsinline preload="metadata"></video>
<p id="now-playing"></p>
<ul class="failures">{failures}</ul>"#,
        name = escape(&name),
        earlier = shift(-(to - from) / 2),
        later = shift((to - from) / 2),
        out = zoom((to - from) * 4),
        zin = zoom(((to - from) / 4).max(60_000)),
        from_text = rfc3339(from),
        to_text = rfc3339(to),
        svg = timeline::svg(spans, from, to, planned),
    );
    page(&format!("{name}: kvs-archiver"), &body).into_response()
}

/// An archived object: a redirect to a presigned URL (S3), or the file with range
/// support (a directory).
async fn media(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let archiver = &state.archiver;
    let prefix = &archiver.config.destination.prefix;
    if !is_object_key(&key, prefix) {
        return failure(StatusCode::NOT_FOUND, format!("no object {key}"));
    }
    match archiver.sink.as_ref() {
        Sink::S3(_) => match archiver
            .sink
            .playable_url(&key, std::time::Duration::from_secs(3600))
            .await
        {
            Ok(url) => Redirect::temporary(&url).into_response(),
            Err(e) => failure(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        Sink::Dir(_) => match archiver.sink.head(&key).await {
            Ok(Some(head)) => ranged_file(&archiver.sink, &key, head.size, &headers).await,
            Ok(None) => failure(StatusCode::NOT_FOUND, format!("no object {key}")),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    }
}

/// A key this program could have written: under the prefix, relative, with no `.`, `..`
/// or empty component (a directory destination joins it to its root).
fn is_object_key(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix)
        && !key.starts_with('/')
        && !key.contains('\\')
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && end < size).then_some((start, end))
}

async fn ranged_file(sink: &Sink, key: &str, size: u64, headers: &HeaderMap) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(value) => match parse_range(value, size) {
            Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end),
            None => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response()
            }
        },
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let body = match sink.read_range(key, start, len).await {
        Ok(body) => body,
        Err(e) => return failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        match body.next().await {
            Ok(Some(bytes)) => Some((Ok::<_, std::io::Error>(bytes), body)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), body)),
        }
    });
    let content_type = if key.ends_with(".mkv") {
        "video/x-matroska"
    } else {
        "video/mp4"
    };
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::{is_object_key, loopback_host, parse_range};

    #[test]
    fn only_relative_keys_under_the_prefix_are_served() {
        assert!(is_object_key("kvs/cam/2026/12/04/cam_1_2.mp4", "kvs/"));
        assert!(!is_object_key("/etc/passwd", ""));
        assert!(!is_object_key("kvs/../../etc/passwd", "kvs/"));
        assert!(!is_object_key("kvs//x.mp4", "kvs/"));
        assert!(!is_object_key("other/x.mp4", "kvs/"));
    }

    #[test]
    fn without_a_token_only_loopback_names_are_answered() {
        let with = |host: &str| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(axum::http::header::HOST, host.parse().expect("header"));
            loopback_host(&headers)
        };
        assert!(with("127.0.0.1:8080"));
        assert!(with("localhost:8080"));
        assert!(with("[::1]:8080"));
        assert!(!with("evil.example:8080"));
        assert!(!with("192.0.2.1"));
    }

    #[test]
    fn ranges_as_browsers_send_them() {
        assert_eq!(parse_range("bytes=0-", 100), Some((0, 99)));
        assert_eq!(parse_range("bytes=10-19", 100), Some((10, 19)));
        assert_eq!(parse_range("bytes=90-500", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}

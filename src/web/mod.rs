//! `kvs-archiver serve`: a read-only web page of the archive. One page per stream with a
//! coverage timeline ([`timeline`]) from 30 days down to minutes; clicking an object plays
//! it in the page ([`media`]): from S3 through a presigned URL (a redirect), from a
//! directory destination streamed by this server with HTTP range requests. Only objects
//! the ledger records as done are served.
//!
//! It listens on loopback unless told otherwise; who may read it is [`auth`]'s business
//! (a token of 32 bytes or more, generated beyond loopback when none is given; a session
//! cookie; a limit on wrong guesses). Every answer carries headers that keep it out of
//! frames, caches and other sites' referrers ([`security_headers`]). Server-rendered
//! HTML and SVG, a little plain JavaScript, everything embedded in the binary.

mod api;
pub mod auth;
mod media;
pub mod timeline;

use crate::archive::ArchiveView;
use crate::config::StreamConfig;
use crate::destination::Destination;
use crate::domain::{rfc3339, EpochMs};
use crate::error::{Error, Result};
use crate::ledger::ChunkState;
use crate::playback::GAP_REPORT_MS;
use auth::{Access, Mode};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
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

struct Shared {
    archive: ArchiveView,
    access: Access,
    /// The sample tables of the objects HLS segments were last cut from: a player asks
    /// for an object's segments one after another.
    tracks: tokio::sync::Mutex<crate::playback::footage::Tracks>,
    /// How reads from the destination are retried.
    retry: crate::retry::RetryPolicy,
    /// The clips laid out last ([`api::RecentClips`]).
    clips: tokio::sync::Mutex<api::RecentClips>,
    /// Turns for laying out a clip ([`api::CLIPS_LAID_OUT_AT_ONCE`]).
    building: tokio::sync::Semaphore,
    /// The Content-Security-Policy of every answer ([`content_security_policy`]).
    csp: HeaderValue,
}

type AppState = Arc<Shared>;

/// Serves the page on `listen` until `shutdown` fires. A token shorter than
/// [`auth::MIN_TOKEN_BYTES`] is refused; beyond loopback without one, one is generated and
/// printed once.
pub async fn serve(
    archive: ArchiveView,
    listen: SocketAddr,
    token: Option<String>,
    retry: crate::retry::RetryPolicy,
    shutdown: crate::shutdown::Shutdown,
) -> Result<()> {
    let access = Access::new(listen, token)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Usage(format!("serve --listen {listen}: cannot listen: {e}")))?;
    let bound = listener.local_addr().unwrap_or(listen);
    let csp = content_security_policy(&archive.destination).await;
    say_how_it_is_guarded(&access, bound);
    let state: AppState = Arc::new(Shared {
        archive,
        access,
        csp,
        tracks: tokio::sync::Mutex::new(crate::playback::footage::Tracks::new(4)),
        retry,
        clips: tokio::sync::Mutex::new(api::RecentClips::new()),
        building: tokio::sync::Semaphore::new(api::CLIPS_LAID_OUT_AT_ONCE),
    });
    let app = api::routes()
        .route("/", axum::routing::get(index))
        .route("/streams/{name}", axum::routing::get(stream_page))
        .route("/media/{*key}", axum::routing::get(media::media))
        .route(
            "/assets/page.js",
            axum::routing::get(|| async { asset(PAGE_JS, "text/javascript") }),
        )
        .route(
            "/assets/page.css",
            axum::routing::get(|| async { asset(PAGE_CSS, "text/css") }),
        )
        // A fallback of our own, so that unknown paths pass the same layers.
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such page".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        // Outermost, so refusals (401, 421, 429) carry the headers too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state);
    // Printed (not only logged) so a user, or a test, knows where to point a browser.
    println!("serving the archive on http://{bound}/");
    tracing::info!(%bound, "serving the archive page");
    // The peer's address is what failed guesses are counted by.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.soft.cancelled().await })
    .await
    .map_err(|e| Error::Usage(format!("serve: {e}")))
}

/// One line at start-up for how the page is guarded: a generated token is printed once
/// (on standard error, not in the log: it is the operator's to copy, and the log may be
/// kept and shipped); loopback without a token warns about proxies.
fn say_how_it_is_guarded(access: &Access, bound: SocketAddr) {
    match (access.mode(), access.token()) {
        (Mode::Generated, Some(token)) => eprintln!(
            "kvs-archiver serve: no token given (KVS_ARCHIVER_SERVE_TOKEN or --token-file), so this run made one; it changes at every start:\n  {token}\n  open http://{bound}/?token={token} once (with this server's name), or send Authorization: Bearer"
        ),
        (Mode::LoopbackOnly, _) => tracing::warn!(
            %bound,
            "serve: no token: anyone who can reach this port reads the whole archive, including through a reverse proxy on this machine; set KVS_ARCHIVER_SERVE_TOKEN (or --token-file) if anything forwards to it"
        ),
        _ => {}
    }
}

/// The page's own script, styles and images from this server only; video from this
/// server or, for S3, from the origin presigned URLs point at (the player follows the
/// redirect); no frames, forms or base URLs.
async fn content_security_policy(destination: &Destination) -> HeaderValue {
    let media = match destination {
        Destination::Dir(_) => "'self'".to_string(),
        // Presigning is local (no request), so this is the origin the player will meet.
        Destination::S3(_) => match destination
            .playable_url(
                "kvs-archiver-csp-probe.mp4",
                std::time::Duration::from_secs(60),
            )
            .await
            .ok()
            .as_deref()
            .and_then(origin_of)
        {
            Some(origin) => format!("'self' {origin}"),
            None => "'self' https:".to_string(),
        },
    };
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src {media}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| {
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self' https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
    })
}

/// `scheme://host[:port]` of a URL, if it is plain enough to put in a policy.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    };
    (matches!(scheme, "http" | "https") && plain(authority))
        .then(|| format!("{scheme}://{authority}"))
}

/// Every answer, refusals and media included: no MIME sniffing, no framing (CSP and the
/// older X-Frame-Options), no caching of archive pages or video by browsers or proxies,
/// no referrer leaving for another site.
async fn security_headers(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CONTENT_SECURITY_POLICY, state.csp.clone());
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
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
    let config = &state.archive.config;
    let status = match state.archive.ledger.status().await {
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
            escape(&state.archive.destination.describe())
        ),
    )
    .into_response()
}

/// The chunks of a stream around `[from, to]`, as timeline spans.
async fn spans(
    archive: &ArchiveView,
    stream: &StreamConfig,
    from: EpochMs,
    to: EpochMs,
) -> Result<(Vec<Span>, Option<(EpochMs, EpochMs)>)> {
    let ledger = archive.ledger.as_ref();
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
    let alarm = archive.config.daemon.retention_alarm.as_millis() as i64;
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

/// A stream's page: its timeline over the asked window (or the archive's extent), the
/// links to move and zoom, a legend with counts, and the failures in view.
async fn stream_page(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let archive = &state.archive;
    let Some(stream) = archive.config.stream(&name).cloned() else {
        return failure(
            StatusCode::NOT_FOUND,
            format!("no stream {name} in the configuration"),
        );
    };
    let (from, to, found) = window_and_spans(archive, &stream, &query).await;
    let (spans, planned) = match found {
        Ok(found) => found,
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let (legend, failures) = legend_and_failures(&spans);
    let body = format!(
        r#"<h1><a href="/">kvs-archiver</a> / {name}</h1>
<nav>{navigation}</nav>
<p class="window">{from_text} .. {to_text} (UTC)</p>
<div id="scrubber">{svg}<div id="hover" hidden><video id="preview" muted playsinline preload="auto"></video><span id="hover-time"></span></div></div>
<p class="legend">{legend}</p>
<p id="selection" hidden><a id="download">download</a></p>
<video id="player" controls muted playsinline preload="metadata" data-stream="{name}"></video>
<p id="now-playing"></p>
<ul class="failures">{failures}</ul>"#,
        name = escape(&name),
        navigation = navigation(&name, from, to),
        from_text = rfc3339(from),
        to_text = rfc3339(to),
        svg = timeline::svg(spans, from, to, planned),
    );
    page(&format!("{name}: kvs-archiver"), &body).into_response()
}

/// The spans and planned range read for a page.
type Found = Result<(Vec<Span>, Option<(EpochMs, EpochMs)>)>;

/// The window a page shows and its spans: the query's `from` and `to` (at least a
/// minute, at most [`WIDEST_MS`]), or else the archive's extent within the last 30 days,
/// a little wider.
async fn window_and_spans(
    archive: &ArchiveView,
    stream: &StreamConfig,
    query: &HashMap<String, String>,
) -> (EpochMs, EpochMs, Found) {
    let now = chrono::Utc::now().timestamp_millis();
    // Within years 1970..2200, so the zoom arithmetic cannot overflow.
    let number = |k: &str| {
        query
            .get(k)
            .and_then(|v| v.parse::<EpochMs>().ok())
            .map(|t| t.clamp(0, 7_258_118_400_000))
    };
    if let (Some(from), Some(to)) = (number("from"), number("to")) {
        if to > from {
            let to = to.min(from + WIDEST_MS).max(from + 60_000);
            return (from, to, spans(archive, stream, from, to).await);
        }
    }
    // Its spans are the ones just read (one scan of the ledger, not two).
    let found = spans(archive, stream, now - WIDEST_MS, now).await;
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

/// The legend, each class with how many spans it has in view, and a list item for each
/// span with a note (a failure's error).
fn legend_and_failures(spans: &[Span]) -> (String, String) {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut failures = String::new();
    for s in spans {
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
    (legend, failures)
}

/// The links that move half a window earlier or later, zoom out or in four times about
/// the centre, or show a preset span about it.
fn navigation(name: &str, from: EpochMs, to: EpochMs) -> String {
    let zoom = |span: i64| {
        let center = (from + to) / 2;
        format!(
            "/streams/{}?from={}&to={}",
            escape(name),
            center - span / 2,
            center + span / 2
        )
    };
    let shift = |by: i64| {
        format!(
            "/streams/{}?from={}&to={}",
            escape(name),
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
    format!(
        r#"<a id="earlier" href="{earlier}">&larr; earlier</a> <a id="zoom-out" href="{out}">zoom out</a> <a id="zoom-in" href="{zin}">zoom in</a> <a id="later" href="{later}">later &rarr;</a> | {presets}"#,
        earlier = shift(-(to - from) / 2),
        later = shift((to - from) / 2),
        out = zoom((to - from) * 4),
        zin = zoom(((to - from) / 4).max(60_000)),
    )
}

#[cfg(test)]
mod tests {
    use super::origin_of;

    #[test]
    fn the_media_origin_is_taken_from_a_presigned_url() {
        assert_eq!(
            origin_of("https://b.s3.us-east-1.amazonaws.com/kvs/x.mp4?X-Amz-Signature=a"),
            Some("https://b.s3.us-east-1.amazonaws.com".into())
        );
        assert_eq!(
            origin_of("http://127.0.0.1:9000/bucket/x.mp4"),
            Some("http://127.0.0.1:9000".into())
        );
        assert_eq!(origin_of("https://a b;c/x"), None);
        assert_eq!(origin_of("javascript://x"), None);
        assert_eq!(origin_of("/local/path.mp4"), None);
    }
}

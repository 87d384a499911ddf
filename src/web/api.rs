//! The playback API, version 1: footage by time for any client (a video management
//! system, an incident tool, a phone, a plain `<video>` or an HLS player). Times are
//! RFC 3339. Same access rules as the page ([`super::auth`]); a player that cannot send
//! headers uses the signed URLs `share` hands out, or those inside a playlist.
//!
//! - `GET /api/v1/streams`: the streams and their archived extent.
//! - `GET /api/v1/streams/{stream}/spans?start=&end=`: archived spans and the gaps
//!   between them, with why each gap is there.
//! - `GET /api/v1/streams/{stream}/clip.mp4?start=&end=[&ts=1][&gaps=hold|join][&cut=exact|keyframe]`:
//!   one MP4 of the range, frame-exact by default, streamed as read, with its length
//!   known up front and byte ranges answered.
//! - `GET /api/v1/streams/{stream}/index.m3u8?start=&end=`: HLS of the range, segments
//!   remuxed on the fly (`hls/…`).
//! - `GET /api/v1/streams/{stream}/preview.mp4?at=`: the keyframe at an instant.
//! - `GET /api/v1/streams/{stream}/share?start=&end=[&ttl=]`: signed URLs of the range's
//!   playlist and clip, for players that cannot send a token.

use super::auth::Grant;
use super::media::parse_range;
use super::AppState;
use crate::config::StreamConfig;
use crate::domain::{rfc3339, EpochMs};
use crate::error::Error;
use crate::playback::clip::{Clip, ClipSpec, Cut};
use crate::playback::footage::Footage;
use crate::playback::{hls, preview, why_missing, GapMode, GAP_REPORT_MS};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// The latest instant a request may name (2200-01-01): arithmetic on times stays far
/// from overflow.
const LATEST_MS: EpochMs = 7_258_118_400_000;
/// The longest range a clip or a playlist covers: a day, and an hour either side.
const MAX_RANGE_MS: i64 = 26 * 3_600_000;
/// The longest range `spans` reads: a month.
const MAX_SPANS_MS: i64 = 31 * 86_400_000;
/// How long a signed URL is good for unless `ttl` says otherwise, and at most.
const DEFAULT_GRANT_SECS: u64 = 3_600;
const MAX_GRANT_SECS: u64 = 7 * 86_400;

/// The API's routes, under `/api/v1`.
pub(super) fn routes() -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/api/v1/streams", get(streams))
        .route("/api/v1/streams/{stream}/spans", get(spans))
        .route("/api/v1/streams/{stream}/clip.mp4", get(clip))
        .route("/api/v1/streams/{stream}/index.m3u8", get(playlist))
        .route("/api/v1/streams/{stream}/hls/{name}", get(segment))
        .route("/api/v1/streams/{stream}/preview.mp4", get(preview_frame))
        .route("/api/v1/streams/{stream}/share", get(share))
}

/// An API error: a status, and what to change, answered as JSON.
pub(super) struct Problem {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

fn problem(status: StatusCode, message: impl Into<String>) -> Problem {
    Problem {
        status,
        message: message.into(),
    }
}

/// The answer to an error of the library: bad input is the client's to fix (400), the
/// rest is the archive's (503 when a retry can help, 502 otherwise).
fn failed(e: &Error) -> Problem {
    let status = match e {
        Error::Usage(_) => StatusCode::BAD_REQUEST,
        // The archive holds it, but in cold storage: `kvs-archiver restore` first.
        Error::NeedsRestore(_) => StatusCode::CONFLICT,
        _ if e.retryability() != crate::error::Retryability::Permanent => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    problem(status, e.to_string())
}

/// An RFC 3339 query parameter.
fn time(query: &HashMap<String, String>, name: &str) -> Result<EpochMs, Problem> {
    let text = query.get(name).ok_or_else(|| {
        problem(
            StatusCode::BAD_REQUEST,
            format!("`{name}` is missing: an RFC 3339 time, like 2026-11-20T14:07:10Z"),
        )
    })?;
    let t = chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            problem(
                StatusCode::BAD_REQUEST,
                format!("`{name}` {text:?} is not an RFC 3339 time ({e}): write it like 2026-11-20T14:07:10Z"),
            )
        })?;
    if !(0..=LATEST_MS).contains(&t) {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!("`{name}` {text:?}: a time between 1970 and 2200"),
        ));
    }
    Ok(t)
}

/// `start` and `end`, checked: end after start, at most `longest` apart.
fn range(query: &HashMap<String, String>, longest: i64) -> Result<(EpochMs, EpochMs), Problem> {
    let (start, end) = (time(query, "start")?, time(query, "end")?);
    if end <= start {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "`end` must be after `start`",
        ));
    }
    if end - start > longest {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!(
                "the range is {:.1} h; ask for at most {} h at a time",
                (end - start) as f64 / 3.6e6,
                longest / 3_600_000
            ),
        ));
    }
    Ok((start, end))
}

/// The configured stream named in the path, or a 404.
fn stream_named(state: &AppState, name: &str) -> Result<StreamConfig, Problem> {
    state.archive.config.stream(name).cloned().ok_or_else(|| {
        problem(
            StatusCode::NOT_FOUND,
            format!("no stream {name:?} in the configuration"),
        )
    })
}

/// A request that came with a signed URL may reach only what the URL was signed for.
fn within_grant(
    grant: Option<&Grant>,
    stream: &str,
    start: EpochMs,
    end: EpochMs,
) -> Result<(), Problem> {
    match grant {
        Some(grant) if !grant.covers(stream, start, end) => Err(problem(
            StatusCode::FORBIDDEN,
            "this link was signed for another stream or range",
        )),
        _ => Ok(()),
    }
}

/// A stream and its archived extent.
#[derive(Serialize)]
struct StreamView {
    stream: String,
    timestamp_source: String,
    archived_from: Option<String>,
    archived_through: Option<String>,
    objects: u64,
    failed: u64,
    expired: u64,
}

async fn streams(State(state): State<AppState>, grant: Option<Extension<Grant>>) -> Response {
    if grant.is_some() {
        return problem(
            StatusCode::FORBIDDEN,
            "a signed link opens one stream's range only",
        )
        .into_response();
    }
    let status = match state.archive.ledger.status().await {
        Ok(status) => status,
        Err(e) => return failed(&e).into_response(),
    };
    let views: Vec<StreamView> = state
        .archive
        .config
        .streams
        .iter()
        .map(|stream| {
            let label = stream.label();
            let s = status.iter().find(|s| s.stream == label);
            StreamView {
                timestamp_source: format!("{:?}", stream.timestamp_source).to_lowercase(),
                archived_from: s.and_then(|s| s.archived_from_ms).map(rfc3339),
                archived_through: s.and_then(|s| s.archived_through_ms).map(rfc3339),
                objects: s.map_or(0, |s| s.done),
                failed: s.map_or(0, |s| s.failed),
                expired: s.map_or(0, |s| s.expired),
                stream: label,
            }
        })
        .collect();
    Json(serde_json::json!({ "streams": views })).into_response()
}

/// A run of archived media, or a gap and why.
#[derive(Serialize)]
struct SpanView {
    start: String,
    end: String,
    start_ms: EpochMs,
    end_ms: EpochMs,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    objects: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
}

async fn spans(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
) -> Response {
    let answer = async {
        let stream = stream_named(&state, &name)?;
        let (start, end) = range(&query, MAX_SPANS_MS)?;
        within_grant(grant.as_deref(), &stream.label(), start, end)?;
        let (label, source) = (stream.label(), stream.timestamp_source);
        let ledger = state.archive.ledger.as_ref();
        let runs = archived_runs(ledger, &label, source, start, end)
            .await
            .map_err(|e| failed(&e))?;
        let mut gaps = Vec::new();
        let mut at = start;
        for run in runs
            .iter()
            .map(|r| (r.start_ms, r.end_ms))
            .chain([(end, end)])
        {
            if run.0 - at > GAP_REPORT_MS {
                let why = why_missing(ledger, &label, source, at + (run.0 - at) / 2)
                    .await
                    .map_err(|e| failed(&e))?;
                gaps.push(SpanView {
                    start: rfc3339(at),
                    end: rfc3339(run.0),
                    start_ms: at,
                    end_ms: run.0,
                    objects: Vec::new(),
                    why: Some(why),
                });
            }
            at = at.max(run.1);
        }
        Ok::<_, Problem>(
            Json(serde_json::json!({
                "stream": label,
                "start": rfc3339(start),
                "end": rfc3339(end),
                "spans": runs,
                "gaps": gaps,
            }))
            .into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// Runs of archived fragments without a gap, clipped to `[start, end)`. Each chunk's
/// fragments are folded into runs as they are read (one or two per object), so a month
/// of them costs only the runs.
async fn archived_runs(
    ledger: &dyn crate::ledger::Ledger,
    label: &str,
    source: crate::domain::TimestampSource,
    start: EpochMs,
    end: EpochMs,
) -> crate::error::Result<Vec<SpanView>> {
    let reach = crate::domain::MAX_FRAGMENT_MS as i64;
    let chunks = ledger.done_in(label, source, start - reach, end).await?;
    // (from, to, chunk): runs of each chunk on its own first.
    let mut pieces: Vec<(EpochMs, EpochMs, usize)> = Vec::new();
    for (c, chunk) in chunks.iter().enumerate() {
        let mut run: Option<(EpochMs, EpochMs)> = None;
        for f in ledger.fragments_of(chunk.id).await? {
            let f_end = f.start_ms + f.duration_ms as i64;
            if f.start_ms >= end || f_end <= start {
                continue;
            }
            run = match run {
                Some((from, to)) if f.start_ms - to <= GAP_REPORT_MS => Some((from, to.max(f_end))),
                Some(done) => {
                    pieces.push((done.0, done.1, c));
                    Some((f.start_ms, f_end))
                }
                None => Some((f.start_ms, f_end)),
            };
        }
        pieces.extend(run.map(|(from, to)| (from, to, c)));
    }
    pieces.sort();
    let mut runs: Vec<SpanView> = Vec::new();
    for (from, to, c) in pieces {
        let key = &chunks[c].object_key;
        match runs.last_mut() {
            Some(run) if from - run.end_ms <= GAP_REPORT_MS => {
                run.end_ms = run.end_ms.max(to.min(end));
                run.end = rfc3339(run.end_ms);
                if !run.objects.contains(key) {
                    run.objects.push(key.clone());
                }
            }
            _ => runs.push(SpanView {
                start: rfc3339(from.max(start)),
                end: rfc3339(to.min(end)),
                start_ms: from.max(start),
                end_ms: to.min(end),
                objects: vec![key.clone()],
                why: None,
            }),
        }
    }
    Ok(runs)
}

/// The clip's options from the query.
fn clip_spec(
    query: &HashMap<String, String>,
    start: EpochMs,
    end: EpochMs,
) -> Result<ClipSpec, Problem> {
    let gaps = match query.get("gaps").map(String::as_str) {
        None | Some("hold") => GapMode::Hold,
        Some("join") => GapMode::Join,
        Some(other) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                format!("`gaps` {other:?}: hold or join"),
            ))
        }
    };
    let cut = match query.get("cut").map(String::as_str) {
        None | Some("exact") => Cut::Exact,
        Some("keyframe") => Cut::Keyframe,
        Some(other) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                format!("`cut` {other:?}: exact or keyframe"),
            ))
        }
    };
    let wall_clock_text = matches!(query.get("ts").map(String::as_str), Some("1" | "true"));
    Ok(ClipSpec {
        start,
        end,
        gaps,
        cut,
        wall_clock_text,
    })
}

async fn clip(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let stream = stream_named(&state, &name)?;
        let (start, end) = range(&query, MAX_RANGE_MS)?;
        within_grant(grant.as_deref(), &stream.label(), start, end)?;
        let spec = clip_spec(&query, start, end)?;
        let clip = laid_out_clip(&state, &stream, spec).await?;
        Ok::<_, Problem>(ranged_clip(&state, clip, &name, start, &headers))
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// The clip of `spec`, laid out again only when no recent request laid it out: a player
/// seeking sends a Range request for each seek. At most [`CLIPS_LAID_OUT_AT_ONCE`] are
/// laid out at a time, whatever the number of clients.
async fn laid_out_clip(
    state: &AppState,
    stream: &StreamConfig,
    spec: ClipSpec,
) -> Result<Arc<Clip>, Problem> {
    let key = format!(
        "{}\0{}\0{}\0{:?}\0{:?}\0{}",
        stream.label(),
        spec.start,
        spec.end,
        spec.gaps,
        spec.cut,
        spec.wall_clock_text
    );
    if let Some(clip) = state.clips.lock().await.held(&key) {
        return Ok(clip);
    }
    let _permit = state
        .building
        .acquire()
        .await
        .map_err(|_| problem(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping"))?;
    let archive = &state.archive;
    let clip = Clip::build(
        archive.ledger.as_ref(),
        &archive.destination,
        &stream.label(),
        stream.timestamp_source,
        spec,
    )
    .await
    .map_err(|e| match e {
        Error::Usage(why) => problem(StatusCode::NOT_FOUND, why),
        e => failed(&e),
    })?;
    let clip = Arc::new(clip);
    state.clips.lock().await.keep(key, clip.clone());
    Ok(clip)
}

/// Clips laid out at once: each holds its sample tables while it is laid out (4 bytes a
/// frame, and the headers of a few objects).
pub(super) const CLIPS_LAID_OUT_AT_ONCE: usize = 2;

/// The clips laid out last, by what was asked: the few a player is seeking in.
pub(super) struct RecentClips {
    kept: Vec<(String, Arc<Clip>)>,
}

impl RecentClips {
    /// Holds no more than two: a day-long clip's tables are some 15 MiB.
    const CAPACITY: usize = 2;

    pub(super) fn new() -> RecentClips {
        RecentClips { kept: Vec::new() }
    }

    fn held(&mut self, key: &str) -> Option<Arc<Clip>> {
        let at = self.kept.iter().position(|(k, _)| k == key)?;
        let kept = self.kept.remove(at);
        self.kept.push(kept.clone());
        Some(kept.1)
    }

    fn keep(&mut self, key: String, clip: Arc<Clip>) {
        self.kept.retain(|(k, _)| *k != key);
        if self.kept.len() >= Self::CAPACITY {
            self.kept.remove(0);
        }
        self.kept.push((key, clip));
    }
}

/// The clip's answer: whole (200) or the asked byte range (206), with its length, an
/// entity tag and what it holds in `X-Clip-*` headers.
fn ranged_clip(
    state: &AppState,
    clip: Arc<Clip>,
    stream: &str,
    start: EpochMs,
    headers: &HeaderMap,
) -> Response {
    let size = clip.len();
    let etag = clip.etag();
    // If-Range with another tag: the client's bytes are of another clip, so all of it.
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| {
            headers
                .get(header::IF_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_none_or(|tag| tag == etag)
        });
    let (status, from, to) = match range {
        None => (StatusCode::OK, 0, size),
        Some(value) => match parse_range(value, size) {
            Some((first, last)) => (StatusCode::PARTIAL_CONTENT, first, last + 1),
            None => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response()
            }
        },
    };
    let described = [
        ("x-clip-shown-from", rfc3339(clip.report.shown_from_ms)),
        ("x-clip-ends", rfc3339(clip.report.last_frame_end_ms)),
        ("x-clip-frames", clip.report.frames.to_string()),
        ("x-clip-gaps", clip.report.gaps.len().to_string()),
    ];
    let body = clip.stream(state.archive.destination.clone(), from, to, state.retry);
    let mut response = Response::new(channel_body(body));
    *response.status_mut() = status;
    let file = format!("{stream}_{}.mp4", crate::domain::compact_time(start));
    let set = [
        (header::CONTENT_TYPE, "video/mp4".to_string()),
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (header::CONTENT_LENGTH, (to - from).to_string()),
        (header::ETAG, etag),
        (
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{file}\""),
        ),
    ];
    let h = response.headers_mut();
    for (name, value) in set {
        if let Ok(value) = HeaderValue::from_str(&value) {
            h.insert(name, value);
        }
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {from}-{}/{size}", to - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    for (name, value) in described {
        if let Ok(value) = HeaderValue::from_str(&value) {
            h.insert(name, value);
        }
    }
    response
}

/// A body fed from a channel of byte chunks; an error ends it early.
fn channel_body(rx: tokio::sync::mpsc::Receiver<crate::error::Result<bytes::Bytes>>) -> Body {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map_err(|e| std::io::Error::other(e.to_string())), rx))
    });
    Body::from_stream(stream)
}

async fn playlist(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
) -> Response {
    let answer = async {
        let stream = stream_named(&state, &name)?;
        let (start, end) = range(&query, MAX_RANGE_MS)?;
        let label = stream.label();
        within_grant(grant.as_deref(), &label, start, end)?;
        let archive = &state.archive;
        let footage = Footage::of_range(
            archive.ledger.as_ref(),
            &archive.destination,
            &label,
            stream.timestamp_source,
            start,
            end,
        )
        .await
        .map_err(|e| failed(&e))?;
        let segments = hls::segments(&footage, start, end);
        if segments.is_empty() {
            let why = why_missing(
                archive.ledger.as_ref(),
                &label,
                stream.timestamp_source,
                start,
            )
            .await
            .map_err(|e| failed(&e))?;
            return Err(problem(
                StatusCode::NOT_FOUND,
                format!(
                    "the archive holds no video of {label} between {} and {} ({why})",
                    rfc3339(start),
                    rfc3339(end)
                ),
            ));
        }
        // The segments carry the playlist's own grant, or a new one for this range, good
        // for the range's length and an hour more (a player watches it in real time).
        let grant = match grant {
            Some(Extension(grant)) => grant,
            None => {
                let secs = ((end - start) as u64 / 1000 + DEFAULT_GRANT_SECS).min(MAX_GRANT_SECS);
                Grant::new(&label, start, end, secs)
            }
        };
        let signed = state.access.grant_query(&grant);
        let complete = range_is_settled(&state, &label, stream.timestamp_source, start, end)
            .await
            .map_err(|e| failed(&e))?;
        let text = hls::playlist(&segments, &signed, complete);
        Ok::<_, Problem>(
            (
                [(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")],
                text,
            )
                .into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// Whether nothing more will be archived in `[start, end)`: it is past, planning has
/// reached its end (when a daemon plans the stream), and no chunk in it waits for a
/// worker. Otherwise the playlist is an EVENT one that players reload.
async fn range_is_settled(
    state: &AppState,
    label: &str,
    source: crate::domain::TimestampSource,
    start: EpochMs,
    end: EpochMs,
) -> crate::error::Result<bool> {
    let ledger = state.archive.ledger.as_ref();
    let now = chrono::Utc::now().timestamp_millis();
    if end >= now {
        return Ok(false);
    }
    let planned = ledger.progress(label, source).await?.planned_through_ms;
    if planned.is_some_and(|through| through < end) {
        return Ok(false);
    }
    Ok(ledger
        .claimable(label, source, start, end, i64::MAX)
        .await?
        .is_empty())
}

/// A segment's file name: `{ms}.init.mp4` (its initialization) or `{ms}.m4s`, with the
/// instant within years 1970..2200, so no arithmetic on it can overflow.
fn segment_named(file: &str) -> Result<(EpochMs, bool), Problem> {
    let (at, init) = match (file.strip_suffix(".init.mp4"), file.strip_suffix(".m4s")) {
        (Some(at), _) => (at, true),
        (None, Some(at)) => (at, false),
        _ => return Err(problem(StatusCode::NOT_FOUND, "no such segment")),
    };
    let at: EpochMs = at
        .parse()
        .ok()
        .filter(|at| (0..=LATEST_MS).contains(at))
        .ok_or_else(|| problem(StatusCode::NOT_FOUND, "no such segment"))?;
    Ok((at, init))
}

async fn segment(
    State(state): State<AppState>,
    Path((name, file)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
) -> Response {
    let answer = async {
        let stream = stream_named(&state, &name)?;
        let label = stream.label();
        let (at, init) = segment_named(&file)?;
        let number = query
            .get("f")
            .filter(|n| crate::domain::is_fragment_number(n))
            .ok_or_else(|| problem(StatusCode::BAD_REQUEST, "`f`: the fragment's number"))?;
        let archive = &state.archive;
        let footage = Footage::of_range(
            archive.ledger.as_ref(),
            &archive.destination,
            &label,
            stream.timestamp_source,
            at,
            at + 1,
        )
        .await
        .map_err(|e| failed(&e))?;
        // A grant opens the segments reaching into its range (the first starts before it).
        if let Some(Extension(grant)) = &grant {
            let reaches = footage.placed.iter().map(|p| footage.fragment(p)).any(|f| {
                f.start_ms == at
                    && f.start_ms < grant.end_ms
                    && f.start_ms + f.duration_ms as i64 > grant.start_ms
            });
            if grant.stream != label || !reaches {
                return Err(problem(
                    StatusCode::FORBIDDEN,
                    "this link was signed for another stream or range",
                ));
            }
        }
        let body = hls::segment(
            &footage,
            &state.tracks,
            &archive.destination,
            at,
            number,
            init,
        )
        .await
        .map_err(|e| failed(&e))?;
        let Some(body) = body else {
            return Err(problem(StatusCode::NOT_FOUND, "no such segment"));
        };
        let len = body.len();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let destination = archive.destination.clone();
        let retry = state.retry;
        tokio::spawn(async move {
            let _ = tx.send(Ok(bytes::Bytes::from(body.header))).await;
            for (offset, run) in body.runs {
                let sent = crate::playback::clip::send_range(
                    &destination,
                    &body.key,
                    offset,
                    run,
                    &retry,
                    &tx,
                )
                .await;
                if let Err(e) = sent {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        });
        let content_type = if init {
            "video/mp4"
        } else {
            "video/iso.segment"
        };
        Ok::<_, Problem>(
            (
                [
                    (header::CONTENT_TYPE, content_type.to_string()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                channel_body(rx),
            )
                .into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn preview_frame(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
) -> Response {
    let answer = async {
        let stream = stream_named(&state, &name)?;
        let at = time(&query, "at")?;
        let label = stream.label();
        within_grant(grant.as_deref(), &label, at, at)?;
        let archive = &state.archive;
        let found = preview::preview(
            archive.ledger.as_ref(),
            &archive.destination,
            &label,
            stream.timestamp_source,
            at,
        )
        .await
        .map_err(|e| failed(&e))?;
        let Some(found) = found else {
            return Err(problem(
                StatusCode::NOT_FOUND,
                format!("no archived video of {label} at {}", rfc3339(at)),
            ));
        };
        Ok::<_, Problem>(
            (
                [
                    (header::CONTENT_TYPE, "video/mp4".to_string()),
                    (
                        header::HeaderName::from_static("x-frame-time"),
                        rfc3339(found.frame_ms),
                    ),
                ],
                found.bytes,
            )
                .into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

async fn share(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    grant: Option<Extension<Grant>>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        if grant.is_some() {
            return Err(problem(
                StatusCode::FORBIDDEN,
                "a signed link cannot sign another: ask with the token",
            ));
        }
        let stream = stream_named(&state, &name)?;
        let (start, end) = range(&query, MAX_RANGE_MS)?;
        let ttl = match query.get("ttl") {
            None => DEFAULT_GRANT_SECS,
            Some(ttl) => humantime::parse_duration(ttl)
                .ok()
                .map(|d| d.as_secs())
                .filter(|s| (1..=MAX_GRANT_SECS).contains(s))
                .ok_or_else(|| {
                    problem(
                        StatusCode::BAD_REQUEST,
                        format!("`ttl` {ttl:?}: a duration like 1h, at most 7d"),
                    )
                })?,
        };
        let label = stream.label();
        let grant = Grant::new(&label, start, end, ttl);
        let signed = state.access.grant_query(&grant);
        let base = format!("/api/v1/streams/{label}");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
        let scheme = if super::auth::arrived_over_https(&headers) {
            "https"
        } else {
            "http"
        };
        let absolute = |path: String| match host {
            Some(host) => format!("{scheme}://{host}{path}"),
            None => path,
        };
        Ok::<_, Problem>(
            Json(serde_json::json!({
                "stream": label,
                "expires": rfc3339(grant.expires as i64 * 1000),
                "playlist": absolute(format!("{base}/index.m3u8?{signed}")),
                "clip": absolute(format!("{base}/clip.mp4?{signed}")),
            }))
            .into_response(),
        )
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

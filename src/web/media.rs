//! `/media/{key}`: one archived object, for the page's `<video>`. Only an object the
//! ledger records as done is served: the key must be one this program writes
//! ([`is_object_key`]) and a done chunk of a configured stream must name it
//! ([`is_done_object`]). Anything else under the destination (sidecars, partial files, a
//! ledger kept there, links planted beside the objects) is a 404, whatever the
//! destination would open. From S3 the answer is a redirect to a presigned URL; from a
//! directory the file is streamed with range support.

use super::{failure, AppState};
use crate::archive::ArchiveView;
use crate::destination::Destination;
use crate::domain::EpochMs;
use crate::error::Result;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// How long a presigned URL handed to the player is good for: a long object watched with
/// pauses, not a link to keep.
const PRESIGNED_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

pub(super) async fn media(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    let archive = &state.archive;
    match is_done_object(archive, &key).await {
        Ok(true) => {}
        Ok(false) => return failure(StatusCode::NOT_FOUND, format!("no object {key}")),
        Err(e) => return failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    match archive.destination.as_ref() {
        Destination::S3(_) => match archive.destination.playable_url(&key, PRESIGNED_FOR).await {
            Ok(url) => Redirect::temporary(&url).into_response(),
            Err(e) => failure(StatusCode::BAD_GATEWAY, e.to_string()),
        },
        Destination::Dir(_) => match archive.destination.head(&key).await {
            Ok(Some(head)) => ranged_file(&archive.destination, &key, head.size, &headers).await,
            Ok(None) => failure(StatusCode::NOT_FOUND, format!("no object {key}")),
            Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    }
}

/// Whether a done chunk of a configured stream has `key` as its object. The key names
/// its stream (the folder under the prefix) and its first fragment's time
/// ([`start_named_by`]), so one narrow ledger query answers; the key must then equal the
/// chunk's exactly. A key that names no time is no object of ours.
pub(super) async fn is_done_object(archive: &ArchiveView, key: &str) -> Result<bool> {
    let prefix = &archive.config.destination.prefix;
    if !is_object_key(key, prefix) {
        return Ok(false);
    }
    // is_object_key holds, so the key starts with the prefix and has a file name.
    let rest = &key[prefix.len()..];
    let (Some((label, _)), Some(file)) = (rest.split_once('/'), rest.rsplit('/').next()) else {
        return Ok(false);
    };
    let Some(start) = start_named_by(file, label) else {
        return Ok(false);
    };
    for stream in archive.config.streams.iter().filter(|s| s.label() == label) {
        let done = archive
            .ledger
            .done_in(label, stream.timestamp_source, start, start)
            .await?;
        if done.iter().any(|chunk| chunk.object_key == key) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The first fragment's time an object's file name gives (`{stream}_{start}_…`, as
/// [`crate::domain::object_key`] writes it), which is its chunk's `start_ms`.
fn start_named_by(file: &str, stream: &str) -> Option<EpochMs> {
    let stamp = file
        .strip_prefix(stream)?
        .strip_prefix('_')?
        .split('_')
        .next()?;
    let time = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ").ok()?;
    Some(time.and_utc().timestamp_millis())
}

/// A key this program could have written: under the prefix, relative, with no `.`, `..`
/// or empty component, no backslash or control character, naming an MP4 or Matroska
/// file (not a `.json` sidecar or a `.partial` file). A directory destination joins it
/// to its root.
pub(super) fn is_object_key(key: &str, prefix: &str) -> bool {
    key.starts_with(prefix) && crate::domain::is_object_key(key)
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `size` bytes: an inclusive
/// range inside the file, or `None` (one range only; the player asks for no more).
pub(super) fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
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

async fn ranged_file(
    destination: &Destination,
    key: &str,
    size: u64,
    headers: &HeaderMap,
) -> Response {
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
    let body = match destination.read_range(key, start, len).await {
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
    use super::{is_object_key, parse_range, start_named_by};
    use crate::domain::{object_key, ChunkKind, ChunkPlan};
    use proptest::prelude::*;

    #[test]
    fn only_relative_keys_under_the_prefix_are_served() {
        assert!(is_object_key("kvs/cam/2026/12/04/cam_1_2.mp4", "kvs/"));
        assert!(is_object_key("cam/2026/12/04/cam_1_f7.mkv", ""));
        assert!(!is_object_key("/etc/passwd", ""));
        assert!(!is_object_key("kvs/../../etc/passwd", "kvs/"));
        assert!(!is_object_key("kvs//x.mp4", "kvs/"));
        assert!(!is_object_key("other/x.mp4", "kvs/"));
        assert!(!is_object_key("kvs/cam/x.mp4.json", "kvs/"));
        assert!(!is_object_key("kvs/cam/x.mp4.3.partial", "kvs/"));
        assert!(!is_object_key("state.db", ""));
        assert!(!is_object_key("kvs/cam/x\n.mp4", "kvs/"));
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
        assert_eq!(parse_range("bytes=0-", 0), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }

    fn plan(kind: ChunkKind, start_ms: i64) -> ChunkPlan {
        ChunkPlan {
            kind,
            fragments: Vec::new(),
            start_ms,
            end_ms: start_ms + 598_000,
            fragment_count: 300,
            bytes: 1,
            duration_ms: 600_000,
            first_fragment: "91343852333181432392682062607743920146264440559".into(),
            last_fragment: "2".into(),
        }
    }

    /// The ledger is asked by the time the key names: it must be the chunk's start, for
    /// every kind of object and for stream names with underscores.
    #[test]
    fn an_object_key_names_its_chunks_start() {
        for kind in [ChunkKind::Clip, ChunkKind::Late, ChunkKind::Mkv] {
            for stream in ["cam", "dock_cam_2"] {
                let chunk = plan(kind, 1_795_564_800_123);
                let key = object_key("kvs/", stream, &chunk);
                let file = key.rsplit('/').next().expect("a file name");
                assert_eq!(start_named_by(file, stream), Some(chunk.start_ms), "{key}");
                assert!(is_object_key(&key, "kvs/"), "{key}");
            }
        }
        assert_eq!(start_named_by("cam_20261125T000000.000Z.json", "cam"), None);
        assert_eq!(start_named_by("passwd.mp4", "cam"), None);
        assert_eq!(
            start_named_by("camera_20261125T000000.000Z_x.mp4", "cam"),
            None
        );
    }

    /// Text with the characters that matter to a path, often enough to meet each other.
    fn key_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("\\".to_string()),
            Just("kvs/".to_string()),
            Just(".mp4".to_string()),
            Just(".mkv".to_string()),
            Just(".json".to_string()),
            Just("\u{0}".to_string()),
            Just("\n".to_string()),
            Just("\u{7f}".to_string()),
            "[a-z0-9_]{1,6}",
            any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn accepted_keys_stay_under_the_prefix_and_name_media(
            key in key_like(),
            prefix in prop_oneof![Just(""), Just("kvs/"), Just("a/b/")],
        ) {
            if is_object_key(&key, prefix) {
                prop_assert!(key.starts_with(prefix));
                prop_assert!(!key.starts_with('/'));
                prop_assert!(!key.contains('\\'));
                prop_assert!(!key.chars().any(char::is_control));
                prop_assert!(key.ends_with(".mp4") || key.ends_with(".mkv"));
                for part in key.split('/') {
                    prop_assert!(!part.is_empty() && part != "." && part != "..", "{key:?}");
                }
                let path = std::path::Path::new(&key);
                prop_assert!(path.is_relative());
                prop_assert!(path
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }

        #[test]
        fn keys_this_program_writes_are_accepted(
            stream in "[A-Za-z0-9_.-]{1,20}",
            start_ms in 0i64..7_258_118_400_000,
            kind in prop_oneof![Just(ChunkKind::Clip), Just(ChunkKind::Late), Just(ChunkKind::Mkv)],
        ) {
            prop_assume!(stream != "." && stream != "..");
            let chunk = plan(kind, start_ms);
            let key = object_key("kvs/", &stream, &chunk);
            prop_assert!(is_object_key(&key, "kvs/"), "{key}");
            let file = key.rsplit('/').next().unwrap_or_default();
            prop_assert_eq!(start_named_by(file, &stream), Some(start_ms));
        }

        #[test]
        fn accepted_ranges_lie_within_the_file(
            value in prop_oneof![
                "bytes=[0-9]{0,21}-[0-9]{0,21}",
                "bytes= ?-?[0-9]{0,4} ?-? ?[0-9]{0,4}(,[0-9]-[0-9])?",
                any::<String>(),
            ],
            size in prop_oneof![Just(0u64), Just(1), 0u64..10_000, Just(u64::MAX)],
        ) {
            if let Some((start, end)) = parse_range(&value, size) {
                prop_assert!(start <= end, "{value:?} of {size}: {start}-{end}");
                prop_assert!(end < size, "{value:?} of {size}: {start}-{end}");
            }
        }
    }
}

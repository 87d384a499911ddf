//! Domain types shared by every module: fragments, planned chunks, time ranges and object
//! keys. Pure: no I/O, no clocks.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;

/// Milliseconds since the Unix epoch: KVS timestamps have millisecond precision.
pub type EpochMs = i64;

/// Which fragment timestamp selects and orders fragments (KVS `FragmentSelectorType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimestampSource {
    /// The time KVS received the fragment: monotonic, never in the future.
    #[default]
    Server,
    /// The camera's clock.
    Producer,
}

impl TimestampSource {
    /// The name stored in the ledger and written in object metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampSource::Server => "server",
            TimestampSource::Producer => "producer",
        }
    }

    /// The source a stored name means; `None` for a name this build does not know.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "server" => Some(TimestampSource::Server),
            "producer" => Some(TimestampSource::Producer),
            _ => None,
        }
    }
}

impl fmt::Display for TimestampSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One fragment as ListFragments describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Decimal string of up to 128 digits (real ones have 47): larger than any integer type.
    pub number: String,
    /// Start timestamp of the stream's timestamp source.
    pub start_ms: EpochMs,
    /// When KVS received it: retention deletes by this clock, whatever the stream's source.
    pub server_ms: EpochMs,
    /// How long the fragment plays.
    pub duration_ms: u64,
    /// `FragmentSizeInBytes`: what GetClip's byte cap counts.
    pub size_bytes: u64,
}

/// The longest fragment this program accepts from a listing. KVS's own limit is 20 s; the
/// bound is looser so that it only refuses answers no KVS gives, and keeps sums of
/// durations far from overflow.
pub const MAX_FRAGMENT_MS: u64 = 3_600_000;
/// The largest fragment this program accepts from a listing (KVS's limit is 50 MB).
pub const MAX_FRAGMENT_BYTES: u64 = 1 << 30;

/// The longest fragment number the API model admits (`FragmentNumber`, 1–128 digits).
pub const MAX_FRAGMENT_NUMBER_LEN: usize = 128;

/// Whether `text` is a fragment number as the API model defines it: 1–128 ASCII digits.
/// Fragment numbers become parts of object keys and file names, so nothing else may pass.
pub fn is_fragment_number(text: &str) -> bool {
    (1..=MAX_FRAGMENT_NUMBER_LEN).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `key` can name an object this program writes: relative, `/`-separated parts
/// that are each non-empty, not `.` or `..`, free of backslashes and control characters,
/// ending in `.mp4` or `.mkv`. Keys from the ledger, the bucket or a request pass this
/// before they become a path or a request, so none can reach outside the destination.
pub fn is_object_key(key: &str) -> bool {
    const MAX_KEY_LEN: usize = 1024; // S3's own limit on a key, in bytes
    key.len() <= MAX_KEY_LEN
        && (key.ends_with(".mp4") || key.ends_with(".mkv"))
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && !key.chars().any(|c| c == '\\' || c.is_control())
}

/// `text` (a key listed from the bucket, say) safe to print on a terminal: control
/// characters, escape sequences among them, are shown escaped (`\u{1b}`).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Orders fragment numbers numerically: by length, then by digits.
pub fn cmp_fragment_numbers(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl Fragment {
    /// Fragments sort by start timestamp, then by fragment number (ingestion order).
    pub fn order(&self, other: &Fragment) -> Ordering {
        self.start_ms
            .cmp(&other.start_ms)
            .then_with(|| cmp_fragment_numbers(&self.number, &other.number))
    }
}

/// How a chunk's media is fetched, and so what its object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChunkKind {
    /// A GetClip range of its own: consecutive fragments, one MP4.
    #[default]
    Clip,
    /// One fragment listed after the range around it was archived, alone in a GetClip
    /// range that selects no archived fragment: one MP4.
    Late,
    /// Fragments GetClip cannot select or package alone (an equal producer timestamp,
    /// media GetClip refuses), fetched by number with GetMediaForFragmentList: Matroska.
    Mkv,
}

impl ChunkKind {
    /// The name stored in the ledger and written in object metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkKind::Clip => "clip",
            ChunkKind::Late => "late",
            ChunkKind::Mkv => "mkv",
        }
    }

    /// The kind a stored name means; `None` for a name this build does not know.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "clip" => Some(ChunkKind::Clip),
            "late" => Some(ChunkKind::Late),
            "mkv" => Some(ChunkKind::Mkv),
            _ => None,
        }
    }

    /// The object's file extension and content type.
    pub fn container(self) -> (&'static str, &'static str) {
        match self {
            ChunkKind::Clip | ChunkKind::Late => ("mp4", "video/mp4"),
            ChunkKind::Mkv => ("mkv", "video/x-matroska"),
        }
    }
}

/// A run of consecutive fragments fetched with one GetClip: the unit of work and of the
/// ledger. GetClip selects fragments whose start lies in `[start_ms, end_ms]`, both
/// inclusive, so chunks that do not overlap never share a fragment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChunkPlan {
    /// How the chunk is fetched and packaged (GetClip's MP4, a late fragment, Matroska).
    pub kind: ChunkKind,
    /// Start of the first fragment.
    pub start_ms: EpochMs,
    /// Start of the last fragment.
    pub end_ms: EpochMs,
    /// Fragments in the chunk (GetClip takes at most 200).
    pub fragment_count: u32,
    /// Sum of the fragments' `FragmentSizeInBytes`.
    pub bytes: u64,
    /// Sum of the fragments' durations: what the clip should play for.
    pub duration_ms: u64,
    /// Number of the first fragment.
    pub first_fragment: String,
    /// Number of the last fragment.
    pub last_fragment: String,
    /// The fragments the chunk holds, as listed when it was planned.
    #[serde(skip)]
    pub fragments: Vec<Fragment>,
}

impl ChunkPlan {
    /// A chunk of the given fragments (sorted, non-empty).
    pub fn of(kind: ChunkKind, fragments: Vec<Fragment>) -> ChunkPlan {
        let first = fragments.first();
        let last = fragments.last();
        ChunkPlan {
            kind,
            start_ms: first.map_or(0, |f| f.start_ms),
            end_ms: last.map_or(0, |f| f.start_ms),
            fragment_count: fragments.len() as u32,
            bytes: fragments.iter().map(|f| f.size_bytes).sum(),
            duration_ms: fragments.iter().map(|f| f.duration_ms).sum(),
            first_fragment: first.map(|f| f.number.clone()).unwrap_or_default(),
            last_fragment: last.map(|f| f.number.clone()).unwrap_or_default(),
            fragments,
        }
    }

    /// GetClip's range. It must end after it starts, so a chunk of one timestamp asks for
    /// one millisecond more; fragments are at least a second apart (KVS's minimum
    /// fragment duration), so that millisecond holds no other fragment.
    pub fn clip_range(&self) -> (EpochMs, EpochMs) {
        (self.start_ms, self.end_ms.max(self.start_ms + 1))
    }
}

/// Formats epoch milliseconds as RFC 3339 with milliseconds, in UTC.
pub fn rfc3339(ms: EpochMs) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// `ms` as UTC with no separators (`20240101T000000.000Z`): the form used in object keys.
pub fn compact_time(ms: EpochMs) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y%m%dT%H%M%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The object key of a chunk: derived from the stream and the chunk's fragment range only,
/// so a re-upload after a crash lands on the same key, and `backfill` and `run` agree.
///
/// `{prefix}{stream}/{YYYY}/{MM}/{DD}/{stream}_{start}_{end}.mp4`, times in UTC; the date
/// is the first fragment's. A late or Matroska chunk lies inside an archived range, so its
/// key also names its first fragment: `{stream}_{start}_f{number}.mp4` or `.mkv`.
pub fn object_key(prefix: &str, stream: &str, chunk: &ChunkPlan) -> String {
    let date = DateTime::<Utc>::from_timestamp_millis(chunk.start_ms)
        .map(|t| t.format("%Y/%m/%d").to_string())
        .unwrap_or_else(|| "invalid-date".to_string());
    let (extension, _) = chunk.kind.container();
    match chunk.kind {
        ChunkKind::Clip => format!(
            "{prefix}{stream}/{date}/{stream}_{}_{}.{extension}",
            compact_time(chunk.start_ms),
            compact_time(chunk.end_ms)
        ),
        ChunkKind::Late | ChunkKind::Mkv => format!(
            "{prefix}{stream}/{date}/{stream}_{}_f{}.{extension}",
            compact_time(chunk.start_ms),
            chunk.first_fragment
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_digits_are_fragment_numbers() {
        assert!(is_fragment_number(
            "91343852336970796563495554524102405879022788815"
        ));
        assert!(is_fragment_number(&"9".repeat(128)));
        assert!(!is_fragment_number(&"9".repeat(129)));
        assert!(!is_fragment_number(""));
        assert!(!is_fragment_number("1/../../tmp/escaped"));
        assert!(!is_fragment_number("１２")); // full-width digits
    }

    #[test]
    fn object_keys_stay_relative_and_inside() {
        assert!(is_object_key("kvs/cam/2026/11/25/cam_1_2.mp4"));
        assert!(is_object_key("cam/x_f1.mkv"));
        for bad in [
            "/etc/passwd.mp4",
            "kvs/../../x.mp4",
            "kvs/./x.mp4",
            "kvs//x.mp4",
            "kvs/x.mp4.json",
            "kvs/x.mp4.1-2.partial",
            "kvs\\..\\x.mp4",
            "kvs/x\n.mp4",
            "",
        ] {
            assert!(!is_object_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn listed_keys_print_without_their_control_characters() {
        assert_eq!(printable("kvs/cam/x.mp4"), "kvs/cam/x.mp4");
        assert_eq!(printable("kvs/\u{1b}[2Jx.mp4"), "kvs/\\u{1b}[2Jx.mp4");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn an_accepted_key_never_leaves_the_root(key in "[a-z./\\\\\n-]{0,40}(\\.mp4|\\.mkv)?") {
            if is_object_key(&key) {
                let path = std::path::Path::new(&key);
                proptest::prop_assert!(path.is_relative());
                proptest::prop_assert!(path.components().all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }

        /// Against an independent oracle, on strings mostly of digits.
        #[test]
        fn fragment_numbers_are_one_to_128_ascii_digits(number in "[0-9]{0,130}|[0-9]{1,5}[/.a٣][0-9]{0,5}") {
            let oracle = !number.is_empty()
                && number.len() <= 128
                && number.chars().all(|c| "0123456789".contains(c));
            proptest::prop_assert_eq!(is_fragment_number(&number), oracle);
        }
    }

    #[test]
    fn fragment_numbers_compare_numerically() {
        assert_eq!(cmp_fragment_numbers("9", "10"), Ordering::Less);
        assert_eq!(
            cmp_fragment_numbers(
                "91343852336970796563495554524102405879022788815",
                "91343852336970796563495554524102405879022788816"
            ),
            Ordering::Less
        );
        assert_eq!(cmp_fragment_numbers("007", "7"), Ordering::Equal);
    }

    #[test]
    fn object_keys_name_stream_date_and_range() {
        let chunk = ChunkPlan {
            kind: ChunkKind::Clip,
            fragments: Vec::new(),
            start_ms: 1_795_564_800_000,
            end_ms: 1_795_565_398_000,
            fragment_count: 300,
            bytes: 1,
            duration_ms: 600_000,
            first_fragment: "1".into(),
            last_fragment: "2".into(),
        };
        assert_eq!(
            object_key("kvs/", "cam", &chunk),
            "kvs/cam/2026/11/25/cam_20261125T000000.000Z_20261125T000958.000Z.mp4"
        );
    }
}

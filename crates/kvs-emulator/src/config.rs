//! What the emulator serves: credentials, streams and their faults. Read from TOML by the
//! binary, built in code by tests, and sent as JSON to the admin endpoint.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Static test credentials every request must be signed with.
pub const DEFAULT_ACCESS_KEY_ID: &str = "AKIDKVSEMULATOR";
/// The secret that goes with [`DEFAULT_ACCESS_KEY_ID`].
pub const DEFAULT_SECRET_ACCESS_KEY: &str = "kvs-emulator-secret";

/// The whole emulator: credentials, ARN parts, seed and the streams that exist at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Access key id a request's SigV4 `Credential` must name.
    #[serde(default = "default_access_key_id")]
    pub access_key_id: String,
    /// Secret the signature is checked with.
    #[serde(default = "default_secret_access_key")]
    pub secret_access_key: String,
    /// Region reported in ARNs (any signing region is accepted, as s3s-fs does).
    #[serde(default = "default_region")]
    pub region: String,
    /// Account id reported in ARNs.
    #[serde(default = "default_account")]
    pub account_id: String,
    /// Seed of the pseudo-random choices (failure rates, page shuffling).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Streams that exist from the start.
    #[serde(default)]
    pub streams: Vec<StreamSpec>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            access_key_id: default_access_key_id(),
            secret_access_key: default_secret_access_key(),
            region: default_region(),
            account_id: default_account(),
            seed: default_seed(),
            streams: Vec::new(),
        }
    }
}

impl EmulatorConfig {
    /// Reads a configuration from a TOML file; the error names the file.
    pub fn from_toml_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
    }
}

fn default_access_key_id() -> String {
    DEFAULT_ACCESS_KEY_ID.to_string()
}
fn default_secret_access_key() -> String {
    DEFAULT_SECRET_ACCESS_KEY.to_string()
}
fn default_region() -> String {
    "us-east-1".to_string()
}
fn default_account() -> String {
    "123456789012".to_string()
}
fn default_seed() -> u64 {
    0x5eed
}

/// Whether a stream's fragments are a fixed past range or keep arriving with the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fragments cover `[start, end]` and nothing is added later.
    Historical,
    /// Fragments from `start` on, each appearing once the wall clock passes its end.
    #[default]
    Live,
}

/// A period without fragments, as when a camera goes offline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapSpec {
    /// Where the gap begins, measured from the stream's start.
    #[serde(with = "humantime_serde")]
    pub after: std::time::Duration,
    /// How long the camera was silent.
    #[serde(with = "humantime_serde")]
    pub length: std::time::Duration,
}

/// One stream: its media, its history and its faults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name (1–256 of `[a-zA-Z0-9_.-]`).
    pub name: String,
    /// Data retention; 0 means the stream keeps nothing (GetClip then fails).
    #[serde(default = "default_retention_hours")]
    pub data_retention_hours: u32,
    /// Media type reported by DescribeStream; GetClip serves only `video/h264`.
    #[serde(default = "default_media_type")]
    pub media_type: String,
    /// Historical (a fixed range) or live (fragments keep arriving with the clock).
    #[serde(default)]
    pub mode: Mode,
    /// First fragment's server timestamp, RFC 3339. Default: now minus `backlog`.
    #[serde(default)]
    pub start: Option<chrono::DateTime<chrono::Utc>>,
    /// How much history exists when `start` is not given.
    #[serde(default = "default_backlog", with = "humantime_serde")]
    pub backlog: std::time::Duration,
    /// End of a historical stream, RFC 3339. Default: the moment the stream is created.
    #[serde(default)]
    pub end: Option<chrono::DateTime<chrono::Utc>>,
    /// Fragment durations in milliseconds (1,000–20,000), repeated in order.
    #[serde(default = "default_durations")]
    pub fragment_durations_ms: Vec<u32>,
    /// Media bytes per fragment; filler pads smaller fragments up to it (0: no padding).
    #[serde(default)]
    pub fragment_size: u64,
    /// Milliseconds between frames: 100 (10 fps, the fixture's own rate) by default; 33
    /// for a 30 fps camera (the fixture's frames, timed faster).
    #[serde(default = "default_frame_interval")]
    pub frame_interval_ms: u32,
    /// Silent periods.
    #[serde(default)]
    pub gaps: Vec<GapSpec>,
    /// Server timestamp minus producer timestamp, in milliseconds.
    #[serde(default)]
    pub producer_offset_ms: i64,
    /// Fragments (by ingest index) whose producer timestamp lies `late_by` further back:
    /// a camera that delivered them late, after the media around them was archived.
    #[serde(default)]
    pub late_fragments_at: Vec<u64>,
    /// How far back the producer timestamps of `late_fragments_at` lie.
    #[serde(default, with = "humantime_serde")]
    pub late_by: std::time::Duration,
    /// Fragments (by ingest index) that repeat the previous fragment's producer timestamp.
    #[serde(default)]
    pub duplicate_producer_timestamp_at: Vec<u64>,
    /// Fragment indexes (0-based) at which the codec private data changes, like a camera
    /// that switched resolution. A clip may not span such a change.
    #[serde(default)]
    pub codec_changes_at: Vec<u64>,
    /// Fragment indexes whose video track lacks codec private data.
    #[serde(default)]
    pub missing_codec_private_data_at: Vec<u64>,
    /// Fragment indexes holding a frame that does not parse.
    #[serde(default)]
    pub invalid_frames_at: Vec<u64>,
    /// Faults and limits the stream starts with; tests change them at run time.
    #[serde(default)]
    pub faults: Faults,
}

impl StreamSpec {
    /// A live stream of 2 s fragments with an hour of history.
    pub fn live(name: &str) -> Self {
        StreamSpec {
            name: name.to_string(),
            data_retention_hours: default_retention_hours(),
            media_type: default_media_type(),
            mode: Mode::Live,
            start: None,
            backlog: default_backlog(),
            end: None,
            fragment_durations_ms: default_durations(),
            fragment_size: 0,
            frame_interval_ms: default_frame_interval(),
            gaps: Vec::new(),
            producer_offset_ms: 0,
            late_fragments_at: Vec::new(),
            late_by: std::time::Duration::ZERO,
            duplicate_producer_timestamp_at: Vec::new(),
            codec_changes_at: Vec::new(),
            missing_codec_private_data_at: Vec::new(),
            invalid_frames_at: Vec::new(),
            faults: Faults::default(),
        }
    }

    /// A historical stream covering `[start, end]`.
    pub fn historical(
        name: &str,
        start: chrono::DateTime<chrono::Utc>,
        end: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        StreamSpec {
            mode: Mode::Historical,
            start: Some(start),
            end: Some(end),
            ..Self::live(name)
        }
    }

    /// Refuses a name KVS would refuse, fragment durations outside KVS's limits, or an end
    /// before the start; the message names the stream.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 256
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(format!(
                "stream name {:?}: must be 1-256 characters of [a-zA-Z0-9_.-]",
                self.name
            ));
        }
        if self.fragment_durations_ms.is_empty()
            || self
                .fragment_durations_ms
                .iter()
                .any(|d| !(1_000..=20_000).contains(d))
        {
            return Err(format!(
                "stream {}: fragment_durations_ms must list durations of 1000-20000 ms (KVS's fragment limits)",
                self.name
            ));
        }
        if let (Some(start), Some(end)) = (self.start, self.end) {
            if end < start {
                return Err(format!("stream {}: end is before start", self.name));
            }
        }
        Ok(())
    }
}

fn default_retention_hours() -> u32 {
    24
}
fn default_media_type() -> String {
    "video/h264".to_string()
}
fn default_backlog() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}
fn default_frame_interval() -> u32 {
    crate::media::FRAME_INTERVAL_MS
}

fn default_durations() -> Vec<u32> {
    vec![2_000]
}

/// Faults and limits of one stream; tests switch them at run time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Enforce KVS's per-stream quotas with ClientLimitExceededException.
    pub throttling: bool,
    /// Multiplies every quota rate (0.1 makes throttling ten times easier to reach).
    pub quota_scale: f64,
    /// Share of data-plane requests answered with 500 InternalFailure.
    pub internal_failure_rate: f64,
    /// The next N data-plane requests fail with 500 InternalFailure.
    pub internal_failures_next: u32,
    /// Share of GetClip bodies cut off (connection reset) after `reset_after_bytes`.
    pub reset_rate: f64,
    /// The next N GetClip bodies are cut off after `reset_after_bytes`.
    pub resets_next: u32,
    /// Where a cut-off body ends.
    pub reset_after_bytes: u64,
    /// Delay before the first byte of a GetClip response.
    pub first_byte_delay_ms: u64,
    /// Cap on GetClip body bandwidth, bytes per second.
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// GetClip's fragment cap (AWS: 200); over it the clip is silently cut.
    pub max_clip_fragments: u32,
    /// GetClip's size cap on media bytes (AWS: "100 MB"; taken as 10^8 bytes, the
    /// stricter reading); over it the clip is silently cut.
    pub max_clip_bytes: u64,
    /// How long after a fragment ends before ListFragments shows it (eventual consistency).
    pub listing_delay_ms: u64,
    /// IAM denies every action on this stream: NotAuthorizedException (401).
    pub deny_access: bool,
    /// The next this many ListFragments answers are HTTP 200 with a body that is not the
    /// model's JSON: cut-off JSON, then an empty body, alternating.
    pub malformed_listings_next: u32,
    /// The next this many data-plane requests are refused as signed with expired
    /// temporary credentials (ExpiredTokenException, 403).
    pub expired_tokens_next: u32,
    /// The next this many GetClip bodies stop sending after `reset_after_bytes` and never
    /// resume (the connection stays open): a stalled body.
    pub stalls_next: u32,
    /// Every ListFragments page lists each of its fragments twice.
    pub duplicate_listings: bool,
    /// A page that has a next page carries a NextToken of 5000 characters (the model
    /// allows 4096).
    pub huge_next_token: bool,
    /// ListFragments reports the first fragment of every page under this number instead
    /// of its own: an endpoint (or a plain-http path) that answers with hostile values.
    pub listed_fragment_number: Option<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            throttling: true,
            quota_scale: 1.0,
            internal_failure_rate: 0.0,
            internal_failures_next: 0,
            reset_rate: 0.0,
            resets_next: 0,
            reset_after_bytes: 64 * 1024,
            first_byte_delay_ms: 0,
            bandwidth_bytes_per_sec: None,
            max_clip_fragments: 200,
            max_clip_bytes: 100_000_000,
            listing_delay_ms: 0,
            deny_access: false,
            malformed_listings_next: 0,
            expired_tokens_next: 0,
            stalls_next: 0,
            duplicate_listings: false,
            huge_next_token: false,
            listed_fragment_number: None,
        }
    }
}

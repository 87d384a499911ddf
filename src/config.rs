//! Configuration: built-in defaults, then the TOML file, then `KVS_ARCHIVER_*` environment
//! variables (`__` between levels), then [`Config::validate`], which names the offending
//! field. Credentials never live here: the AWS default credential chain provides them.

use crate::domain::TimestampSource;
pub use crate::error::ConfigError;
use crate::plan::ChunkLimits;
use crate::storage::{ObjectLockConfig, Overrides, Sse, StorageClass, StreamSettings};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// GetClip's hard caps (KVS quotas page).
pub const GET_CLIP_MAX_FRAGMENTS: u32 = 200;
/// GetClip's cap on the bytes of one clip.
pub const GET_CLIP_MAX_BYTES: u64 = 100_000_000;
const DAY: Duration = Duration::from_secs(24 * 3600);

/// The whole configuration, as loaded and validated before anything starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[aws]`: region, endpoints and credentials' source.
    #[serde(default)]
    pub aws: AwsConfig,
    /// `[ledger]`: where progress is recorded (`[state]` in older files, still read).
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// `[destination]`: the bucket or directory objects go to.
    #[serde(default)]
    pub destination: DestinationConfig,
    /// `[archive]`: how media is cut into objects, retried and paced.
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// `[daemon]`: how `run` schedules and limits its work.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// `[[streams]]`: the streams to archive, each with its overrides.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
}

/// How `kvs-archiver run` schedules and limits its work.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Cron expression with seconds (sec min hour day-of-month month day-of-week): when
    /// each stream's archiving run starts. A stream may override it.
    pub schedule: String,
    /// Time zone of the schedules: "UTC", "local", or a fixed offset such as "+01:00".
    pub time_zone: String,
    /// How far behind the live edge archiving stays: past KVS's listing delay (under a
    /// second) and the longest fragment (20 s). A stream may override it.
    #[serde(with = "humantime_serde")]
    pub lag: Duration,
    /// Each pass lists this far behind what it already planned again, and archives
    /// fragments listed since (media delayed on its way into KVS), for streams selected by
    /// server timestamp. A stream may override it.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// The same for streams selected by producer timestamp: cameras that buffer and
    /// upload in batches (the KVS Edge Agent, cellular links) deliver minutes late.
    #[serde(with = "humantime_serde")]
    pub producer_settle: Duration,
    /// A pass over one stream stops after this long (its chunks in flight are taken back
    /// and finished by the next pass), so one stuck stream never holds the others' work.
    #[serde(with = "humantime_serde")]
    pub pass_timeout: Duration,
    /// Clips in flight across all streams.
    pub max_clips_in_flight: usize,
    /// On SIGTERM/SIGINT, how long clips in flight may take to finish before they are
    /// aborted (and their chunks go back to pending). Keep it under systemd's
    /// TimeoutStopSec.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log an error and raise the at-risk metric when the oldest unarchived fragment of
    /// a stream is this close to KVS deleting it.
    #[serde(with = "humantime_serde")]
    pub retention_alarm: Duration,
    /// Prometheus `/metrics` and `/healthz` listener; off unless set. Loopback only.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Control-plane pacing (GetDataEndpoint, DescribeStream): KVS allows 5 per second
    /// per stream and 300 per second per account.
    pub control_calls_per_second_per_stream: f64,
    /// The account-wide half of that pacing, shared by every stream.
    pub control_calls_per_second: f64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            schedule: "0 */5 * * * *".to_string(),
            time_zone: "UTC".to_string(),
            lag: Duration::from_secs(120),
            settle: Duration::from_secs(10 * 60),
            producer_settle: Duration::from_secs(3600),
            pass_timeout: Duration::from_secs(30 * 60),
            max_clips_in_flight: 8,
            shutdown_grace: Duration::from_secs(30),
            retention_alarm: Duration::from_secs(3600),
            metrics_listen: None,
            control_calls_per_second_per_stream: 4.0,
            control_calls_per_second: 250.0,
        }
    }
}

impl DaemonConfig {
    /// The schedules' time zone.
    pub fn zone(&self) -> Result<crate::schedule::Zone, ConfigError> {
        crate::schedule::Zone::parse(&self.time_zone).ok_or_else(|| {
            invalid(
                "daemon.time_zone",
                format!(
                    "must be an IANA zone like \"Europe/Paris\", \"UTC\", \"local\" or an offset like \"+01:00\" (got {:?})",
                    self.time_zone
                ),
            )
        })
    }
}

/// Whether `schedule` is a cron expression with seconds, as the daemon fires them.
fn valid_cron(schedule: &str) -> bool {
    crate::schedule::parse_cron(schedule).is_some()
}

/// `[aws]`: where the streams and the bucket are, and how they are reached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region of the streams and of the bucket's signing.
    pub region: String,
    /// Control-plane endpoint (GetDataEndpoint, DescribeStream); default: AWS's.
    pub kinesis_video_endpoint_url: Option<String>,
    /// Any S3-compatible store; default: AWS S3.
    pub s3_endpoint_url: Option<String>,
    /// Path-style bucket addressing, which most S3-compatible stores need.
    pub s3_force_path_style: bool,
    /// STS endpoint for `destination.role_arn` (a VPC endpoint, say); default: AWS's.
    pub sts_endpoint_url: Option<String>,
    /// PEM file of the certificate authorities trusted instead of the system's, for
    /// endpoints behind a private CA (a TLS-inspecting proxy, an S3-compatible store).
    /// Unset: `$AWS_CA_BUNDLE` if set, as the AWS CLI reads it.
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Longest wait to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence on a response (first byte or between bytes) before it is retried.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// KVS is the bundled emulator, started inside the process from this emulator
    /// configuration (its streams), with the emulator's own keys: what `kvs-archiver demo`
    /// writes, so that every command works on the demo's archive afterwards. Unset for a
    /// real KVS; needs a build with the `demo` feature (the default). Its keys sign every
    /// request, so it goes with a directory destination, as the demo's does.
    pub bundled_emulator: Option<std::path::PathBuf>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: "us-east-1".to_string(),
            kinesis_video_endpoint_url: None,
            s3_endpoint_url: None,
            s3_force_path_style: false,
            sts_endpoint_url: None,
            ca_bundle: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            bundled_emulator: None,
        }
    }
}

/// `[ledger]`: where progress is recorded, and who this instance is in it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// The ledger of progress: `sqlite://PATH` (one host; created if missing) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` (several instances share one fleet).
    pub database_url: String,
    /// This instance's id in a shared ledger (letters, digits, `.`, `_`, `-`). Unset: one
    /// is generated at the first start and kept in `instance-id` in the state directory
    /// ($STATE_DIRECTORY under systemd, else the SQLite file's directory, else
    /// /var/lib/kvs-archiver), so a restart is the same instance.
    pub instance_id: Option<String>,
    /// How long a claim on a chunk or a stream holds without a heartbeat: an instance
    /// that dies loses its work to the others after this long. Heartbeats come every
    /// third of it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            database_url: "sqlite:///var/lib/kvs-archiver/state.db".to_string(),
            instance_id: None,
            lease: Duration::from_secs(60),
        }
    }
}

impl LedgerConfig {
    /// The configured instance id, or the one kept in the state directory (generated
    /// and stored there at the first start).
    pub fn resolve_instance_id(&self) -> Result<String, ConfigError> {
        if let Some(id) = &self.instance_id {
            return Ok(id.clone());
        }
        let dir = std::env::var_os("STATE_DIRECTORY")
            // systemd may pass several, colon-separated: the first is ours.
            .and_then(|d| {
                d.to_str()
                    .and_then(|d| d.split(':').next())
                    .map(PathBuf::from)
            })
            .or_else(|| {
                self.database_url
                    .strip_prefix("sqlite://")
                    .or_else(|| self.database_url.strip_prefix("sqlite:"))
                    .map(|p| p.split('?').next().unwrap_or(p))
                    .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
                    .filter(|p| !p.as_os_str().is_empty())
            })
            .unwrap_or_else(|| PathBuf::from("/var/lib/kvs-archiver"));
        let path = dir.join("instance-id");
        let cannot = |e: std::io::Error| {
            invalid(
                "ledger.instance_id",
                format!(
                    "not set, and {} cannot be read or written ({e}): set ledger.instance_id (or KVS_ARCHIVER_LEDGER__INSTANCE_ID) to a name unique to this instance",
                    path.display()
                ),
            )
        };
        match std::fs::read_to_string(&path) {
            Ok(text) if valid_instance_id(text.trim()) => return Ok(text.trim().to_string()),
            Ok(_) => {
                return Err(invalid(
                    "ledger.instance_id",
                    format!(
                        "{} holds no valid instance id: delete it or set ledger.instance_id",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cannot(e)),
        }
        let host = host_name()
            .map(|h| {
                h.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    .take(40)
                    .collect::<String>()
            })
            .unwrap_or_default();
        let host = if host.is_empty() {
            "kvs-archiver".to_string()
        } else {
            host
        };
        let id = format!("{host}-{:06x}", fastrand::u32(..) & 0xff_ffff);
        std::fs::create_dir_all(&dir).map_err(cannot)?;
        // Written whole or not at all: two processes starting together keep one id.
        let tmp = dir.join(format!(".instance-id.{}", std::process::id()));
        std::fs::write(&tmp, format!("{id}\n")).map_err(cannot)?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => {
                let _ = std::fs::remove_file(&tmp);
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&tmp);
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .map_err(cannot)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(cannot(e))
            }
        }
    }
}

/// An instance id: 1 to 64 letters, digits, `.`, `_` or `-` (it is part of owner names
/// and metric labels).
pub fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `[destination]`: where objects are written. Exactly one of `bucket` and `directory`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationConfig {
    /// S3 bucket the MP4 files go to.
    pub bucket: Option<String>,
    /// Key prefix inside the bucket or directory.
    pub prefix: String,
    /// A local directory instead of a bucket.
    pub directory: Option<PathBuf>,
    /// Multipart part size in bytes (S3: at least 5 MiB). A clip in flight holds one
    /// part in memory, and one upload in four a second one, to fill the next part while
    /// the last is sent.
    pub part_size: u64,
    /// Whether request bodies are covered by the SigV4 signature (a SHA-256 over every
    /// byte). Every body carries a CRC32C that S3 verifies either way. `auto`: unsigned
    /// over HTTPS, where TLS protects the body (what AWS recommends), signed over plain
    /// HTTP.
    pub payload_signing: PayloadSigning,
    /// The storage class objects are written in (S3's default, STANDARD, if unset).
    pub storage_class: Option<StorageClass>,
    /// Server-side encryption: "AES256" or "aws:kms" (the bucket's default if unset).
    pub sse: Option<Sse>,
    /// The KMS key for sse = "aws:kms": key id, key ARN or alias (`aws/s3` if unset).
    pub kms_key_id: Option<String>,
    /// With sse = "aws:kms": an S3 Bucket Key cuts the KMS requests (and their cost).
    pub bucket_key: Option<bool>,
    /// Tags on every object; `{stream}` in a value is the stream's name.
    pub tags: BTreeMap<String, String>,
    /// Objects are written only where none exists yet (`If-None-Match: *`); an object
    /// already there with other bytes is never replaced. `false` for stores that do not
    /// support conditional writes.
    pub create_only: bool,
    /// A role to assume for S3 requests alone (a bucket in another account); KVS keeps
    /// the default credential chain.
    pub role_arn: Option<String>,
    /// The external id the role's trust policy asks for.
    pub external_id: Option<String>,
    /// The assumed role's session name (CloudTrail shows it); default "kvs-archiver".
    pub session_name: Option<String>,
    /// `[destination.object_lock]`: lock each object against deletion (Object Lock must
    /// be enabled on the bucket).
    pub object_lock: Option<ObjectLockConfig>,
}

impl DestinationConfig {
    /// The settings a stream may override, as `[destination]` sets them.
    pub fn overrides(&self) -> Overrides<'_> {
        Overrides {
            storage_class: self.storage_class,
            sse: self.sse,
            kms_key_id: self.kms_key_id.as_deref(),
            bucket_key: self.bucket_key,
            tags: (!self.tags.is_empty()).then_some(&self.tags),
            object_lock: self.object_lock.as_ref(),
        }
    }
}

/// Whether S3 request bodies are signed (`destination.payload_signing`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadSigning {
    /// Signed over plain HTTP only; over HTTPS, TLS protects the body.
    #[default]
    Auto,
    /// Always signed, HTTPS included.
    Always,
    /// Never signed: the CRC32C (and TLS, over HTTPS) guards the body.
    Never,
}

impl PayloadSigning {
    /// Whether payloads sent to `endpoint` (None: AWS, always HTTPS) are signed.
    pub fn signs(self, endpoint: Option<&str>) -> bool {
        match self {
            PayloadSigning::Always => true,
            PayloadSigning::Never => false,
            PayloadSigning::Auto => {
                endpoint.is_some_and(|url| !url.to_ascii_lowercase().starts_with("https://"))
            }
        }
    }
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            bucket: None,
            prefix: "kvs/".to_string(),
            directory: None,
            // S3's minimum: two parts per clip in flight is most of the archiver's memory,
            // and smaller parts cost no throughput (docs/PERFORMANCE.md).
            part_size: 5 * 1024 * 1024,
            payload_signing: PayloadSigning::Auto,
            storage_class: None,
            sse: None,
            kms_key_id: None,
            bucket_key: None,
            tags: BTreeMap::new(),
            create_only: true,
            role_arn: None,
            external_id: None,
            session_name: None,
            object_lock: None,
        }
    }
}

/// `[archive]`: how media is cut into objects, retried and paced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Objects are cut on multiples of this since the epoch (UTC); caps may split further.
    /// Under 24 h.
    #[serde(with = "humantime_serde", alias = "max_clip_duration")]
    pub clip_duration: Duration,
    /// Fragments per clip; GetClip returns at most 200.
    pub max_fragments_per_clip: u32,
    /// Sum of listed fragment sizes per clip; GetClip returns at most 100 MB, and MP4
    /// packaging differs from the listed sizes (by well under 1 %), so the default keeps
    /// 1 % headroom; a clip cut short anyway is detected and split.
    pub max_bytes_per_clip: u64,
    /// Clips fetched and uploaded at once.
    pub concurrency: usize,
    /// Length of the ListFragments windows planning walks through; bounds its memory.
    #[serde(with = "humantime_serde")]
    pub plan_window: Duration,
    /// Attempts per chunk before it is recorded as failed.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter, up to `retry_max_delay`.
    #[serde(with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// The ceiling of that doubling, so a long outage is retried at least this often.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// GetClip pacing per stream, in fragment-media points per second (KVS: 500; each
    /// clip costs its fragment count). The default leaves 4 % for other consumers: a
    /// viewer's HLS or DASH playback costs one point per fragment, and a backfill
    /// should take no more than 5 % longer than the quota itself allows.
    pub media_points_per_second: f64,
    /// ListFragments and GetClip pacing per stream, in fragment-metadata points per
    /// second (KVS: 10,000; a listing costs its page size, 1,000).
    pub metadata_points_per_second: f64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            clip_duration: Duration::from_secs(600),
            // The fragment cap is exact ("the first 200 fragments"). The size cap counts
            // the MP4 GetClip writes, which differs from the listed MKV fragment sizes by
            // under 1 % (sample tables instead of block headers); 1 % headroom keeps
            // clips whole, and a clip cut short anyway is detected and split.
            max_fragments_per_clip: 200,
            max_bytes_per_clip: 99_000_000,
            concurrency: 4,
            plan_window: Duration::from_secs(3600),
            max_attempts: 8,
            retry_base_delay: Duration::from_millis(250),
            retry_max_delay: Duration::from_secs(30),
            media_points_per_second: 480.0,
            metadata_points_per_second: 9_000.0,
        }
    }
}

impl ArchiveConfig {
    /// The planner's caps on one chunk, from these settings.
    pub fn limits(&self) -> ChunkLimits {
        ChunkLimits {
            max_fragments: self.max_fragments_per_clip,
            max_bytes: self.max_bytes_per_clip,
            clip_duration_ms: self.clip_duration.as_millis() as u64,
        }
    }
}

/// `[[streams]]`: one stream to archive, with what it overrides of `[daemon]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name; or give `arn`.
    #[serde(default)]
    pub name: Option<String>,
    /// Stream ARN; or give `name`.
    #[serde(default)]
    pub arn: Option<String>,
    /// Which timestamp selects fragments: "server" (default) or "producer".
    #[serde(default)]
    pub timestamp_source: TimestampSource,
    /// This stream's cron schedule, instead of `daemon.schedule`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// How far back `run` archives; default: the stream's DataRetentionInHours.
    #[serde(default, with = "humantime_serde")]
    pub retention_window: Option<Duration>,
    /// This stream's lag behind the live edge, instead of `daemon.lag`.
    #[serde(default, with = "humantime_serde")]
    pub lag: Option<Duration>,
    /// How far behind what it already planned each pass lists again, for media that
    /// reaches KVS late; instead of `daemon.settle` (server timestamps) or
    /// `daemon.producer_settle` (producer timestamps).
    #[serde(default, with = "humantime_serde")]
    pub settle: Option<Duration>,
    /// This stream's storage class, instead of `destination.storage_class`.
    #[serde(default)]
    pub storage_class: Option<StorageClass>,
    /// This stream's encryption, instead of `destination.sse`.
    #[serde(default)]
    pub sse: Option<Sse>,
    /// This stream's KMS key, instead of `destination.kms_key_id`.
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// Instead of `destination.bucket_key`.
    #[serde(default)]
    pub bucket_key: Option<bool>,
    /// Tags added to `destination.tags` (this stream's value wins for a key both set).
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// This stream's Object Lock, instead of `[destination.object_lock]`.
    #[serde(default)]
    pub object_lock: Option<ObjectLockConfig>,
}

impl StreamConfig {
    /// A stream known by name only, with every default.
    pub fn named(name: &str) -> Self {
        StreamConfig {
            name: Some(name.to_string()),
            arn: None,
            timestamp_source: TimestampSource::Server,
            schedule: None,
            retention_window: None,
            lag: None,
            settle: None,
            storage_class: None,
            sse: None,
            kms_key_id: None,
            bucket_key: None,
            tags: None,
            object_lock: None,
        }
    }

    /// The settings this stream overrides.
    pub fn overrides(&self) -> Overrides<'_> {
        Overrides {
            storage_class: self.storage_class,
            sse: self.sse,
            kms_key_id: self.kms_key_id.as_deref(),
            bucket_key: self.bucket_key,
            tags: self.tags.as_ref(),
            object_lock: self.object_lock.as_ref(),
        }
    }
}

impl StreamConfig {
    /// The name used in keys, logs and the ledger: the name, or the ARN's name part.
    pub fn label(&self) -> String {
        match (&self.name, &self.arn) {
            (Some(name), _) => name.clone(),
            (None, Some(arn)) => arn_stream_name(arn).unwrap_or(arn).to_string(),
            (None, None) => String::new(),
        }
    }
}

/// Whether `segment` can be one folder name under the destination: not empty, not `.` or
/// `..`, no separator and no control character.
pub fn safe_path_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && !segment.contains(['/', '\\'])
        && !segment.chars().any(char::is_control)
}

/// Whether a key prefix stays inside the destination: relative, every segment safe (so
/// no empty one: `a//b/` and `kvs//` are refused).
pub fn safe_prefix(prefix: &str) -> bool {
    prefix.is_empty()
        || (!prefix.starts_with('/')
            && prefix
                .strip_suffix('/')
                .unwrap_or(prefix)
                .split('/')
                .all(safe_path_segment))
}

/// `arn:aws:kinesisvideo:REGION:ACCOUNT:stream/NAME/CREATION` → `NAME`.
pub fn arn_stream_name(arn: &str) -> Option<&str> {
    let resource = arn.splitn(6, ':').nth(5)?;
    let mut parts = resource.split('/');
    (parts.next()? == "stream").then_some(())?;
    parts.next().filter(|n| !n.is_empty())
}

/// Whether `database_url` names a PostgreSQL ledger.
pub fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Defaults, then `path` (if given), then the environment; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut given = Figment::new();
        let source = match path {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Load {
                        path: path.display().to_string(),
                        message: "file not found (give --config PATH or KVS_ARCHIVER_CONFIG)"
                            .into(),
                    });
                }
                given = given.merge(Toml::file(path));
                path.display().to_string()
            }
            None => "defaults".to_string(),
        };
        given = given.merge(
            Env::prefixed("KVS_ARCHIVER_")
                .ignore(&["config", "log", "crashpoint", "serve_token"])
                .split("__"),
        );
        let load_error = |e: figment::Error| ConfigError::Load {
            path: source.clone(),
            message: describe_figment_error(e),
        };
        let mut given: figment::value::Dict = given.extract().map_err(load_error)?;
        rename_state_section(&mut given)?;
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Serialized::defaults(given))
            .extract()
            .map_err(load_error)?;
        // No file, and the environment names no destination: nothing was configured.
        if path.is_none()
            && config.destination.bucket.is_none()
            && config.destination.directory.is_none()
        {
            return Err(ConfigError::Missing);
        }
        config.validate()?;
        config.leave_out_unread_ledger_parameters();
        Ok(config)
    }

    /// `ledger.database_url` without the query parameters its driver does not read (see
    /// [`postgres_url_for_driver`]), with a warning that names them, never their values.
    /// The URL worked before with them ignored, and still does; the driver would log
    /// their values.
    fn leave_out_unread_ledger_parameters(&mut self) {
        let (url, left_out) = postgres_url_for_driver(&self.ledger.database_url);
        if left_out.is_empty() {
            return;
        }
        let names = left_out.join(", ");
        let hint = if left_out
            .iter()
            .any(|name| decode_form(name).eq_ignore_ascii_case("sslpassword"))
        {
            " (for sslpassword: give sslkey a key file without a passphrase, readable only by the service)"
        } else {
            ""
        };
        tracing::warn!(
            parameters = %names,
            "ledger.database_url: the PostgreSQL driver (sqlx) does not read the query parameters {names}; they are left out of the URL it is given, values unused and unlogged: remove them from the configuration{hint}; the driver reads sslmode, sslrootcert, sslcert, sslkey, host, hostaddr, port, dbname, user, password, application_name, options and statement-cache-capacity"
        );
        self.ledger.database_url = url;
    }

    /// Checks every value before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_aws()?;
        self.validate_ledger()?;
        self.validate_destination()?;
        self.validate_archive()?;
        self.validate_daemon()?;
        self.validate_streams()?;
        self.validate_object_settings()
    }

    /// What S3 stores with this stream's objects: `[destination]`'s settings with the
    /// stream's overrides.
    pub fn object_settings(&self, stream: &StreamConfig) -> StreamSettings {
        StreamSettings::resolve(
            &self.destination.overrides(),
            &stream.overrides(),
            &stream.label(),
        )
    }

    /// Whether any stream's objects are locked (the bucket must have Object Lock).
    pub fn uses_object_lock(&self) -> bool {
        self.destination.object_lock.is_some()
            || self.streams.iter().any(|s| s.object_lock.is_some())
    }

    /// Every KMS key objects are encrypted with, once each, with the field that names it
    /// (`None`: the account's `aws/s3` key).
    pub fn kms_keys(&self) -> Vec<crate::storage::KmsKey> {
        use crate::storage::KmsKey;
        let mut keys: Vec<KmsKey> = Vec::new();
        if self.destination.sse == Some(Sse::Kms) {
            keys.push(KmsKey {
                field: "destination.kms_key_id".into(),
                key_id: self.destination.kms_key_id.clone(),
                bucket_key: self.destination.bucket_key.unwrap_or(false),
            });
        }
        for (i, stream) in self.streams.iter().enumerate() {
            if let Some(crate::storage::Encryption::Kms { key_id, bucket_key }) =
                self.object_settings(stream).encryption
            {
                if !keys
                    .iter()
                    .any(|k| k.key_id == key_id && k.bucket_key == bucket_key)
                {
                    keys.push(KmsKey {
                        field: format!("streams[{i}].kms_key_id"),
                        key_id,
                        bucket_key,
                    });
                }
            }
        }
        keys
    }

    /// What the object settings need of the bucket, for the start-up check.
    pub fn required_of_bucket(&self) -> crate::storage::Required {
        crate::storage::Required {
            object_lock: self.uses_object_lock(),
            kms_keys: self.kms_keys(),
        }
    }

    /// The settle window of a stream (see `daemon.settle`).
    pub fn settle(&self, stream: &StreamConfig) -> Duration {
        stream.settle.unwrap_or(match stream.timestamp_source {
            crate::domain::TimestampSource::Server => self.daemon.settle,
            crate::domain::TimestampSource::Producer => self.daemon.producer_settle,
        })
    }

    /// The configured stream whose label (its name, or the name in its ARN) is `label`.
    pub fn stream(&self, label: &str) -> Option<&StreamConfig> {
        self.streams.iter().find(|s| s.label() == label)
    }

    /// The configuration as TOML, for `check-config`. It holds no secrets by design, and
    /// every URL is shown through [`redact_url`].
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for url in [
            &mut shown.aws.kinesis_video_endpoint_url,
            &mut shown.aws.s3_endpoint_url,
        ]
        .into_iter()
        .flatten()
        {
            *url = redact_url(url);
        }
        shown.ledger.database_url = redact_url(&shown.ledger.database_url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

impl Config {
    /// `[aws]`: the region, the endpoints, and the bundled emulator.
    fn validate_aws(&self) -> Result<(), ConfigError> {
        if self.aws.region.trim().is_empty() {
            return Err(invalid("aws.region", "must not be empty"));
        }
        // Read now, so that check-config says what is wrong with it.
        if let Some(bundle) = crate::https::CaBundle::chosen(self.aws.ca_bundle.as_deref()) {
            if let Err(e) = bundle.read() {
                return Err(invalid(bundle.source, e.to_string()));
            }
        }
        for (field, url) in [
            (
                "aws.kinesis_video_endpoint_url",
                &self.aws.kinesis_video_endpoint_url,
            ),
            ("aws.s3_endpoint_url", &self.aws.s3_endpoint_url),
            ("aws.sts_endpoint_url", &self.aws.sts_endpoint_url),
        ] {
            let Some(url) = url else { continue };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    field,
                    format!(
                        "must be an http:// or https:// URL (got {:?})",
                        redact_url(url)
                    ),
                ));
            }
            // The credential chain signs every request; a user, password or token in
            // the URL would authenticate nothing and be printed in every "cannot reach"
            // error and log line.
            if url.contains(['@', '?', '#']) {
                return Err(invalid(
                    field,
                    format!(
                        "must hold only a scheme, host, port and path: remove the user, password, query or fragment (credentials come from the AWS credential chain) (got {:?})",
                        redact_url(url)
                    ),
                ));
            }
        }
        if self.aws.bundled_emulator.is_some() && self.aws.kinesis_video_endpoint_url.is_some() {
            return Err(invalid(
                "aws.bundled_emulator",
                "names the KVS to use, as aws.kinesis_video_endpoint_url does: set only one",
            ));
        }
        if self.aws.bundled_emulator.is_some() && self.destination.bucket.is_some() {
            return Err(invalid(
                "aws.bundled_emulator",
                "goes only with destination.directory: with destination.bucket, S3 requests would be signed with the emulator's keys, which are public (in its source); archive the demo to a directory, or remove aws.bundled_emulator to read a real KVS with your own credentials",
            ));
        }
        Ok(())
    }

    /// `[ledger]`: the ledger's URL, the instance id and the lease.
    fn validate_ledger(&self) -> Result<(), ConfigError> {
        let url = &self.ledger.database_url;
        if !url.starts_with("sqlite:") && !is_postgres(url) {
            return Err(invalid(
                "ledger.database_url",
                format!(
                    "must be a sqlite: URL such as sqlite:///var/lib/kvs-archiver/state.db or a postgres:// URL such as postgres://archiver@db.example/kvs_archiver (got {:?})",
                    redact_url(url)
                ),
            ));
        }
        if is_postgres(url) {
            check_postgres_url(url)?;
        }
        if let Some(id) = &self.ledger.instance_id {
            if !valid_instance_id(id) {
                return Err(invalid(
                    "ledger.instance_id",
                    format!("{id:?}: use 1 to 64 letters, digits, '.', '_' or '-'"),
                ));
            }
        }
        if self.ledger.lease < Duration::from_secs(3)
            || self.ledger.lease > Duration::from_secs(3600)
        {
            return Err(invalid(
                "ledger.lease",
                format!(
                    "{} is out of range: use 3 s to 1 h (60 s: a dead instance's work moves within a minute)",
                    humantime::format_duration(self.ledger.lease)
                ),
            ));
        }
        Ok(())
    }

    /// `[destination]`: one of bucket and directory, a bucket S3 could hold, a prefix that
    /// stays inside it and that `iam-policy` grants alone.
    fn validate_destination(&self) -> Result<(), ConfigError> {
        match (&self.destination.bucket, &self.destination.directory) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "destination",
                    "set either bucket or directory, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "destination",
                    "set bucket (S3) or directory (local files)",
                ))
            }
            (Some(bucket), None) => {
                // Buckets created in us-east-1 before March 2018 keep S3's legacy names,
                // and S3-compatible stores set their own rules.
                let legacy = self.aws.s3_endpoint_url.is_some()
                    || self.aws.region.trim() == LEGACY_BUCKET_REGION;
                if let Some(problem) = bucket_name_problem(bucket, legacy) {
                    return Err(invalid(
                        "destination.bucket",
                        format!("{problem} (got {})", shown(bucket)),
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        let prefix = &self.destination.prefix;
        // IAM reads `*` and `?` in a resource or an s3:prefix condition as wildcards, and
        // `${…}` as a policy variable: the policy would grant other prefixes too.
        if prefix.contains(['*', '?']) || prefix.contains("${") {
            return Err(invalid(
                "destination.prefix",
                format!(
                    "must not hold *, ? or ${{: iam-policy would grant them as wildcards over other prefixes; write the folder's plain name (got {})",
                    shown(prefix)
                ),
            ));
        }
        if !safe_prefix(prefix) {
            return Err(invalid(
                "destination.prefix",
                format!(
                    "must be a relative path of plain folder names, without . or .. or control characters (got {})",
                    shown(prefix)
                ),
            ));
        }
        if !prefix.is_empty() && !prefix.ends_with('/') {
            return Err(invalid(
                "destination.prefix",
                format!(
                    "must end with \"/\": write {:?} (got {}); without it, keys run on from it (\"{prefix}STREAM/…\"), and iam-policy's \"{prefix}*\" would also grant \"{prefix}-other/\"",
                    format!("{prefix}/"),
                    shown(prefix)
                ),
            ));
        }
        if self.destination.part_size < 5 * 1024 * 1024 {
            return Err(invalid(
                "destination.part_size",
                format!(
                    "must be at least 5 MiB, S3's minimum part size (got {})",
                    self.destination.part_size
                ),
            ));
        }
        Ok(())
    }

    /// `[archive]`: clips within GetClip's caps, and rates within KVS's per-stream quotas.
    fn validate_archive(&self) -> Result<(), ConfigError> {
        let a = &self.archive;
        if a.clip_duration < Duration::from_secs(1) || a.clip_duration >= DAY {
            return Err(invalid(
                "archive.clip_duration",
                format!(
                    "must be at least 1s and under 24h, GetClip's range limit (got {})",
                    humantime::format_duration(a.clip_duration)
                ),
            ));
        }
        if a.max_fragments_per_clip == 0 || a.max_fragments_per_clip > GET_CLIP_MAX_FRAGMENTS {
            return Err(invalid(
                "archive.max_fragments_per_clip",
                format!(
                    "must be 1-{GET_CLIP_MAX_FRAGMENTS}, GetClip's cap (got {})",
                    a.max_fragments_per_clip
                ),
            ));
        }
        if a.max_bytes_per_clip == 0 || a.max_bytes_per_clip > GET_CLIP_MAX_BYTES {
            return Err(invalid(
                "archive.max_bytes_per_clip",
                format!(
                    "must be 1-{GET_CLIP_MAX_BYTES}, GetClip's cap (got {})",
                    a.max_bytes_per_clip
                ),
            ));
        }
        if a.concurrency == 0 || a.concurrency > 64 {
            return Err(invalid(
                "archive.concurrency",
                format!("must be 1-64 (got {})", a.concurrency),
            ));
        }
        if a.plan_window < Duration::from_secs(60) {
            return Err(invalid("archive.plan_window", "must be at least 1m"));
        }
        for (field, value, cap) in [
            (
                "archive.media_points_per_second",
                a.media_points_per_second,
                500.0,
            ),
            (
                "archive.metadata_points_per_second",
                a.metadata_points_per_second,
                10_000.0,
            ),
        ] {
            if !(value > 0.0 && value <= cap) {
                return Err(invalid(
                    field,
                    format!(
                        "must be above 0 and at most {cap}, KVS's per-stream quota (got {value})"
                    ),
                ));
            }
        }
        if a.max_attempts == 0 {
            return Err(invalid("archive.max_attempts", "must be at least 1"));
        }
        Ok(())
    }

    /// `[daemon]`: the schedule, its zone, the lag behind KVS, a metrics address that stays
    /// on the host, and control-plane rates within KVS's quotas.
    fn validate_daemon(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        if !valid_cron(&d.schedule) {
            return Err(invalid(
                "daemon.schedule",
                format!(
                    "must be a cron expression with seconds, like \"0 */5 * * * *\" (got {:?})",
                    d.schedule
                ),
            ));
        }
        d.zone()?;
        if d.lag < Duration::from_secs(1) {
            return Err(invalid(
                "daemon.lag",
                "must be at least 1s: KVS lists fragments after they end, with a delay",
            ));
        }
        if d.max_clips_in_flight == 0 {
            return Err(invalid("daemon.max_clips_in_flight", "must be at least 1"));
        }
        if let Some(addr) = d.metrics_listen {
            if !addr.ip().is_loopback() {
                return Err(invalid("daemon.metrics_listen", format!("must be a loopback address such as 127.0.0.1:9464 (got {addr}); put a proxy in front to expose it")));
            }
        }
        for (field, value, cap) in [
            (
                "daemon.control_calls_per_second_per_stream",
                d.control_calls_per_second_per_stream,
                5.0,
            ),
            (
                "daemon.control_calls_per_second",
                d.control_calls_per_second,
                300.0,
            ),
        ] {
            if !(value > 0.0 && value <= cap) {
                return Err(invalid(
                    field,
                    format!("must be above 0 and at most {cap}, KVS's quota (got {value})"),
                ));
            }
        }
        Ok(())
    }

    /// `[[streams]]`: each names a KVS stream that can name a folder, once, with its own
    /// schedule and retention window if set.
    fn validate_streams(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.streams.iter().enumerate() {
            validate_stream_identity(i, s)?;
            if !safe_path_segment(&s.label()) {
                return Err(invalid(
                    format!("streams[{i}]"),
                    format!("the stream name {:?} cannot name a folder: it must not be . or .. nor hold / or control characters", s.label()),
                ));
            }
            if let Some(schedule) = &s.schedule {
                if !valid_cron(schedule) {
                    return Err(invalid(
                        format!("streams[{i}].schedule"),
                        format!("must be a cron expression with seconds (got {schedule:?})"),
                    ));
                }
            }
            if let Some(window) = s.retention_window {
                if window < self.archive.clip_duration {
                    return Err(invalid(
                        format!("streams[{i}].retention_window"),
                        "must be at least archive.clip_duration",
                    ));
                }
            }
            if !seen.insert(s.label()) {
                return Err(invalid(
                    format!("streams[{i}]"),
                    format!("stream {} is listed twice", s.label()),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Storage class, encryption, tags, Object Lock and the role: S3 settings, each
    /// checked where it is set; a directory takes none of them.
    fn validate_object_settings(&self) -> Result<(), ConfigError> {
        use crate::storage::validate;
        let d = &self.destination;
        validate("destination", &d.overrides(), d.sse)?;
        for (i, stream) in self.streams.iter().enumerate() {
            validate(
                &format!("streams[{i}]"),
                &stream.overrides(),
                stream.sse.or(d.sse),
            )?;
            // The destination's tags and the stream's together.
            let tags = self.object_settings(stream).tags.len();
            if tags > 10 {
                return Err(invalid(
                    format!("streams[{i}].tags"),
                    format!("with destination.tags, {tags} tags: S3 keeps at most 10 on an object"),
                ));
            }
        }
        if d.directory.is_some() {
            let streams_set = self
                .streams
                .iter()
                .any(|s| s.overrides() != Overrides::default());
            let set = [
                ("storage_class", d.storage_class.is_some()),
                ("sse", d.sse.is_some()),
                ("kms_key_id", d.kms_key_id.is_some()),
                ("bucket_key", d.bucket_key.is_some()),
                ("tags", !d.tags.is_empty()),
                ("object_lock", d.object_lock.is_some()),
                ("role_arn", d.role_arn.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("destination.{field}"),
                    "is an S3 setting: remove it, or archive to destination.bucket",
                ));
            }
            if streams_set {
                return Err(invalid(
                    "streams",
                    "storage_class, sse, kms_key_id, bucket_key, tags and object_lock are S3 settings: remove them, or archive to destination.bucket",
                ));
            }
        }
        self.validate_role()
    }

    /// `role_arn`, `external_id` and `session_name`, as STS takes them.
    fn validate_role(&self) -> Result<(), ConfigError> {
        let d = &self.destination;
        let Some(arn) = &d.role_arn else {
            if d.external_id.is_some() || d.session_name.is_some() {
                return Err(invalid(
                    "destination.role_arn",
                    "external_id and session_name go with role_arn: set it, or remove them",
                ));
            }
            return Ok(());
        };
        let role_shaped = arn.strip_prefix("arn:").is_some_and(|rest| {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            parts.len() == 5
                && parts[0].starts_with("aws")
                && parts[1] == "iam"
                && parts[3].len() == 12
                && parts[3].bytes().all(|b| b.is_ascii_digit())
                && parts[4].starts_with("role/")
                && parts[4].len() > 5
        });
        if !role_shaped || arn.len() > 2048 {
            return Err(invalid(
                "destination.role_arn",
                format!(
                    "must be an IAM role ARN such as arn:aws:iam::123456789012:role/archiver (got {})",
                    shown(arn)
                ),
            ));
        }
        let sts_text = |c: char| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c);
        if let Some(id) = &d.external_id {
            if !(2..=1224).contains(&id.len()) || !id.chars().all(sts_text) {
                return Err(invalid(
                    "destination.external_id",
                    "must be 2 to 1224 letters, digits or _+=,.@:/-",
                ));
            }
        }
        if let Some(name) = &d.session_name {
            if !(2..=64).contains(&name.len())
                || !name.chars().all(|c| sts_text(c) && c != ':' && c != '/')
            {
                return Err(invalid(
                    "destination.session_name",
                    "must be 2 to 64 letters, digits or _+=,.@-",
                ));
            }
        }
        Ok(())
    }
}

/// `value` quoted for a message, cut at 80 characters: a 5,000-character value would
/// bury the message.
fn shown(value: &str) -> String {
    const SHOWN: usize = 80;
    let count = value.chars().count();
    if count <= SHOWN {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(SHOWN).collect();
        format!("{head:?}… ({count} characters)")
    }
}

/// A stream's `name` and `arn`: at least one, each as KVS writes it (StreamName and
/// ResourceARN in KVS's API model), so that the name is safe in a key, a folder, a log
/// line, the page and the IAM policy.
fn validate_stream_identity(i: usize, stream: &StreamConfig) -> Result<(), ConfigError> {
    if stream.name.is_none() && stream.arn.is_none() {
        return Err(invalid(format!("streams[{i}]"), "set name or arn"));
    }
    if let Some(name) = &stream.name {
        if !valid_stream_name(name) {
            return Err(invalid(
                format!("streams[{i}].name"),
                format!(
                    "must be 1-256 characters of [a-zA-Z0-9_.-], as KVS names streams (got {})",
                    shown(name)
                ),
            ));
        }
    }
    if let Some(arn) = &stream.arn {
        if let Some(name) = arn_stream_name(arn).filter(|name| !valid_stream_name(name)) {
            return Err(invalid(
                format!("streams[{i}].arn"),
                format!(
                    "names the stream {}, which is not a KVS stream name (1-256 characters of [a-zA-Z0-9_.-]): copy the stream's ARN from `aws kinesisvideo describe-stream` (got {})",
                    shown(name),
                    shown(arn)
                ),
            ));
        }
        if !valid_stream_arn(arn) {
            return Err(invalid(
                format!("streams[{i}].arn"),
                format!(
                    "must look like arn:aws:kinesisvideo:REGION:ACCOUNT:stream/NAME/CREATION-TIME (got {})",
                    shown(arn)
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `arn` is a KVS stream ARN: ResourceARN's pattern in KVS's API model,
/// `arn:[a-z\d-]+:kinesisvideo:[a-z0-9-]+:[0-9]+:[a-z]+/[a-zA-Z0-9_.-]+/[0-9]+`, at most
/// 1,024 characters, with the resource type `stream`. `iam-policy` prints it as a
/// resource, so it must hold no wildcard.
fn valid_stream_arn(arn: &str) -> bool {
    let lower_digits_dashes = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [arn_word, partition, service, region, account, resource] = parts[..] else {
        return false;
    };
    let resource: Vec<&str> = resource.split('/').collect();
    arn.len() <= 1024
        && arn_word == "arn"
        && lower_digits_dashes(partition)
        && service == "kinesisvideo"
        && lower_digits_dashes(region)
        && digits(account)
        && matches!(resource[..], ["stream", name, created] if valid_stream_name(name) && digits(created))
}

/// The region whose buckets may have S3's legacy names (created before March 2018).
const LEGACY_BUCKET_REGION: &str = "us-east-1";

/// Why `bucket` cannot name the destination bucket, or None. Never a wildcard, `/`,
/// whitespace or a control character: they would widen the policy `iam-policy` prints
/// or are no bucket's name. `legacy` (us-east-1, or an S3-compatible store at
/// aws.s3_endpoint_url): S3's legacy naming, 1-255 letters, digits, `.`, `-` and `_`.
/// Otherwise AWS's current rules for general purpose buckets.
fn bucket_name_problem(bucket: &str, legacy: bool) -> Option<String> {
    if bucket.contains(['*', '?']) {
        Some("must name one bucket, without * or ?: iam-policy would grant the pattern over every bucket it matches; write the bucket's own name".into())
    } else if bucket.contains('/') {
        Some("must name one bucket, without /: write the bucket's name alone, and the folder inside it as destination.prefix (ending in /)".into())
    } else if bucket.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not hold whitespace or control characters, which no bucket's name holds: remove them (a space or newline pasted with the name?)".into())
    } else if legacy {
        legacy_bucket_name_problem(bucket)
    } else {
        general_purpose_bucket_name_problem(bucket).map(|problem| {
            format!(
                "{problem}, as AWS's current bucket naming rules require outside {LEGACY_BUCKET_REGION}; a bucket in {LEGACY_BUCKET_REGION} created under S3's legacy naming (uppercase letters, '_', up to 255 characters) is accepted with aws.region = \"{LEGACY_BUCKET_REGION}\", and a bucket on an S3-compatible store once aws.s3_endpoint_url names the store"
            )
        })
    }
}

/// Why `bucket` breaks S3's legacy naming (us-east-1 before March 2018, and what
/// S3-compatible stores accept), or None.
fn legacy_bucket_name_problem(bucket: &str) -> Option<String> {
    const RULES: &str = "S3's legacy naming, accepted in us-east-1 and with aws.s3_endpoint_url";
    if !(1..=255).contains(&bucket.len()) {
        Some(format!(
            "must be 1-255 characters ({RULES}): write the bucket's name as `aws s3 ls` shows it"
        ))
    } else if !bucket
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        Some(format!(
            "may hold only letters, digits, '.', '-' and '_' ({RULES}): write the bucket's name as `aws s3 ls` shows it"
        ))
    } else if bucket.bytes().all(|b| b == b'.') {
        // `.` and `..` are path segments in a path-style request, not a bucket.
        Some(format!(
            "must hold a letter or a digit ({RULES}): write the bucket's name"
        ))
    } else {
        None
    }
}

/// Why `bucket` cannot name an S3 general purpose bucket under AWS's current naming
/// rules, or None.
fn general_purpose_bucket_name_problem(bucket: &str) -> Option<&'static str> {
    const RESERVED_PREFIXES: [&str; 3] = ["xn--", "sthree-", "amzn-s3-demo-"];
    const RESERVED_SUFFIXES: [&str; 5] = ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"];
    let bytes = bucket.as_bytes();
    let ip_like = {
        let parts: Vec<&str> = bucket.split('.').collect();
        parts.len() == 4
            && parts
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if !(3..=63).contains(&bytes.len()) {
        Some("must be 3-63 characters")
    } else if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'))
    {
        Some("may hold only lowercase letters, digits, '.' and '-'")
    } else if !(bytes[0].is_ascii_alphanumeric() && bytes[bytes.len() - 1].is_ascii_alphanumeric())
    {
        Some("must begin and end with a letter or a digit")
    } else if bucket.contains("..") {
        Some("must not hold two adjacent dots")
    } else if ip_like {
        Some("must not be formatted as an IP address")
    } else if RESERVED_PREFIXES.iter().any(|p| bucket.starts_with(p)) {
        Some("must not begin with xn--, sthree- or amzn-s3-demo-, which S3 reserves")
    } else if RESERVED_SUFFIXES.iter().any(|s| bucket.ends_with(s)) {
        Some("must not end with -s3alias, --ol-s3, .mrap, --x-s3 or --table-s3, which S3 reserves for access points, Multi-Region Access Points, directory and table buckets (name a general purpose bucket)")
    } else {
        None
    }
}

/// Query parameters sqlx's PostgreSQL driver reads (`PgConnectOptions::parse_from_url`,
/// sqlx-postgres 0.8), besides `options[NAME]`. It ignores any other with a warning that
/// logs the value (a libpq `sslpassword`, or a misspelled `passwrod`, would reach the
/// journal), so [`postgres_url_for_driver`] leaves the others out of the URL it is given.
const POSTGRES_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// A PostgreSQL URL whose secrets can be told apart (see [`redact_url`]). Query
/// parameters the driver does not read are not refused (libpq's `connect_timeout` or
/// `target_session_attrs` worked before, ignored): [`Config::load`] leaves them out.
fn check_postgres_url(url: &str) -> Result<(), ConfigError> {
    let (_, rest) = split_scheme(url);
    if split_userinfo(rest).is_none() {
        return Err(invalid(
            "ledger.database_url",
            "holds an @ after the host's end: percent-encode /, ?, #, and @ in the user, password and query values (%2F, %3F, %23, %40); as written, the driver would read part of the password as the host or the path",
        ));
    }
    Ok(())
}

/// `url`, a PostgreSQL URL, as its driver (sqlx) is to be given it: without the query
/// parameters it does not read, which it would log with their values. Also the names of
/// those left out, for a warning: a name is shown only when written as one (`name=…`, of
/// unreserved characters, at most 64), else as `REDACTED`, since a pair without `=` or
/// with an odd key may be a pasted secret. Any other URL is returned as it is.
pub fn postgres_url_for_driver(url: &str) -> (String, Vec<String>) {
    if !is_postgres(url) {
        return (url.to_string(), Vec::new());
    }
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (url, None),
    };
    let Some((base, query)) = before_fragment.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut left_out: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        let name = decode_form(key);
        if POSTGRES_URL_PARAMETERS.contains(&name.as_str()) || name.starts_with("options[") {
            kept.push(pair);
        } else {
            let shown = if pair.contains('=') && plain(key) && key.len() <= 64 {
                key
            } else {
                REDACTED
            };
            if !left_out.iter().any(|name| name == shown) {
                left_out.push(shown.to_string());
            }
        }
    }
    if left_out.is_empty() {
        return (url.to_string(), left_out);
    }
    let mut driven = base.to_string();
    if !kept.is_empty() {
        driven.push('?');
        driven.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        driven.push('#');
        driven.push_str(fragment);
    }
    (driven, left_out)
}

/// What stands in for a secret in a printed URL.
const REDACTED: &str = "REDACTED";

/// Query parameters [`redact_url`] shows with their value: the connect options of sqlx's
/// PostgreSQL and SQLite drivers that hold no secret (`sslkey` is a file's path, not the
/// key). Every other parameter is hidden whole: an allow-list, so that a secret under a
/// name nobody foresaw (`Password`, `pass%77ord`, libpq's `sslpassword`, a misspelling)
/// is hidden too.
const PUBLIC_URL_PARAMETERS: &[&str] = &[
    // PostgreSQL (see POSTGRES_URL_PARAMETERS; `options` may carry anything).
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    // SQLite.
    "mode",
    "cache",
    "immutable",
    "vfs",
];

/// Query parameters [`redact_url`] names, with their value hidden, so that the reader
/// sees a password was given (in any case or percent-encoding).
const SECRET_URL_PARAMETERS: &[&str] = &["password", "sslpassword"];

/// `url` with every secret in it replaced by `REDACTED`, for messages, logs and
/// `check-config`: the user-info's password (the user stays: it says who connects),
/// every query value but those of [`PUBLIC_URL_PARAMETERS`], and the fragment. It takes
/// any text, not only a valid URL. Where the user-info cannot be told apart, an `@`
/// after the host's end (a password with an unencoded `/`, `?` or `#`, or an `@` in the
/// path, query or fragment), all after the scheme is hidden.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = split_scheme(url);
    let Some((userinfo, rest)) = split_userinfo(rest) else {
        return format!("{scheme}{REDACTED}");
    };
    let mut out = String::with_capacity(url.len() + REDACTED.len());
    out.push_str(scheme);
    if let Some(info) = userinfo {
        match info.split_once(':') {
            Some((user, _)) if plain(user) => {
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
            }
            None if plain(info) => out.push_str(info),
            _ => out.push_str(REDACTED),
        }
        out.push('@');
    }
    // As a URL parser reads it: the fragment from the first `#`, the query from the
    // first `?` before it.
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (rest, None),
    };
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    out.push_str(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query.split('&').map(redact_query_pair).collect();
        out.push_str(&pairs.join("&"));
    }
    match fragment {
        Some("") => out.push('#'),
        Some(_) => {
            out.push('#');
            out.push_str(REDACTED);
        }
        None => {}
    }
    out
}

/// This machine's host name, from uname(2): `/proc/sys` is hidden under systemd's
/// `ProcSubset=pid`.
pub fn host_name() -> Option<String> {
    // SAFETY: uname fills the struct it is given; its fields are NUL-terminated.
    let name = unsafe {
        let mut names: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut names) != 0 {
            return None;
        }
        std::ffi::CStr::from_ptr(names.nodename.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    let name = name.trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// `url` split after its scheme's `://`: `("postgres://", rest)`, or `("", url)` when it
/// has none (text before a `://` that is no scheme may be a secret: it stays in `rest`).
fn split_scheme(url: &str) -> (&str, &str) {
    let is_scheme = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    match url.find("://") {
        Some(end) if is_scheme(&url[..end]) => url.split_at(end + 3),
        _ => ("", url),
    }
}

/// `rest`, a URL after its scheme, split at the `@` that ends its user-info:
/// `(Some(userinfo), after)`, or `(None, rest)` without one. None when an `@` comes after
/// the host's end (the first `/`, `?`, `#` or `\`): a password with such a character
/// unencoded and an `@` in the path, query or fragment cannot be told apart.
fn split_userinfo(rest: &str) -> Option<(Option<&str>, &str)> {
    let host_end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    match rest.rfind('@') {
        None => Some((None, rest)),
        Some(at) if at < host_end => Some((Some(&rest[..at]), &rest[at + 1..])),
        Some(_) => None,
    }
}

/// One `key=value` of a query as [`redact_url`] prints it.
fn redact_query_pair(pair: &str) -> String {
    let key = pair.split_once('=').map_or(pair, |(key, _)| key);
    let name = decode_form(key);
    if pair.is_empty() || PUBLIC_URL_PARAMETERS.contains(&name.as_str()) {
        pair.to_string()
    } else if pair.contains('=')
        && plain(key)
        && SECRET_URL_PARAMETERS
            .iter()
            .any(|secret| name.eq_ignore_ascii_case(secret))
    {
        format!("{key}={REDACTED}")
    } else {
        REDACTED.to_string()
    }
}

/// Whether `text` holds only characters a user or parameter name is written with
/// (unreserved, and `%` of an encoded one): anything else may be part of a secret.
fn plain(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-' | b'%' | b'+'))
}

/// `text` decoded as a query's keys are (`+` is a space, `%XX` a byte), as sqlx reads
/// them.
fn decode_form(text: &str) -> String {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = |i: usize| tail.get(i).and_then(|c| (*c as char).to_digit(16));
        match (b, hex(0), hex(1)) {
            (b'%', Some(high), Some(low)) => {
                // Two hex digits make at most 0xff.
                bytes.push((high * 16 + low) as u8);
                rest = &tail[2..];
            }
            (b'+', _, _) => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[state]`, the ledger's section before it was named for it, read as `[ledger]` with a
/// warning. Its keys fill in what `[ledger]` (or `KVS_ARCHIVER_LEDGER__*`) leaves out; a
/// key given both ways with different values is refused, naming both: the old name may
/// be an operator's (a fleet's PostgreSQL URL in an EnvironmentFile) and the new one a
/// packaged unit's default, and silently taking either could move a daemon to another
/// ledger.
fn rename_state_section(given: &mut figment::value::Dict) -> Result<(), ConfigError> {
    let Some(state) = given.remove("state") else {
        return Ok(());
    };
    tracing::warn!("configuration: [state] is now [ledger], with the same keys (KVS_ARCHIVER_STATE__* is KVS_ARCHIVER_LEDGER__*): rename it; [state] is still read");
    let figment::value::Value::Dict(tag, old) = state else {
        // Not a table: left for the type check to name.
        given.insert("state".into(), state);
        return Ok(());
    };
    let ledger = given
        .entry("ledger".into())
        .or_insert_with(|| figment::value::Value::Dict(tag, figment::value::Dict::new()));
    // A `ledger` that is not a table is left for the type check to name.
    if let figment::value::Value::Dict(_, ledger) = ledger {
        for (key, value) in old {
            match ledger.get(&key) {
                Some(given) if *given != value => {
                    return Err(invalid(
                        format!("ledger.{key}"),
                        format!(
                            "given twice, as [ledger] {key} (or KVS_ARCHIVER_LEDGER__{upper}) and as the old [state] {key} (or KVS_ARCHIVER_STATE__{upper}), with different values: rename the one you mean to [ledger] / KVS_ARCHIVER_LEDGER__{upper} (in an EnvironmentFile too) and remove the other; the packaged unit sets KVS_ARCHIVER_LEDGER__DATABASE_URL, which an EnvironmentFile's KVS_ARCHIVER_LEDGER__DATABASE_URL overrides",
                            upper = key.to_uppercase()
                        ),
                    ))
                }
                Some(_) => {}
                None => {
                    ledger.insert(key, value);
                }
            }
        }
    }
    Ok(())
}

fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let path = e.path.join(".");
            if path.is_empty() {
                e.kind.to_string()
            } else {
                format!("{path}: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        path
    }

    /// A file from before `[ledger]` was named for the ledger still loads, its keys
    /// filling in what `[ledger]` (a new unit's environment, say) leaves out.
    #[test]
    fn the_old_state_section_is_read_as_the_ledger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "[state]\ndatabase_url = \"sqlite:///tmp/old.db\"\nlease = \"30s\"\n[destination]\ndirectory = \"/tmp/x\"\n",
        );
        let config = Config::load(Some(&path)).expect("loads");
        assert_eq!(config.ledger.database_url, "sqlite:///tmp/old.db");
        assert_eq!(config.ledger.lease, Duration::from_secs(30));
        let given = |text: &str| -> figment::value::Dict {
            Figment::from(Toml::string(text)).extract().expect("toml")
        };
        let mut both = given(
            "[ledger]\ndatabase_url = \"sqlite:///tmp/x.db\"\n[state]\ndatabase_url = \"sqlite:///tmp/x.db\"\nlease = \"30s\"\n",
        );
        rename_state_section(&mut both).expect("the same value twice is no conflict");
        let ledger: LedgerConfig = Figment::from(Serialized::defaults(LedgerConfig::default()))
            .merge(Serialized::defaults(both["ledger"].clone()))
            .extract()
            .expect("a ledger section");
        assert_eq!(ledger.lease, Duration::from_secs(30), "[state] fills in");
        assert!(!both.contains_key("state"));
        // A fleet's old EnvironmentFile against the packaged unit's new default.
        let mut conflict = given(
            "[ledger]\ndatabase_url = \"sqlite:///var/lib/kvs-archiver/state.db\"\n[state]\ndatabase_url = \"postgres://archiver@db/kvs\"\n",
        );
        let refused = rename_state_section(&mut conflict)
            .expect_err("two ledgers")
            .to_string();
        assert!(
            refused.starts_with("config: ledger.database_url: given twice")
                && refused.contains("KVS_ARCHIVER_LEDGER__DATABASE_URL")
                && !refused.contains("postgres://"),
            "{refused}"
        );
    }

    #[test]
    fn a_malformed_value_names_its_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "[destination]\ndirectory = \"/tmp/x\"\n[archive]\nclip_duration = \"ten minutes\"\n",
        );
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("archive.clip_duration"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "[destination]\ndirectory = \"/tmp/x\"\nbukket = \"b\"\n",
        );
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("bukket"), "{err}");
    }

    #[test]
    fn validation_names_the_stream_and_the_cap() {
        let mut config = Config::default();
        config.destination.directory = Some("/tmp/x".into());
        config.archive.clip_duration = Duration::from_secs(30 * 3600);
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("archive.clip_duration") && err.contains("1day 6h"),
            "{err}"
        );
        config.archive.clip_duration = Duration::from_secs(600);
        config.streams.push(StreamConfig::named("bad name"));
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("streams[0].name"), "{err}");
    }

    #[test]
    fn names_and_prefixes_that_could_write_outside_the_destination_are_refused() {
        let base = || {
            let mut config = Config::default();
            config.destination.directory = Some("/tmp/x".into());
            config
        };
        for name in [".", ".."] {
            let mut config = base();
            config.streams.push(StreamConfig::named(name));
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains("streams[0]") && err.contains("cannot name a folder"),
                "{err}"
            );
        }
        let mut config = base();
        let mut from_arn = StreamConfig::named("x");
        from_arn.name = None;
        from_arn.arn = Some("arn:aws:kinesisvideo:us-east-1:123456789012:stream/../1".into());
        config.streams.push(from_arn);
        assert!(config.validate().is_err(), "an ARN naming .. is refused");
        for prefix in ["/etc/", "../up/", "a/../../b/", "a/\u{7}/"] {
            let mut config = base();
            config.destination.prefix = prefix.into();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("destination.prefix"), "{prefix:?}: {err}");
        }
        let mut config = base();
        config.destination.prefix = "archive/kvs/".into();
        assert!(config.validate().is_ok());
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kvs-archiver.example.toml");
        let config = Config::load(Some(&path)).expect("the example validates");
        assert_eq!(config.streams.len(), 2);
        assert_eq!(config.streams[1].label(), "loading-dock");
        assert_eq!(config.daemon.schedule, "0 */5 * * * *");
    }

    #[test]
    fn arn_names_are_parsed() {
        assert_eq!(
            arn_stream_name(
                "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam-1/1700000000000"
            ),
            Some("cam-1")
        );
        assert_eq!(arn_stream_name("arn:aws:s3:::bucket"), None);
    }

    /// A configuration that validates: a directory destination, no stream.
    fn valid() -> Config {
        let mut config = Config::default();
        config.destination.directory = Some("/tmp/x".into());
        config
    }

    fn refusal(config: &Config) -> String {
        match config.validate() {
            Ok(()) => panic!("accepted: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_issues_urls_print_no_secret() {
        for (url, shown) in [
            (
                "postgres://u:pw@h/kvs?password=hunter2",
                "postgres://u:REDACTED@h/kvs?password=REDACTED",
            ),
            (
                "postgres://archiver@db.internal:5432/kvs?sslmode=verify-full&sslpassword=hunter2",
                "postgres://archiver@db.internal:5432/kvs?sslmode=verify-full&sslpassword=REDACTED",
            ),
            (
                "postgresql://h/kvs?application_name=a&Password=hunter2",
                "postgresql://h/kvs?application_name=a&Password=REDACTED",
            ),
            (
                "postgres://h/kvs?pass%77ord=hunter2",
                "postgres://h/kvs?pass%77ord=REDACTED",
            ),
            (
                "postgres://h/kvs?PASSWORD=hunter2",
                "postgres://h/kvs?PASSWORD=REDACTED",
            ),
            // Names nobody foresaw are hidden whole, key and all.
            (
                "postgres://h/kvs?passwrod=hunter2",
                "postgres://h/kvs?REDACTED",
            ),
            (
                "postgres://h/kvs?options=-c%20x%3Dhunter2",
                "postgres://h/kvs?REDACTED",
            ),
            ("postgres://h/kvs?hunter2", "postgres://h/kvs?REDACTED"),
            ("postgres://h/kvs#hunter2", "postgres://h/kvs#REDACTED"),
            (
                "postgres://h/kvs?password=hun#ter2",
                "postgres://h/kvs?password=REDACTED#REDACTED",
            ),
            ("postgres://:hunter2@h/kvs", "postgres://:REDACTED@h/kvs"),
            ("postgres://u:hun@ter2@h/kvs", "postgres://u:REDACTED@h/kvs"),
            (
                "https://AKIA:hunter2@s3.example",
                "https://AKIA:REDACTED@s3.example",
            ),
            // No scheme.
            ("u:hunter2@h/kvs", "u:REDACTED@h/kvs"),
            ("h/kvs?password=hunter2", "h/kvs?password=REDACTED"),
            ("?password=hunter2://h", "?password=REDACTED"),
            // An @ after the host's end: the password's end cannot be told, so all goes.
            ("postgres://u:hun/ter2@h/kvs", "postgres://REDACTED"),
            ("postgres://u:hun?ter2@h/kvs", "postgres://REDACTED"),
            ("postgres://h/kvs?password=hun@ter2", "postgres://REDACTED"),
            (
                "postgres://hunter2:x@h/kvs",
                "postgres://hunter2:REDACTED@h/kvs",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_without_secrets_print_as_written() {
        for url in [
            "sqlite:///var/lib/kvs-archiver/state.db",
            "sqlite://state.db?mode=rwc",
            "sqlite:state.db",
            "postgres://archiver@db.internal:5432/kvs_archiver?sslmode=require&sslrootcert=/etc/ca.pem",
            "http://127.0.0.1:9000",
            "https://s3.eu-west-1.amazonaws.com/",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn check_config_prints_no_password_from_the_query() {
        let mut config = valid();
        config.ledger.database_url = "postgres://u:pw@h/kvs?password=hunter2".into();
        config.validate().expect("valid");
        let shown = config.to_redacted_toml();
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://u:REDACTED@h/kvs?password=REDACTED"),
            "{shown}"
        );
    }

    #[test]
    fn postgres_parameters_the_driver_does_not_read_are_accepted() {
        // Configurations that worked before issue 20 (the driver ignored these) still do.
        for url in [
            "postgres://u@h/kvs?sslpassword=hunter2",
            "postgres://u@h/kvs?passwrod=hunter2",
            "postgres://u@h/kvs?Password=hunter2",
            "postgres://u:pw@h/kvs?connect_timeout=10&target_session_attrs=read-write",
            "postgres://u:pw@h:5432/kvs?password=x&sslmode=verify-full&sslrootcert=/ca.pem",
            "postgresql://u@h/kvs?options[statement_timeout]=5s&application_name=a",
        ] {
            let mut config = valid();
            config.ledger.database_url = url.into();
            config.validate().expect(url);
        }
        // Still refused: where the password ends cannot be told.
        let mut config = valid();
        config.ledger.database_url = "postgres://u:hun/ter2@h/kvs".into();
        let err = refusal(&config);
        assert!(
            err.starts_with("config: ledger.database_url: ") && err.contains("percent-encode"),
            "{err}"
        );
        assert!(!err.contains("ter2"), "{err}");
    }

    #[test]
    fn the_driver_is_given_only_the_parameters_it_reads() {
        for (url, driven, left_out) in [
            (
                "postgres://u@h/kvs?sslmode=verify-full&sslpassword=hunter2",
                "postgres://u@h/kvs?sslmode=verify-full",
                &["sslpassword"][..],
            ),
            (
                "postgres://u:pw@h/kvs?connect_timeout=10&password=x&target_session_attrs=read-write",
                "postgres://u:pw@h/kvs?password=x",
                &["connect_timeout", "target_session_attrs"][..],
            ),
            (
                "postgresql://h/kvs?passwrod=hunter2&Password=hunter2&pass%77ord=hunter2",
                // `pass%77ord` is `password`, which the driver reads.
                "postgresql://h/kvs?pass%77ord=hunter2",
                &["passwrod", "Password"][..],
            ),
            (
                "postgres://h/kvs?connect_timeout=1&connect_timeout=2",
                "postgres://h/kvs",
                &["connect_timeout"][..],
            ),
            // A pair without `=`, or an odd key, may be a pasted secret: not named.
            (
                "postgres://h/kvs?hunter2&sslmode=require",
                "postgres://h/kvs?sslmode=require",
                &["REDACTED"][..],
            ),
            (
                "postgres://h/kvs?hun:ter2=x&app=1#frag",
                "postgres://h/kvs#frag",
                &["REDACTED", "app"][..],
            ),
        ] {
            let (got, names) = postgres_url_for_driver(url);
            assert_eq!(got, driven, "{url}");
            assert_eq!(names, left_out, "{url}");
        }
        // What the driver reads, and any other ledger, is given as written.
        for url in [
            "postgres://u:pw@h:5432/kvs?password=x&sslmode=verify-full&sslrootcert=/ca.pem",
            "postgresql://u@h/kvs?options[statement_timeout]=5s&application_name=a&options=-c%20x%3D1",
            "postgres://u@h/kvs?ssl%6Dode=require",
            "postgres://u@h/kvs",
            "sqlite:///var/lib/kvs-archiver/state.db?mode=rwc&x=1",
        ] {
            assert_eq!(postgres_url_for_driver(url), (url.to_string(), vec![]));
        }
    }

    /// Standard error of a process, for a test: what the fmt subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_loaded_ledger_url_leaves_out_what_the_driver_would_log_and_warns_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "[ledger]\ndatabase_url = \"postgres://u:pw@h/kvs?connect_timeout=10&sslpassword=hunter2&sslmode=require\"\n[destination]\ndirectory = \"/tmp/x\"\n",
        );
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let config = tracing::subscriber::with_default(subscriber, || {
            Config::load(Some(&path)).expect("loads")
        });
        let log = String::from_utf8(log.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(
            config.ledger.database_url,
            "postgres://u:pw@h/kvs?sslmode=require"
        );
        assert!(
            log.contains("WARN")
                && log.contains("ledger.database_url")
                && log.contains("connect_timeout, sslpassword")
                && log.contains("sslkey a key file without a passphrase"),
            "{log}"
        );
        assert!(!log.contains("hunter2") && !log.contains("=10"), "{log}");
        assert_eq!(log.lines().count(), 1, "one warning: {log}");
        // check-config shows what the driver is given, its password redacted.
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains("\"postgres://u:REDACTED@h/kvs?sslmode=require\""),
            "{shown}"
        );
    }

    #[test]
    fn an_endpoint_with_credentials_is_refused_without_them() {
        for url in [
            "https://AKIA:hunter2@s3.example",
            "http://127.0.0.1:9000/?token=hunter2",
            "http://127.0.0.1:9000/#hunter2",
        ] {
            let mut config = valid();
            config.aws.s3_endpoint_url = Some(url.into());
            let err = refusal(&config);
            assert!(
                err.contains("aws.s3_endpoint_url") && err.contains("credential chain"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    /// A bucket destination in `region`, on AWS or (`endpoint`) an S3-compatible store.
    fn with_bucket(bucket: &str, region: &str, endpoint: Option<&str>) -> Config {
        let mut config = Config::default();
        config.aws.region = region.into();
        config.aws.s3_endpoint_url = endpoint.map(Into::into);
        config.destination.bucket = Some(bucket.into());
        config
    }

    /// Where buckets may have S3's legacy names: us-east-1, and any S3-compatible store.
    const LEGACY_PLACES: [(&str, Option<&str>); 3] = [
        ("us-east-1", None),
        ("eu-west-1", Some("http://127.0.0.1:9000")),
        ("us-east-1", Some("https://minio.example")),
    ];

    #[test]
    fn bucket_names_follow_s3s_current_rules_on_aws_outside_us_east_1() {
        let long = "a".repeat(64);
        for bucket in [
            "ab",
            long.as_str(),
            "My-Archive",
            "my_archive",
            "-archive",
            "archive-",
            "my..archive",
            "192.168.5.4",
            "xn--archive",
            "sthree-archive",
            "amzn-s3-demo-archive",
            "archive-s3alias",
            "archive--ol-s3",
            "archive.mrap",
            "archive--use1-az4--x-s3",
            "archive--table-s3",
        ] {
            let err = refusal(&with_bucket(bucket, "eu-west-1", None));
            assert!(
                err.starts_with("config: destination.bucket: ")
                    && err.contains(&format!("{bucket:?}"))
                    && err.contains("aws.region = \"us-east-1\"")
                    && err.contains("aws.s3_endpoint_url"),
                "{bucket}: {err}"
            );
        }
        // The examples' and the tests' buckets (moto's and s3s-fs's too).
        for bucket in [
            "my-camera-archive",
            "archive",
            "footage",
            "bench",
            "no-such-bucket",
            "moto-4242",
            "a.b.c",
            "192.168.5.4.x",
        ] {
            with_bucket(bucket, "eu-west-1", None)
                .validate()
                .expect(bucket);
            for (region, endpoint) in LEGACY_PLACES {
                with_bucket(bucket, region, endpoint)
                    .validate()
                    .expect(bucket);
            }
        }
    }

    #[test]
    fn legacy_bucket_names_are_accepted_in_us_east_1_and_on_s3_compatible_stores() {
        // Created in us-east-1 before March 2018, or named so on a store of its own.
        let longest = format!("Archive_{}", "x".repeat(247));
        for bucket in [
            "My-Archive",
            "my_archive",
            "CAMERAS",
            "_archive_",
            "-archive",
            "archive-",
            "my..archive",
            "ab",
            "a",
            "192.168.5.4",
            "xn--archive",
            "archive--x-s3",
            longest.as_str(),
        ] {
            for (region, endpoint) in LEGACY_PLACES {
                with_bucket(bucket, region, endpoint)
                    .validate()
                    .unwrap_or_else(|e| panic!("{bucket} in {region} at {endpoint:?}: {e}"));
            }
        }
        let too_long = "a".repeat(256);
        for (bucket, says) in [
            (too_long.as_str(), "1-255 characters"),
            ("my+archive", "only letters, digits, '.', '-' and '_'"),
            ("my:archive", "only letters, digits, '.', '-' and '_'"),
            ("archivé", "only letters, digits, '.', '-' and '_'"),
            (".", "a letter or a digit"),
            ("..", "a letter or a digit"),
        ] {
            for (region, endpoint) in LEGACY_PLACES {
                let err = refusal(&with_bucket(bucket, region, endpoint));
                assert!(
                    err.starts_with("config: destination.bucket: ")
                        && err.contains(says)
                        && err.contains("legacy naming"),
                    "{bucket} in {region} at {endpoint:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn no_bucket_name_holds_a_wildcard_a_slash_whitespace_or_a_control_character() {
        for (bucket, says) in [
            ("my-b*", "without * or ?"),
            ("my-bucke?", "without * or ?"),
            ("*", "without * or ?"),
            ("my-archive/kvs", "destination.prefix"),
            ("/my-archive", "destination.prefix"),
            ("my archive", "whitespace or control characters"),
            ("my-archive\n", "whitespace or control characters"),
            ("my\tarchive", "whitespace or control characters"),
            ("my\u{7f}archive", "whitespace or control characters"),
            ("my\u{0}archive", "whitespace or control characters"),
        ] {
            for (region, endpoint) in LEGACY_PLACES.into_iter().chain([("eu-west-1", None)]) {
                let err = refusal(&with_bucket(bucket, region, endpoint));
                assert!(
                    err.starts_with("config: destination.bucket: ")
                        && err.contains(says)
                        && err.contains(&format!("{bucket:?}")),
                    "{bucket:?} in {region} at {endpoint:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn prefixes_hold_no_wildcard_and_end_with_a_slash() {
        for (prefix, says) in [
            ("kvs*/", "wildcards"),
            ("k?s/", "wildcards"),
            ("${aws:username}/", "wildcards"),
            ("kvs", "write \"kvs/\""),
            ("site-a/kvs", "write \"site-a/kvs/\""),
            ("kvs//", "plain folder names"),
        ] {
            let mut config = valid();
            config.destination.prefix = prefix.into();
            let err = refusal(&config);
            assert!(
                err.starts_with("config: destination.prefix: ") && err.contains(says),
                "{prefix}: {err}"
            );
        }
        for prefix in ["", "kvs/", "site-a/kvs/"] {
            let mut config = valid();
            config.destination.prefix = prefix.into();
            config.validate().expect(prefix);
        }
    }

    #[test]
    fn a_stream_name_from_an_arn_is_a_kvs_stream_name() {
        let arn = |name: &str| {
            format!("arn:aws:kinesisvideo:us-east-1:123456789012:stream/{name}/1700000000000")
        };
        let long = "a".repeat(5000);
        for (given, says) in [
            (arn("<img src=x>"), "not a KVS stream name"),
            (arn(&long), "not a KVS stream name"),
            (arn("cam*"), "not a KVS stream name"),
            (
                "arn:aws:kinesisvideo:us-east-1:*:stream/cam/1".to_string(),
                "must look like",
            ),
            (
                "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam/*".to_string(),
                "must look like",
            ),
            (
                "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam".to_string(),
                "must look like",
            ),
            (
                "arn:aws:kinesisvideo:us-east-1:123456789012:channel/cam/1".to_string(),
                "must look like",
            ),
            (
                "arn:aws:s3:us-east-1:123456789012:stream/cam/1".to_string(),
                "must look like",
            ),
        ] {
            let mut config = valid();
            let mut stream = StreamConfig::named("x");
            stream.name = None;
            stream.arn = Some(given.clone());
            config.streams.push(stream);
            let err = refusal(&config);
            assert!(
                err.starts_with("config: streams[0].arn: ") && err.contains(says),
                "{err}"
            );
            assert!(
                err.len() < 600,
                "a long value is cut: {} characters",
                err.len()
            );
        }
        for given in [
            arn("loading-dock"),
            "arn:aws-cn:kinesisvideo:cn-north-1:123456789012:stream/Cam_1.a/1".to_string(),
        ] {
            let mut config = valid();
            let mut stream = StreamConfig::named("x");
            stream.name = None;
            stream.arn = Some(given.clone());
            config.streams.push(stream);
            config.validate().expect(&given);
        }
    }

    #[test]
    fn the_bundled_emulator_goes_only_with_a_directory() {
        let mut config = valid();
        config.aws.bundled_emulator = Some("demo-output/emulator.toml".into());
        config.validate().expect("with a directory");
        config.destination.directory = None;
        config.destination.bucket = Some("footage".into());
        let err = refusal(&config);
        assert!(
            err.starts_with("config: aws.bundled_emulator: ")
                && err.contains("destination.directory")
                && err.contains("signed with the emulator's keys"),
            "{err}"
        );
    }

    /// `text` with every byte but letters and digits percent-encoded.
    fn percent_encoded(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn redaction_never_panics(url in "\\PC{0,120}", bytes in "[:/?#@&=%+\\\\a-zA-Z0-9é]{0,60}") {
            let _ = redact_url(&url);
            let _ = redact_url(&bytes);
        }

        /// A secret written where a URL holds one (the user-info's password, a query
        /// value under a secret's name in any case or encoding or an unknown name, the
        /// fragment), percent-encoded or as typed, never shows in the printed URL.
        #[test]
        fn a_secret_never_shows(
            scheme in "(|postgres://|postgresql://|https://|sqlite://)",
            user in "[a-z]{0,6}",
            host in "[a-z][a-z0-9.-]{0,15}(:[0-9]{1,5})?",
            path in "(/[a-z0-9_]{0,8}){0,2}",
            public in proptest::collection::vec("(sslmode|host|port|application_name|mode)=[a-z0-9]{0,6}", 0..3),
            key in "(password|PASSWORD|Password|sslpassword|SSLPassword|pass%77ord|p%61ssword|passwrod|token|options|secret)",
            secret in "[!-~]{8,24}",
            place in 0..3usize,
            encode in proptest::prelude::any::<bool>(),
        ) {
            let written = if encode { percent_encoded(&secret) } else { secret.clone() };
            let query = public.join("&");
            let build = |secret: &str| match place {
                0 => format!("{scheme}{user}:{secret}@{host}{path}?{query}"),
                1 => format!("{scheme}{user}@{host}{path}?{query}&{key}={secret}&{query}"),
                _ => format!("{scheme}{host}{path}?{query}#{secret}"),
            };
            let skeleton = build("");
            proptest::prop_assume!(!skeleton.contains(&secret) && !REDACTED.contains(&secret));
            let shown = redact_url(&build(&written));
            proptest::prop_assert!(!shown.contains(&secret), "{shown}");
            proptest::prop_assert!(!shown.contains(&written), "{shown}");
        }

        /// What holds no secret prints as written.
        #[test]
        fn a_url_without_secrets_prints_as_written(
            scheme in "(|postgres://|https://|sqlite://)",
            user in "([a-z]{1,6}@)?",
            host in "[a-z][a-z0-9.-]{0,15}(:[0-9]{1,5})?",
            path in "(/[a-z0-9_]{0,8}){0,2}",
            public in proptest::collection::vec("(sslmode|host|port|application_name|mode)=[a-z0-9]{0,6}", 0..3),
        ) {
            let query = if public.is_empty() { String::new() } else { format!("?{}", public.join("&")) };
            let url = format!("{scheme}{user}{host}{path}{query}");
            proptest::prop_assert_eq!(redact_url(&url), url);
        }
    }
}

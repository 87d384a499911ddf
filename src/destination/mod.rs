//! Where clips go: an S3 bucket ([`s3`]) or a local directory ([`dir`]), behind one narrow
//! interface. An upload receives the clip's bytes in order and either finishes (the
//! object exists, whole) or is aborted (nothing is left behind).

pub mod dir;
pub mod s3;

use crate::error::Result;
use crate::ledger::Archived;
use bytes::Bytes;
use std::time::Duration;

/// A partial upload no ledger row names is removed only once it is this old: a live
/// process records its upload within its first part, so only a process killed between
/// creating an upload and recording it leaves one behind, and none that lives is touched.
pub const ORPHAN_AGE: Duration = Duration::from_secs(6 * 3600);

/// Running CRC32C of an object's bytes, as written.
#[derive(Debug, Default, Clone, Copy)]
pub struct Crc32c(u32);

impl Crc32c {
    /// Adds `bytes`, which follow those already added.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, bytes);
    }

    /// The checksum as 8 lowercase hex digits: how the ledger and `verify` record it.
    pub fn hex(self) -> String {
        format!("{:08x}", self.0)
    }

    /// The CRC of `self`'s bytes followed by `next`'s `len` bytes, without reading them.
    pub fn followed_by(self, next: Crc32c, len: usize) -> Crc32c {
        Crc32c(crc32c::crc32c_combine(self.0, next.0, len))
    }

    /// The checksum of S3's `x-amz-checksum-crc32c` (base64 of the big-endian value);
    /// `None` for anything else, a composite `…-N` included.
    pub fn from_base64(text: &str) -> Option<Crc32c> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let digits = text.strip_suffix("==")?.as_bytes();
        if digits.len() != 6 {
            return None;
        }
        let mut n = 0u64;
        for digit in digits {
            let value = ALPHABET.iter().position(|a| a == digit)?;
            n = (n << 6) | value as u64;
        }
        // 36 bits: the 32 of the value, then 4 of padding that must be zero.
        (n & 0xf == 0).then_some(Crc32c((n >> 4) as u32))
    }

    /// Base64 of the big-endian value: the form of S3's `x-amz-checksum-crc32c`.
    pub fn base64(self) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let n = u64::from(self.0) << 16; // 32 bits, padded to 48 = eight 6-bit digits
        let digits: String = (0..6)
            .map(|i| ALPHABET[((n >> (42 - 6 * i)) & 63) as usize] as char)
            .collect();
        digits + "=="
    }
}

/// Object metadata: what a user needs to find a clip without the ledger.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// Name and value pairs, stored with the object (S3 user metadata, or a side file).
    pub pairs: Vec<(&'static str, String)>,
}

/// Where archived objects go: the one seam between the worker and S3 or a directory.
pub enum Destination {
    /// An S3 bucket (or an S3-compatible store).
    S3(s3::S3Destination),
    /// A local directory.
    Dir(dir::DirDestination),
}

/// One object being written; nothing is visible at its key until [`Upload::finish`].
pub enum Upload {
    /// A multipart upload to S3.
    S3(s3::S3Upload),
    /// A partial file in the directory, renamed into place at the end.
    Dir(dir::DirUpload),
}

impl Destination {
    /// Checks that the destination can be reached and written under `prefix`, with a
    /// clear error if not.
    /// `first_contact`: a command's first request (an endpoint that does not answer is
    /// reported after one retry); the daemon passes `false` and keeps its whole patience,
    /// so a store still starting at boot does not stop it.
    /// `required`: what the settings need of the bucket, asked of it where S3 can say.
    pub async fn check(
        &self,
        prefix: &str,
        first_contact: bool,
        required: &Required,
    ) -> Result<()> {
        match self {
            Destination::S3(s) => {
                s.check(prefix, first_contact).await?;
                s.check_required(prefix, required).await
            }
            Destination::Dir(d) => d.check().await,
        }
    }

    /// Starts an upload to `key`. Nothing is visible at `key` until [`Upload::finish`].
    pub async fn begin(
        &self,
        key: &str,
        meta: ObjectMeta,
        content_type: &'static str,
        settings: crate::storage::ObjectSettings,
    ) -> Result<Upload> {
        match self {
            Destination::S3(s) => Ok(Upload::S3(s.begin(key, meta, content_type, settings))),
            Destination::Dir(d) => Ok(Upload::Dir(d.begin(key, meta).await?)),
        }
    }

    /// Aborts an upload a previous process left behind (`upload_id` from the ledger).
    pub async fn abort_abandoned(&self, key: &str, upload_id: &str) -> Result<()> {
        match self {
            Destination::S3(s) => s.abort_upload(key, upload_id).await,
            Destination::Dir(_) => Ok(()),
        }
    }

    /// Aborts every partial upload of `key`: called for a chunk just taken over from a
    /// dead claim, whose process may have created an upload and died before recording it.
    /// Any upload of the key belongs to an earlier claim of that chunk, fenced off now.
    pub async fn abort_uploads_of(&self, key: &str) -> Result<usize> {
        match self {
            Destination::S3(s) => s.abort_uploads_of(key).await,
            Destination::Dir(d) => d.abort_partial(key).await,
        }
    }

    /// Aborts partial uploads under `prefix` that no in-flight chunk records (`live`) and
    /// that are older than [`ORPHAN_AGE`] (a crash between creating an upload and
    /// recording it). Best effort: some stores cannot list them.
    pub async fn sweep_orphans(&self, prefix: &str, live: &[String]) -> usize {
        match self {
            Destination::S3(s) => s.sweep_orphans(prefix, live, ORPHAN_AGE).await,
            Destination::Dir(d) => d.sweep_orphans(prefix, ORPHAN_AGE).await,
        }
    }

    /// Where objects go, for logs and messages: `s3://BUCKET` or the directory's path.
    pub fn describe(&self) -> String {
        match self {
            Destination::S3(s) => s.describe(),
            Destination::Dir(d) => d.describe(),
        }
    }

    /// The object at `key` as stored now: size, CRC32C of its bytes (read whole) and
    /// metadata; `None` if there is no object.
    pub async fn inspect(&self, key: &str) -> Result<Option<StoredObject>> {
        match self {
            Destination::S3(s) => s.inspect(key).await,
            Destination::Dir(d) => d.inspect(key).await,
        }
    }

    /// Where a player can open the object at `key`: a presigned GET URL valid for
    /// `valid` (S3), or the file's path (a directory).
    pub async fn playable_url(&self, key: &str, valid: std::time::Duration) -> Result<String> {
        match self {
            Destination::S3(s) => s.presigned_get(key, valid).await,
            Destination::Dir(d) => Ok(d.path_of(key)?.display().to_string()),
        }
    }

    /// `len` bytes of the object at `key` from byte `start`, as they arrive.
    pub async fn read_range(&self, key: &str, start: u64, len: u64) -> Result<RangeBody> {
        match self {
            Destination::S3(s) => s.read_range(key, start, len).await,
            Destination::Dir(d) => d.read_range(key, start, len).await,
        }
    }

    /// Size and metadata of the object at `key`, without its bytes.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectHead>> {
        match self {
            Destination::S3(s) => s.head(key).await,
            Destination::Dir(d) => d.head(key).await,
        }
    }

    /// Starts a restore of the object at `key` for `days` at `tier` (S3 only): `true` if
    /// it started, `false` if one was already under way or done.
    pub async fn restore(&self, key: &str, days: i32, tier: RestoreTier) -> Result<bool> {
        match self {
            Destination::S3(s) => s.restore(key, days, tier).await,
            Destination::Dir(d) => Err(crate::error::Error::Usage(format!(
                "{}: a directory's files need no restore",
                d.describe()
            ))),
        }
    }

    /// Every object key under `prefix` (metadata side files excluded), all pages.
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        match self {
            Destination::S3(s) => s.list_keys(prefix).await,
            Destination::Dir(d) => d.list_keys(prefix).await,
        }
    }
}

/// How fast (and at what price) S3 restores an archived object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RestoreTier {
    /// Minutes, at the highest price (not for DEEP_ARCHIVE).
    Expedited,
    /// Hours.
    Standard,
    /// The slowest and cheapest.
    Bulk,
}

impl RestoreTier {
    /// The name S3 uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreTier::Expedited => "Expedited",
            RestoreTier::Standard => "Standard",
            RestoreTier::Bulk => "Bulk",
        }
    }
}

pub use crate::storage::Required;

/// An object as `verify` reads it back.
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// Bytes, as stored now.
    pub size: u64,
    /// CRC32C of the whole object, hex.
    pub crc32c: String,
    /// The object's metadata, as [`ObjectMeta`] wrote it.
    pub meta: std::collections::BTreeMap<String, String>,
}

/// An object's size and metadata, and what the store keeps about it.
#[derive(Debug, Clone, Default)]
pub struct ObjectHead {
    /// Bytes.
    pub size: u64,
    /// The object's metadata, as [`ObjectMeta`] wrote it.
    pub meta: std::collections::BTreeMap<String, String>,
    /// The CRC32C of the whole object (hex), where the store reports one (S3: objects
    /// written with a full-object CRC32C); `None` otherwise.
    pub crc32c: Option<String>,
    /// The storage class, where the store reports one (S3 omits STANDARD).
    pub storage_class: Option<String>,
    /// S3's `x-amz-restore` for an archived object being or having been restored.
    pub restore: Option<String>,
    /// Intelligent-Tiering's archive tier (`ARCHIVE_ACCESS`, `DEEP_ARCHIVE_ACCESS`).
    pub archive_status: Option<String>,
}

impl ObjectHead {
    /// Whether the object's bytes can be read now (see [`Readiness`]).
    pub fn readiness(&self) -> Readiness {
        let class = match (
            self.storage_class.as_deref(),
            self.archive_status.as_deref(),
        ) {
            (Some(class @ ("GLACIER" | "DEEP_ARCHIVE")), _) => class.to_string(),
            (_, Some(tier @ ("ARCHIVE_ACCESS" | "DEEP_ARCHIVE_ACCESS"))) => {
                format!("INTELLIGENT_TIERING {tier}")
            }
            _ => return Readiness::Readable,
        };
        match self.restore.as_deref() {
            Some(r) if r.contains("ongoing-request=\"true\"") => Readiness::Restoring { class },
            Some(r) if r.contains("ongoing-request=\"false\"") => Readiness::Restored {
                class,
                until: r
                    .split("expiry-date=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or_default()
                    .to_string(),
            },
            _ => Readiness::NeedsRestore { class },
        }
    }
}

/// Whether an object's bytes can be read now: objects in S3's archive classes must be
/// restored (a retrieval, billed per GB) before any read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Readiness {
    /// Readable at once.
    Readable,
    /// In an archive class, not restored: `kvs-archiver restore` first.
    NeedsRestore {
        /// The class (or Intelligent-Tiering tier) it is in.
        class: String,
    },
    /// A restore is under way.
    Restoring {
        /// The class it is in.
        class: String,
    },
    /// Restored: a temporary copy is readable until `until` (as S3 writes it).
    Restored {
        /// The class it is in.
        class: String,
        /// When the restored copy goes.
        until: String,
    },
}

impl Readiness {
    /// Whether a read now would be refused.
    pub fn blocks_reads(&self) -> bool {
        matches!(
            self,
            Readiness::NeedsRestore { .. } | Readiness::Restoring { .. }
        )
    }
}

/// How long a restore takes in `class` at each tier, and what it costs: said wherever an
/// object needs one (AWS's "Understanding archive retrieval options").
pub fn restore_tiers(class: &str) -> &'static str {
    if class.contains("DEEP_ARCHIVE") {
        "Standard tier within 12 h, Bulk within 48 h and cheapest per GB; no Expedited"
    } else {
        "Expedited 1-5 min at the highest price per GB, Standard 3-5 h, Bulk 5-12 h and cheapest (free for GLACIER)"
    }
}

/// A byte range of an object, read piece by piece.
pub enum RangeBody {
    /// From S3: the GetObject body.
    S3 {
        /// The body being read.
        body: aws_sdk_s3::primitives::ByteStream,
        /// `s3://BUCKET/KEY`, for errors.
        target: String,
    },
    /// From a directory: the file, cut to the range.
    Dir {
        /// The file, positioned at the start and limited to the range's length.
        file: tokio::io::Take<tokio::fs::File>,
        /// Its path, for errors.
        path: std::path::PathBuf,
    },
}

impl RangeBody {
    /// The next bytes, `None` at the end of the range.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            RangeBody::S3 { body, target } => {
                body.try_next()
                    .await
                    .map_err(|e| crate::error::Error::Destination {
                        op: "GetObject",
                        target: target.clone(),
                        message: format!("body broke off: {e}"),
                        retry: crate::error::Retryability::Transient,
                    })
            }
            RangeBody::Dir { file, path } => {
                use tokio::io::AsyncReadExt;
                let mut buffer = vec![0u8; 1 << 20];
                let n =
                    file.read(&mut buffer)
                        .await
                        .map_err(|e| crate::error::Error::Destination {
                            op: "read",
                            target: path.display().to_string(),
                            message: e.to_string(),
                            retry: crate::error::Retryability::Transient,
                        })?;
                buffer.truncate(n);
                Ok((n > 0).then(|| Bytes::from(buffer)))
            }
        }
    }

    /// The whole range in memory (for headers: small).
    pub async fn collect(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(bytes) = self.next().await? {
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }
}

impl Upload {
    /// Appends bytes. May upload a part and wait for the previous one (bounded memory).
    pub async fn write(&mut self, bytes: Bytes) -> Result<()> {
        match self {
            Upload::S3(u) => u.write(bytes).await,
            Upload::Dir(u) => u.write(bytes).await,
        }
    }

    /// The multipart upload id once one exists: the ledger records it.
    pub fn upload_id(&self) -> Option<&str> {
        match self {
            Upload::S3(u) => u.upload_id(),
            Upload::Dir(_) => None,
        }
    }

    /// Makes the object visible; returns its size and checksum.
    pub async fn finish(self) -> Result<Archived> {
        match self {
            Upload::S3(u) => u.finish().await,
            Upload::Dir(u) => u.finish().await,
        }
    }

    /// Discards everything written.
    pub async fn abort(self) {
        match self {
            Upload::S3(u) => u.abort().await,
            Upload::Dir(u) => u.abort().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Crc32c;

    #[test]
    fn base64_is_the_big_endian_value() {
        assert_eq!(Crc32c(0xdead_beef).base64(), "3q2+7w==");
        assert_eq!(Crc32c(0).base64(), "AAAAAA==");
        assert_eq!(Crc32c(u32::MAX).base64(), "/////w==");
    }

    #[test]
    fn base64_reads_back_and_refuses_composites() {
        for value in [0, 1, 0xdead_beef, u32::MAX] {
            let crc = Crc32c(value);
            assert_eq!(Crc32c::from_base64(&crc.base64()).map(|c| c.0), Some(value));
        }
        for bad in ["3q2+7w==-3", "3q2+7w", "3q2+7x==", "AAAAAAAA", ""] {
            assert!(Crc32c::from_base64(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parts_combine_into_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Crc32c::default();
        whole.update(&data);
        let (a, b) = data.split_at(31_337);
        let (mut first, mut second) = (Crc32c::default(), Crc32c::default());
        first.update(a);
        second.update(b);
        assert_eq!(first.followed_by(second, b.len()).hex(), whole.hex());
    }
}

//! Storage settings: what S3 keeps with each object besides its bytes and metadata: its storage class, its
//! encryption, its tags and its Object Lock. `[destination]` sets them and a stream may
//! override each; [`StreamSettings`] is the result for one stream, and
//! [`StreamSettings::for_object`] turns it into the headers of one object's writes.

use crate::domain::EpochMs;
use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// An S3 storage class an object is written in (`storage_class`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StorageClass {
    /// Milliseconds to first byte, no retrieval fee.
    Standard,
    /// Cheaper storage; a retrieval fee per GB and 30 days' minimum.
    StandardIa,
    /// S3 moves each object between tiers by its use, for a monitoring fee per object.
    IntelligentTiering,
    /// Archive prices, still read in milliseconds; 90 days' minimum.
    GlacierIr,
    /// Glacier Flexible Retrieval: must be restored (minutes to hours) before a read.
    Glacier,
    /// The cheapest: must be restored (12 to 48 hours) before a read; 180 days' minimum.
    DeepArchive,
}

impl StorageClass {
    /// The name S3 uses (`x-amz-storage-class`).
    pub fn as_str(self) -> &'static str {
        match self {
            StorageClass::Standard => "STANDARD",
            StorageClass::StandardIa => "STANDARD_IA",
            StorageClass::IntelligentTiering => "INTELLIGENT_TIERING",
            StorageClass::GlacierIr => "GLACIER_IR",
            StorageClass::Glacier => "GLACIER",
            StorageClass::DeepArchive => "DEEP_ARCHIVE",
        }
    }
}

/// Server-side encryption (`sse`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Sse {
    /// Keys S3 manages (SSE-S3).
    #[serde(rename = "AES256")]
    Aes256,
    /// A KMS key (SSE-KMS): `kms_key_id`, or the account's `aws/s3` key without one.
    #[serde(rename = "aws:kms")]
    Kms,
}

/// Object Lock's retention mode.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten it.
    Governance,
    /// Nobody, the root user included, can delete the object before its date.
    Compliance,
}

impl LockMode {
    /// The name S3 uses (`x-amz-object-lock-mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// What an object's retention is counted from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetainFrom {
    /// The end of the newest fragment in the object: every fragment is kept at least
    /// `retain_for` after it was recorded, however late it was archived.
    #[default]
    Recorded,
    /// The moment the object is written.
    Uploaded,
}

/// `[destination.object_lock]`: locks every object against deletion and overwrite.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectLockConfig {
    /// GOVERNANCE or COMPLIANCE.
    pub mode: LockMode,
    /// How long each object is locked, such as "365d".
    #[serde(with = "humantime_serde")]
    pub retain_for: Duration,
    /// "recorded" (default): counted from the newest fragment's time; "uploaded": from
    /// the write.
    #[serde(default)]
    pub retain_from: RetainFrom,
    /// Also place a legal hold, which lasts until someone removes it.
    #[serde(default)]
    pub legal_hold: bool,
}

/// The settings a stream may override, as the file gives them (`[destination]` or one
/// `[[streams]]` entry). `None`: not set here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides<'a> {
    /// `storage_class`.
    pub storage_class: Option<StorageClass>,
    /// `sse`.
    pub sse: Option<Sse>,
    /// `kms_key_id`.
    pub kms_key_id: Option<&'a str>,
    /// `bucket_key`.
    pub bucket_key: Option<bool>,
    /// `tags`.
    pub tags: Option<&'a BTreeMap<String, String>>,
    /// `object_lock`.
    pub object_lock: Option<&'a ObjectLockConfig>,
}

/// Encryption as it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// SSE-S3.
    S3Managed,
    /// SSE-KMS with this key (`None`: `aws/s3`), with or without an S3 Bucket Key.
    Kms {
        /// The key's id, ARN or alias.
        key_id: Option<String>,
        /// Whether S3 Bucket Keys cut the KMS calls.
        bucket_key: bool,
    },
}

/// One stream's settings, resolved: the destination's, with the stream's overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamSettings {
    /// The storage class (`None`: the store's default, STANDARD on S3).
    pub storage_class: Option<StorageClass>,
    /// The encryption (`None`: the bucket's default).
    pub encryption: Option<Encryption>,
    /// Tags, `{stream}` replaced.
    pub tags: Vec<(String, String)>,
    /// Object Lock, if set.
    pub object_lock: Option<ObjectLockConfig>,
}

/// What one object is written with: [`StreamSettings`] with its retention date fixed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectSettings {
    /// See [`StreamSettings::storage_class`].
    pub storage_class: Option<StorageClass>,
    /// See [`StreamSettings::encryption`].
    pub encryption: Option<Encryption>,
    /// `x-amz-tagging`: the tags, URL-encoded; `None` without tags.
    pub tagging: Option<String>,
    /// Object Lock: the mode and the date until which the object is locked.
    pub lock: Option<(LockMode, chrono::DateTime<chrono::Utc>)>,
    /// Whether a legal hold is placed.
    pub legal_hold: bool,
    /// The write may replace an object already at the key (`verify --repair` rewriting a
    /// damaged object of the archive's own): not create-only.
    pub replace_existing: bool,
}

/// What the configured object settings need of the bucket.
#[derive(Debug, Clone, Default)]
pub struct Required {
    /// Objects are locked: the bucket must have Object Lock enabled.
    pub object_lock: bool,
    /// KMS keys objects are encrypted with.
    pub kms_keys: Vec<KmsKey>,
}

/// A KMS key objects are encrypted with, as the start-up check tries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKey {
    /// The field that names it (`destination.kms_key_id`, `streams[2].kms_key_id`).
    pub field: String,
    /// The key (`None`: the account's `aws/s3` key).
    pub key_id: Option<String>,
    /// With an S3 Bucket Key (a key policy may tell the two apart).
    pub bucket_key: bool,
}

/// S3's limits on tags (User Guide, "Categorizing your storage using tags").
const MAX_TAGS: usize = 10;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;
/// The longest Object Lock retention we accept: S3 takes dates up to year 9999, but a
/// COMPLIANCE lock cannot be shortened by anyone, so a typo ("36500d") would be final.
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl StreamSettings {
    /// The destination's settings with the stream's overrides: each set field replaces
    /// the destination's, and the stream's tags are added to the destination's (the
    /// stream's value wins for a key both set). `stream` replaces `{stream}` in tags.
    pub fn resolve(destination: &Overrides<'_>, stream: &Overrides<'_>, name: &str) -> Self {
        let sse = stream.sse.or(destination.sse);
        let encryption = sse.map(|sse| match sse {
            Sse::Aes256 => Encryption::S3Managed,
            Sse::Kms => Encryption::Kms {
                key_id: stream
                    .kms_key_id
                    .or(destination.kms_key_id)
                    .map(str::to_string),
                bucket_key: stream
                    .bucket_key
                    .or(destination.bucket_key)
                    .unwrap_or(false),
            },
        });
        let mut tags: BTreeMap<String, String> = BTreeMap::new();
        for source in [destination.tags, stream.tags].into_iter().flatten() {
            for (k, v) in source {
                tags.insert(k.clone(), v.replace("{stream}", name));
            }
        }
        StreamSettings {
            storage_class: stream.storage_class.or(destination.storage_class),
            encryption,
            tags: tags.into_iter().collect(),
            object_lock: stream.object_lock.or(destination.object_lock).cloned(),
        }
    }

    /// The settings of an object whose newest fragment ends at `recorded_end`, written at
    /// `now`: the retention date is fixed here, rounded up to the second.
    pub fn for_object(&self, recorded_end: EpochMs, now: EpochMs) -> ObjectSettings {
        let lock = self.object_lock.as_ref().map(|lock| {
            let from = match lock.retain_from {
                RetainFrom::Recorded => recorded_end,
                RetainFrom::Uploaded => now,
            };
            // S3 refuses a date in the past (old footage archived late, a producer clock
            // behind): such an object is locked for a day from now.
            let until_ms = from
                .saturating_add(lock.retain_for.as_millis() as i64)
                .max(now.saturating_add(24 * 3600 * 1000));
            let until_s = until_ms.div_euclid(1000) + i64::from(until_ms.rem_euclid(1000) != 0);
            let until = chrono::DateTime::from_timestamp(until_s, 0).unwrap_or_default();
            (lock.mode, until)
        });
        ObjectSettings {
            storage_class: self.storage_class,
            encryption: self.encryption.clone(),
            tagging: (!self.tags.is_empty()).then(|| tagging(&self.tags)),
            lock,
            legal_hold: self.object_lock.as_ref().is_some_and(|l| l.legal_hold),
            replace_existing: false,
        }
    }
}

/// Tags as `x-amz-tagging` carries them: URL query form, every byte but the unreserved
/// ones percent-encoded (a `+` would be read as itself, not a space).
pub fn tagging(tags: &[(String, String)]) -> String {
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    tags.iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Checks one table of settings (`[destination]` or `streams[i]`), naming the field.
/// `scope`: the table's name in messages (`destination` or `streams[2]`); `sse`: the
/// encryption in effect there (the stream's, else the destination's).
pub fn validate(scope: &str, given: &Overrides<'_>, sse: Option<Sse>) -> Result<(), ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        field: format!("{scope}.{field}"),
        message,
    };
    if given.kms_key_id.is_some() && sse != Some(Sse::Kms) {
        return Err(invalid(
            "kms_key_id",
            "goes with sse = \"aws:kms\": set it, or remove kms_key_id".into(),
        ));
    }
    if let Some(key) = given.kms_key_id {
        if key.is_empty() || key.len() > 2048 || key.chars().any(|c| c.is_control() || c == ' ') {
            return Err(invalid(
                "kms_key_id",
                "must be a KMS key id, key ARN, alias (alias/NAME) or alias ARN".into(),
            ));
        }
    }
    if given.bucket_key == Some(true) && sse != Some(Sse::Kms) {
        return Err(invalid(
            "bucket_key",
            "S3 Bucket Keys apply to sse = \"aws:kms\" only: remove bucket_key or use aws:kms"
                .into(),
        ));
    }
    if let Some(tags) = given.tags {
        validate_tags(tags).map_err(|message| invalid("tags", message))?;
    }
    if let Some(lock) = given.object_lock {
        if lock.retain_for < Duration::from_secs(24 * 3600) || lock.retain_for > MAX_RETENTION {
            return Err(invalid(
                "object_lock.retain_for",
                format!(
                    "must be 1 day to 100 years, such as \"365d\" (got {})",
                    humantime::format_duration(lock.retain_for)
                ),
            ));
        }
    }
    Ok(())
}

/// S3's tag rules: at most 10, keys 1 to 128 characters and values up to 256, of letters,
/// digits, spaces and `+ - = . _ : / @`; `aws:` keys are reserved. `{stream}` is the only
/// placeholder.
fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "S3 keeps at most {MAX_TAGS} tags on an object (got {})",
            tags.len()
        ));
    }
    let allowed = |c: char| c.is_alphanumeric() || " +-=._:/@".contains(c);
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > MAX_TAG_KEY || !key.chars().all(allowed) {
            return Err(format!("tag key {key:?}: use 1 to {MAX_TAG_KEY} letters, digits, spaces or + - = . _ : / @"));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(format!(
                "tag key {key:?}: keys starting with aws: are AWS's"
            ));
        }
        let expanded = value.replace("{stream}", "x");
        if expanded.contains(['{', '}']) {
            return Err(format!(
                "tag {key} = {value:?}: {{stream}} is the only placeholder"
            ));
        }
        // A stream name is at most 256 characters: counted at its longest.
        let longest = value.replace("{stream}", &"x".repeat(256));
        if longest.chars().count() > MAX_TAG_VALUE && value.contains("{stream}")
            || value.chars().count() > MAX_TAG_VALUE
            || !expanded.chars().all(allowed)
        {
            return Err(format!(
                "tag {key} = {value:?}: use up to {MAX_TAG_VALUE} letters, digits, spaces or + - = . _ : / @ (a stream's name counts fully)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(retain_from: RetainFrom) -> ObjectLockConfig {
        ObjectLockConfig {
            mode: LockMode::Compliance,
            retain_for: Duration::from_secs(365 * 24 * 3600),
            retain_from,
            legal_hold: true,
        }
    }

    #[test]
    fn a_stream_overrides_each_setting_and_adds_tags() {
        let dest_tags = BTreeMap::from([
            ("team".to_string(), "security".to_string()),
            ("camera".to_string(), "{stream}".to_string()),
        ]);
        let stream_tags = BTreeMap::from([("team".to_string(), "lobby crew".to_string())]);
        let dest_lock = lock(RetainFrom::Recorded);
        let destination = Overrides {
            storage_class: Some(StorageClass::GlacierIr),
            sse: Some(Sse::Kms),
            kms_key_id: Some("alias/cams"),
            bucket_key: Some(true),
            tags: Some(&dest_tags),
            object_lock: Some(&dest_lock),
        };
        let stream = Overrides {
            storage_class: Some(StorageClass::DeepArchive),
            tags: Some(&stream_tags),
            ..Overrides::default()
        };
        let s = StreamSettings::resolve(&destination, &stream, "lobby-1");
        assert_eq!(s.storage_class, Some(StorageClass::DeepArchive));
        assert_eq!(
            s.encryption,
            Some(Encryption::Kms {
                key_id: Some("alias/cams".into()),
                bucket_key: true
            })
        );
        assert_eq!(
            tagging(&s.tags),
            "camera=lobby-1&team=lobby%20crew",
            "{:?}",
            s.tags
        );
        assert_eq!(s.object_lock, Some(dest_lock));
    }

    #[test]
    fn retention_is_counted_from_the_newest_fragment_or_the_upload_rounded_up() {
        let mut s = StreamSettings {
            object_lock: Some(lock(RetainFrom::Recorded)),
            ..StreamSettings::default()
        };
        let recorded = 1_767_225_600_250; // 2026-01-01T00:00:00.250Z
        let now = 1_780_000_000_000;
        let o = s.for_object(recorded, now);
        let (mode, until) = o.lock.expect("locked");
        assert_eq!(mode, LockMode::Compliance);
        assert_eq!(until.to_rfc3339(), "2027-01-01T00:00:01+00:00");
        assert!(o.legal_hold);
        // Footage older than its retention: locked a day from now, not refused by S3.
        let (_, until) = s
            .for_object(recorded - 400 * 86_400_000, now)
            .lock
            .expect("locked");
        assert_eq!(until.timestamp_millis(), now + 86_400_000);
        s.object_lock = Some(lock(RetainFrom::Uploaded));
        let (_, until) = s.for_object(recorded, now).lock.expect("locked");
        assert_eq!(until.timestamp_millis(), now + 365 * 24 * 3600 * 1000);
    }

    #[test]
    fn bad_settings_name_their_field() {
        let many: BTreeMap<String, String> =
            (0..11).map(|i| (format!("k{i}"), "v".into())).collect();
        let bad = [
            (
                Overrides {
                    sse: Some(Sse::Aes256),
                    kms_key_id: Some("k"),
                    ..Overrides::default()
                },
                "destination.kms_key_id",
            ),
            (
                Overrides {
                    sse: Some(Sse::Aes256),
                    bucket_key: Some(true),
                    ..Overrides::default()
                },
                "destination.bucket_key",
            ),
            (
                Overrides {
                    tags: Some(&many),
                    ..Overrides::default()
                },
                "destination.tags",
            ),
        ];
        for (given, field) in bad {
            let error = validate("destination", &given, given.sse)
                .expect_err(field)
                .to_string();
            assert!(error.contains(field), "{error}");
        }
        let placeholder = BTreeMap::from([("cam".to_string(), "{camera}".to_string())]);
        let reserved = BTreeMap::from([("aws:x".to_string(), "y".to_string())]);
        for tags in [&placeholder, &reserved] {
            let given = Overrides {
                tags: Some(tags),
                ..Overrides::default()
            };
            assert!(validate("streams[0]", &given, None).is_err(), "{tags:?}");
        }
        let short = ObjectLockConfig {
            retain_for: Duration::from_secs(60),
            ..lock(RetainFrom::Recorded)
        };
        let given = Overrides {
            object_lock: Some(&short),
            ..Overrides::default()
        };
        let error = validate("destination", &given, None)
            .expect_err("short")
            .to_string();
        assert!(error.contains("object_lock.retain_for"), "{error}");
    }
}

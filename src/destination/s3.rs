//! S3 (or any S3-compatible store) as the destination.
//!
//! A clip smaller than one part goes up with one PutObject; a larger one as a multipart
//! upload. Memory per clip: one part buffer, reused part after part; one upload in four
//! (a budget shared by the process) holds a second, to fill the next part while the last
//! is sent, where the others wait for their part with the GetClip socket holding the
//! stream. The bytes are copied once, from the GetClip body into the part. Every request carries the
//! part's CRC32C, computed while it fills, which S3 verifies; the payload is signed only
//! where the configuration asks (see `PayloadSigning`). A failed request is retried from
//! the part still in memory, so an S3 hiccup never costs a second GetClip (KVS bills
//! every byte it sends).

use super::{Crc32c, ObjectMeta};
use crate::error::{Error, Result, Retryability};
use crate::ledger::Archived;
use crate::retry::{with_retry, RetryPolicy};
use crate::storage::{Encryption, ObjectSettings};
use aws_sdk_s3 as s3;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
    ObjectLockLegalHoldStatus, ObjectLockMode, ServerSideEncryption,
};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

struct Inner {
    client: s3::Client,
    bucket: String,
    /// The endpoint the client sends to, named when it cannot be reached.
    endpoint: String,
    part_size: usize,
    sign_payload: bool,
    /// Writes carry `If-None-Match: *`: an object already at the key is never replaced.
    create_only: bool,
    policy: RetryPolicy,
    /// Second part buffers, shared by every upload of the process: an upload holding one
    /// fills its next part while the last one is sent; the others wait for their part to
    /// be sent first (the GetClip socket holds the stream meanwhile). Each part buffer is
    /// at least S3's 5 MiB minimum, so this is what bounds memory per clip in flight.
    overlap: Arc<Semaphore>,
}

/// An S3 bucket (or S3-compatible store) as [`super::Destination`]; cheap to share.
pub struct S3Destination {
    inner: Arc<Inner>,
}

/// One object on its way to S3: a multipart upload once it outgrows one part, else one
/// PutObject.
pub struct S3Upload {
    inner: Arc<Inner>,
    key: String,
    meta: ObjectMeta,
    content_type: &'static str,
    settings: ObjectSettings,
    /// CRC32C of the parts already sent; with `part_crc`, that of every byte written.
    sent_crc: Crc32c,
    part_crc: Crc32c,
    /// The part being filled; never grows past `part_size`.
    buffer: BytesMut,
    /// The other part buffer, back from its upload and ready to fill.
    spare: Option<BytesMut>,
    /// Held while this upload may own two part buffers.
    overlap: Option<OwnedSemaphorePermit>,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    in_flight: Option<JoinHandle<Result<(CompletedPart, Bytes)>>>,
    next_part: i32,
    total: u64,
}

/// The IAM action an S3 operation needs (AWS's service authorization reference).
fn s3_action(op: &str) -> &'static str {
    match op {
        "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload" | "PutObject" => {
            "s3:PutObject"
        }
        "AbortMultipartUpload" => "s3:AbortMultipartUpload",
        "ListParts" => "s3:ListMultipartUploadParts",
        "ListMultipartUploads" => "s3:ListBucketMultipartUploads",
        "ListObjectsV2" => "s3:ListBucket",
        "RestoreObject" => "s3:RestoreObject",
        "GetObjectLockConfiguration" => "s3:GetBucketObjectLockConfiguration",
        _ => "s3:GetObject",
    }
}

/// Applies an object's [`ObjectSettings`] to a PutObject or CreateMultipartUpload
/// request: the two builders share these setters, but no trait.
macro_rules! with_object_settings {
    ($request:expr, $settings:expr) => {{
        let settings: &ObjectSettings = $settings;
        let mut request = $request;
        if let Some(class) = settings.storage_class {
            request = request.storage_class(s3::types::StorageClass::from(class.as_str()));
        }
        match &settings.encryption {
            Some(Encryption::S3Managed) => {
                request = request.server_side_encryption(ServerSideEncryption::Aes256);
            }
            Some(Encryption::Kms { key_id, bucket_key }) => {
                request = request
                    .server_side_encryption(ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id.clone())
                    .bucket_key_enabled(*bucket_key);
            }
            None => {}
        }
        if let Some(tagging) = &settings.tagging {
            request = request.tagging(tagging);
        }
        if let Some((mode, until)) = settings.lock {
            request = request
                .object_lock_mode(ObjectLockMode::from(mode.as_str()))
                .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                    until.timestamp(),
                ));
        }
        if settings.legal_hold {
            request = request.object_lock_legal_hold_status(ObjectLockLegalHoldStatus::On);
        }
        request
    }};
}

/// The S3 answers that say something about the object or the upload rather than fail a
/// request: each becomes its own error.
fn answered_state(op: &'static str, target: &str, code: &str, status: u16) -> Option<Error> {
    // A read of an object in an archive class: nothing was read, nothing billed.
    if code == "InvalidObjectState" {
        return Some(Error::NeedsRestore(format!(
            "{op} {target}: the object is in an archive storage class (GLACIER or DEEP_ARCHIVE) and must be restored before it can be read: `kvs-archiver restore --stream STREAM --start T --end T` starts it, and `kvs-archiver find` says its class and the tiers"
        )));
    }
    // A conditional CompleteMultipartUpload raced another write of the key: AWS asks for
    // a new upload, not a retry of this one.
    if code == "NoSuchUpload"
        || (code == "ConditionalRequestConflict" && op == "CompleteMultipartUpload")
    {
        return Some(Error::UploadLost {
            op,
            target: target.to_string(),
        });
    }
    // Only a create-only write is conditional: an object is already at the key.
    (status == 412).then(|| Error::Occupied {
        target: target.to_string(),
        found: format!("{op} refused with {code} (HTTP 412)"),
    })
}

/// Whether repeating a request S3 answered with `code` and `status` can succeed.
fn service_retryability(code: &str, status: u16) -> Retryability {
    match code {
        "SlowDown" | "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            Retryability::Throttled
        }
        // Expired or refreshed credentials, a clock that drifted, a body damaged on the
        // way: the next attempt (new signature, new body) can succeed.
        "RequestTimeout"
        | "InternalError"
        | "ExpiredToken"
        | "TokenRefreshRequired"
        | "RequestTimeTooSkewed"
        | "BadDigest"
        | "IncompleteBody"
        | "XAmzContentSHA256Mismatch"
        // Two conditional writes of one key at once: one of them wins.
        | "ConditionalRequestConflict"
        | "OperationAborted" => Retryability::Transient,
        _ if status == 503 => Retryability::Throttled,
        _ if status >= 500 || status == 408 => Retryability::Transient,
        _ => Retryability::Permanent,
    }
}

/// Classifies an S3 SDK error: the one place S3 errors get their retryability.
fn s3_error<E>(
    inner: &Inner,
    op: &'static str,
    target: &str,
    err: SdkError<E, s3::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    tracing::debug!(op, target, error = ?err, "S3 request failed");
    // A refused certificate: what to fix, and whether waiting helps.
    if let Some(why) = crate::error::rejected_certificate(&err) {
        let (message, retry) =
            crate::error::certificate_advice(&format!("S3 at {}", inner.endpoint), &why);
        return Error::Destination {
            op,
            target: target.to_string(),
            message,
            retry,
        };
    }
    let (message, retry) = match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or(match status {
                404 => "NotFound",
                403 => "AccessDenied",
                _ => "Error",
            });
            let message = match ctx.err().message() {
                Some(m) => m.to_string(),
                // No parsed message: show the whole error chain and what the store sent.
                None => format!(
                    "{}; response body: {}",
                    crate::error::chain(ctx.err()),
                    ctx.raw()
                        .body()
                        .bytes()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                        .unwrap_or_default()
                ),
            };
            if let Some(error) = answered_state(op, target, code, status) {
                return error;
            }
            let retry = service_retryability(code, status);
            let denied = format!(
                " (the credentials may not call {} here: `kvs-archiver iam-policy` prints the policy this configuration needs)",
                s3_action(op)
            );
            let hint = match code {
                "NoSuchBucket" => {
                    " (the bucket does not exist: create it or fix destination.bucket)"
                }
                "AccessDenied" => denied.as_str(),
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" => " (check the AWS credentials)",
                _ => "",
            };
            (format!("{code} (HTTP {status}) {message}{hint}"), retry)
        }
        SdkError::ConstructionFailure(_) => (crate::error::chain(&err), Retryability::Permanent),
        _ => (
            format!(
                "cannot reach S3 at {}: {} (check aws.s3_endpoint_url and the network; retried)",
                inner.endpoint,
                crate::error::chain(&err)
            ),
            match err {
                SdkError::DispatchFailure(_) => Retryability::Unreachable,
                _ => Retryability::Transient,
            },
        ),
    };
    Error::Destination {
        op,
        target: target.to_string(),
        message,
        retry,
    }
}

/// How [`S3Destination`] writes: everything but the client.
pub struct S3Options {
    /// The bucket.
    pub bucket: String,
    /// The configured endpoint, if any (named in errors).
    pub endpoint_url: Option<String>,
    /// Bytes per part.
    pub part_size: usize,
    /// Whether request bodies are signed.
    pub sign_payload: bool,
    /// Whether writes are create-only (`If-None-Match: *`).
    pub create_only: bool,
    /// Retries of every request.
    pub policy: RetryPolicy,
    /// Uploads that may hold a second part buffer at once.
    pub overlapping_uploads: usize,
}

impl S3Destination {
    /// A destination writing through `client` as `options` say.
    pub fn new(client: s3::Client, options: S3Options) -> Self {
        let S3Options {
            bucket,
            endpoint_url,
            part_size,
            sign_payload,
            create_only,
            policy,
            overlapping_uploads,
        } = options;
        // Without an endpoint URL the SDK addresses the bucket as a virtual host.
        let endpoint = match endpoint_url {
            Some(url) => url.to_string(),
            None => format!(
                "https://{bucket}.s3.{}.amazonaws.com",
                client.config().region().map_or("us-east-1", |r| r.as_ref())
            ),
        };
        S3Destination {
            inner: Arc::new(Inner {
                client,
                bucket,
                endpoint,
                part_size,
                sign_payload,
                create_only,
                policy,
                overlap: Arc::new(Semaphore::new(overlapping_uploads)),
            }),
        }
    }

    /// `s3://BUCKET`, for logs and messages.
    pub fn describe(&self) -> String {
        format!("s3://{}", self.inner.bucket)
    }

    /// A GET URL for `key` that works without credentials for `valid`.
    pub async fn presigned_get(&self, key: &str, valid: std::time::Duration) -> Result<String> {
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(valid)
            .map_err(|e| Error::Usage(format!("presigned URL for {target}: {e}")))?;
        let request = self
            .inner
            .client
            .get_object()
            .bucket(&self.inner.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| s3_error(&self.inner, "GetObject (presign)", &target, e))?;
        Ok(request.uri().to_string())
    }

    /// A listing of one key under `prefix`, not HeadBucket: HeadBucket needs
    /// `s3:ListBucket` on the whole bucket, a prefix listing only under the prefix, so the
    /// IAM policy can keep the program out of the rest of the bucket.
    pub async fn check(&self, prefix: &str, first_contact: bool) -> Result<()> {
        let target = self.describe();
        let list = || async {
            self.inner
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(prefix)
                .max_keys(1)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_error(&self.inner, "ListObjectsV2", &target, e))
        };
        if first_contact {
            with_retry(&self.inner.policy.first_contact(), "ListObjectsV2", list).await
        } else {
            with_retry(&self.inner.policy, "ListObjectsV2", list).await
        }
    }

    /// Asks the bucket for what the settings need: Object Lock enabled, and each KMS key
    /// usable (a multipart upload encrypted with it is created under `prefix` and aborted
    /// at once: S3 asks KMS for a data key then). A refusal is a configuration error
    /// naming the field; an S3 that does not answer is retried as usual.
    pub async fn check_required(&self, prefix: &str, required: &super::Required) -> Result<()> {
        let bucket = &self.inner.bucket;
        if required.object_lock {
            let got = with_retry(&self.inner.policy, "GetObjectLockConfiguration", || async {
                match self
                    .inner
                    .client
                    .get_object_lock_configuration()
                    .bucket(bucket)
                    .send()
                    .await
                {
                    Ok(out) => Ok(Ok(out)),
                    // 501: a store without Object Lock.
                    Err(SdkError::ServiceError(ctx))
                        if matches!(ctx.raw().status().as_u16(), 400..=499 | 501) =>
                    {
                        let code = ctx.err().code().unwrap_or("Error").to_string();
                        Ok(Err(format!(
                            "{code} (HTTP {})",
                            ctx.raw().status().as_u16()
                        )))
                    }
                    Err(e) => Err(s3_error(
                        &self.inner,
                        "GetObjectLockConfiguration",
                        bucket,
                        e,
                    )),
                }
            })
            .await?;
            let enabled = got.as_ref().is_ok_and(|out| {
                out.object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled")
            });
            if !enabled {
                let why = got.err().unwrap_or_else(|| "not enabled".into());
                return Err(Error::Config(crate::error::ConfigError::Invalid {
                    field: "destination.object_lock".into(),
                    message: format!(
                        "the bucket {bucket} does not have Object Lock enabled ({why}): enable it (aws s3api put-object-lock-configuration --bucket {bucket} --object-lock-configuration ObjectLockEnabled=Enabled, with versioning on), or remove object_lock; an AccessDenied here needs s3:GetBucketObjectLockConfiguration (kvs-archiver iam-policy)"
                    ),
                }));
            }
        }
        for key in &required.kms_keys {
            self.check_kms_key(prefix, key).await?;
        }
        Ok(())
    }

    /// Creates and aborts a multipart upload encrypted with `key_id` (see
    /// [`S3Destination::check_required`]).
    async fn check_kms_key(&self, prefix: &str, kms: &crate::storage::KmsKey) -> Result<()> {
        let (field, key_id) = (&kms.field, kms.key_id.as_deref());
        let key = format!("{prefix}.kvs-archiver-kms-check");
        let created = with_retry(&self.inner.policy, "CreateMultipartUpload", || async {
            match self
                .inner
                .client
                .create_multipart_upload()
                .bucket(&self.inner.bucket)
                .key(&key)
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.map(str::to_string))
                .bucket_key_enabled(kms.bucket_key)
                .send()
                .await
            {
                Ok(out) => Ok(Ok(out)),
                Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() < 500 => {
                    let code = ctx.err().code().unwrap_or("Error").to_string();
                    let message = ctx.err().message().unwrap_or_default().to_string();
                    Ok(Err(format!(
                        "{code} (HTTP {}) {message}",
                        ctx.raw().status().as_u16()
                    )))
                }
                Err(e) => Err(s3_error(&self.inner, "CreateMultipartUpload", &key, e)),
            }
        })
        .await?;
        match created {
            Ok(out) => {
                if let Some(id) = out.upload_id() {
                    abort(&self.inner, &key, id).await?;
                }
                Ok(())
            }
            Err(why) => Err(Error::Config(crate::error::ConfigError::Invalid {
                field: field.to_string(),
                message: format!(
                    "S3 cannot encrypt with the KMS key {}: {why}: check the key id, that the key is enabled and in the bucket's region, and that these credentials may use it (kms:GenerateDataKey and kms:Decrypt; kvs-archiver iam-policy prints them)",
                    key_id.unwrap_or("aws/s3")
                ),
            })),
        }
    }

    /// Starts an upload to `key`; nothing reaches S3 before the first part is full or the
    /// upload finishes.
    pub fn begin(
        &self,
        key: &str,
        meta: ObjectMeta,
        content_type: &'static str,
        settings: ObjectSettings,
    ) -> S3Upload {
        S3Upload {
            inner: self.inner.clone(),
            key: key.to_string(),
            meta,
            content_type,
            settings,
            sent_crc: Crc32c::default(),
            part_crc: Crc32c::default(),
            buffer: BytesMut::with_capacity(self.inner.part_size),
            spare: None,
            overlap: None,
            upload_id: None,
            parts: Vec::new(),
            in_flight: None,
            next_part: 1,
            total: 0,
        }
    }

    /// Aborts the multipart upload `upload_id` of `key`; one already gone is no error.
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<()> {
        abort(&self.inner, key, upload_id).await
    }

    /// Multipart uploads open under `prefix`, all pages: key, upload id, start time.
    /// `None` when the store cannot list them (s3s-fs answers 501).
    async fn open_uploads(&self, prefix: &str) -> Option<Vec<OpenUpload>> {
        let mut found = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_marker: Option<String> = None;
        loop {
            let listed = self
                .inner
                .client
                .list_multipart_uploads()
                .bucket(&self.inner.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(upload_marker.clone())
                .send()
                .await
                .ok()?;
            found.extend(listed.uploads().iter().filter_map(|u| {
                Some(OpenUpload {
                    key: u.key()?.to_string(),
                    id: u.upload_id()?.to_string(),
                    initiated: u
                        .initiated()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                })
            }));
            key_marker = listed.next_key_marker().map(str::to_string);
            upload_marker = listed.next_upload_id_marker().map(str::to_string);
            if listed.is_truncated() != Some(true)
                || (key_marker.is_none() && upload_marker.is_none())
            {
                return Some(found);
            }
        }
    }

    /// Aborts uploads under `prefix` older than `min_age` that `live` does not list;
    /// returns how many.
    pub async fn sweep_orphans(
        &self,
        prefix: &str,
        live: &[String],
        min_age: std::time::Duration,
    ) -> usize {
        let oldest_allowed = std::time::SystemTime::now() - min_age;
        let Some(uploads) = self.open_uploads(prefix).await else {
            tracing::debug!("the store cannot list multipart uploads; relying on the ledger");
            return 0;
        };
        let mut aborted = 0;
        for upload in uploads {
            // Without a start time the upload's age is unknown: leave it.
            let old_enough = upload.initiated.is_some_and(|t| t < oldest_allowed);
            if live.contains(&upload.id) || !old_enough {
                continue;
            }
            if abort(&self.inner, &upload.key, &upload.id).await.is_ok() {
                tracing::info!(key = %upload.key, "aborted an orphaned multipart upload");
                aborted += 1;
            }
        }
        aborted
    }

    /// Aborts every open multipart upload of `key`; returns how many.
    pub async fn abort_uploads_of(&self, key: &str) -> Result<usize> {
        // A store that cannot list uploads: only the recorded id can be aborted.
        let uploads = self.open_uploads(key).await.unwrap_or_default();
        let mut aborted = 0;
        for upload in uploads.iter().filter(|u| u.key == key) {
            abort(&self.inner, key, &upload.id).await?;
            tracing::info!(key, "aborted an upload a stopped worker left unrecorded");
            aborted += 1;
        }
        Ok(aborted)
    }
}

/// One multipart upload a listing shows.
struct OpenUpload {
    key: String,
    id: String,
    initiated: Option<std::time::SystemTime>,
}

impl S3Destination {
    /// See [`super::Destination::inspect`].
    pub async fn inspect(&self, key: &str) -> Result<Option<super::StoredObject>> {
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let got = self
            .inner
            .client
            .get_object()
            .bucket(&self.inner.bucket)
            .key(key)
            .send()
            .await;
        let mut out = match got {
            Ok(out) => out,
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 404 => {
                return Ok(None)
            }
            Err(e) => return Err(s3_error(&self.inner, "GetObject", &target, e)),
        };
        let meta = out
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut crc = Crc32c::default();
        let mut size = 0u64;
        while let Some(bytes) = out.body.try_next().await.map_err(|e| Error::Destination {
            op: "GetObject",
            target: target.clone(),
            message: format!("body broke off: {e}"),
            retry: Retryability::Transient,
        })? {
            size += bytes.len() as u64;
            crc.update(&bytes);
        }
        Ok(Some(super::StoredObject {
            size,
            crc32c: crc.hex(),
            meta,
        }))
    }

    /// `len` bytes of the object at `key` from byte `start`, as the store sends them.
    pub async fn read_range(&self, key: &str, start: u64, len: u64) -> Result<super::RangeBody> {
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let last = start + len.max(1) - 1;
        let out = with_retry(&self.inner.policy, "GetObject", || async {
            self.inner
                .client
                .get_object()
                .bucket(&self.inner.bucket)
                .key(key)
                .range(format!("bytes={start}-{last}"))
                .send()
                .await
                .map_err(|e| s3_error(&self.inner, "GetObject", &target, e))
        })
        .await?;
        Ok(super::RangeBody::S3 {
            body: out.body,
            target,
        })
    }

    /// Size, metadata, whole-object checksum and storage class of the object at `key`
    /// (HeadObject), `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<super::ObjectHead>> {
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let got = with_retry(&self.inner.policy, "HeadObject", || async {
            match self
                .inner
                .client
                .head_object()
                .bucket(&self.inner.bucket)
                .key(key)
                .checksum_mode(ChecksumMode::Enabled)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out)),
                Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 404 => Ok(None),
                Err(e) => Err(s3_error(&self.inner, "HeadObject", &target, e)),
            }
        })
        .await?;
        Ok(got.map(|out| super::ObjectHead {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            meta: out
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            crc32c: whole_object_crc32c(out.checksum_crc32_c(), out.checksum_type()),
            storage_class: out.storage_class().map(|c| c.as_str().to_string()),
            restore: out.restore().map(str::to_string),
            archive_status: out.archive_status().map(|s| s.as_str().to_string()),
        }))
    }

    /// Whether the object at `key` holds exactly the bytes `archived` describes: called
    /// when a create-only write was refused (a retry of a write that landed, or a rerun
    /// after a crash before the ledger recorded it). The same bytes are `Ok`; others are
    /// [`Error::Occupied`]. The store's whole-object CRC32C decides where it keeps one;
    /// otherwise the object is read back.
    pub async fn is_same_object(&self, key: &str, archived: &Archived) -> Result<()> {
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let head = self.head(key).await?.ok_or_else(|| Error::Destination {
            op: "HeadObject",
            target: target.clone(),
            message: "the object that refused the write is gone again; writing it again".into(),
            retry: Retryability::Transient,
        })?;
        let crc32c = match head.crc32c {
            Some(crc) if head.size == archived.bytes => crc,
            _ if head.size != archived.bytes => {
                return Err(Error::Occupied {
                    target,
                    found: format!(
                        "{} bytes there, {} in this chunk's clip",
                        head.size, archived.bytes
                    ),
                })
            }
            _ => match self.inspect(key).await? {
                Some(stored) => stored.crc32c,
                None => {
                    return Err(Error::Destination {
                        op: "GetObject",
                        target,
                        message:
                            "the object that refused the write is gone again; writing it again"
                                .into(),
                        retry: Retryability::Transient,
                    })
                }
            },
        };
        if crc32c == archived.crc32c {
            tracing::info!(
                key,
                "the object is already there, byte for byte: recorded as archived"
            );
            return Ok(());
        }
        Err(Error::Occupied {
            target,
            found: format!(
                "CRC32C {crc32c} there, {} in this chunk's clip",
                archived.crc32c
            ),
        })
    }

    /// See [`super::Destination::restore`]: sent only for an object that needs one.
    /// Intelligent-Tiering's archive tiers take no `days` (the object moves back to a
    /// readable tier).
    pub async fn restore(&self, key: &str, days: i32, tier: super::RestoreTier) -> Result<bool> {
        use aws_sdk_s3::types::{GlacierJobParameters, RestoreRequest, Tier};
        let target = format!("s3://{}/{key}", self.inner.bucket);
        let Some(head) = self.head(key).await? else {
            return Err(Error::Destination {
                op: "HeadObject",
                target,
                message: "the object is missing (`kvs-archiver verify` reports it)".into(),
                retry: Retryability::Permanent,
            });
        };
        if !matches!(head.readiness(), super::Readiness::NeedsRestore { .. }) {
            return Ok(false);
        }
        let tiering = head.storage_class.as_deref() == Some("INTELLIGENT_TIERING");
        let parameters = GlacierJobParameters::builder()
            .tier(Tier::from(tier.as_str()))
            .build()
            .map_err(|e| Error::Usage(format!("RestoreObject {target}: {e}")))?;
        let request = RestoreRequest::builder()
            .set_days((!tiering).then_some(days))
            .glacier_job_parameters(parameters)
            .build();
        with_retry(&self.inner.policy, "RestoreObject", || async {
            match self
                .inner
                .client
                .restore_object()
                .bucket(&self.inner.bucket)
                .key(key)
                .restore_request(request.clone())
                .send()
                .await
            {
                Ok(_) => Ok(true),
                // RestoreAlreadyInProgress: another restore started meanwhile.
                Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 409 => Ok(false),
                Err(e) => Err(s3_error(&self.inner, "RestoreObject", &target, e)),
            }
        })
        .await
    }

    /// See [`super::Destination::list_keys`].
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let target = self.describe();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .inner
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| s3_error(&self.inner, "ListObjectsV2", &target, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }
}

/// The whole object's CRC32C as hex, from what HeadObject reports: `None` for a composite
/// checksum (a checksum of the parts' checksums, `…-N`), which no byte count can match.
fn whole_object_crc32c(base64: Option<&str>, kind: Option<&ChecksumType>) -> Option<String> {
    if kind.is_some_and(|k| *k != ChecksumType::FullObject) {
        return None;
    }
    Crc32c::from_base64(base64?).map(Crc32c::hex)
}

/// How many times [`abort`] aborts an upload whose parts are still listed.
const ABORTS: u32 = 4;

/// How long an abort waits for the part in flight to land or fail first.
const PART_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Aborts the upload `upload_id` of `key`, then asks S3 (ListParts) whether it is gone:
/// AWS warns that a part still on its way may outlive an abort ("it might be necessary to
/// abort a given multipart upload multiple times"), so while parts are listed it is
/// aborted again, a few times at most.
///
/// Parts still listed after every abort was accepted or answered NoSuchUpload (a killed
/// process's part that landed after another process aborted its upload) cost storage but
/// hold no footage the archive needs: they are reported, and the chunk goes on; failing
/// would stop every later run at the same chunk. An abort S3 refuses (AccessDenied) is an
/// error, which says what to fix.
async fn abort(inner: &Inner, key: &str, upload_id: &str) -> Result<()> {
    abort_once(inner, key, upload_id).await?;
    let mut listed_parts = 0;
    for check in 1..=ABORTS {
        let listed = inner
            .client
            .list_parts()
            .bucket(&inner.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        match listed {
            Ok(out) if !out.parts().is_empty() => {
                listed_parts = out.parts().len();
                if check == ABORTS {
                    break;
                }
                tracing::warn!(
                    key,
                    parts = listed_parts,
                    "parts of the aborted upload are still listed: aborting it again"
                );
                tokio::time::sleep(PART_SETTLE / 30).await;
                abort_once(inner, key, upload_id).await?;
            }
            Ok(_) => return Ok(()),
            // NoSuchUpload: nothing is left. Any other answer (a store without ListParts,
            // one that refuses it): the abort itself succeeded; the orphan sweep is the
            // last resort.
            Err(error) => {
                tracing::debug!(key, error = ?error, "ListParts did not list the aborted upload");
                return Ok(());
            }
        }
    }
    tracing::warn!(
        key,
        upload_id,
        parts = listed_parts,
        aborts = ABORTS,
        "the aborted upload still lists parts after every abort: they are billed as storage \
         until removed, which a bucket lifecycle rule AbortIncompleteMultipartUpload does"
    );
    Ok(())
}

async fn abort_once(inner: &Inner, key: &str, upload_id: &str) -> Result<()> {
    let target = format!("s3://{}/{key}", inner.bucket);
    let result = with_retry(&inner.policy, "AbortMultipartUpload", || async {
        inner
            .client
            .abort_multipart_upload()
            .bucket(&inner.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_error(inner, "AbortMultipartUpload", &target, e))
    })
    .await;
    match result {
        // NoSuchUpload: already completed or aborted, nothing is left behind either way.
        // Any other refusal (AccessDenied) stands: these credentials cannot clean up.
        Err(Error::UploadLost { .. }) => Ok(()),
        other => other,
    }
}

/// Uploads one part; gives the part's buffer back with the result, for the next part.
async fn upload_part(
    inner: Arc<Inner>,
    key: String,
    upload_id: String,
    number: i32,
    body: Bytes,
    crc: Crc32c,
) -> Result<(CompletedPart, Bytes)> {
    let target = format!("s3://{}/{key} part {number}", inner.bucket);
    let checksum = crc.base64();
    let part = with_retry(&inner.policy, "UploadPart", || async {
        let request = inner
            .client
            .upload_part()
            .bucket(&inner.bucket)
            .key(&key)
            .upload_id(&upload_id)
            .part_number(number)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .checksum_crc32_c(&checksum)
            .body(ByteStream::from(body.clone()));
        let sent = if inner.sign_payload {
            request.send().await
        } else {
            request.customize().disable_payload_signing().send().await
        };
        let out = sent.map_err(|e| s3_error(&inner, "UploadPart", &target, e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .checksum_crc32_c(out.checksum_crc32_c().unwrap_or(&checksum))
            .build())
    })
    .await?;
    Ok((part, body))
}

impl S3Upload {
    fn destination(&self) -> S3Destination {
        S3Destination {
            inner: self.inner.clone(),
        }
    }

    fn target(&self) -> String {
        format!("s3://{}/{}", self.inner.bucket, self.key)
    }

    /// See [`super::Upload::upload_id`].
    pub fn upload_id(&self) -> Option<&str> {
        self.upload_id.as_deref()
    }

    /// Adds bytes to the object, sending a part whenever one is full.
    pub async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.total += bytes.len() as u64;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let room = self.inner.part_size - self.buffer.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buffer.extend_from_slice(now);
            self.part_crc.update(now);
            rest = later;
            if self.buffer.len() == self.inner.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// CRC32C of every byte written so far.
    fn object_crc(&self) -> Crc32c {
        self.sent_crc.followed_by(self.part_crc, self.buffer.len())
    }

    async fn wait_in_flight(&mut self) -> Result<()> {
        if let Some(task) = self.in_flight.take() {
            let (part, body) = task.await.map_err(|e| Error::Destination {
                op: "UploadPart",
                target: self.target(),
                message: format!("upload task failed: {e}"),
                retry: Retryability::Transient,
            })??;
            self.parts.push(part);
            // The SDK has dropped its references: the buffer is ours again.
            self.spare = body.try_into_mut().ok().map(|mut buffer| {
                buffer.clear();
                buffer
            });
        }
        Ok(())
    }

    /// Sends the buffer as the next part, and either starts filling the spare one while
    /// it goes (with an overlap permit) or waits for it and fills the same buffer again.
    async fn send_part(&mut self) -> Result<()> {
        if self.upload_id.is_none() {
            let target = self.target();
            let inner = self.inner.clone();
            let meta = self.meta.clone();
            let settings = self.settings.clone();
            let key = self.key.clone();
            let content_type = self.content_type;
            let out = with_retry(&inner.policy, "CreateMultipartUpload", || async {
                // A full-object CRC32C, not one of the parts' checksums: S3 then keeps the
                // CRC32C of the whole object, the one the ledger records, and `verify`
                // compares them with a HEAD.
                let mut request = with_object_settings!(
                    inner
                        .client
                        .create_multipart_upload()
                        .bucket(&inner.bucket)
                        .key(&key)
                        .content_type(content_type)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                        .checksum_type(ChecksumType::FullObject),
                    &settings
                );
                for (k, v) in &meta.pairs {
                    request = request.metadata(*k, v);
                }
                request
                    .send()
                    .await
                    .map_err(|e| s3_error(&self.inner, "CreateMultipartUpload", &target, e))
            })
            .await?;
            self.upload_id = Some(out.upload_id().unwrap_or_default().to_string());
        }
        // At most one part in flight per upload.
        self.wait_in_flight().await?;
        let number = self.next_part;
        self.next_part += 1;
        let upload_id = self.upload_id.clone().unwrap_or_default();
        if self.overlap.is_none() {
            self.overlap = self.inner.overlap.clone().try_acquire_owned().ok();
        }
        let next = match (&self.overlap, self.spare.take()) {
            (Some(_), Some(spare)) => spare,
            (Some(_), None) => BytesMut::with_capacity(self.inner.part_size),
            // Filled again once sent, below.
            (None, _) => BytesMut::new(),
        };
        let part = std::mem::replace(&mut self.buffer, next).freeze();
        let crc = std::mem::take(&mut self.part_crc);
        self.sent_crc = self.sent_crc.followed_by(crc, part.len());
        self.in_flight = Some(tokio::spawn(upload_part(
            self.inner.clone(),
            self.key.clone(),
            upload_id,
            number,
            part,
            crc,
        )));
        if self.overlap.is_none() {
            self.wait_in_flight().await?;
            self.buffer = self
                .spare
                .take()
                .unwrap_or_else(|| BytesMut::with_capacity(self.inner.part_size));
        }
        Ok(())
    }

    /// An object that never filled a part: one PutObject.
    async fn put_whole(mut self, archived: Archived, crc: Crc32c) -> Result<Archived> {
        let target = self.target();
        let body = std::mem::take(&mut self.buffer).freeze();
        let checksum = crc.base64();
        let inner = self.inner.clone();
        let put = with_retry(&inner.policy, "PutObject", || async {
            let mut request = with_object_settings!(
                inner
                    .client
                    .put_object()
                    .bucket(&inner.bucket)
                    .key(&self.key)
                    .content_type(self.content_type)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                    .checksum_crc32_c(&checksum)
                    .body(ByteStream::from(body.clone())),
                &self.settings
            );
            if inner.create_only && !self.settings.replace_existing {
                request = request.if_none_match("*");
            }
            for (k, v) in &self.meta.pairs {
                request = request.metadata(*k, v);
            }
            let sent = if inner.sign_payload {
                request.send().await
            } else {
                request.customize().disable_payload_signing().send().await
            };
            sent.map(|_| ())
                .map_err(|e| s3_error(&self.inner, "PutObject", &target, e))
        })
        .await;
        match put {
            Ok(()) => Ok(archived),
            // Refused: a retry of a write that landed, or another object.
            Err(Error::Occupied { .. }) => {
                self.destination()
                    .is_same_object(&self.key, &archived)
                    .await?;
                Ok(archived)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends what is left and completes the object (one PutObject if it never filled a
    /// part).
    pub async fn finish(mut self) -> Result<Archived> {
        let crc = self.object_crc();
        let archived = Archived {
            bytes: self.total,
            crc32c: crc.hex(),
        };
        let target = self.target();
        let Some(upload_id) = self.upload_id.clone() else {
            return self.put_whole(archived, crc).await;
        };
        if !self.buffer.is_empty() {
            if let Err(e) = self.send_part().await {
                self.abort().await;
                return Err(e);
            }
        }
        if let Err(e) = self.wait_in_flight().await {
            self.abort().await;
            return Err(e);
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let inner = self.inner.clone();
        let checksum = crc.base64();
        let result = with_retry(&inner.policy, "CompleteMultipartUpload", || async {
            let mut request = inner
                .client
                .complete_multipart_upload()
                .bucket(&inner.bucket)
                .key(&self.key)
                .upload_id(&upload_id)
                .checksum_crc32_c(&checksum)
                .checksum_type(ChecksumType::FullObject)
                .multipart_upload(completed.clone());
            if inner.create_only && !self.settings.replace_existing {
                request = request.if_none_match("*");
            }
            request
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_error(&self.inner, "CompleteMultipartUpload", &target, e))
        })
        .await;
        match result {
            Ok(()) => Ok(archived),
            // Refused, the upload is still open: it goes either way.
            Err(Error::Occupied { .. }) => {
                let same = self
                    .destination()
                    .is_same_object(&self.key, &archived)
                    .await;
                self.abort().await;
                same.map(|()| archived)
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Aborts the upload, if one was created, once the part in flight has landed or
    /// failed: a part already on the wire that reached S3 after the abort would outlive
    /// it and stay billed (AWS: "it might be necessary to abort a given multipart upload
    /// multiple times"). A part that does not settle within [`PART_SETTLE`] is cancelled,
    /// and the upload is aborted again once it could have landed.
    pub async fn abort(mut self) {
        let mut unsettled = false;
        if let Some(mut task) = self.in_flight.take() {
            if tokio::time::timeout(PART_SETTLE, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                unsettled = true;
            }
        }
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        if let Err(error) = abort(&self.inner, &self.key, &upload_id).await {
            tracing::warn!(%error, "could not abort a multipart upload; the next start retries");
            return;
        }
        if unsettled {
            tokio::time::sleep(PART_SETTLE / 10).await;
            if let Err(error) = abort(&self.inner, &self.key, &upload_id).await {
                tracing::warn!(%error, "could not abort a multipart upload again; the next start retries");
            }
        }
    }
}

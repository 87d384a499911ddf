//! The KVS adapter: DescribeStream and GetDataEndpoint (control plane), ListFragments and
//! GetClip (archived media, on the data endpoint GetDataEndpoint names per API).
//!
//! Data endpoints are cached per stream and API and dropped after a failure, as the KVS
//! quota page advises. SDK errors become [`Error::Kvs`] with their retryability decided
//! here, once: KVS throttling (`ClientLimitExceededException`, HTTP 400) is not retried
//! by the SDK, so it is classified as [`Retryability::Throttled`] for our own backoff.

use crate::config::StreamConfig;
use crate::domain::{
    is_fragment_number, rfc3339, EpochMs, Fragment, TimestampSource, MAX_FRAGMENT_BYTES,
    MAX_FRAGMENT_MS, MAX_FRAGMENT_NUMBER_LEN,
};
use crate::error::{Error, Result, Retryability};
use crate::quota::TokenBucket;
use crate::retry::{with_retry, RetryPolicy};
use aws_sdk_kinesisvideo as kv;
use aws_sdk_kinesisvideoarchivedmedia as am;
use aws_sdk_kinesisvideoarchivedmedia::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesisvideoarchivedmedia::primitives::{ByteStream, DateTime};
use aws_sdk_kinesisvideoarchivedmedia::types::{
    ClipFragmentSelector, ClipFragmentSelectorType, ClipTimestampRange, FragmentSelector,
    FragmentSelectorType, TimestampRange,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// ListFragments page size: the model's maximum, so the fewest calls per window.
const LIST_PAGE: i64 = 1000;
/// The longest NextToken the API model admits.
const MAX_NEXT_TOKEN: usize = 4096;

/// What DescribeStream says of a stream.
#[derive(Debug, Clone)]
pub struct StreamDescription {
    /// The stream's name.
    pub name: String,
    /// The stream's ARN.
    pub arn: String,
    /// How long KVS keeps the stream's media: what an unarchived fragment races against.
    pub retention_hours: u32,
    /// The stream's media type (`video/h264`, ...).
    pub media_type: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Api {
    ListFragments,
    GetClip,
    GetMediaForFragmentList,
}

/// Per-second point rates the source keeps each stream under.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// GetClip's fragment-media points (KVS: 500 per second per stream).
    pub media_points_per_second: f64,
    /// ListFragments' and GetClip's fragment-metadata points (KVS: 10,000 per second per
    /// stream).
    pub metadata_points_per_second: f64,
    /// DescribeStream and GetDataEndpoint calls per second, per stream and per account.
    pub control_calls_per_second_per_stream: f64,
    /// The account-wide half, shared by every stream.
    pub control_calls_per_second: f64,
}

struct StreamBuckets {
    media: TokenBucket,
    metadata: TokenBucket,
    control: TokenBucket,
}

/// The KVS adapter: the only code that calls KVS, paced per stream and retried by `policy`.
pub struct KvsSource {
    control: kv::Client,
    media_config: am::Config,
    /// Data endpoints by stream and API: the client and its URL (for errors).
    endpoints: Mutex<HashMap<(String, Api), (am::Client, String)>>,
    /// One client per distinct data endpoint URL, shared by the streams and APIs it
    /// serves: many streams share a host, and an SDK client (its configuration and
    /// runtime plugins) costs tens of KiB, which per stream and API grew the daemon's
    /// memory with every configured camera.
    clients: Mutex<HashMap<String, am::Client>>,
    /// The control plane's URL, for errors.
    control_url: String,
    buckets: Mutex<HashMap<String, Arc<StreamBuckets>>>,
    account_control: TokenBucket,
    pacing: Pacing,
    policy: RetryPolicy,
    /// Each stream's retention as DescribeStream last said, in ms, and when it said it.
    retention: Mutex<HashMap<String, (i64, std::time::Instant)>>,
}

/// Epoch seconds arrive as JSON numbers: 0.567 s parses as 0.56699…, so round to the
/// nearest millisecond instead of truncating.
/// `None` past what milliseconds since the epoch can hold (an answer no KVS gives).
fn to_ms(t: &DateTime) -> Option<EpochMs> {
    t.secs()
        .checked_mul(1000)?
        .checked_add((i64::from(t.subsec_nanos()) + 500_000) / 1_000_000)
}

/// A listed timestamp may differ from the asked range by the answer's rounding: epoch
/// seconds with three decimals, read back as the nearest millisecond.
const LISTING_SLACK_MS: EpochMs = 1;
/// No KVS timestamp lies past this (the year 3000): later ones would overflow the
/// arithmetic of ranges and keys built from them.
const LATEST_TIMESTAMP_MS: EpochMs = 32_503_680_000_000;

/// The data endpoint GetDataEndpoint named, if it is one the signed requests may go to:
/// an absolute `https://` URL with a host and nothing else (no user-info, path, query,
/// spaces or control characters), or `http://` only when the control plane itself was
/// configured as plain http (a local endpoint). Credentials sign every request sent there.
fn checked_data_endpoint(endpoint: &str, control_url: &str) -> std::result::Result<String, String> {
    const MAX_URL: usize = 2048;
    let quoted = || format!("{:?}", endpoint.chars().take(80).collect::<String>());
    let plain_http_allowed = control_url.starts_with("http://");
    let rest = match endpoint.split_once("://") {
        Some(("https", rest)) => rest,
        Some(("http", rest)) if plain_http_allowed => rest,
        _ => {
            return Err(format!(
                "{} (not an https:// URL{})",
                quoted(),
                if plain_http_allowed {
                    " or http:// URL"
                } else {
                    ""
                }
            ))
        }
    };
    let host = rest.strip_suffix('/').unwrap_or(rest);
    let valid = endpoint.len() <= MAX_URL
        && !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if valid {
        Ok(endpoint.to_string())
    } else {
        Err(format!("{} (not a scheme and a host alone)", quoted()))
    }
}

/// One ListFragments entry, checked: the number is what the API model says (it becomes
/// part of object keys and file names), the timestamps are times (between 1970 and the
/// year 3000), and the duration and size are within [`MAX_FRAGMENT_MS`] and
/// [`MAX_FRAGMENT_BYTES`]. `Err` says what is wrong, quoting at most a few dozen
/// characters of the value; an entry outside the asked range is skipped.
fn checked_fragment(
    f: &am::types::Fragment,
    source: TimestampSource,
    start: EpochMs,
    end: EpochMs,
) -> std::result::Result<Listed, String> {
    let quoted = |text: &str| format!("{:?}", text.chars().take(48).collect::<String>());
    let Some(number) = f.fragment_number() else {
        return Ok(Listed::Skipped(
            "a fragment without a FragmentNumber".into(),
        ));
    };
    if !is_fragment_number(number) {
        return Err(format!(
            "lists the fragment number {} ({} characters), which is not 1-{MAX_FRAGMENT_NUMBER_LEN} digits as the API defines FragmentNumber",
            quoted(number),
            number.len()
        ));
    }
    let Some(selected) = (match source {
        TimestampSource::Server => f.server_timestamp(),
        TimestampSource::Producer => f.producer_timestamp(),
    }) else {
        return Ok(Listed::Skipped(format!(
            "fragment {number} without its {source} timestamp"
        )));
    };
    let in_time = |t: &DateTime| to_ms(t).filter(|ms| (0..=LATEST_TIMESTAMP_MS).contains(ms));
    let start_ms = in_time(selected)
        .ok_or_else(|| format!("lists fragment {number} at {selected:?}, not a time KVS gives"))?;
    // Outside the asked range it is another listing's fragment (or a rounding this code
    // did not foresee): left to the window that holds it, never planned here.
    if start_ms < start - LISTING_SLACK_MS || start_ms > end + LISTING_SLACK_MS {
        return Ok(Listed::Skipped(format!(
            "fragment {number} at {}, outside the asked range {} .. {}",
            rfc3339(start_ms),
            rfc3339(start),
            rfc3339(end)
        )));
    }
    let server_ms = match f.server_timestamp() {
        Some(t) => in_time(t).ok_or_else(|| {
            format!("lists fragment {number} with the server timestamp {t:?}, not a time KVS gives")
        })?,
        None => start_ms,
    };
    let duration_ms = u64::try_from(f.fragment_length_in_milliseconds())
        .ok()
        .filter(|d| *d <= MAX_FRAGMENT_MS)
        .ok_or_else(|| {
            format!(
                "lists fragment {number} lasting {} ms (KVS allows at most 20 s)",
                f.fragment_length_in_milliseconds()
            )
        })?;
    let size_bytes = u64::try_from(f.fragment_size_in_bytes())
        .ok()
        .filter(|s| *s <= MAX_FRAGMENT_BYTES)
        .ok_or_else(|| {
            format!(
                "lists fragment {number} of {} bytes (KVS allows at most 50 MB)",
                f.fragment_size_in_bytes()
            )
        })?;
    Ok(Listed::Fragment(Fragment {
        number: number.to_string(),
        start_ms,
        server_ms,
        duration_ms,
        size_bytes,
    }))
}

/// One ListFragments entry as [`checked_fragment`] takes it.
#[derive(Debug, PartialEq)]
enum Listed {
    Fragment(Fragment),
    /// Not a fragment of this listing (outside its range, or without the fields that
    /// place it), with why: left out, and logged.
    Skipped(String),
}

/// Classifies an SDK error: the one place KVS errors get their retryability.
/// Whether a failed data-plane request should ask GetDataEndpoint again before the next
/// attempt: a data endpoint that does not answer, or answers 5xx, may have moved (the
/// cached one would otherwise be tried until the process restarts).
fn endpoint_may_have_moved(error: &Error) -> bool {
    matches!(
        error.retryability(),
        Retryability::Transient | Retryability::Unreachable
    )
}

/// Whether a KVS service error with `code` and HTTP `status` is worth another attempt.
fn service_retryability(code: Option<&str>, status: u16) -> Retryability {
    match code {
        Some("ClientLimitExceededException" | "ThrottlingException") => Retryability::Throttled,
        // Credentials that expired mid-pass are refreshed by the provider; a clock
        // that drifted is corrected by the SDK's skew detection on the next attempt.
        Some(
            "ExpiredTokenException"
            | "ExpiredToken"
            | "RequestExpired"
            | "RequestTimeTooSkewed"
            | "InvalidSignatureException",
        ) => Retryability::Transient,
        _ if status >= 500 || status == 408 => Retryability::Transient,
        // A 2xx the SDK could not read as the operation's output (a body cut off
        // or garbled on the way): not a refusal, so worth another attempt.
        _ if status < 300 => Retryability::Transient,
        _ => Retryability::Permanent,
    }
}

/// What the operator can do about a service error `code` from `op`, as the end of its
/// message ("" when nothing to add).
fn service_hint(code: Option<&str>, op: &str) -> &'static str {
    match code {
        Some(
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "MissingAuthenticationTokenException",
        ) => " (the AWS credentials are not valid for this account or region: check them and aws.region)",
        Some("ResourceNotFoundException") if op != "GetClip" => {
            " (check the stream name or ARN in the configuration)"
        }
        Some("NoDataRetentionException") => {
            " (the stream keeps no media: set its data retention above 0)"
        }
        _ => "",
    }
}

fn kvs_error<E>(
    op: &'static str,
    stream: &str,
    endpoint: &str,
    err: SdkError<E, am::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // The whole error (request id, raw response) for whoever reads the debug log.
    tracing::debug!(op, stream, error = ?err, "KVS request failed");
    // A refused certificate: what to fix, and whether waiting helps.
    if let Some(why) = crate::error::rejected_certificate(&err) {
        let (message, retry) = crate::error::certificate_advice(endpoint, &why);
        return Error::Kvs {
            op,
            stream: stream.to_string(),
            code: None,
            status: None,
            message,
            retry,
        };
    }
    let (code, status, message, retry) = match &err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().map(str::to_string);
            let status = ctx.raw().status().as_u16();
            let message = ctx.err().message().unwrap_or("no message").to_string();
            let retry = service_retryability(code.as_deref(), status);
            if matches!(
                code.as_deref(),
                Some("NotAuthorizedException" | "AccessDeniedException")
            ) {
                let message = format!(
                    "access denied: the credentials may not call kinesisvideo:{op} on this stream; `kvs-archiver iam-policy` prints the policy this configuration needs"
                );
                let (stream, status) = (stream.to_string(), Some(status));
                return Error::Kvs {
                    op,
                    stream,
                    code,
                    status,
                    message,
                    retry,
                };
            }
            let hint = service_hint(code.as_deref(), op);
            let what = match code.as_deref() {
                Some(code) => code.to_string(),
                None => format!("HTTP {status}, unreadable answer"),
            };
            (
                code.clone(),
                Some(status),
                format!("{what}: {message}{hint}"),
                retry,
            )
        }
        SdkError::ConstructionFailure(_) => (
            None,
            None,
            crate::error::chain(&err),
            Retryability::Permanent,
        ),
        SdkError::ResponseError(ctx) => (
            None,
            Some(ctx.raw().status().as_u16()),
            format!(
                "KVS answered HTTP {} with a body that is not the API's JSON: {}",
                ctx.raw().status().as_u16(),
                crate::error::chain(&err)
            ),
            Retryability::Transient,
        ),
        // No answer: refused, unresolvable, or not sent; or no answer in time.
        _ => (
            None,
            None,
            format!(
                "cannot reach {endpoint}: {} (check the endpoint and the network; retried)",
                crate::error::chain(&err)
            ),
            match err {
                SdkError::DispatchFailure(_) => Retryability::Unreachable,
                _ => Retryability::Transient,
            },
        ),
    };
    Error::Kvs {
        op,
        stream: stream.to_string(),
        code,
        status,
        message,
        retry,
    }
}

impl KvsSource {
    /// A source using `shared`'s region and credentials, the control plane at
    /// `control_endpoint` (default: AWS's).
    pub fn new(
        shared: &aws_config::SdkConfig,
        control_endpoint: Option<&str>,
        pacing: Pacing,
        policy: RetryPolicy,
    ) -> Self {
        let mut control = kv::config::Builder::from(shared);
        if let Some(url) = control_endpoint {
            control = control.endpoint_url(url);
        }
        let region = shared
            .region()
            .map_or("us-east-1".to_string(), |r| r.to_string());
        let control_url = control_endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://kinesisvideo.{region}.amazonaws.com"));
        KvsSource {
            control: kv::Client::from_conf(control.build()),
            media_config: am::config::Builder::from(shared).build(),
            endpoints: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            control_url,
            buckets: Mutex::new(HashMap::new()),
            account_control: TokenBucket::new(pacing.control_calls_per_second),
            pacing,
            policy,
            retention: Mutex::new(HashMap::new()),
        }
    }

    /// The stream's retention in ms, as DescribeStream last said (asked now if never).
    pub async fn retention_ms(&self, stream: &StreamConfig) -> Result<i64> {
        let known = self
            .retention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&stream.label())
            .map(|(ms, _)| *ms);
        match known {
            Some(ms) => Ok(ms),
            None => Ok(i64::from(self.describe(stream).await?.retention_hours) * 3_600_000),
        }
    }

    /// The stream's retention in hours, as DescribeStream said less than `max_age` ago
    /// (asked again when older). A daemon pass needs it every firing, but it changes only
    /// when an operator changes it, and DescribeStream shares the account's control-plane
    /// quota with every other camera: a fleet that described each stream every pass
    /// would spend that quota on answers it already has.
    pub async fn retention_hours_within(
        &self,
        stream: &StreamConfig,
        max_age: std::time::Duration,
    ) -> Result<u32> {
        let known = self
            .retention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&stream.label())
            .copied();
        let hours = |ms: i64| u32::try_from(ms / 3_600_000).unwrap_or(u32::MAX);
        match known {
            Some((ms, asked)) if asked.elapsed() < max_age => Ok(hours(ms)),
            _ => match self.describe(stream).await {
                Ok(described) => Ok(described.retention_hours),
                // Asked again and not answered: what it said last is still the best
                // guess, and the pass's other calls will say if the stream is gone.
                Err(e) if e.retryability() != Retryability::Permanent && known.is_some() => {
                    tracing::warn!(stream = %stream.label(), error = %e, "DescribeStream failed; using the retention it gave before");
                    Ok(known.map_or(0, |(ms, _)| hours(ms)))
                }
                Err(e) => Err(e),
            },
        }
    }

    fn buckets(&self, stream: &StreamConfig) -> Arc<StreamBuckets> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .entry(stream.label())
            .or_insert_with(|| {
                Arc::new(StreamBuckets {
                    // Fragment points are the stream's, whoever spends them. Control
                    // calls start full: a command's first call should not wait, and
                    // their burst is a few calls.
                    media: TokenBucket::starting_empty(self.pacing.media_points_per_second),
                    metadata: TokenBucket::starting_empty(self.pacing.metadata_points_per_second),
                    control: TokenBucket::new(self.pacing.control_calls_per_second_per_stream),
                })
            })
            .clone()
    }

    async fn pace_control_call(&self, stream: &StreamConfig) {
        self.buckets(stream).control.acquire(1.0).await;
        self.account_control.acquire(1.0).await;
    }

    fn lock_endpoints(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, Api), (am::Client, String)>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What DescribeStream says of `stream`; retried by the source's policy.
    pub async fn describe(&self, stream: &StreamConfig) -> Result<StreamDescription> {
        self.describe_with(stream, &self.policy).await
    }

    /// [`Self::describe`] as a command's first request: an endpoint that does not answer
    /// is reported after one retry, not the whole backoff.
    pub async fn describe_first(&self, stream: &StreamConfig) -> Result<StreamDescription> {
        self.describe_with(stream, &self.policy.first_contact())
            .await
    }

    async fn describe_with(
        &self,
        stream: &StreamConfig,
        policy: &impl crate::retry::Backoff,
    ) -> Result<StreamDescription> {
        let label = stream.label();
        let described = with_retry(policy, "DescribeStream", || async {
            self.pace_control_call(stream).await;
            let out = self
                .control
                .describe_stream()
                .set_stream_name(stream.name.clone())
                .set_stream_arn(stream.arn.clone())
                .send()
                .await
                .map_err(|e| kvs_error("DescribeStream", &label, &self.control_url, e))?;
            let info = out.stream_info().ok_or_else(|| Error::Kvs {
                op: "DescribeStream",
                stream: label.clone(),
                code: None,
                status: None,
                message: "response has no StreamInfo".into(),
                retry: Retryability::Transient,
            })?;
            Ok(StreamDescription {
                name: info.stream_name().unwrap_or(&label).to_string(),
                arn: info.stream_arn().unwrap_or_default().to_string(),
                retention_hours: info.data_retention_in_hours().unwrap_or(0).max(0) as u32,
                media_type: info.media_type().unwrap_or_default().to_string(),
            })
        })
        .await?;
        self.retention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                label,
                (
                    i64::from(described.retention_hours) * 3_600_000,
                    std::time::Instant::now(),
                ),
            );
        Ok(described)
    }

    /// The archived-media client for `api` on the stream's data endpoint, and its URL.
    async fn media_client(&self, stream: &StreamConfig, api: Api) -> Result<(am::Client, String)> {
        let label = stream.label();
        if let Some(client) = self.lock_endpoints().get(&(label.clone(), api)) {
            return Ok(client.clone());
        }
        let api_name = match api {
            Api::ListFragments => kv::types::ApiName::ListFragments,
            Api::GetClip => kv::types::ApiName::GetClip,
            Api::GetMediaForFragmentList => kv::types::ApiName::GetMediaForFragmentList,
        };
        let endpoint = with_retry(&self.policy, "GetDataEndpoint", || async {
            self.pace_control_call(stream).await;
            let out = self
                .control
                .get_data_endpoint()
                .set_stream_name(stream.name.clone())
                .set_stream_arn(stream.arn.clone())
                .api_name(api_name.clone())
                .send()
                .await
                .map_err(|e| kvs_error("GetDataEndpoint", &label, &self.control_url, e))?;
            let endpoint = out.data_endpoint().ok_or_else(|| Error::Kvs {
                op: "GetDataEndpoint",
                stream: label.clone(),
                code: None,
                status: None,
                message: "response has no DataEndpoint".into(),
                retry: Retryability::Transient,
            })?;
            checked_data_endpoint(endpoint, &self.control_url).map_err(|problem| Error::Kvs {
                op: "GetDataEndpoint",
                stream: label.clone(),
                code: None,
                status: Some(200),
                message: format!(
                    "the answer from {} names the data endpoint {problem}; no request was sent to it",
                    self.control_url
                ),
                retry: Retryability::Permanent,
            })
        })
        .await?;
        let client = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(endpoint.clone())
            .or_insert_with(|| {
                am::Client::from_conf(
                    self.media_config
                        .to_builder()
                        .endpoint_url(&endpoint)
                        .build(),
                )
            })
            .clone();
        self.lock_endpoints()
            .insert((label, api), (client.clone(), endpoint.clone()));
        Ok((client, endpoint))
    }

    /// Drops a cached data endpoint after a failure, so the next call asks again.
    fn forget_endpoint(&self, stream: &StreamConfig, api: Api) {
        self.lock_endpoints().remove(&(stream.label(), api));
    }

    /// Every fragment whose start lies in `[start, end]`, all pages, unsorted.
    pub async fn list(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
    ) -> Result<Vec<Fragment>> {
        self.list_paged(stream, start, end, LIST_PAGE).await
    }

    /// [`KvsSource::list`] with pages of `page` fragments: each request costs `page`
    /// metadata points, so a range of known size is listed with a page to match.
    pub async fn list_paged(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        page: i64,
    ) -> Result<Vec<Fragment>> {
        let page_size = page.clamp(1, LIST_PAGE);
        let label = stream.label();
        let kind = match stream.timestamp_source {
            TimestampSource::Server => FragmentSelectorType::ServerTimestamp,
            TimestampSource::Producer => FragmentSelectorType::ProducerTimestamp,
        };
        let selector = FragmentSelector::builder()
            .fragment_selector_type(kind)
            .timestamp_range(
                TimestampRange::builder()
                    .start_timestamp(DateTime::from_millis(start))
                    .end_timestamp(DateTime::from_millis(end))
                    .build()
                    .map_err(|e| Error::Usage(format!("timestamp range: {e}")))?,
            )
            .build()
            .map_err(|e| Error::Usage(format!("fragment selector: {e}")))?;
        let mut fragments = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = with_retry(&self.policy, "ListFragments", || async {
                self.buckets(stream)
                    .metadata
                    .acquire(page_size as f64)
                    .await;
                let (client, endpoint) = self.media_client(stream, Api::ListFragments).await?;
                let mut request = client
                    .list_fragments()
                    .set_stream_name(stream.name.clone())
                    .set_stream_arn(stream.arn.clone())
                    .max_results(page_size);
                request = match &token {
                    Some(t) => request.next_token(t),
                    None => request.fragment_selector(selector.clone()),
                };
                let result = request.send().await;
                let page = result.map_err(|e| {
                    let error = kvs_error("ListFragments", &label, &endpoint, e);
                    if endpoint_may_have_moved(&error) {
                        self.forget_endpoint(stream, Api::ListFragments);
                    }
                    error
                })?;
                // KVS always names the list, even empty: without it, the answer is not one
                // (an empty or cut-off 200), and taking it for "no fragments" would lose
                // media.
                if page.fragments.is_none() {
                    return Err(Error::Kvs {
                        op: "ListFragments",
                        stream: label.clone(),
                        code: None,
                        status: Some(200),
                        message: "answer without a Fragments list: not a ListFragments response"
                            .into(),
                        retry: Retryability::Transient,
                    });
                }
                Ok(page)
            })
            .await?;
            self.take_page(stream, page.fragments(), (start, end), &mut fragments)?;
            match page.next_token() {
                // The model allows 1-4096 characters of base64; anything else cannot be a
                // token KVS would take back, and following it would end the listing early.
                Some(t) if t.len() > MAX_NEXT_TOKEN => {
                    return Err(Error::Kvs {
                        op: "ListFragments",
                        stream: label.clone(),
                        code: None,
                        status: Some(200),
                        message: format!(
                            "answer with a NextToken of {} characters (the API allows {MAX_NEXT_TOKEN}): the listing cannot continue; nothing was planned from it",
                            t.len()
                        ),
                        retry: Retryability::Permanent,
                    })
                }
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(fragments),
            }
        }
    }

    /// Adds one ListFragments page's entries to `fragments`, each checked
    /// ([`checked_fragment`]); one that no KVS gives fails the whole listing.
    fn take_page(
        &self,
        stream: &StreamConfig,
        page: &[am::types::Fragment],
        (start, end): (EpochMs, EpochMs),
        fragments: &mut Vec<Fragment>,
    ) -> Result<()> {
        let label = stream.label();
        for f in page {
            let listed = checked_fragment(f, stream.timestamp_source, start, end).map_err(|problem| {
                let endpoints = self.lock_endpoints();
                let endpoint = endpoints
                    .get(&(label.clone(), Api::ListFragments))
                    .map_or("the data endpoint", |(_, url)| url.as_str());
                Error::Kvs {
                    op: "ListFragments",
                    stream: label.clone(),
                    code: None,
                    status: Some(200),
                    message: format!(
                        "the answer from {endpoint} {problem}: not an answer KVS gives; nothing was planned from this listing"
                    ),
                    // The same endpoint answers the same way again.
                    retry: Retryability::Permanent,
                }
            })?;
            match listed {
                Listed::Fragment(fragment) => fragments.push(fragment),
                Listed::Skipped(why) => {
                    tracing::warn!(stream = %label, %why, "ListFragments: entry left out");
                }
            }
        }
        Ok(())
    }

    /// Starts a GetClip for `[start, end]` (fragment starts, inclusive). One attempt: the
    /// caller retries the whole clip, since a body can fail after its headers.
    pub async fn get_clip(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        fragments: u32,
    ) -> Result<ClipBody> {
        let label = stream.label();
        let kind = match stream.timestamp_source {
            TimestampSource::Server => ClipFragmentSelectorType::ServerTimestamp,
            TimestampSource::Producer => ClipFragmentSelectorType::ProducerTimestamp,
        };
        let selector = ClipFragmentSelector::builder()
            .fragment_selector_type(kind)
            .timestamp_range(
                ClipTimestampRange::builder()
                    .start_timestamp(DateTime::from_millis(start))
                    .end_timestamp(DateTime::from_millis(end))
                    .build()
                    .map_err(|e| Error::Usage(format!("clip range: {e}")))?,
            )
            .build()
            .map_err(|e| Error::Usage(format!("clip selector: {e}")))?;
        let (client, endpoint) = self.media_client(stream, Api::GetClip).await?;
        let buckets = self.buckets(stream);
        buckets.media.acquire(f64::from(fragments)).await;
        buckets.metadata.acquire(f64::from(fragments)).await;
        let asked = std::time::Instant::now();
        let out = client
            .get_clip()
            .set_stream_name(stream.name.clone())
            .set_stream_arn(stream.arn.clone())
            .clip_fragment_selector(selector)
            .send()
            .await
            // The SDK answers once the response's head has arrived: the first byte.
            .inspect(|_| crate::metrics::getclip_latency(&label, asked.elapsed()))
            .map_err(|e| {
                let error = kvs_error("GetClip", &label, &endpoint, e);
                if endpoint_may_have_moved(&error) {
                    self.forget_endpoint(stream, Api::GetClip);
                }
                error
            })?;
        Ok(ClipBody {
            stream: label,
            payload: out.payload,
        })
    }

    /// Starts a GetMediaForFragmentList for the given fragments (Matroska). One attempt.
    pub async fn get_media_for_fragment_list(
        &self,
        stream: &StreamConfig,
        numbers: &[String],
    ) -> Result<ClipBody> {
        let label = stream.label();
        let (client, endpoint) = self
            .media_client(stream, Api::GetMediaForFragmentList)
            .await?;
        self.buckets(stream)
            .media
            .acquire(numbers.len() as f64)
            .await;
        let out = client
            .get_media_for_fragment_list()
            .set_stream_name(stream.name.clone())
            .set_stream_arn(stream.arn.clone())
            .set_fragments(Some(numbers.to_vec()))
            .send()
            .await
            .map_err(|e| {
                let error = kvs_error("GetMediaForFragmentList", &label, &endpoint, e);
                if endpoint_may_have_moved(&error) {
                    self.forget_endpoint(stream, Api::GetMediaForFragmentList);
                }
                error
            })?;
        Ok(ClipBody {
            stream: label,
            payload: out.payload,
        })
    }
}

/// A GetClip response body being received.
pub struct ClipBody {
    stream: String,
    payload: ByteStream,
}

impl ClipBody {
    /// The next piece of the body; `None` at its end.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        self.payload.try_next().await.map_err(|e| Error::Kvs {
            op: "GetClip",
            stream: self.stream.clone(),
            code: None,
            status: None,
            message: format!("body broke off: {}", crate::error::chain(&e)),
            retry: Retryability::Transient,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_endpoints_are_a_scheme_and_a_host_alone() {
        let aws = "https://kinesisvideo.us-east-1.amazonaws.com";
        assert!(
            checked_data_endpoint("https://b-1234.kinesisvideo.us-east-1.amazonaws.com", aws)
                .is_ok()
        );
        assert!(checked_data_endpoint("http://127.0.0.1:4566", "http://127.0.0.1:4566").is_ok());
        for bad in [
            "http://b-1234.kinesisvideo.us-east-1.amazonaws.com",
            "https://user:pw@evil.example",
            "https://evil.example/path?x=1",
            "file:///etc/passwd",
            "https://",
            "https://a b",
        ] {
            assert!(checked_data_endpoint(bad, aws).is_err(), "{bad}");
        }
    }

    fn listed(number: &str, at_ms: i64, length_ms: i64, size: i64) -> am::types::Fragment {
        am::types::Fragment::builder()
            .fragment_number(number)
            .server_timestamp(DateTime::from_millis(at_ms))
            .producer_timestamp(DateTime::from_millis(at_ms))
            .fragment_length_in_milliseconds(length_ms)
            .fragment_size_in_bytes(size)
            .build()
    }

    #[test]
    fn a_listing_is_refused_for_any_value_no_kvs_gives() {
        let ok = checked_fragment(
            &listed("123", 5_000, 2_000, 1_000),
            TimestampSource::Server,
            0,
            10_000,
        );
        assert!(matches!(ok, Ok(Listed::Fragment(f)) if f.number == "123"));
        let elsewhere = checked_fragment(
            &listed("1", 50_000, 2_000, 1),
            TimestampSource::Server,
            0,
            10_000,
        );
        assert!(
            matches!(elsewhere, Ok(Listed::Skipped(why)) if why.contains("outside the asked range"))
        );
        for far in [i64::MAX, i64::MIN] {
            let fragment = am::types::Fragment::builder()
                .fragment_number("1")
                .server_timestamp(DateTime::from_secs(far))
                .build();
            let refused = checked_fragment(&fragment, TimestampSource::Server, 0, 10_000)
                .expect_err("refused");
            assert!(refused.contains("not a time KVS gives"), "{refused}");
        }
        for (fragment, problem) in [
            (
                listed("1/../../tmp/escaped", 5_000, 2_000, 1),
                "not 1-128 digits",
            ),
            (
                listed(&"9".repeat(129), 5_000, 2_000, 1),
                "not 1-128 digits",
            ),
            (listed("1", 5_000, -1, 1), "lasting -1 ms"),
            (listed("1", 5_000, i64::MAX, 1), "lasting"),
            (listed("1", 5_000, 2_000, -5), "of -5 bytes"),
            (listed("1", 5_000, 2_000, i64::MAX), "bytes"),
        ] {
            let refused = checked_fragment(&fragment, TimestampSource::Server, 0, 10_000)
                .expect_err("refused");
            assert!(refused.contains(problem), "{refused}");
        }
    }
}

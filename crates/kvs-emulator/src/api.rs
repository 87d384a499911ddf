//! The KVS operations: request and response shapes of the service models (rest-json,
//! PascalCase members, timestamps as epoch seconds) and their semantics.

use crate::config::{Faults, StreamSpec};
use crate::error::ApiError;
use crate::log::RequestRecord;
use crate::media::gop;
use crate::mp4::clip_header;
use crate::state::Shared;
use crate::stream::{Fragment, StreamState, TimestampKind};
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// GetClip's range limit: "within 24 hours of the specified StartTimestamp".
const MAX_CLIP_RANGE_MS: i64 = 24 * 3_600_000;
/// ListFragments' MaxResults default and bounds (archived-media model).
const DEFAULT_MAX_RESULTS: i64 = 100;
const MAX_RESULTS_RANGE: std::ops::RangeInclusive<i64> = 1..=1000;
const API_NAMES: &[&str] = &[
    "PUT_MEDIA",
    "GET_MEDIA",
    "LIST_FRAGMENTS",
    "GET_MEDIA_FOR_FRAGMENT_LIST",
    "GET_HLS_STREAMING_SESSION_URL",
    "GET_DASH_STREAMING_SESSION_URL",
    "GET_CLIP",
    "GET_IMAGES",
];

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct StreamRef {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TimestampRange {
    start_timestamp: Option<f64>,
    end_timestamp: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Selector {
    fragment_selector_type: Option<String>,
    timestamp_range: Option<TimestampRange>,
}

struct ParsedSelector {
    kind: TimestampKind,
    label: &'static str,
    start_ms: i64,
    end_ms: i64,
}

fn parse_selector(selector: Option<Selector>, member: &str) -> Result<ParsedSelector, ApiError> {
    let selector = selector
        .ok_or_else(|| ApiError::invalid_argument(format!("{member} must not be null.")))?;
    let (kind, label) = match selector.fragment_selector_type.as_deref() {
        Some("SERVER_TIMESTAMP") => (TimestampKind::Server, "SERVER_TIMESTAMP"),
        Some("PRODUCER_TIMESTAMP") => (TimestampKind::Producer, "PRODUCER_TIMESTAMP"),
        other => {
            return Err(ApiError::invalid_argument(format!(
                "FragmentSelectorType {other:?} must be SERVER_TIMESTAMP or PRODUCER_TIMESTAMP."
            )))
        }
    };
    let range = selector
        .timestamp_range
        .ok_or_else(|| ApiError::invalid_argument("TimestampRange must not be null."))?;
    let (Some(start), Some(end)) = (range.start_timestamp, range.end_timestamp) else {
        return Err(ApiError::invalid_argument(
            "StartTimestamp and EndTimestamp must not be null.",
        ));
    };
    Ok(ParsedSelector {
        kind,
        label,
        start_ms: secs_to_ms(start),
        end_ms: secs_to_ms(end),
    })
}

fn secs_to_ms(secs: f64) -> i64 {
    (secs * 1000.0).round() as i64
}

fn ms_to_secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ApiError::serialization(e.to_string()))
}

fn json_response(value: serde_json::Value) -> Response {
    let mut response = (StatusCode::OK, value.to_string()).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

/// Refuses the action when the stream's faults say IAM denies it.
fn authorize(shared: &Shared, name: &str, action: &str) -> Result<(), ApiError> {
    let streams = shared.lock_streams();
    match streams.get(name) {
        Some(s) if s.faults.deny_access => Err(ApiError::not_authorized(action, &s.arn)),
        _ => Ok(()),
    }
}

/// Finds the stream a request names; both name and ARN must agree when both are given.
fn stream_key(shared: &Shared, reference: &StreamRef) -> Result<String, ApiError> {
    let streams = shared.lock_streams();
    let by_arn = |arn: &str| {
        streams
            .values()
            .find(|s| s.arn == arn)
            .map(|s| s.spec.name.clone())
    };
    match (&reference.stream_name, &reference.stream_arn) {
        (None, None) => Err(ApiError::invalid_argument(
            "Either StreamName or StreamARN must be specified.",
        )),
        (Some(name), None) => streams
            .contains_key(name)
            .then(|| name.clone())
            .ok_or_else(ApiError::stream_not_found),
        (None, Some(arn)) => by_arn(arn).ok_or_else(ApiError::stream_not_found),
        (Some(name), Some(arn)) => match by_arn(arn) {
            Some(found) if &found == name => Ok(found),
            Some(_) => Err(ApiError::invalid_argument(
                "StreamName and StreamARN name different streams.",
            )),
            None => Err(ApiError::stream_not_found()),
        },
    }
}

fn stream_info(s: &StreamState) -> serde_json::Value {
    json!({
        "DeviceName": "kvs-emulator",
        "StreamName": s.spec.name,
        "StreamARN": s.arn,
        "MediaType": s.spec.media_type,
        "KmsKeyId": "arn:aws:kms:us-east-1:123456789012:alias/aws/kinesisvideo",
        "Version": s.version,
        "Status": "ACTIVE",
        "CreationTime": ms_to_secs(s.created_ms),
        "DataRetentionInHours": s.spec.data_retention_hours,
    })
}

/// Outcome of one operation: the response and what the log records of it.
pub struct Handled {
    /// The HTTP response to send.
    pub response: Response,
    /// What the request log keeps of the request and its outcome.
    pub record: RequestRecord,
}

/// Answers operation `op` (its name as in the API) with the JSON `body` the client sent.
pub async fn handle(shared: &Arc<Shared>, op: &str, body: &[u8]) -> Handled {
    let mut record = RequestRecord {
        op: op.to_string(),
        ..RequestRecord::default()
    };
    let result = match op {
        "DescribeStream" => describe_stream(shared, body, &mut record),
        "GetDataEndpoint" => get_data_endpoint(shared, body, &mut record),
        "ListStreams" => list_streams(shared, body),
        "CreateStream" => create_stream(shared, body, &mut record),
        "ListFragments" => list_fragments(shared, body, &mut record),
        "GetClip" => get_clip(shared, body, &mut record).await,
        "GetMediaForFragmentList" => get_media_for_fragment_list(shared, body, &mut record),
        _ => Err(ApiError::unknown_operation()),
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(error.code.to_string());
            error.into_response()
        }
    };
    record.status = response.status().as_u16();
    Handled { response, record }
}

fn control_plane_throttle(shared: &Shared, name: &str) -> Result<(), ApiError> {
    let now = shared.now_ms();
    let mut streams = shared.lock_streams();
    let Some(stream) = streams.get_mut(name) else {
        return Err(ApiError::stream_not_found());
    };
    if !stream.faults.throttling {
        return Ok(());
    }
    let rate = crate::stream::CONTROL_TPS_PER_STREAM * stream.faults.quota_scale;
    if !stream.control_calls.try_take(1.0, rate, now) {
        return Err(ApiError::client_limit_exceeded(format!(
            "The request rate for stream {name} exceeds the limit of {rate} transactions per second for this API."
        )));
    }
    Ok(())
}

fn describe_stream(
    shared: &Shared,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let reference: StreamRef = parse(body)?;
    let name = stream_key(shared, &reference)?;
    record.stream = Some(name.clone());
    authorize(shared, &name, "DescribeStream")?;
    control_plane_throttle(shared, &name)?;
    let streams = shared.lock_streams();
    let stream = streams.get(&name).ok_or_else(ApiError::stream_not_found)?;
    Ok(json_response(json!({ "StreamInfo": stream_info(stream) })))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetDataEndpointInput {
    #[serde(flatten)]
    stream: StreamRef,
    #[serde(rename = "APIName")]
    api_name: Option<String>,
}

fn get_data_endpoint(
    shared: &Shared,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let input: GetDataEndpointInput = parse(body)?;
    match input.api_name.as_deref() {
        Some(api) if API_NAMES.contains(&api) => {}
        other => {
            return Err(ApiError::invalid_argument(format!(
                "APIName {other:?} is not one of {}.",
                API_NAMES.join(", ")
            )))
        }
    }
    let name = stream_key(shared, &input.stream)?;
    record.stream = Some(name.clone());
    authorize(shared, &name, "GetDataEndpoint")?;
    control_plane_throttle(shared, &name)?;
    // One endpoint for every API: the client must dial what it is told.
    Ok(json_response(
        json!({ "DataEndpoint": shared.data_endpoint() }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListStreamsInput {
    max_results: Option<i64>,
    next_token: Option<String>,
    stream_name_condition: Option<StreamNameCondition>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StreamNameCondition {
    comparison_operator: Option<String>,
    comparison_value: Option<String>,
}

fn list_streams(shared: &Shared, body: &[u8]) -> Result<Response, ApiError> {
    let input: ListStreamsInput = parse(body)?;
    let max = input.max_results.unwrap_or(10_000);
    if !(1..=10_000).contains(&max) {
        return Err(ApiError::invalid_argument(
            "MaxResults must be between 1 and 10000.",
        ));
    }
    let prefix = match input.stream_name_condition {
        Some(c) if c.comparison_operator.as_deref() == Some("BEGINS_WITH") => {
            c.comparison_value.unwrap_or_default()
        }
        Some(_) => {
            return Err(ApiError::invalid_argument(
                "ComparisonOperator must be BEGINS_WITH.",
            ))
        }
        None => String::new(),
    };
    let offset: usize = match input.next_token {
        Some(token) => token
            .strip_prefix("streams")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ApiError::invalid_argument("NextToken is not valid."))?,
        None => 0,
    };
    let streams = shared.lock_streams();
    let mut names: Vec<&String> = streams.keys().filter(|n| n.starts_with(&prefix)).collect();
    names.sort();
    let page: Vec<serde_json::Value> = names
        .iter()
        .skip(offset)
        .take(max as usize)
        .filter_map(|n| streams.get(*n).map(stream_info))
        .collect();
    let next = offset + page.len();
    let mut out = json!({ "StreamInfoList": page });
    if next < names.len() {
        out["NextToken"] = json!(format!("streams{next}"));
    }
    Ok(json_response(out))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateStreamInput {
    stream_name: Option<String>,
    data_retention_in_hours: Option<u32>,
    media_type: Option<String>,
}

fn create_stream(
    shared: &Shared,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let input: CreateStreamInput = parse(body)?;
    let name = input
        .stream_name
        .ok_or_else(|| ApiError::invalid_argument("StreamName must not be null."))?;
    record.stream = Some(name.clone());
    let mut spec = StreamSpec::live(&name);
    spec.backlog = Duration::ZERO;
    spec.data_retention_hours = input.data_retention_in_hours.unwrap_or(0);
    if let Some(media_type) = input.media_type {
        spec.media_type = media_type;
    }
    let arn = shared.add_stream(spec)?;
    Ok(json_response(json!({ "StreamARN": arn })))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListFragmentsInput {
    #[serde(flatten)]
    stream: StreamRef,
    max_results: Option<i64>,
    next_token: Option<String>,
    fragment_selector: Option<Selector>,
}

/// Where a listing stands, carried in NextToken (base64 of JSON, which fits the model's
/// `[a-zA-Z0-9+/]+={0,2}` pattern). It holds the first page's moment and the last
/// fragment served rather than an offset: a live stream keeps growing between pages, and
/// an offset into a set that grew (or lost a fragment to retention) repeats and skips.
#[derive(Serialize, Deserialize)]
struct ListingToken {
    stream: String,
    kind: String,
    start_ms: i64,
    end_ms: i64,
    /// The listing's set is the fragments that had ended by this moment: the first
    /// page's clock less the stream's listing delay then.
    listed_until_ms: i64,
    /// Order key of the last fragment served.
    after_key: u64,
    /// Number of the last fragment served; breaks ties between equal keys.
    after_number: String,
}

/// One ListFragments request, read from its selector or from its NextToken.
struct ListingRequest {
    name: String,
    kind: TimestampKind,
    label: &'static str,
    start_ms: i64,
    end_ms: i64,
    max_results: i64,
    /// Set by a NextToken: the first page's set, and the position after which to go on.
    resume: Option<Resume>,
}

/// What a NextToken adds to the selector: which set the listing pages through, and where.
struct Resume {
    listed_until_ms: i64,
    after: OrderKey,
}

/// A fragment's place in a listing's order: a hash of its number under the listing's
/// seed, then the number itself, so the order is total.
type OrderKey = (u64, String);

/// A stream's listing faults, read once per request.
struct ListingFaults {
    /// Answer with a malformed body; the count of malformed answers still to come.
    malformed_left: Option<u32>,
    duplicate: bool,
    huge_token: bool,
    forged_number: Option<String>,
}

fn check_retention(
    stream: &StreamState,
    kind: TimestampKind,
    end_ms: i64,
    now: i64,
) -> Result<(), ApiError> {
    // Observed AWS behaviour: with server timestamps an end before the retention window
    // is an argument error; with producer timestamps the range just selects nothing.
    if kind == TimestampKind::Server && end_ms < now - stream.retention_ms() {
        return Err(ApiError::invalid_argument(format!(
            "End timestamp {end_ms} is outside of the stream retention period."
        )));
    }
    Ok(())
}

fn list_fragments(
    shared: &Shared,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let request = read_listing_request(shared, body, record)?;
    let (matched, listed_until_ms, faults) = listing_set(shared, &request)?;
    // "Results are in no specific order, even across pages": an order fixed per query,
    // so every page of one listing cuts the same sequence.
    let seed = crate::stream::fnv1a(
        format!(
            "{}/{}/{}/{}",
            request.name, request.label, request.start_ms, request.end_ms
        )
        .as_bytes(),
    ) ^ shared.seed;
    let after = request.resume.as_ref().map(|r| &r.after);
    let (page, more) = listing_page(matched, seed, after, request.max_results as usize);
    record.fragments = page.len();
    if let Some(left) = faults.malformed_left {
        return Ok(malformed_listing(left));
    }
    let next_token = match page.last() {
        Some((key, last)) if more => Some(if faults.huge_token {
            "A".repeat(5000)
        } else {
            encode_token(&ListingToken {
                stream: request.name.clone(),
                kind: request.label.to_string(),
                start_ms: request.start_ms,
                end_ms: request.end_ms,
                listed_until_ms,
                after_key: *key,
                after_number: last.number.clone(),
            })
        }),
        _ => None,
    };
    Ok(listing_response(&page, &faults, next_token))
}

/// Reads and checks a ListFragments request: its stream, MaxResults, and either its
/// selector (a first page) or its NextToken (a later one).
fn read_listing_request(
    shared: &Shared,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<ListingRequest, ApiError> {
    let input: ListFragmentsInput = parse(body)?;
    let max_results = input.max_results.unwrap_or(DEFAULT_MAX_RESULTS);
    if !MAX_RESULTS_RANGE.contains(&max_results) {
        return Err(ApiError::invalid_argument(format!(
            "MaxResults {max_results} must be between 1 and 1000."
        )));
    }
    let name = stream_key(shared, &input.stream)?;
    record.stream = Some(name.clone());
    authorize(shared, &name, "ListFragments")?;
    let request = match (input.next_token, input.fragment_selector) {
        (Some(token), _) => {
            let token = decode_token(&token)
                .filter(|t| t.stream == name)
                .ok_or_else(|| {
                    ApiError::invalid_argument("NextToken is not valid for this stream.")
                })?;
            let (kind, label) = if token.kind == "PRODUCER_TIMESTAMP" {
                (TimestampKind::Producer, "PRODUCER_TIMESTAMP")
            } else {
                (TimestampKind::Server, "SERVER_TIMESTAMP")
            };
            ListingRequest {
                name,
                kind,
                label,
                start_ms: token.start_ms,
                end_ms: token.end_ms,
                max_results,
                resume: Some(Resume {
                    listed_until_ms: token.listed_until_ms,
                    after: (token.after_key, token.after_number),
                }),
            }
        }
        (None, selector) => {
            let s = parse_selector(selector, "FragmentSelector")?;
            ListingRequest {
                name,
                kind: s.kind,
                label: s.label,
                start_ms: s.start_ms,
                end_ms: s.end_ms,
                max_results,
                resume: None,
            }
        }
    };
    record.selector = Some(request.label.to_string());
    record.start_ms = Some(request.start_ms);
    record.end_ms = Some(request.end_ms);
    if request.end_ms < request.start_ms {
        return Err(ApiError::invalid_argument(
            "EndTimestamp must be later than or equal to StartTimestamp.",
        ));
    }
    Ok(request)
}

/// The fragments a listing pages through, the moment that set is taken at, and the
/// stream's listing faults, after the failure, retention and quota checks. A first page
/// takes the set at its own clock; a later page takes the first page's set again, less
/// what retention has dropped since.
fn listing_set(
    shared: &Shared,
    request: &ListingRequest,
) -> Result<(Vec<Fragment>, i64, ListingFaults), ApiError> {
    let now = shared.now_ms();
    shared.inject_internal_failure(&request.name)?;
    let mut streams = shared.lock_streams();
    let stream = streams
        .get_mut(&request.name)
        .ok_or_else(ApiError::stream_not_found)?;
    stream.advance(now);
    check_retention(stream, request.kind, request.end_ms, now)?;
    if stream.faults.throttling {
        let rate = crate::stream::METADATA_POINTS_PER_SEC * stream.faults.quota_scale;
        if !stream
            .metadata_points
            .try_take(request.max_results as f64, rate, now)
        {
            return Err(ApiError::client_limit_exceeded(format!(
                "Fragment-metadata quota of {rate} points per second exceeded for stream {}.",
                request.name
            )));
        }
    }
    let malformed_left = if stream.faults.malformed_listings_next > 0 {
        stream.faults.malformed_listings_next -= 1;
        Some(stream.faults.malformed_listings_next)
    } else {
        None
    };
    let faults = ListingFaults {
        malformed_left,
        duplicate: stream.faults.duplicate_listings,
        huge_token: stream.faults.huge_next_token,
        forged_number: stream.faults.listed_fragment_number.clone(),
    };
    // A fragment shows in listings `listing_delay_ms` after it ends (eventual consistency).
    let listed_until_ms = match &request.resume {
        Some(resume) => resume.listed_until_ms,
        None => now - stream.faults.listing_delay_ms as i64,
    };
    let matched = stream
        .select(request.kind, request.start_ms, request.end_ms)
        .into_iter()
        .filter(|f| f.server_ms + i64::from(f.duration_ms) <= listed_until_ms)
        .collect();
    Ok((matched, listed_until_ms, faults))
}

/// The next page of a listing: the `max` fragments that follow `after` in the listing's
/// order (from the start without it), each with its order key, and whether more follow.
fn listing_page(
    matched: Vec<Fragment>,
    seed: u64,
    after: Option<&OrderKey>,
    max: usize,
) -> (Vec<(u64, Fragment)>, bool) {
    let mut rest: Vec<(u64, Fragment)> = matched
        .into_iter()
        .map(|f| (order_key(seed, &f.number), f))
        .filter(|(key, f)| after.is_none_or(|(k, n)| (*key, &f.number) > (*k, n)))
        .collect();
    rest.sort_unstable_by(|(a, fa), (b, fb)| (a, &fa.number).cmp(&(b, &fb.number)));
    let more = rest.len() > max;
    rest.truncate(max);
    (rest, more)
}

/// A fragment's pseudo-random rank in a listing: its number's hash mixed with the
/// listing's seed (splitmix64's finalizer), so each query orders the fragments anew.
fn order_key(seed: u64, number: &str) -> u64 {
    let mut z = crate::stream::fnv1a(number.as_bytes()) ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `malformed_listings_next` fault: HTTP 200 whose body is not the model's JSON,
/// cut-off JSON and an empty body by turns.
fn malformed_listing(left: u32) -> Response {
    let body = if left.is_multiple_of(2) {
        "{\"Fragments\": [{\"FragmentNumber\": "
    } else {
        ""
    };
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

/// A page as JSON, with the listing faults that change what it says.
fn listing_response(
    page: &[(u64, Fragment)],
    faults: &ListingFaults,
    next_token: Option<String>,
) -> Response {
    let fragments: Vec<serde_json::Value> = page
        .iter()
        .enumerate()
        .map(|(i, (_, f))| {
            let number = faults.forged_number.as_ref().filter(|_| i == 0);
            json!({
                "FragmentNumber": number.unwrap_or(&f.number),
                "FragmentSizeInBytes": f.layout.reported_size(),
                "ProducerTimestamp": ms_to_secs(f.producer_ms),
                "ServerTimestamp": ms_to_secs(f.server_ms),
                "FragmentLengthInMilliseconds": f.duration_ms,
            })
        })
        .collect();
    let fragments = if faults.duplicate {
        fragments
            .iter()
            .flat_map(|f| [f.clone(), f.clone()])
            .collect()
    } else {
        fragments
    };
    let mut out = json!({ "Fragments": fragments });
    if let Some(token) = next_token {
        out["NextToken"] = json!(token);
    }
    json_response(out)
}

fn encode_token(token: &ListingToken) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(token).unwrap_or_default())
}

fn decode_token(token: &str) -> Option<ListingToken> {
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    serde_json::from_slice(&data).ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetClipInput {
    #[serde(flatten)]
    stream: StreamRef,
    clip_fragment_selector: Option<Selector>,
}

async fn get_clip(
    shared: &Arc<Shared>,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let input: GetClipInput = parse(body)?;
    let selector = parse_selector(input.clip_fragment_selector, "ClipFragmentSelector")?;
    let name = stream_key(shared, &input.stream)?;
    record.stream = Some(name.clone());
    authorize(shared, &name, "GetClip")?;
    record.selector = Some(selector.label.to_string());
    record.start_ms = Some(selector.start_ms);
    record.end_ms = Some(selector.end_ms);
    let now = shared.now_ms();
    let (fragments, selected, faults) = select_clip(shared, &name, &selector, now)?;
    shared.inject_internal_failure(&name)?;
    check_clip_media(&fragments)?;
    if faults.throttling {
        take_clip_points(shared, &name, &faults, fragments.len(), now)?;
    }

    let layouts: Vec<_> = fragments.iter().map(|f| (*f.layout).clone()).collect();
    let gop = gop();
    let header = clip_header(gop, &layouts);
    let total = header.total_len();
    let mut chunks = Vec::with_capacity(1 + fragments.len() * 5);
    chunks.push(header.bytes.clone());
    for f in &fragments {
        chunks.extend(gop.fragment_chunks(&f.layout, &f.number));
    }

    record.fragments = fragments.len();
    record.fragments_selected = selected;
    record.truncated = fragments.len() < selected;
    record.first_fragment = fragments.first().map(|f| f.number.clone());
    record.last_fragment = fragments.last().map(|f| f.number.clone());
    record.bytes = total;
    serve_clip(shared, &name, &faults, chunks, total, record).await
}

/// Checks a GetClip request against its stream and selects what the clip serves: the
/// fragments within the caps, how many the range selected before them, and the stream's
/// faults.
fn select_clip(
    shared: &Shared,
    name: &str,
    selector: &ParsedSelector,
    now: i64,
) -> Result<(Vec<Fragment>, usize, Faults), ApiError> {
    let mut streams = shared.lock_streams();
    let stream = streams
        .get_mut(name)
        .ok_or_else(ApiError::stream_not_found)?;
    check_clip_request(stream, selector, now)?;
    stream.advance(now);
    check_retention(stream, selector.kind, selector.end_ms, now)?;
    let mut selected = stream.select(selector.kind, selector.start_ms, selector.end_ms);
    if selector.kind == TimestampKind::Producer {
        // "Duplicate producer timestamps are deduplicated ... only the oldest ingested
        // collection of fragments are returned" (ClipFragmentSelector).
        selected.sort_by(|a, b| {
            a.producer_ms
                .cmp(&b.producer_ms)
                .then_with(|| a.number.cmp(&b.number))
        });
        selected.dedup_by(|later, first| later.producer_ms == first.producer_ms);
    }
    let faults = stream.faults.clone();
    // Over the caps, KVS returns "the first 100 MB or the first 200 fragments" with
    // HTTP 200 and no sign of the cut: whole fragments from the start, up to the caps.
    let mut served = Vec::new();
    let mut bytes = 0u64;
    for f in &selected {
        let size = f.layout.media_bytes();
        if served.len() as u32 >= faults.max_clip_fragments
            || (!served.is_empty() && bytes + size > faults.max_clip_bytes)
        {
            break;
        }
        bytes += size;
        served.push(f.clone());
    }
    Ok((served, selected.len(), faults))
}

/// GetClip's refusals that depend on the stream and the range alone, in AWS's order.
fn check_clip_request(
    stream: &StreamState,
    selector: &ParsedSelector,
    now: i64,
) -> Result<(), ApiError> {
    if stream.spec.data_retention_hours == 0 {
        return Err(ApiError::no_data_retention());
    }
    if stream.spec.media_type != "video/h264" {
        return Err(ApiError::unsupported_media_type(&stream.spec.media_type));
    }
    if selector.end_ms <= selector.start_ms {
        return Err(ApiError::invalid_argument(
            "EndTimestamp must be later than StartTimestamp.",
        ));
    }
    if selector.end_ms - selector.start_ms > MAX_CLIP_RANGE_MS {
        return Err(ApiError::invalid_argument(
            "The time range between StartTimestamp and EndTimestamp must not exceed 24 hours.",
        ));
    }
    if selector.kind == TimestampKind::Server && selector.end_ms > now {
        return Err(ApiError::invalid_argument(
            "EndTimestamp must be in the past for SERVER_TIMESTAMP selectors.",
        ));
    }
    Ok(())
}

/// GetClip's refusals of the selected media: nothing selected, or fragments that cannot
/// be packaged as one MP4.
fn check_clip_media(fragments: &[Fragment]) -> Result<(), ApiError> {
    let Some(first) = fragments.first() else {
        return Err(ApiError::no_fragments_for_clip());
    };
    if fragments.iter().any(|f| f.missing_codec_private_data) {
        return Err(ApiError::missing_codec_private_data());
    }
    if fragments.iter().any(|f| f.invalid_frame) {
        return Err(ApiError::invalid_media_frame());
    }
    if fragments
        .iter()
        .any(|f| f.codec_generation != first.codec_generation)
    {
        return Err(ApiError::invalid_codec_private_data(
            "The codec private data changes within the requested clip range; request the \
             ranges before and after the change separately.",
        ));
    }
    Ok(())
}

/// Takes a clip's cost, one point per fragment, from both the media and the metadata
/// quota (KVS counts GetClip against both).
fn take_clip_points(
    shared: &Shared,
    name: &str,
    faults: &Faults,
    fragments: usize,
    now: i64,
) -> Result<(), ApiError> {
    let cost = fragments as f64;
    let mut streams = shared.lock_streams();
    let stream = streams
        .get_mut(name)
        .ok_or_else(ApiError::stream_not_found)?;
    let media_rate = crate::stream::MEDIA_POINTS_PER_SEC * faults.quota_scale;
    let metadata_rate = crate::stream::METADATA_POINTS_PER_SEC * faults.quota_scale;
    if !stream.media_points.try_take(cost, media_rate, now)
        || !stream.metadata_points.try_take(cost, metadata_rate, now)
    {
        return Err(ApiError::client_limit_exceeded(format!(
            "Fragment-media quota of {media_rate} points per second exceeded for stream {name}."
        )));
    }
    Ok(())
}

/// The clip's response: headers now, the body streamed with the stream's body faults
/// (first-byte delay, bandwidth cap, a reset or a stall part-way).
async fn serve_clip(
    shared: &Shared,
    name: &str,
    faults: &Faults,
    chunks: Vec<Bytes>,
    total: u64,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let stall = shared.take_stall(name);
    let reset_at = (stall || shared.take_reset(name)).then_some(faults.reset_after_bytes);
    record.reset = reset_at.is_some();

    if faults.first_byte_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.first_byte_delay_ms)).await;
    }
    let cut = if stall {
        crate::body::Cut::Stall
    } else {
        crate::body::Cut::Reset
    };
    let body = crate::body::cut_body(chunks, reset_at, cut, faults.bandwidth_bytes_per_sec);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("video/mp4"));
    headers.insert("content-length", HeaderValue::from(total));
    Ok(response)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetMediaForFragmentListInput {
    #[serde(flatten)]
    stream: StreamRef,
    fragments: Option<Vec<String>>,
}

/// GetMediaForFragmentList: the named fragments as Matroska, in the order asked.
fn get_media_for_fragment_list(
    shared: &Arc<Shared>,
    body: &[u8],
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let input: GetMediaForFragmentListInput = parse(body)?;
    let name = stream_key(shared, &input.stream)?;
    record.stream = Some(name.clone());
    authorize(shared, &name, "GetMediaForFragmentList")?;
    let numbers = input
        .fragments
        .filter(|f| !f.is_empty() && f.len() <= 1000)
        .ok_or_else(|| {
            ApiError::invalid_argument("Fragments must list 1 to 1000 fragment numbers.")
        })?;
    let now = shared.now_ms();
    let fragments = {
        let mut streams = shared.lock_streams();
        let stream = streams
            .get_mut(&name)
            .ok_or_else(ApiError::stream_not_found)?;
        stream.advance(now);
        let mut found = Vec::with_capacity(numbers.len());
        for number in &numbers {
            match stream.by_number(number) {
                Some(f) => found.push(f),
                None => {
                    return Err(ApiError::resource_not_found(format!(
                        "Fragment {number} was not found in the stream."
                    )))
                }
            }
        }
        found
    };
    shared.inject_internal_failure(&name)?;
    let chunks = crate::mkv::media_bytes(gop(), &fragments);
    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    record.fragments = fragments.len();
    record.first_fragment = fragments.first().map(|f| f.number.clone());
    record.last_fragment = fragments.last().map(|f| f.number.clone());
    record.bytes = total;
    let body = crate::body::clip_body(chunks, None, None);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("video/webm"));
    headers.insert("content-length", HeaderValue::from(total));
    Ok(response)
}

/// Bytes of one clip, for callers that build clips without HTTP (benchmarks, tests).
pub fn clip_bytes(fragments: &[Fragment]) -> Vec<Bytes> {
    let layouts: Vec<_> = fragments.iter().map(|f| (*f.layout).clone()).collect();
    let gop = gop();
    let mut chunks = vec![clip_header(gop, &layouts).bytes];
    for f in fragments {
        chunks.extend(gop.fragment_chunks(&f.layout, &f.number));
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_tokens_round_trip_and_fit_the_model_pattern() {
        let token = ListingToken {
            stream: "cam-1".into(),
            kind: "SERVER_TIMESTAMP".into(),
            start_ms: 1,
            end_ms: 2,
            listed_until_ms: 3,
            after_key: u64::MAX,
            after_number: "9".repeat(47),
        };
        let text = encode_token(&token);
        assert!(text
            .trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
        let back = decode_token(&text).expect("decodes");
        assert_eq!(back.after_key, u64::MAX);
        assert_eq!(back.listed_until_ms, 3);
        assert_eq!(back.stream, "cam-1");
    }

    #[test]
    fn a_fragment_leaving_mid_listing_shifts_no_other_between_pages() {
        let now = 1_800_000_000_000;
        let mut spec = StreamSpec::live("cam");
        spec.backlog = Duration::from_secs(100);
        let mut stream = StreamState::new(spec, "us-east-1", "123456789012", now);
        stream.advance(now);
        let mut set = stream.select(TimestampKind::Server, i64::MIN, i64::MAX);
        assert_eq!(set.len(), 50);
        let (mut listed, mut after, mut expired) = (Vec::new(), None, Vec::new());
        loop {
            let (page, more) = listing_page(set.clone(), 7, after.as_ref(), 8);
            listed.extend(page.iter().map(|(_, f)| f.number.clone()));
            let Some((key, last)) = page.last().filter(|_| more) else {
                break;
            };
            after = Some((*key, last.number.clone()));
            // Retention drops the oldest fragment, served or not, before the next page.
            expired.push(set.remove(0).number);
        }
        let unique: std::collections::HashSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "none listed twice");
        let all = stream.select(TimestampKind::Server, i64::MIN, i64::MAX);
        let missed: Vec<_> = all.iter().filter(|f| !unique.contains(&f.number)).collect();
        assert!(
            missed.iter().all(|f| expired.contains(&f.number)),
            "only expired fragments are missing"
        );
    }
}

//! Verification of AWS Signature Version 4 on incoming requests.
//!
//! `aws-sigv4` only signs; verifying needs the canonical request rebuilt from exactly the
//! headers the client listed in `SignedHeaders`, so it is done here, following the
//! published algorithm. Refusals use the codes and messages AWS's JSON services send.

use axum::http::{self, HeaderMap, Method, Uri};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// AWS rejects signatures whose `X-Amz-Date` is more than 15 minutes off its clock.
const MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;

/// The service name both KVS APIs sign with.
pub const SIGNING_NAME: &str = "kinesisvideo";

/// The one key pair the emulator accepts.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Access key id a request's `Credential` must name.
    pub access_key_id: String,
    /// Secret the signature is computed with.
    pub secret_access_key: String,
}

struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let mut scope = credential?.split('/');
    let auth = Authorization {
        access_key_id: scope.next()?,
        date: scope.next()?,
        region: scope.next()?,
        service: scope.next()?,
        signed_headers: signed?.split(';').collect(),
        signature: signature?,
    };
    (scope.next()? == "aws4_request").then_some(auth)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn canonical_uri(path: &str) -> String {
    // Non-S3 services encode each segment twice; KVS paths hold only unreserved characters
    // after the first encoding, so the second pass is the first pass again.
    path.split('/')
        .map(uri_encode)
        .collect::<Vec<_>>()
        .join("/")
}

fn uri_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_query(query: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Checks the request's SigV4 signature against `credentials`, at `now_epoch_secs`.
pub fn verify(
    credentials: &Credentials,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    now_epoch_secs: i64,
) -> Result<(), ApiError> {
    let (auth, amz_date) = check_authorization(credentials, headers, now_epoch_secs)?;
    let canonical_request = canonical_request(method, uri, headers, body, &auth);
    let expected = signature(credentials, &auth, amz_date, &canonical_request);
    if !constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        return Err(ApiError::invalid_signature(
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service \
             documentation for details.",
        ));
    }
    Ok(())
}

/// Reads the `Authorization` header and refuses, as AWS does, what can be told wrong
/// before any hashing: an unknown key, another service, a missing or stale `X-Amz-Date`,
/// a scope of another day, an unsigned `Host`. Returns the header and `X-Amz-Date`.
fn check_authorization<'h>(
    credentials: &Credentials,
    headers: &'h HeaderMap,
    now_epoch_secs: i64,
) -> Result<(Authorization<'h>, &'h str), ApiError> {
    let Some(header) = headers.get(http::header::AUTHORIZATION) else {
        return Err(ApiError::missing_authentication_token());
    };
    let header = header
        .to_str()
        .map_err(|_| ApiError::incomplete_signature("Authorization header is not ASCII"))?;
    let auth = parse_authorization(header).ok_or_else(|| {
        ApiError::incomplete_signature(
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' \
             parameters (AWS4-HMAC-SHA256)",
        )
    })?;
    if auth.access_key_id != credentials.access_key_id {
        return Err(ApiError::unrecognized_client());
    }
    if auth.service != SIGNING_NAME {
        return Err(ApiError::invalid_signature(&format!(
            "Credential should be scoped to correct service: '{SIGNING_NAME}'."
        )));
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::incomplete_signature("missing X-Amz-Date header"))?;
    let signed_at = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| ApiError::incomplete_signature("X-Amz-Date is not in ISO 8601 basic form"))?
        .and_utc()
        .timestamp();
    if (now_epoch_secs - signed_at).abs() > MAX_CLOCK_SKEW_SECS {
        return Err(ApiError::invalid_signature(&format!(
            "Signature expired: {amz_date} is now earlier or later than the allowed 15 minutes."
        )));
    }
    if !amz_date.starts_with(auth.date) {
        return Err(ApiError::invalid_signature(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP",
        ));
    }
    if !auth.signed_headers.contains(&"host") {
        return Err(ApiError::invalid_signature(
            "'Host' must be a 'SignedHeader'",
        ));
    }
    Ok((auth, amz_date))
}

/// The canonical request, rebuilt from exactly the headers the client signed.
fn canonical_request(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    auth: &Authorization<'_>,
) -> String {
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload_hash = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| hex::encode(Sha256::digest(body)));
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        method.as_str(),
        canonical_uri(uri.path()),
        canonical_query(uri.query()),
        canonical_headers,
        auth.signed_headers.join(";"),
        payload_hash
    )
}

/// The signature the client must have sent: HMAC chain of the secret over the scope, then
/// over the string to sign.
fn signature(
    credentials: &Credentials,
    auth: &Authorization<'_>,
    amz_date: &str,
    canonical_request: &str,
) -> String {
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(
        format!("AWS4{}", credentials.secret_access_key).as_bytes(),
        auth.date.as_bytes(),
    );
    let k_region = hmac(&k_date, auth.region.as_bytes());
    let k_service = hmac(&k_region, auth.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex::encode(hmac(&k_signing, string_to_sign.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

//! Who may read the page. [`Access::new`] picks one of two modes at start:
//!
//! - **Loopback without a token.** A request must name this machine in `Host` (so a page
//!   on another site cannot reach the server through a name rebound to 127.0.0.1) and
//!   carry no proxy header (a proxy in front would hand the archive to whoever reaches
//!   the proxy). A proxy that rewrites `Host` and adds no header still gets through,
//!   which is why start-up warns and the README says a proxy needs a token.
//! - **A token** of at least [`MIN_TOKEN_BYTES`], given or, beyond loopback, generated.
//!   It comes as `Authorization: Bearer`, or once as `?token=`, which buys a session
//!   cookie (the `<video>` element cannot send headers). The cookie is an expiry signed
//!   with HMAC-SHA256 under a key this process drew at start, never the token: a cookie
//!   that leaks (a log, a shared browser profile) gives neither the token nor more than
//!   [`SESSION_SECS`], and a restart ends every session.
//!
//! Wrong credentials are counted per client ([`Limiter`]); past the limit the client is
//! answered 429 before its credentials are looked at.
//!
//! A player that can send neither headers nor cookies (VLC, iOS, ffplay) gets a
//! [`Grant`] instead, as KVS's HLS session URLs do: one stream's range until an expiry,
//! signed under the same process key, carried in the query of the playlist's URL and of
//! every segment's. A grant opens nothing else, and a wrong or expired one is a 403.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The shortest token accepted: 32 bytes is a 256-bit key when random, and a pass
/// phrase that long is beyond guessing at [`FAILURES_PER_WINDOW`] tries a minute.
pub const MIN_TOKEN_BYTES: usize = 32;
/// Random bytes in a generated token (printed as hex, so 64 characters).
const GENERATED_TOKEN_BYTES: usize = 32;
const SESSION_COOKIE: &str = "kvs_archiver_session";
/// How long a session cookie is good for: a working day of watching; after it the page
/// asks for `?token=` again.
const SESSION_SECS: u64 = 12 * 3600;
/// Wrong credentials a client may send per [`WINDOW`]: a person who mistypes or pastes a
/// stale link stays under it; a guesser gets 14,400 tries a day, nothing against a
/// 32-byte token.
const FAILURES_PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
/// Clients whose failures are counted one by one. About 50 bytes each, so the table stays
/// under a few hundred KiB whatever arrives; past it, new clients share one window.
const MAX_CLIENTS: usize = 4096;
/// Headers a reverse proxy adds. Without a token, a request carrying one came through a
/// proxy that anyone reaching the proxy can use, so it is refused.
const PROXY_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

/// Why `serve` cannot guard the page as asked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The operator's token is too short to resist guessing.
    #[error("serve token (KVS_ARCHIVER_SERVE_TOKEN or --token-file): must be at least {MIN_TOKEN_BYTES} bytes (got {got}); make one with `openssl rand -hex 32`, or leave it unset to get one generated")]
    TooShort {
        /// Its length, in bytes.
        got: usize,
    },
    /// The operating system gave no random bytes: no token nor session key can be made.
    #[error("serve: cannot draw random bytes for the token or the session key: {0}")]
    NoRandomness(String),
}

impl From<TokenError> for crate::error::Error {
    fn from(e: TokenError) -> Self {
        crate::error::Error::Usage(e.to_string())
    }
}

/// How the page is guarded, for start-up to say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The operator's token.
    Given,
    /// None given beyond loopback: this run made one, printed once at start.
    Generated,
    /// Loopback without a token: the `Host` and proxy-header checks only.
    LoopbackOnly,
}

/// A session cookie's value, as checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    Valid,
    /// Signed by this process, but old: not a guess, so not counted as a failure.
    Expired,
    /// Not signed by this process: a guess, a cookie of an earlier run or of another
    /// server on the same host name.
    Forged,
}

/// The token, the session key and the failure counts of one `serve` process.
pub struct Access {
    token: Option<String>,
    mode: Mode,
    /// Signs session cookies; drawn at start and never leaves the process.
    session_key: [u8; 32],
    limiter: Mutex<Limiter>,
}

fn random_bytes<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::NoRandomness(e.to_string()))?;
    Ok(bytes)
}

impl Access {
    /// The guard for a server on `listen` with the operator's `token`: a token shorter
    /// than [`MIN_TOKEN_BYTES`] is refused; beyond loopback without one, one is made.
    pub fn new(listen: SocketAddr, token: Option<String>) -> Result<Access, TokenError> {
        let (token, mode) = match token {
            Some(token) if token.len() < MIN_TOKEN_BYTES => {
                return Err(TokenError::TooShort { got: token.len() })
            }
            Some(token) => (Some(token), Mode::Given),
            None if listen.ip().is_loopback() => (None, Mode::LoopbackOnly),
            None => (
                Some(hex::encode(random_bytes::<GENERATED_TOKEN_BYTES>()?)),
                Mode::Generated,
            ),
        };
        Ok(Access {
            token,
            mode,
            session_key: random_bytes()?,
            limiter: Mutex::new(Limiter::default()),
        })
    }

    /// How the page is guarded, for start-up to say so.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The token in force, to print once when it was generated.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn mac(&self, expires: u64) -> Hmac<Sha256> {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.session_key)
            .expect("HMAC accepts keys of any length");
        mac.update(b"kvs-archiver session\0");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// A session cookie's value: `{expiry, unix seconds}.{HMAC of it, hex}`.
    fn issue(&self, now_unix: u64) -> String {
        let expires = now_unix.saturating_add(SESSION_SECS);
        let tag = self.mac(expires).finalize().into_bytes();
        format!("{expires}.{}", hex::encode(tag))
    }

    fn check(&self, value: &str, now_unix: u64) -> Session {
        let Some((expires, tag)) = value.split_once('.') else {
            return Session::Forged;
        };
        let (Ok(expires), Ok(tag)) = (expires.parse::<u64>(), hex::decode(tag)) else {
            return Session::Forged;
        };
        // verify_slice compares in constant time.
        if self.mac(expires).verify_slice(&tag).is_err() {
            Session::Forged
        } else if expires <= now_unix {
            Session::Expired
        } else {
            Session::Valid
        }
    }

    fn grant_mac(&self, grant: &Grant) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.session_key)
            .expect("HMAC accepts keys of any length");
        mac.update(b"kvs-archiver playback\0");
        mac.update(
            format!(
                "{}\0{}\0{}\0{}",
                grant.stream, grant.start_ms, grant.end_ms, grant.expires
            )
            .as_bytes(),
        );
        mac
    }

    /// The query that carries `grant`: `start`, `end`, `expires` and `sig`.
    pub fn grant_query(&self, grant: &Grant) -> String {
        let sig = hex::encode(self.grant_mac(grant).finalize().into_bytes());
        let pairs = [
            ("start", crate::domain::rfc3339(grant.start_ms)),
            ("end", crate::domain::rfc3339(grant.end_ms)),
            ("expires", grant.expires.to_string()),
            ("sig", sig),
        ];
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    /// The grant a request's `path` and `query` carry, checked: it must name the
    /// stream of the path, be signed by this process and not have expired.
    fn check_grant(
        &self,
        path: &str,
        query: &HashMap<String, String>,
        now_unix: u64,
    ) -> Result<Grant, GrantRefusal> {
        let stream = path
            .strip_prefix("/api/v1/streams/")
            .and_then(|rest| rest.split_once('/'))
            .map(|(stream, _)| stream.to_string())
            .ok_or(GrantRefusal::Forged)?;
        let time = |name: &str| {
            query
                .get(name)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_millis())
        };
        let (Some(start_ms), Some(end_ms), Some(expires), Some(sig)) = (
            time("start"),
            time("end"),
            query.get("expires").and_then(|e| e.parse::<u64>().ok()),
            query.get("sig").and_then(|s| hex::decode(s).ok()),
        ) else {
            return Err(GrantRefusal::Forged);
        };
        let grant = Grant {
            stream,
            start_ms,
            end_ms,
            expires,
        };
        if self.grant_mac(&grant).verify_slice(&sig).is_err() {
            Err(GrantRefusal::Forged)
        } else if expires <= now_unix {
            Err(GrantRefusal::Expired)
        } else {
            Ok(grant)
        }
    }

    /// How long `client` must wait before its credentials are looked at again.
    fn wait(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        // A poisoned lock only means a panic elsewhere mid-update; the counts stay usable.
        let limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        limiter.wait(client, now)
    }

    /// Counts a failure of `client`; says so in the log once per window it is shut out.
    fn failed(&self, client: IpAddr, now: Instant) {
        let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if limiter.failed(client, now) == FAILURES_PER_WINDOW {
            tracing::warn!(%client, "serve: {FAILURES_PER_WINDOW} wrong tokens within a minute: this address is answered 429 until the minute ends");
        }
    }
}

/// One client's failures in the window that started at `started`.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

impl Window {
    fn current(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) < WINDOW
    }
}

/// Failed attempts per client in fixed one-minute windows, in bounded memory: at most
/// [`MAX_CLIENTS`] clients are counted one by one; when the table is full and none of its
/// windows has ended, further clients share `overflow`, so many addresses buy an attacker
/// no more tries than one.
#[derive(Debug, Default)]
struct Limiter {
    clients: HashMap<IpAddr, Window>,
    overflow: Option<Window>,
}

impl Limiter {
    fn wait(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let window = match self.clients.get(&client) {
            Some(window) => *window,
            None if self.clients.len() >= MAX_CLIENTS => self.overflow?,
            None => return None,
        };
        (window.current(now) && window.failures >= FAILURES_PER_WINDOW)
            .then(|| WINDOW.saturating_sub(now.saturating_duration_since(window.started)))
    }

    /// Counts a failure; returns the failures of the window it went into.
    fn failed(&mut self, client: IpAddr, now: Instant) -> u32 {
        if !self.clients.contains_key(&client) && self.clients.len() >= MAX_CLIENTS {
            self.clients.retain(|_, w| w.current(now));
        }
        let fresh = Window {
            started: now,
            failures: 0,
        };
        let window = if self.clients.contains_key(&client) || self.clients.len() < MAX_CLIENTS {
            self.clients.entry(client).or_insert(fresh)
        } else {
            self.overflow.get_or_insert(fresh)
        };
        if !window.current(now) {
            *window = fresh;
        }
        window.failures = window.failures.saturating_add(1);
        window.failures
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.clients.len()
    }
}

/// The unit counted: an IPv4 address, or an IPv6 /64 (one host usually holds a whole
/// /64, so counting single IPv6 addresses would give it 2^64 windows).
fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a request's `Host` names this machine's loopback: without a token, a page
/// on another site must not reach the server through a name rebound to 127.0.0.1.
pub(super) fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The proxy header a request carries, if any.
fn proxy_header(headers: &HeaderMap) -> Option<&'static str> {
    PROXY_HEADERS
        .into_iter()
        .find(|name| headers.contains_key(*name))
}

/// Whether the browser reached us over TLS, as a TLS-terminating proxy says in
/// `X-Forwarded-Proto` or `Forwarded`. A client that claims it falsely over plain http
/// only gets a cookie its own browser will not send back.
pub(super) fn arrived_over_https(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    let forwarded = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([';', ',']))
        .any(|pair| pair.trim().eq_ignore_ascii_case("proto=https"));
    forwarded_proto || forwarded
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The session cookie's value among a request's cookies.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

/// One stream's range, playable until `expires` by whoever holds the signed URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The stream's label.
    pub stream: String,
    /// The range's start.
    pub start_ms: i64,
    /// Its end.
    pub end_ms: i64,
    /// Unix seconds after which it opens nothing.
    pub expires: u64,
}

impl Grant {
    /// A grant of `stream`'s `[start_ms, end_ms)` for `for_secs` from now.
    pub fn new(stream: &str, start_ms: i64, end_ms: i64, for_secs: u64) -> Grant {
        Grant {
            stream: stream.to_string(),
            start_ms,
            end_ms,
            expires: now_unix().saturating_add(for_secs),
        }
    }

    /// Whether it opens `[start_ms, end_ms]` of `stream`.
    pub fn covers(&self, stream: &str, start_ms: i64, end_ms: i64) -> bool {
        self.stream == stream && self.start_ms <= start_ms && end_ms <= self.end_ms
    }
}

/// Why a grant opens nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrantRefusal {
    Forged,
    Expired,
}

/// The middleware: lets a request through, or answers it 401, 403, 421 or 429.
pub(super) async fn authorize(
    State(state): State<super::AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = &state.access;
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    // Without connection info (only a server built without it) every client is one.
    let client = client_of(
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| c.0.ip()),
    );
    let now = Instant::now();
    if access.token().is_none() {
        if let Some(refusal) = refuse_without_token(request.headers()) {
            return refusal;
        }
    }
    if query.contains_key("sig") {
        if let Some(wait) = access.wait(client, now) {
            return too_many(wait);
        }
        return match access.check_grant(request.uri().path(), &query, now_unix()) {
            Ok(grant) => {
                request.extensions_mut().insert(grant);
                next.run(request).await
            }
            Err(refusal) => {
                if refusal == GrantRefusal::Forged {
                    access.failed(client, now);
                }
                let why = match refusal {
                    GrantRefusal::Forged => "this link's signature does not match: ask for a new link (GET /api/v1/streams/{stream}/share)\n",
                    GrantRefusal::Expired => "this link has expired: ask for a new one (GET /api/v1/streams/{stream}/share)\n",
                };
                (StatusCode::FORBIDDEN, why).into_response()
            }
        };
    }
    let Some(token) = access.token() else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let cookie = session_cookie(headers);
    let session = cookie.map(|c| access.check(c, now_unix()));
    // A valid session passes before the limiter: its cookie is signed with a key no
    // client knows, so it helps no guesser, and a browser already signed in is never
    // locked out by someone else's wrong guesses (behind a proxy all share one address).
    if session == Some(Session::Valid) {
        return next.run(request).await;
    }
    // A token, even the right one, waits out the limit: answering the right guess during
    // it would let guessing go on unlimited.
    if let Some(wait) = access.wait(client, now) {
        return too_many(wait);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|b| same_token(b, token)) {
        return next.run(request).await;
    }
    let given = query.get("token");
    if given.is_some_and(|t| same_token(t, token)) {
        return start_session(access, &request, &query);
    }
    // An expired cookie of ours, or no credentials at all, is no guess.
    if bearer.is_some() || given.is_some() || session == Some(Session::Forged) {
        access.failed(client, now);
    }
    unauthorized(cookie.is_some())
}

fn refuse_without_token(headers: &HeaderMap) -> Option<Response> {
    if !loopback_host(headers) {
        return Some(
            (
                StatusCode::MISDIRECTED_REQUEST,
                "without a token this page answers only to localhost and 127.0.0.1\n",
            )
                .into_response(),
        );
    }
    proxy_header(headers).map(|name| {
        (
            StatusCode::FORBIDDEN,
            format!("this request came through a proxy ({name}): without a token the page answers only to browsers on this machine; set KVS_ARCHIVER_SERVE_TOKEN (or --token-file) for a proxy in front of it\n"),
        )
            .into_response()
    })
}

/// The right `?token=`: a redirect to the same page without it, with a session cookie.
fn start_session(access: &Access, request: &Request, query: &HashMap<String, String>) -> Response {
    let rest: Vec<(&String, &String)> = query
        .iter()
        .filter(|(k, _)| k.as_str() != "token")
        .collect();
    // One leading slash: `//host/…` would redirect to another site.
    let path = format!("/{}", request.uri().path().trim_start_matches('/'));
    let target = match serde_urlencoded::to_string(&rest) {
        Ok(rest) if !rest.is_empty() => format!("{path}?{rest}"),
        _ => path,
    };
    // `Secure` only when the browser came over https (through a TLS proxy): over plain
    // http a browser drops a Secure cookie (localhost aside), and the video would stop
    // playing. The README asks a TLS proxy to send X-Forwarded-Proto.
    let secure = if arrived_over_https(request.headers()) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict; Path=/{secure}",
        access.issue(now_unix())
    );
    let mut response = Redirect::to(&target).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn too_many(wait: Duration) -> Response {
    // Whole seconds, rounded up: a client retrying at once would be refused again.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, seconds.max(1).to_string())],
        "too many wrong tokens from this address: wait, then try again\n",
    )
        .into_response()
}

fn unauthorized(had_cookie: bool) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this page needs the token: open it with ?token=... or send Authorization: Bearer\n",
    )
        .into_response();
    if had_cookie {
        // A dead session cookie is dropped, so the browser's next page does not send it
        // (and count against its address) again.
        response.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_static(
                "kvs_archiver_session=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/",
            ),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> IpAddr {
        client_of(ip.parse().expect("an address"))
    }

    #[test]
    fn without_a_token_only_loopback_names_are_answered() {
        let with = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, host.parse().expect("header"));
            loopback_host(&headers)
        };
        assert!(with("127.0.0.1:8080"));
        assert!(with("localhost:8080"));
        assert!(with("[::1]:8080"));
        assert!(!with("evil.example:8080"));
        assert!(!with("192.0.2.1"));
    }

    #[test]
    fn a_short_token_is_refused_and_none_beyond_loopback_gets_one_generated() {
        let lan: SocketAddr = "192.0.2.1:8080".parse().expect("address");
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let short = Access::new(lan, Some("x".repeat(31))).err();
        assert!(
            matches!(short, Some(TokenError::TooShort { got: 31 })),
            "{short:?}"
        );
        let message = TokenError::TooShort { got: 1 }.to_string();
        assert!(message.contains("KVS_ARCHIVER_SERVE_TOKEN"), "{message}");
        assert!(message.contains("--token-file"), "{message}");

        let given = Access::new(lan, Some("y".repeat(32))).expect("32 bytes is enough");
        assert_eq!(given.mode(), Mode::Given);
        let local_only = Access::new(local, None).expect("loopback");
        assert_eq!(local_only.mode(), Mode::LoopbackOnly);
        assert_eq!(local_only.token(), None);

        let one = Access::new(lan, None).expect("generated");
        let two = Access::new(lan, None).expect("generated");
        assert_eq!(one.mode(), Mode::Generated);
        let token = one.token().expect("a token");
        assert_eq!(token.len(), 2 * GENERATED_TOKEN_BYTES);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        assert_ne!(one.token(), two.token(), "each run draws its own");
    }

    #[test]
    fn a_session_is_signed_by_this_process_and_expires() {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let token = "t".repeat(40);
        let access = Access::new(listen, Some(token.clone())).expect("access");
        let other = Access::new(listen, Some(token.clone())).expect("access");
        let cookie = access.issue(1_000);
        assert!(!cookie.contains(&token));
        assert_eq!(access.check(&cookie, 1_000), Session::Valid);
        assert_eq!(
            access.check(&cookie, 1_000 + SESSION_SECS),
            Session::Expired
        );
        assert_eq!(other.check(&cookie, 1_000), Session::Forged, "another run");
        let (_, tag) = cookie.split_once('.').expect("two parts");
        let stretched = format!("{}.{tag}", u64::MAX);
        assert_eq!(access.check(&stretched, 1_000), Session::Forged);
        for junk in ["", ".", "1.", "x.y", &token] {
            assert_eq!(access.check(junk, 1_000), Session::Forged, "{junk:?}");
        }
    }

    #[test]
    fn failures_past_the_limit_wait_out_the_window() {
        let mut limiter = Limiter::default();
        let start = Instant::now();
        let guesser = at("192.0.2.7");
        for _ in 0..FAILURES_PER_WINDOW {
            assert_eq!(limiter.wait(guesser, start), None);
            limiter.failed(guesser, start);
        }
        let wait = limiter.wait(guesser, start + Duration::from_secs(20));
        assert_eq!(wait, Some(Duration::from_secs(40)));
        assert_eq!(limiter.wait(at("192.0.2.8"), start), None, "others go on");
        assert_eq!(limiter.wait(guesser, start + WINDOW), None, "a new window");
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_client() {
        let mut limiter = Limiter::default();
        let now = Instant::now();
        for host in 0..FAILURES_PER_WINDOW {
            limiter.failed(at(&format!("2001:db8:1:2::{host:x}")), now);
        }
        assert!(limiter.wait(at("2001:db8:1:2::ffff"), now).is_some());
        assert_eq!(limiter.wait(at("2001:db8:1:3::1"), now), None);
        assert_eq!(at("::ffff:192.0.2.1"), at("192.0.2.1"));
    }

    #[test]
    fn the_table_of_clients_stays_bounded_and_many_addresses_share_one_window() {
        let mut limiter = Limiter::default();
        let now = Instant::now();
        for n in 0..(MAX_CLIENTS as u32 + 500) {
            limiter.failed(IpAddr::V4(std::net::Ipv4Addr::from(n)), now);
        }
        assert_eq!(limiter.len(), MAX_CLIENTS);
        // 500 failures from untracked addresses went into the shared window.
        let newcomer = IpAddr::V4(std::net::Ipv4Addr::from(u32::MAX));
        assert!(limiter.wait(newcomer, now).is_some());
        // Once the windows end, the table makes room again.
        let later = now + WINDOW;
        limiter.failed(newcomer, later);
        assert_eq!(limiter.len(), 1);
        assert_eq!(limiter.wait(newcomer, later), None);
    }
}

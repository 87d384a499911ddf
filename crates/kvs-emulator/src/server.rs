//! The HTTP server: routing, SigV4 checks, the request log, the admin endpoints, and the
//! [`Emulator`] handle tests start in-process.

use crate::api;
use crate::config::{EmulatorConfig, Faults, StreamSpec};
use crate::error::ApiError;
use crate::log::RequestRecord;
use crate::sigv4;
use crate::state::{wall_clock_ms, Shared};
use crate::stream::{Fragment, TimestampKind};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A fragment as tests see it: the ground truth to compare archives against.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FragmentInfo {
    /// Fragment number, 47 decimal digits as KVS's are.
    pub number: String,
    /// When KVS received the fragment (its start), epoch ms.
    pub server_ms: i64,
    /// The camera's timestamp of the fragment's start, epoch ms.
    pub producer_ms: i64,
    /// Duration as ListFragments reports it.
    pub duration_ms: u32,
    /// `FragmentSizeInBytes` as ListFragments reports it: media and Matroska overhead.
    pub reported_size: u64,
    /// Bytes the fragment adds to a GetClip MP4's `mdat`.
    pub media_bytes: u64,
}

impl From<&Fragment> for FragmentInfo {
    fn from(f: &Fragment) -> Self {
        FragmentInfo {
            number: f.number.clone(),
            server_ms: f.server_ms,
            producer_ms: f.producer_ms,
            duration_ms: f.duration_ms,
            reported_size: f.layout.reported_size(),
            media_bytes: f.layout.media_bytes(),
        }
    }
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Emulator {
    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on `addr` (the binary's `--listen`).
    pub async fn start_on(config: EmulatorConfig, addr: SocketAddr) -> std::io::Result<Emulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(&config, format!("http://{addr}")));
        for spec in config.streams {
            shared
                .add_stream(spec)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.message))?;
        }
        let app = router(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(error) = serve.await {
                tracing::error!(%error, "kvs-emulator: server stopped");
            }
        });
        Ok(Emulator {
            shared,
            addr,
            shutdown: Some(tx),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the endpoint for both KVS clients.
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// GetDataEndpoint answers `url` from now on instead of this server's URL: a TLS
    /// terminator in front of it, which clients must dial for the media APIs.
    pub fn set_data_endpoint(&self, url: &str) {
        self.shared.set_data_endpoint(url.to_string());
    }

    /// Adds a stream while the emulator runs; returns its ARN.
    pub fn add_stream(&self, spec: StreamSpec) -> Result<String, ApiError> {
        self.shared.add_stream(spec)
    }

    /// Stops the emulated clock at its current reading and returns it (epoch ms). A live
    /// stream then grows only as [`Emulator::advance_clock`] moves the clock, so a test
    /// decides exactly which fragments exist at each request. SigV4 keeps using the host's
    /// clock.
    pub fn freeze_clock(&self) -> i64 {
        self.shared.freeze_clock()
    }

    /// Moves the emulated clock forward by `by` (stopping it first if it runs) and returns
    /// the new reading (epoch ms). Fragments that end by then appear; old ones may expire.
    pub fn advance_clock(&self, by: std::time::Duration) -> i64 {
        self.shared
            .advance_clock(i64::try_from(by.as_millis()).unwrap_or(i64::MAX))
    }

    /// Changes a stream's faults while the emulator runs.
    pub fn update_faults(&self, stream: &str, change: impl FnOnce(&mut Faults)) -> bool {
        let mut streams = self.shared.lock_streams();
        match streams.get_mut(stream) {
            Some(s) => {
                change(&mut s.faults);
                true
            }
            None => false,
        }
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.clear_requests();
    }

    /// The stream's fragments that exist now (within retention), oldest first.
    pub fn fragments(&self, stream: &str) -> Vec<FragmentInfo> {
        let now = self.shared.now_ms();
        let mut streams = self.shared.lock_streams();
        match streams.get_mut(stream) {
            Some(s) => {
                s.advance(now);
                s.select(TimestampKind::Server, i64::MIN, i64::MAX)
                    .iter()
                    .map(FragmentInfo::from)
                    .collect()
            }
            None => Vec::new(),
        }
    }

    /// The media of fragments `[start_ms, end_ms]` (server time) as one MP4, without HTTP.
    pub fn clip_bytes(&self, stream: &str, start_ms: i64, end_ms: i64) -> Vec<Bytes> {
        let streams = self.shared.lock_streams();
        match streams.get(stream) {
            Some(s) => api::clip_bytes(&s.select(TimestampKind::Server, start_ms, end_ms)),
            None => Vec::new(),
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/_emulator/streams",
            post(admin_add_stream).get(admin_list_streams),
        )
        .route("/_emulator/streams/{name}/faults", put(admin_set_faults))
        .route("/_emulator/streams/{name}/fragments", get(admin_fragments))
        .route(
            "/_emulator/requests",
            get(admin_requests).delete(admin_clear_requests),
        )
        .fallback(dispatch)
        .with_state(shared)
}

fn operation(path: &str) -> Option<&'static str> {
    Some(match path {
        "/describeStream" => "DescribeStream",
        "/getDataEndpoint" => "GetDataEndpoint",
        "/listStreams" => "ListStreams",
        "/createStream" => "CreateStream",
        "/listFragments" => "ListFragments",
        "/getClip" => "GetClip",
        "/getMediaForFragmentList" => "GetMediaForFragmentList",
        _ => return None,
    })
}

async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op = operation(uri.path());
    let mut record = RequestRecord {
        op: op.unwrap_or("Unknown").to_string(),
        ..RequestRecord::default()
    };
    let refusal = match op {
        Some(_) if method == Method::POST => sigv4::verify(
            &shared.credentials,
            &method,
            &uri,
            &headers,
            &body,
            // Clients sign with the host's clock, so signatures are checked against it
            // even when a test has stopped or moved the emulated one.
            wall_clock_ms() / 1000,
        )
        .err(),
        _ => Some(ApiError::unknown_operation()),
    };
    let response = match (refusal, op) {
        (None, Some(op)) => {
            let handled = api::handle(&shared, op, &body).await;
            record = handled.record;
            handled.response
        }
        (refusal, _) => {
            let error = refusal.unwrap_or_else(ApiError::unknown_operation);
            record.error = Some(error.code.to_string());
            record.status = error.status.as_u16();
            error.into_response()
        }
    };
    tracing::debug!(
        op = %record.op,
        stream = ?record.stream,
        status = record.status,
        fragments = record.fragments,
        truncated = record.truncated,
        "request"
    );
    shared.record(record);
    response
}

async fn admin_add_stream(
    State(shared): State<Arc<Shared>>,
    Json(spec): Json<StreamSpec>,
) -> Response {
    match shared.add_stream(spec) {
        Ok(arn) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "StreamARN": arn })),
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

async fn admin_list_streams(State(shared): State<Arc<Shared>>) -> Response {
    let streams = shared.lock_streams();
    let specs: Vec<&StreamSpec> = streams.values().map(|s| &s.spec).collect();
    Json(serde_json::to_value(specs).unwrap_or_default()).into_response()
}

async fn admin_set_faults(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(faults): Json<Faults>,
) -> Response {
    let mut streams = shared.lock_streams();
    match streams.get_mut(&name) {
        Some(stream) => {
            stream.faults = faults;
            StatusCode::NO_CONTENT.into_response()
        }
        None => ApiError::stream_not_found().into_response(),
    }
}

async fn admin_fragments(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let now = shared.now_ms();
    let mut streams = shared.lock_streams();
    match streams.get_mut(&name) {
        Some(stream) => {
            stream.advance(now);
            let all: Vec<FragmentInfo> = stream
                .select(TimestampKind::Server, i64::MIN, i64::MAX)
                .iter()
                .map(FragmentInfo::from)
                .collect();
            Json(all).into_response()
        }
        None => ApiError::stream_not_found().into_response(),
    }
}

async fn admin_requests(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.requests()).into_response()
}

async fn admin_clear_requests(State(shared): State<Arc<Shared>>) -> Response {
    shared.clear_requests();
    StatusCode::NO_CONTENT.into_response()
}

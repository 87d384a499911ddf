//! A real S3 server for tests and benchmarks: s3s-fs serving a temporary directory on
//! 127.0.0.1, signing with the emulator's test keys, and an SDK client for it.
//! Included from tests/support/mod.rs and by path from benches/archive_throughput.rs.

// Each includer uses its own part of this module.
#![allow(dead_code)]

use aws_sdk_s3 as s3;
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The temporary keys of an assumed role, as the STS stand-in (tests/support/sts.rs)
/// hands them out; this server accepts them besides the emulator's test keys.
pub const ASSUMED_ACCESS_KEY_ID: &str = "ASIAKVSARCHIVERROLE1";
/// Their secret.
pub const ASSUMED_SECRET_ACCESS_KEY: &str = "assumed-role-secret-for-tests-only-0123456";
/// Their session token.
pub const ASSUMED_SESSION_TOKEN: &str = "assumed-role-session-token-for-tests";

/// s3s-fs serving a temporary directory on loopback, with a log of every request it
/// received and faults a test can switch on.
pub struct S3Server {
    pub url: String,
    pub root: tempfile::TempDir,
    /// "METHOD /path?query" of every request, in arrival order.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Every request as it arrived and how it was answered, with its headers.
    pub exchanges: Arc<Mutex<Vec<Exchange>>>,
    pub faults: Arc<S3Faults>,
    task: tokio::task::JoinHandle<()>,
}

/// A multipart upload the server created: s3s-fs keeps only its id, so the log keeps
/// the key and time too, to answer ListMultipartUploads as AWS does.
#[derive(Clone)]
struct Created {
    bucket: String,
    key: String,
    id: String,
    initiated: chrono::DateTime<chrono::Utc>,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// ListMultipartUploads (s3s-fs answers 501): the uploads created here whose registration
/// s3s-fs still holds, filtered by prefix; one page.
fn list_uploads(root: &std::path::Path, created: &[Created], bucket: &str, prefix: &str) -> String {
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{bucket}</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker><MaxUploads>1000</MaxUploads><IsTruncated>false</IsTruncated>"
    );
    for c in created {
        let open = root.join(format!(".upload-{}.json", c.id)).exists();
        if c.bucket == bucket && c.key.starts_with(prefix) && open {
            xml.push_str(&format!(
                "<Upload><Key>{}</Key><UploadId>{}</UploadId><Initiated>{}</Initiated><StorageClass>STANDARD</StorageClass></Upload>",
                c.key,
                c.id,
                c.initiated.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ));
        }
    }
    xml.push_str("</ListMultipartUploadsResult>");
    xml
}

/// One request and its answer, as the server saw them.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// "METHOD /path?query".
    pub line: String,
    /// The request's `x-amz-*` and `if-*` headers (lowercase names), and the access key
    /// id of its signature as `credential`.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// Faults the test server injects.
#[derive(Default)]
pub struct S3Faults {
    /// The next this many UploadPart and PutObject requests are answered 503 SlowDown.
    pub slow_down_next: AtomicU32,
    /// While set, connections are closed as soon as they are accepted: the endpoint is down.
    pub down: AtomicBool,
    /// Milliseconds each UploadPart waits before it is stored (a slow link): while set,
    /// the log gets a `DONE PUT …` line when a part is answered.
    pub part_delay_ms: std::sync::atomic::AtomicU64,
    /// When set, the only KMS keys writes may name: another is refused as AWS refuses a
    /// key the caller may not use (403, not authorized to perform kms:GenerateDataKey).
    /// s3s-fs itself ignores encryption headers.
    pub kms_keys: Mutex<Option<Vec<String>>>,
    /// Answer GetObjectLockConfiguration "Enabled" (s3s-fs answers 501): the bucket claims
    /// Object Lock, so a test can log the lock headers of writes s3s-fs does not keep.
    pub object_lock: AtomicBool,
    /// The parts an upload had when it was aborted reappear once the abort is answered,
    /// as a killed process's part still being stored does when another process aborts its
    /// upload: ListParts lists them and s3s-fs, the upload forgotten, refuses every
    /// further abort of it.
    pub parts_outlive_aborts: AtomicBool,
    /// AbortMultipartUpload is refused, 403 AccessDenied, as for credentials without
    /// s3:AbortMultipartUpload.
    pub deny_aborts: AtomicBool,
}

impl S3Server {
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every answered request, with its headers and status.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_s3s() -> S3Server {
    let root = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let exchanges: Arc<Mutex<Vec<Exchange>>> = Arc::default();
    let faults: Arc<S3Faults> = Arc::default();
    let handler = Handler {
        service: s3s_service(root.path()),
        log: log.clone(),
        exchanges: exchanges.clone(),
        faults: faults.clone(),
        created: Arc::default(),
        root: root.path().to_path_buf(),
    };
    let task = tokio::spawn(serve(listener, handler));
    S3Server {
        url,
        root,
        log,
        exchanges,
        faults,
        task,
    }
}

/// s3s-fs on `root`, accepting requests signed with the emulator's test keys.
fn s3s_service(root: &std::path::Path) -> s3s::service::S3Service {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs on a directory");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    let mut auth =
        s3s::auth::SimpleAuth::from_single(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY);
    // The keys the STS stand-in hands out (tests/support/sts.rs): a role's requests.
    auth.register(
        ASSUMED_ACCESS_KEY_ID.to_string(),
        ASSUMED_SECRET_ACCESS_KEY.to_string().into(),
    );
    builder.set_auth(auth);
    builder.build()
}

/// Accepts connections until the server is dropped; while `faults.down` is set, each
/// one is closed as soon as it is accepted.
async fn serve(listener: tokio::net::TcpListener, handler: Handler) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        if handler.faults.down.load(Ordering::SeqCst) {
            drop(socket);
            continue;
        }
        let handler = handler.clone();
        let logged =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                handler.handle(req)
            });
        tokio::spawn(async move {
            let conn = Builder::new(TokioExecutor::new());
            let _ = conn.serve_connection(TokioIo::new(socket), logged).await;
        });
    }
}

/// What every connection shares: s3s-fs, the request log, the faults, and the multipart
/// uploads created (for ListMultipartUploads, which s3s-fs does not answer).
#[derive(Clone)]
struct Handler {
    service: s3s::service::S3Service,
    log: Arc<Mutex<Vec<String>>>,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    faults: Arc<S3Faults>,
    created: Arc<Mutex<Vec<Created>>>,
    /// The directory s3s-fs serves: it keeps an open upload's registration there.
    root: std::path::PathBuf,
}

impl Handler {
    /// Logs the request and decides, as it arrives, whether it lists or creates multipart
    /// uploads or is answered SlowDown (so the fault counter is taken in arrival order);
    /// everything else goes to s3s-fs.
    fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Result<s3s::HttpResponse, s3s::HttpError>> + Send + 'static
    {
        let handler = self.clone();
        let path = percent_decode(req.uri().path());
        let query = req.uri().query().unwrap_or("").to_string();
        let (bucket, key) = path
            .trim_start_matches('/')
            .split_once('/')
            .map(|(b, k)| (b.to_string(), k.to_string()))
            .unwrap_or_else(|| (path.trim_matches('/').to_string(), String::new()));
        let has = |name: &str| {
            query
                .split('&')
                .any(|p| p == name || p.starts_with(&format!("{name}=")))
        };
        let listing_uploads =
            req.method() == hyper::Method::GET && key.is_empty() && has("uploads");
        let creating_upload = req.method() == hyper::Method::POST && has("uploads");
        let line = format!(
            "{} {}",
            req.method(),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        );
        let done_line = format!("DONE {line}");
        let headers = logged_headers(req.headers());
        let lock_asked = req.method() == hyper::Method::GET && key.is_empty() && has("object-lock");
        let early = self.answer_here(&headers, lock_asked);
        let exchange_line = line.clone();
        let exchanges = self.exchanges.clone();
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
        let is_put = req.method() == hyper::Method::PUT;
        let part_delay = if is_put && has("uploadId") {
            self.faults.part_delay_ms.load(Ordering::SeqCst)
        } else {
            0
        };
        let aborting = (req.method() == hyper::Method::DELETE)
            .then(|| query_param(&query, "uploadId"))
            .flatten();
        let parts_outlive_aborts = self.faults.parts_outlive_aborts.load(Ordering::SeqCst);
        let slow_down = is_put
            && self
                .faults
                .slow_down_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let answer = async move {
            if let Some(response) = early {
                return Ok(response);
            }
            if listing_uploads {
                return Ok(handler.list_uploads_response(&bucket, &query));
            }
            if creating_upload {
                return handler.create_upload(req, bucket, key).await;
            }
            if slow_down {
                return Ok(slow_down_response());
            }
            if let Some(upload_id) = aborting {
                return handler
                    .abort_upload(req, &upload_id, parts_outlive_aborts)
                    .await;
            }
            if part_delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(part_delay)).await;
                let answer = hyper::service::Service::call(&handler.service, req).await;
                handler
                    .log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(done_line);
                return answer;
            }
            hyper::service::Service::call(&handler.service, req).await
        };
        async move {
            let answered = answer.await;
            let status = answered.as_ref().map_or(500, |r| r.status().as_u16());
            exchanges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Exchange {
                    line: exchange_line,
                    headers,
                    status,
                });
            answered
        }
    }

    /// What this server answers itself instead of s3s-fs: Object Lock "Enabled" when a
    /// test claims it, and a KMS key a test does not allow refused.
    fn answer_here(
        &self,
        headers: &std::collections::BTreeMap<String, String>,
        lock_asked: bool,
    ) -> Option<s3s::HttpResponse> {
        if lock_asked && self.faults.object_lock.load(Ordering::SeqCst) {
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><ObjectLockEnabled>Enabled</ObjectLockEnabled></ObjectLockConfiguration>";
            return Some(
                hyper::Response::builder()
                    .status(200)
                    .header("content-type", "application/xml")
                    .body(s3s::Body::from(xml.to_string()))
                    .expect("response"),
            );
        }
        let key = headers.get("x-amz-server-side-encryption-aws-kms-key-id")?;
        let allowed = self
            .faults
            .kms_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        allowed
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(key))
            .then(|| kms_denied_response(key))
    }

    /// AbortMultipartUpload by s3s-fs, answered as AWS answers it: NoSuchUpload for an
    /// upload s3s-fs no longer holds (it refuses those with AccessDenied, which would tell
    /// a client it may not abort, not that the upload is gone). With `parts_outlive`, the
    /// parts the upload had are stored again once the abort is answered.
    async fn abort_upload(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        upload_id: &str,
        parts_outlive: bool,
    ) -> Result<s3s::HttpResponse, s3s::HttpError> {
        if self.faults.deny_aborts.load(Ordering::SeqCst) {
            return Ok(abort_denied_response());
        }
        if !self.root.join(format!(".upload-{upload_id}.json")).exists() {
            return Ok(no_such_upload_response());
        }
        let parts = if parts_outlive {
            self.stored_parts(upload_id)
        } else {
            Vec::new()
        };
        let answer = hyper::service::Service::call(&self.service, req).await;
        for (path, bytes) in parts {
            std::fs::write(path, bytes).expect("a part written back");
        }
        answer
    }

    /// The part files s3s-fs keeps for `upload_id`, with their bytes.
    fn stored_parts(&self, upload_id: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let prefix = format!(".upload_id-{upload_id}.part-");
        std::fs::read_dir(&self.root)
            .expect("the served directory")
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let name = path.file_name()?.to_str()?;
                if !name.starts_with(&prefix) {
                    return None;
                }
                let bytes = std::fs::read(&path).ok()?;
                Some((path, bytes))
            })
            .collect()
    }

    /// ListMultipartUploads, answered here from the uploads created.
    fn list_uploads_response(&self, bucket: &str, query: &str) -> s3s::HttpResponse {
        let prefix = query_param(query, "prefix").unwrap_or_default();
        let all = self
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let xml = list_uploads(&self.root, &all, bucket, &prefix);
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/xml")
            .body(s3s::Body::from(xml))
            .expect("response")
    }

    /// CreateMultipartUpload by s3s-fs, with the upload's id, key and time recorded for
    /// ListMultipartUploads.
    async fn create_upload(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        bucket: String,
        key: String,
    ) -> Result<s3s::HttpResponse, s3s::HttpError> {
        let response = hyper::service::Service::call(&self.service, req).await?;
        let (parts, mut body) = response.into_parts();
        let bytes = body.store_all_limited(1 << 20).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        if let Some(id) = text
            .split_once("<UploadId>")
            .and_then(|(_, rest)| rest.split_once("</UploadId>"))
            .map(|(id, _)| id.to_string())
        {
            self.created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Created {
                    bucket,
                    key,
                    id,
                    initiated: chrono::Utc::now(),
                });
        }
        Ok(hyper::Response::from_parts(parts, s3s::Body::from(bytes)))
    }
}

/// The headers a test asserts on: `x-amz-*` and `if-*`, and the signature's access key.
fn logged_headers(headers: &hyper::HeaderMap) -> std::collections::BTreeMap<String, String> {
    let mut logged = std::collections::BTreeMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        let value = value.to_str().unwrap_or_default();
        if name.starts_with("x-amz-") || name.starts_with("if-") {
            logged.insert(name.to_string(), value.to_string());
        }
        if name == "authorization" {
            if let Some(key) = value
                .split("Credential=")
                .nth(1)
                .and_then(|c| c.split('/').next())
            {
                logged.insert("credential".to_string(), key.to_string());
            }
        }
    }
    logged
}

/// An S3 error answer: `status`, with the XML body S3 sends.
fn error_response(status: u16, code: &str, message: &str) -> s3s::HttpResponse {
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>");
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(s3s::Body::from(body))
        .expect("response")
}

/// 403 AccessDenied for a KMS key, as S3 answers a write with a key the caller may not use.
fn kms_denied_response(key: &str) -> s3s::HttpResponse {
    error_response(403, "AccessDenied", &format!("User: arn:aws:iam::123456789012:user/tests is not authorized to perform: kms:GenerateDataKey on resource: {key} because no identity-based policy allows the kms:GenerateDataKey action"))
}

/// 403 AccessDenied for an abort, as S3 answers credentials that may not abort uploads.
fn abort_denied_response() -> s3s::HttpResponse {
    error_response(403, "AccessDenied", "User: arn:aws:iam::123456789012:user/tests is not authorized to perform: s3:AbortMultipartUpload because no identity-based policy allows the s3:AbortMultipartUpload action")
}

/// 404 NoSuchUpload, as S3 answers for an upload that was completed or aborted.
fn no_such_upload_response() -> s3s::HttpResponse {
    error_response(404, "NoSuchUpload", "The specified multipart upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.")
}

/// 503 SlowDown, as S3 throttles.
fn slow_down_response() -> s3s::HttpResponse {
    error_response(503, "SlowDown", "Please reduce your request rate.")
}

pub fn s3_client(url: &str) -> s3::Client {
    let conf = s3::Config::builder()
        .behavior_version(s3::config::BehaviorVersion::latest())
        .region(s3::config::Region::new("us-east-1"))
        .credentials_provider(s3::config::Credentials::new(
            DEFAULT_ACCESS_KEY_ID,
            DEFAULT_SECRET_ACCESS_KEY,
            None,
            None,
            "tests",
        ))
        .endpoint_url(url)
        .force_path_style(true)
        // moto reports a multipart object's composite CRC32C without the "-N" suffix,
        // which the SDK would check as a whole-object checksum and reject.
        .response_checksum_validation(s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    s3::Client::from_conf(conf)
}

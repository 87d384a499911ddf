//! A stand-in for STS on 127.0.0.1: answers AssumeRole with fixed temporary keys (the
//! ones the local S3 server accepts) and logs each request's form, so a test sees which
//! role was asked for, with which external id and session name, signed by which key.

use crate::support::local_s3::{
    ASSUMED_ACCESS_KEY_ID, ASSUMED_SECRET_ACCESS_KEY, ASSUMED_SESSION_TOKEN,
};
use std::sync::{Arc, Mutex};

/// One request's form pairs.
pub type Form = Vec<(String, String)>;
/// Every request's form, in arrival order.
pub type Log = Arc<Mutex<Vec<Form>>>;

/// The stand-in, serving until dropped.
pub struct Sts {
    pub url: String,
    /// Each request: its decoded form pairs, and `credential` (the signing key's id).
    pub log: Log,
    /// While set, AssumeRole is refused as a trust policy refuses it (403 AccessDenied).
    pub refuse: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sts {
    pub async fn start() -> Sts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let log: Log = Arc::default();
        let refuse: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let task = tokio::spawn(serve(listener, log.clone(), refuse.clone()));
        Sts {
            url,
            log,
            refuse,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Form> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    log: Log,
    refuse: Arc<std::sync::atomic::AtomicBool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let log = log.clone();
        let refuse = refuse.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let log = log.clone();
                let refused = refuse.load(std::sync::atomic::Ordering::SeqCst);
                async move { Ok::<_, std::convert::Infallible>(answer(req, &log, refused).await) }
            });
        tokio::spawn(async move {
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    log: &Mutex<Vec<Form>>,
    refused: bool,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let credential = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    form.push(("credential".into(), credential));
    let session = form
        .iter()
        .find(|(k, _)| k == "RoleSessionName")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let role = form
        .iter()
        .find(|(k, _)| k == "RoleArn")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    log.lock().unwrap_or_else(|p| p.into_inner()).push(form);
    let assumed = role
        .replacen(":iam::", ":sts::", 1)
        .replacen(":role/", ":assumed-role/", 1);
    if refused {
        let xml = format!("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User: arn:aws:iam::123456789012:user/tests is not authorized to perform: sts:AssumeRole on resource: {role}</Message></Error><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>");
        return hyper::Response::builder()
            .status(403)
            .header("content-type", "text/xml")
            .body(http_body_util::Full::new(bytes::Bytes::from(xml)))
            .expect("response");
    }
    let expires = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let xml = format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><AssumedRoleUser><AssumedRoleId>AROATESTROLE:{session}</AssumedRoleId><Arn>{assumed}/{session}</Arn></AssumedRoleUser><Credentials><AccessKeyId>{ASSUMED_ACCESS_KEY_ID}</AccessKeyId><SecretAccessKey>{ASSUMED_SECRET_ACCESS_KEY}</SecretAccessKey><SessionToken>{ASSUMED_SESSION_TOKEN}</SessionToken><Expiration>{expires}</Expiration></Credentials></AssumeRoleResult><ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata></AssumeRoleResponse>"
    );
    hyper::Response::builder()
        .status(200)
        .header("content-type", "text/xml")
        .body(http_body_util::Full::new(bytes::Bytes::from(xml)))
        .expect("response")
}

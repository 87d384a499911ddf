//! A real S3 server for tests and benchmarks: s3s-fs serving a temporary directory on
//! 127.0.0.1, signing with the emulator's test keys, and an SDK client for it.
//! Included by path from tests/archiver.rs and benches/archive_throughput.rs.

// Each includer uses its own part of this module.
#![allow(dead_code)]

use aws_sdk_s3 as s3;
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};

/// s3s-fs serving a temporary directory on loopback.
pub struct S3Server {
    pub url: String,
    pub root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_s3s() -> S3Server {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    let root = tempfile::tempdir().expect("tempdir");
    let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs on a directory");
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(
        DEFAULT_ACCESS_KEY_ID,
        DEFAULT_SECRET_ACCESS_KEY,
    ));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let conn = Builder::new(TokioExecutor::new());
                let _ = conn.serve_connection(TokioIo::new(socket), service).await;
            });
        }
    });
    S3Server { url, root, task }
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

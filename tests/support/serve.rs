//! `serve` as a client meets it: the binary on a free port of 127.0.0.1, its log kept,
//! and plain HTTP/1.1 requests to it.

use crate::support::process::free_port;
use crate::support::world::World;
use std::time::Duration;

/// A token long enough for `serve`.
pub const TOKEN: &str = "s3cret-token-of-at-least-32-bytes";

/// A running `serve`, killed when dropped.
pub struct Served {
    pub child: tokio::process::Child,
    pub port: u16,
    /// Everything it logged (standard error), at trace level.
    pub log: std::path::PathBuf,
}

impl Served {
    /// `serve` with [`TOKEN`], logging at trace level into the world's directory.
    pub async fn start(world: &World) -> Served {
        let port = free_port();
        let log = world.work.path().join(format!("serve-{port}.log"));
        let child = world
            .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("KVS_ARCHIVER_SERVE_TOKEN", TOKEN)
            .env("KVS_ARCHIVER_LOG", "trace")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("serve starts");
        let mut served = Served { child, port, log };
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return served;
            }
            if let Ok(Some(status)) = served.child.try_wait() {
                panic!(
                    "serve exited ({status}): {}",
                    std::fs::read_to_string(&served.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("serve does not listen on {port}");
    }

    /// GET `path` with the token as a bearer.
    pub async fn get(&self, path: &str) -> Answer {
        get(
            self.port,
            path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        )
        .await
    }

    /// GET `path` with no credentials but what it carries.
    pub async fn get_signed(&self, path: &str) -> Answer {
        get(self.port, path, &[]).await
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON ({e}): {} {}", self.status, self.text()))
    }
}

/// A GET over one HTTP/1.1 connection, closed after it; chunked bodies are decoded.
pub async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

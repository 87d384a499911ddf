//! `serve` attacked as issue 20 ("Hostile inputs", findings 5 and 9) did: the binary as a
//! user runs it, on 127.0.0.1 only, asked with raw HTTP/1.1 so that nothing between the
//! test and the server normalizes a path or a header. Each test reproduces an attack and
//! checks what its author would see: status codes, headers, and bytes not served.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A token long enough to be accepted (40 bytes).
const TOKEN: &str = "0123456789abcdef0123456789abcdef-serve!!";

fn archiver() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvs-archiver"));
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("KVS_ARCHIVER_CONFIG")
        .env_remove("KVS_ARCHIVER_SERVE_TOKEN");
    cmd
}

/// A configuration with an empty ledger and a directory destination: enough for `serve`,
/// which never asks KVS (the endpoint is a closed port).
fn empty_archive(dir: &Path) -> PathBuf {
    let path = dir.join("kvs-archiver.toml");
    std::fs::write(
        &path,
        format!(
            "[aws]\nregion = \"us-east-1\"\nkinesis_video_endpoint_url = \"http://127.0.0.1:9\"\n\
             [ledger]\ndatabase_url = \"sqlite://{0}/state.db\"\n\
             [destination]\ndirectory = \"{0}/archive\"\n\
             [[streams]]\nname = \"cam\"\n",
            dir.display()
        ),
    )
    .expect("config written");
    path
}

/// `kvs-archiver demo` into `dir`: ten minutes of a camera archived into `dir/archive`
/// (prefix empty, stream `demo-camera`), the ledger in `dir/state.db`. Returns its
/// configuration.
fn demo(dir: &Path) -> PathBuf {
    let out = archiver()
        .arg("demo")
        .arg("--output")
        .arg(dir)
        .output()
        .expect("demo runs");
    assert!(
        out.status.success(),
        "demo: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("kvs-archiver.toml")
}

/// A running `serve` on 127.0.0.1 at the port it chose; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(config: &Path, token: Option<&str>) -> Server {
        let log = config.with_file_name(format!("serve-{}.log", fastrand::u32(..)));
        let mut cmd = archiver();
        cmd.arg("--config")
            .arg(config)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(token) = token {
            cmd.env("KVS_ARCHIVER_SERVE_TOKEN", token);
        }
        let mut child = cmd.spawn().expect("serve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads on after the first line, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "serve printed no address: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let port = line
            .strip_prefix("serving the archive on http://127.0.0.1:")
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        Server { child, port, log }
    }

    fn get(&self, target: &str, headers: &[(&str, &str)]) -> Reply {
        get(self.port, target, headers)
    }

    /// What the server wrote to standard error so far (its log and any notice).
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer: status, header lines, body (de-chunked).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {:.300}", self.status, self.headers, self.text())
    }
}

/// A raw HTTP/1.1 GET of `target` on 127.0.0.1:`port`. `Host: 127.0.0.1:port` unless
/// `headers` names another.
fn get(port: u16, target: &str, headers: &[(&str, &str)]) -> Reply {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout set");
    let mut request = format!("GET {target} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).expect("sent");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).expect("answer read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut reply = Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        reply.body = dechunk(&reply.body);
    }
    reply
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        let rest = &body[end + 2..];
        if size == 0 || rest.len() < size {
            break;
        }
        out.extend_from_slice(&rest[..size]);
        body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// Every file under `root`, as keys relative to it.
fn files_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable").flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else if let Ok(key) = path.strip_prefix(root) {
                found.push(key.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

fn assert_security_headers(reply: &Reply) {
    assert_eq!(
        reply.header("x-content-type-options"),
        Some("nosniff"),
        "{reply:?}"
    );
    assert_eq!(reply.header("x-frame-options"), Some("DENY"), "{reply:?}");
    assert_eq!(reply.header("cache-control"), Some("no-store"), "{reply:?}");
    assert_eq!(
        reply.header("referrer-policy"),
        Some("no-referrer"),
        "{reply:?}"
    );
    let csp = reply.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("frame-ancestors 'none'"), "{reply:?}");
    assert!(csp.contains("script-src 'self'"), "{reply:?}");
    assert!(csp.contains("media-src 'self'"), "{reply:?}");
}

/// Finding 5: links, sidecars, partial files, a stray copy and the ledger itself, all
/// under the destination root, are 404 with none of their bytes; a done object is
/// served whole and in ranges; a done object swapped for a link is not followed.
#[test]
fn planted_links_sidecars_partial_files_and_a_ledger_in_the_root_get_404_and_only_done_objects_are_served(
) {
    let work = tempfile::tempdir().expect("tempdir");
    let config = demo(work.path());
    let root = work.path().join("archive");
    let objects: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|k| k.ends_with(".mp4"))
        .collect();
    assert!(objects.len() >= 2, "{objects:?}");
    let key = objects[0].clone();
    let (folder, _) = key.rsplit_once('/').expect("a dated folder");
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let secret = passwd.lines().next().expect("a first line").to_string();
    let ledger = std::fs::read(work.path().join("state.db")).expect("the ledger");

    // What an attacker with write access to the destination (or a careless operator)
    // leaves beside the objects.
    use std::os::unix::fs::symlink;
    symlink("/etc/passwd", root.join("demo-camera/passwd.mp4")).expect("link");
    let shaped = format!("{folder}/demo-camera_20000101T000000.000Z_20000101T000958.000Z.mp4");
    symlink("/etc/passwd", root.join(&shaped)).expect("link");
    std::fs::write(root.join("state.db"), &ledger).expect("ledger copy");
    symlink(root.join("state.db"), root.join("demo-camera/ledger.mp4")).expect("link");
    std::fs::write(root.join(format!("{key}.7.partial")), b"half an upload").expect("partial");
    std::fs::write(
        root.join(format!("{folder}/in-flight.mp4.partial")),
        b"half",
    )
    .expect("partial");
    std::fs::copy(root.join(&key), root.join(format!("{folder}/copy.mp4"))).expect("copy");
    assert!(
        root.join(format!("{key}.json")).is_file(),
        "the demo wrote sidecars"
    );

    let server = Server::start(&config, None);
    let refused = [
        "demo-camera/passwd.mp4".to_string(),
        shaped,
        "state.db".into(),
        "demo-camera/ledger.mp4".into(),
        format!("{key}.json"),
        format!("{key}.7.partial"),
        format!("{folder}/in-flight.mp4.partial"),
        format!("{folder}/copy.mp4"),
        "..%2f..%2f..%2fetc%2fpasswd".into(),
        "%2fetc%2fpasswd".into(),
        format!("{folder}/..%2f..%2f..%2f..%2fstate.db"),
    ];
    for target in &refused {
        let reply = server.get(&format!("/media/{target}"), &[]);
        assert_eq!(reply.status, 404, "{target}: {reply:?}");
        let text = reply.text();
        assert!(!text.contains(&secret), "{target}: /etc/passwd served");
        assert!(
            !text.contains("SQLite format 3"),
            "{target}: the ledger served"
        );
        assert!(!text.contains("half"), "{target}: a partial file served");
        assert_security_headers(&reply);
    }

    // The done objects are served, whole and in ranges, with the headers too.
    let bytes = std::fs::read(root.join(&key)).expect("object");
    let whole = server.get(&format!("/media/{key}"), &[]);
    assert_eq!(whole.status, 200, "{whole:?}");
    assert_eq!(whole.body, bytes);
    assert_security_headers(&whole);
    let part = server.get(&format!("/media/{key}"), &[("Range", "bytes=4-11")]);
    assert_eq!(part.status, 206, "{part:?}");
    assert_eq!(part.body, bytes[4..12]);
    assert_security_headers(&part);

    // The object the ledger knows, swapped for a link: the directory destination opens
    // it without following links, so /etc/passwd is not what comes back.
    let swapped = &objects[1];
    std::fs::rename(root.join(swapped), root.join(format!("{swapped}.moved"))).expect("moved");
    symlink("/etc/passwd", root.join(swapped)).expect("link");
    let reply = server.get(&format!("/media/{swapped}"), &[]);
    assert!(!matches!(reply.status, 200 | 206), "{reply:?}");
    assert!(!reply.text().contains(&secret), "/etc/passwd served");
}

/// Finding 9: a 1-character token was accepted. Now one under 32 bytes is refused at
/// start, from the environment or a file, and the message names both settings.
#[test]
fn a_token_shorter_than_32_bytes_is_refused_naming_the_setting() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = empty_archive(work.path());
    let out = archiver()
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KVS_ARCHIVER_SERVE_TOKEN", "x".repeat(31))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "KVS_ARCHIVER_SERVE_TOKEN or --token-file): must be at least 32 bytes (got 31)"
        ),
        "{stderr}"
    );
    let file = work.path().join("token");
    std::fs::write(&file, "a\n").expect("token file");
    let out = archiver()
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&file)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("(got 1)"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing was served");
}

/// Finding 9: guesses were not limited. Requests without credentials are not counted;
/// ten wrong ones within a minute (header, query or cookie) are 401; then the address is
/// answered 429 with Retry-After, the right token included, until the minute ends.
#[test]
fn wrong_tokens_past_ten_a_minute_are_answered_429_with_retry_after() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&empty_archive(work.path()), Some(TOKEN));
    let right = format!("Bearer {TOKEN}");
    // A browser that signed in before the guessing began.
    let opened = server.get(&format!("/?token={TOKEN}"), &[]);
    let session = opened
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    for _ in 0..15 {
        assert_eq!(server.get("/", &[]).status, 401);
    }
    assert_eq!(server.get("/", &[("Authorization", &right)]).status, 200);
    let wrong = format!("Bearer {}", TOKEN.replace('0', "1"));
    for n in 0..10 {
        let reply = match n % 3 {
            0 => server.get("/", &[("Authorization", &wrong)]),
            1 => server.get("/?token=guess", &[]),
            _ => server.get("/", &[("Cookie", "kvs_archiver_session=1.abcd")]),
        };
        assert_eq!(reply.status, 401, "guess {n}: {reply:?}");
        assert_security_headers(&reply);
    }
    for auth in [&wrong, &right] {
        let reply = server.get("/", &[("Authorization", auth)]);
        assert_eq!(reply.status, 429, "{reply:?}");
        let wait: u64 = reply
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&wait), "{wait}");
        assert_security_headers(&reply);
    }
    // Someone else's guesses (behind a proxy, every client's address is the proxy's)
    // never lock out a browser already signed in.
    assert_eq!(server.get("/", &[("Cookie", &session)]).status, 200);
    assert!(
        server.stderr().contains("wrong tokens within a minute"),
        "{}",
        server.stderr()
    );
}

/// Finding 9: the cookie was the raw token, without Secure. Now `?token=` buys a session
/// value signed by this process: it is not the token, carries HttpOnly, SameSite=Strict,
/// Path=/ and an expiry, Secure when a TLS proxy says the browser came over https; the
/// raw token, an old-style cookie, a tampered one or one from an earlier run is refused.
#[test]
fn the_cookie_is_a_signed_session_that_is_not_the_token_and_ends_with_the_process() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = empty_archive(work.path());
    let server = Server::start(&config, Some(TOKEN));
    let opened = server.get(&format!("/streams/cam?from=1&token={TOKEN}"), &[]);
    assert_eq!(opened.status, 303, "{opened:?}");
    assert_eq!(opened.header("location"), Some("/streams/cam?from=1"));
    assert_security_headers(&opened);
    let set = opened
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    assert!(!set.contains(TOKEN), "{set}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(attribute), "{attribute}: {set}");
    }
    assert!(
        !set.contains("Secure"),
        "plain http: a Secure cookie would be dropped: {set}"
    );
    let cookie = set.split(';').next().expect("name=value").to_string();
    assert!(cookie.starts_with("kvs_archiver_session="), "{cookie}");
    let page = server.get("/streams/cam", &[("Cookie", &cookie)]);
    assert_eq!(page.status, 200, "{page:?}");

    let behind_tls = server.get(
        &format!("/?token={TOKEN}"),
        &[("X-Forwarded-Proto", "https")],
    );
    let set = behind_tls.header("set-cookie").unwrap_or("");
    assert!(set.contains("; Secure"), "{set}");

    // A path of two slashes is not sent on to another site.
    let elsewhere = server.get(&format!("//evil.example/?token={TOKEN}"), &[]);
    assert_eq!(
        elsewhere.header("location"),
        Some("/evil.example/"),
        "{elsewhere:?}"
    );

    let value = cookie.trim_start_matches("kvs_archiver_session=");
    let (expires, tag) = value.split_once('.').expect("expiry.tag");
    let later: u64 = expires.parse::<u64>().expect("an expiry") + 86_400;
    for forged in [
        format!("kvs_archiver_session={TOKEN}"),
        format!("kvs_archiver_token={TOKEN}"),
        format!("kvs_archiver_session={later}.{tag}"),
    ] {
        let reply = server.get("/", &[("Cookie", &forged)]);
        assert_eq!(reply.status, 401, "{forged}: {reply:?}");
    }
    drop(server);
    let restarted = Server::start(&config, Some(TOKEN));
    let reply = restarted.get("/", &[("Cookie", &cookie)]);
    assert_eq!(reply.status, 401, "a session of the earlier run: {reply:?}");
    assert!(
        reply
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "the dead cookie is dropped: {reply:?}"
    );
}

/// Finding 9: no nosniff, frame-ancestors or no-store. Now every answer has them: the
/// pages, the assets, refusals and unknown paths.
#[test]
fn every_answer_carries_the_security_headers() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&empty_archive(work.path()), Some(TOKEN));
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    for (target, headers, status) in [
        ("/", &auth[..], 200),
        ("/streams/cam", &auth[..], 200),
        ("/assets/page.js", &auth[..], 200),
        ("/assets/page.css", &auth[..], 200),
        ("/streams/nope", &auth[..], 404),
        ("/no/such/page", &auth[..], 404),
        ("/media/cam/x.mp4", &auth[..], 404),
        ("/", &[][..], 401),
    ] {
        let reply = server.get(target, headers);
        assert_eq!(reply.status, status, "{target}: {reply:?}");
        assert_security_headers(&reply);
    }
}

/// Finding 9: on loopback without a token, a local reverse proxy exposed the archive
/// silently. Now start-up warns in one line, and requests that came through a proxy (a
/// forwarding header) or name another host are refused; a browser on the machine still
/// gets the page.
#[test]
fn without_a_token_start_up_warns_of_proxies_and_proxied_requests_are_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&empty_archive(work.path()), None);
    assert_eq!(server.get("/", &[]).status, 200);
    for header in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9;proto=https"),
        ("Via", "1.1 proxy"),
    ] {
        let reply = server.get("/", &[header]);
        assert_eq!(reply.status, 403, "{header:?}: {reply:?}");
        assert!(
            reply.text().contains("KVS_ARCHIVER_SERVE_TOKEN"),
            "{reply:?}"
        );
        assert_security_headers(&reply);
    }
    let rebound = server.get("/", &[("Host", "evil.example")]);
    assert_eq!(rebound.status, 421, "{rebound:?}");
    assert_security_headers(&rebound);
    let log = server.stderr();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reverse proxy"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
}

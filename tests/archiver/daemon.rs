//! The daemon (`run`, `run --once`): live streams, the same keys as `backfill`, SIGTERM
//! stages, and a backfill beside it on one ledger.

use crate::support::checks::assert_exactly_once;
use crate::support::local_s3::s3_client;
use crate::support::process::{free_port, signal, streams_json, text};
use crate::support::world::{
    hd_stream, historical, new_ledger_url, recent, rfc3339, wait_for_a_streaming_clip, World,
};
use chrono::Utc;
use kvs_emulator::{scan_markers, GapSpec, StreamSpec};
use std::collections::BTreeMap;
use std::time::Duration;

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    response
}

fn metric(text: &str, name: &str, stream: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("stream=\"{stream}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every stored object lies within one clip window (by its metadata).
async fn assert_aligned(world: &World, objects: &BTreeMap<String, Vec<u8>>, clip_ms: i64) {
    let client = s3_client(&world.s3_url);
    for key in objects.keys() {
        let head = client
            .head_object()
            .bucket(&world.bucket)
            .key(key)
            .send()
            .await
            .expect("head");
        let meta = head.metadata().expect("metadata");
        let start = kvs_archiver::app::parse_time(&meta["kvs-start"], "kvs-start").expect("start");
        let end = kvs_archiver::app::parse_time(&meta["kvs-end"], "kvs-end").expect("end");
        assert_eq!(
            start.div_euclid(clip_ms),
            end.div_euclid(clip_ms),
            "{key} crosses a clip boundary"
        );
    }
}

/// The daemon test's 20 live cameras: fragment lengths and sizes vary, cam-07 has a gap,
/// and cam-13 (KVS keeps an hour of it) falls behind its retention.
fn twenty_live_streams() -> Vec<StreamSpec> {
    let mut specs = Vec::new();
    for i in 0..20 {
        let mut spec = StreamSpec::live(&format!("cam-{i:02}"));
        spec.backlog = Duration::from_secs(150);
        spec.fragment_durations_ms = match i % 4 {
            0 => vec![2000],
            1 => vec![1000],
            2 => vec![3000, 1000],
            _ => vec![4000],
        };
        spec.fragment_size = [0, 20_000, 60_000][i % 3];
        if i == 7 {
            spec.gaps = vec![GapSpec {
                after: Duration::from_secs(60),
                length: Duration::from_secs(30),
            }];
        }
        if i == 13 {
            // KVS keeps an hour of this camera, and every clip breaks off: the archiver
            // falls behind and KVS deletes fragments first.
            spec.data_retention_hours = 1;
            spec.backlog = Duration::from_secs(3700);
            spec.faults.resets_next = u32::MAX;
            spec.faults.reset_after_bytes = 0;
        }
        specs.push(spec);
    }
    specs
}

/// Every stream but cam-13: every fragment in a window that closed before the last pass
/// (`stop`) archived once, and nothing of a window still open.
fn assert_closed_windows_archived_once(
    world: &World,
    objects: &BTreeMap<String, Vec<u8>>,
    stop: i64,
    clip_ms: i64,
) {
    // Everything in windows that closed before the last pass is archived; nothing newer.
    let cutoff = (stop - 10_000 - 5_000).div_euclid(clip_ms) * clip_ms;
    let newest_allowed = (stop - 5_000).div_euclid(clip_ms) * clip_ms;
    for i in (0..20).filter(|i| *i != 13) {
        let name = format!("cam-{i:02}");
        let mine: BTreeMap<String, Vec<u8>> = objects
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("kvs/{name}/")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fragments = world.emu.fragments(&name);
        let expected: Vec<String> = fragments
            .iter()
            .filter(|f| f.server_ms < cutoff)
            .map(|f| f.number.clone())
            .collect();
        let allowed: std::collections::HashSet<&String> = fragments
            .iter()
            .filter(|f| f.server_ms < newest_allowed)
            .map(|f| &f.number)
            .collect();
        let stored: Vec<String> = mine.values().flat_map(|b| scan_markers(b)).collect();
        let unique: std::collections::HashSet<&String> = stored.iter().collect();
        assert_eq!(
            unique.len(),
            stored.len(),
            "{name}: a fragment stored twice"
        );
        for number in &expected {
            assert!(
                unique.contains(number),
                "{name}: fragment {number} not archived"
            );
        }
        assert!(
            stored.iter().all(|n| allowed.contains(n)),
            "{name}: an open window was archived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_keeps_twenty_live_streams_archived_exactly_once() {
    const SHORT: &str = "cam-13";
    let specs = twenty_live_streams();
    let port = free_port();
    let sections = format!(
        "[daemon]\nschedule = \"*/5 * * * * *\"\nlag = \"5s\"\nmax_clips_in_flight = 8\nshutdown_grace = \"5s\"\n\
         retention_alarm = \"50m\"\nmetrics_listen = \"127.0.0.1:{port}\"\n"
    );
    let world = World::with_sections(
        specs,
        "clip_duration = \"20s\"\nconcurrency = 2",
        &sections,
        &|_| String::new(),
    )
    .await;
    let started = Utc::now().timestamp_millis();
    // Logs go to a file: a pipe nobody reads would fill up and stall the daemon.
    let log_path = world.work.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut daemon = world
        .command(&["run"])
        .env("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("daemon starts");
    tokio::time::sleep(Duration::from_secs(90)).await;
    let metrics = tokio::time::timeout(Duration::from_secs(10), http_get(port, "/metrics"))
        .await
        .expect("metrics answer");
    assert!(http_get(port, "/healthz").await.contains("ok"));
    let stop = Utc::now().timestamp_millis();
    signal(&daemon, "TERM");
    let exited = tokio::time::timeout(Duration::from_secs(15), daemon.wait()).await;
    let status = exited.expect("exits within the grace").expect("status");
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success(),
        "daemon exit {status:?}: {}",
        &stderr[stderr.len().saturating_sub(3000)..]
    );

    assert_eq!(
        metric(&metrics, "kvs_archiver_at_risk", SHORT),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "kvs_archiver_at_risk", "cam-00"),
        Some(0.0)
    );
    assert!(
        metric(&metrics, "kvs_archiver_fragments_expired_total", SHORT).unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "kvs_archiver_chunks_archived_total", "cam-00").unwrap_or(0.0) > 0.0);
    assert_real_histograms(&metrics);

    let objects = world.objects().await;
    let clip_ms = 20_000;
    assert_closed_windows_archived_once(&world, &objects, stop, clip_ms);
    assert_aligned(&world, &objects, clip_ms).await;
    assert!(started < stop);
    // Passes every 5 s for 90 s, and each stream described once: its retention is
    // taken as current for 15 minutes, sparing the account's control-plane quota.
    let mut described: BTreeMap<String, usize> = BTreeMap::new();
    for r in world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "DescribeStream" && r.status == 200)
    {
        *described
            .entry(r.stream.clone().unwrap_or_default())
            .or_default() += 1;
    }
    assert!(
        described.len() >= 20 && described.values().all(|&n| n == 1),
        "DescribeStream once per stream: {described:?}"
    );

    let status = world.run(&["status", "--json"]).await;
    let json = streams_json(&status);
    let short = json
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["stream"] == SHORT)
        .expect("short stream");
    assert!(
        short["expired"].as_u64().unwrap_or(0) > 0,
        "expired fragments recorded: {short}"
    );
    assert!(
        short["next_run_ms"].as_i64().is_some(),
        "the next firing is shown: {short}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_and_run_produce_the_same_objects() {
    // A fixed 20-minute stretch on whole minutes, archived by backfill into a/ and by
    // `run --once` (on its own ledger) into b/.
    let minute = 60_000;
    let end = (Utc::now().timestamp_millis() - 10 * minute).div_euclid(minute) * minute;
    let start = end - 20 * minute;
    let spec = historical("cam", start, end - 1, 2000, 20_000);
    let world = World::with_sections(vec![spec], "clip_duration = \"1m\"", "", &|_| {
        "retention_window = \"2h\"".into()
    })
    .await;
    let config = std::fs::read_to_string(&world.config).expect("config");
    let second = world.work.path().join("run.toml");
    let other_ledger = new_ledger_url(world.work.path(), "run-state.db").await;
    std::fs::write(
        &second,
        config
            .replace(&world.ledger_url, &other_ledger)
            .replace("prefix = \"kvs/\"", "prefix = \"b/\""),
    )
    .expect("second config");
    std::fs::write(
        &world.config,
        config.replace("prefix = \"kvs/\"", "prefix = \"a/\""),
    )
    .expect("first config");

    let backfill = world.backfill("cam", start, end).await;
    assert!(backfill.status.success(), "{}", text(&backfill));
    let run = world
        .command(&["run", "--once"])
        .env("KVS_ARCHIVER_CONFIG", &second)
        .output()
        .await
        .expect("runs");
    assert!(run.status.success(), "{}", text(&run));
    let strip = |prefix: &str, objects: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        objects
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v))
            .collect()
    };
    let a = strip("a/", world.objects_under("a/").await);
    let b = strip("b/", world.objects_under("b/").await);
    assert!(a.len() >= 20, "{} objects", a.len());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same keys"
    );
    assert_eq!(a, b, "same bytes");
    assert_exactly_once(&a, &world.fragment_numbers("cam", start, end));
}

/// Starts `run` and returns once a clip has been streaming for `into_clip`.
async fn start_daemon_mid_clip(world: &World, into_clip: Duration) -> tokio::process::Child {
    let daemon = world
        .command(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starts");
    wait_for_a_streaming_clip(world).await;
    tokio::time::sleep(into_clip).await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_uploads_finish_or_aborts_them_and_a_rerun_completes() {
    let (mut spec, start, end) = hd_stream("cam");
    spec.faults.bandwidth_bytes_per_sec = Some(8_000_000);
    let sections = "[daemon]\nshutdown_grace = \"1s\"\nlag = \"5s\"\n";
    // One-minute windows: the whole stream (ending 5 minutes ago) lies in closed ones.
    let world = World::with_sections(vec![spec], "clip_duration = \"1m\"", sections, &|_| {
        "retention_window = \"1h\"".into()
    })
    .await;
    let mut daemon = start_daemon_mid_clip(&world, Duration::from_millis(1500)).await;
    let asked = std::time::Instant::now();
    signal(&daemon, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "exits within the grace: {:?}",
        asked.elapsed()
    );
    assert!(
        world.open_multipart_uploads().is_empty(),
        "aborted: {:?}",
        world.open_multipart_uploads()
    );

    world
        .emu
        .update_faults("cam", |f| f.bandwidth_bytes_per_sec = None);
    let rerun = world.run(&["run", "--once"]).await;
    assert!(rerun.status.success(), "{}", text(&rerun));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &world.fragment_numbers("cam", start, end));
    assert!(world.open_multipart_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_the_next_start_cleans_up() {
    let (mut spec, start, end) = hd_stream("cam");
    spec.faults.bandwidth_bytes_per_sec = Some(2_000_000);
    let sections = "[daemon]\nshutdown_grace = \"60s\"\nlag = \"5s\"\n";
    let world = World::with_sections(vec![spec], "clip_duration = \"1m\"", sections, &|_| {
        "retention_window = \"1h\"".into()
    })
    .await;
    let mut daemon = start_daemon_mid_clip(&world, Duration::from_millis(3000)).await;
    signal(&daemon, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = std::time::Instant::now();
    signal(&daemon, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), daemon.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "second signal exits at once"
    );
    assert_eq!(status.code(), Some(130));

    world
        .emu
        .update_faults("cam", |f| f.bandwidth_bytes_per_sec = None);
    let rerun = world.run(&["run", "--once"]).await;
    assert!(rerun.status.success(), "{}", text(&rerun));
    assert_exactly_once(
        &world.objects().await,
        &world.fragment_numbers("cam", start, end),
    );
    assert!(
        world.open_multipart_uploads().is_empty(),
        "the upload left open was aborted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_and_the_daemon_share_one_ledger_without_double_work() {
    let (start, end) = recent(1.0);
    let world = World::with_sections(
        vec![historical("cam", start, end, 2000, 20_000)],
        "concurrency = 2",
        "[daemon]\nlag = \"5s\"\n",
        &|_| "retention_window = \"2h\"".into(),
    )
    .await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let daemon = world.command(&["run", "--once"]).output();
    let backfill = world
        .command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b])
        .output();
    let (daemon, backfill) = tokio::join!(daemon, backfill);
    let (daemon, backfill) = (
        daemon.expect("daemon runs"),
        backfill.expect("backfill runs"),
    );
    assert!(daemon.status.success(), "{}", text(&daemon));
    assert!(backfill.status.success(), "{}", text(&backfill));
    assert_exactly_once(
        &world.objects().await,
        &world.fragment_numbers("cam", start, end),
    );
    let fetched: usize = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .map(|r| r.fragments)
        .sum();
    assert_eq!(
        fetched,
        world.fragment_numbers("cam", start, end).len(),
        "no fragment fetched twice"
    );
}

/// An HTTP/1.1 chunked body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The scrape parses as Prometheus text, and the latency and size metrics are histograms
/// (not summaries) whose buckets count up to their total, for cam-00.
fn assert_real_histograms(text: &str) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or(("", text));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    for name in [
        "kvs_archiver_getclip_first_byte_seconds",
        "kvs_archiver_upload_finish_seconds",
        "kvs_archiver_chunk_seconds",
        "kvs_archiver_chunk_bytes",
    ] {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("stream") == Some("cam-00"))
            .unwrap_or_else(|| {
                let lines: Vec<&str> = body.lines().filter(|l| l.contains(name)).take(6).collect();
                let parsed: Vec<String> = scrape
                    .samples
                    .iter()
                    .filter(|s| s.metric.contains(name))
                    .take(3)
                    .map(|s| format!("{} {:?}", s.metric, s.labels))
                    .collect();
                panic!("{name} for cam-00 in the scrape: {lines:#?} parsed {parsed:?}")
            });
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            panic!("{name} is {:?}, not a histogram", sample.value);
        };
        assert!(buckets.len() >= 8, "{name}: {buckets:?}");
        let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{name}: cumulative {counts:?}"
        );
        assert!(
            counts.last().copied().unwrap_or(0.0) > 0.0,
            "{name}: observed"
        );
    }
}

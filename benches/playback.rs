//! The playback API's memory, time to first byte and throughput, against s3s-fs on
//! loopback: `cargo bench --bench playback`.
//!
//! A day of a 30 fps camera (2 s fragments of the emulator's H.264, 2.6 million frames)
//! is archived into s3s-fs by the release binary; then `serve` (loopback, no token) is
//! asked for:
//! - the whole day as one MP4 (`clip.mp4`, 24 h): bytes, time, and `serve`'s peak RSS;
//! - the first byte of a 1-hour clip and of its playlist (`index.m3u8`);
//! - the 1-hour clip whole, against plain ranged GETs of the same objects from s3s-fs.
//!
//! Prints one line per figure; docs/PERFORMANCE.md records them.

use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../tests/support/local_s3.rs"]
mod local_s3;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// Peak RSS of a process in KiB, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn archiver(config: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("KVS_ARCHIVER_LOG", "warn")
        .stdout(std::process::Stdio::null());
    cmd
}

/// A GET on loopback: (time to the first body byte, body bytes, total time).
async fn get(port: u16, path: &str) -> (Duration, u64, Duration) {
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut first_byte = None;
    let mut body = 0u64;
    loop {
        let n = tcp.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        if first_byte.is_some() {
            body += n as u64;
            continue;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = String::from_utf8_lossy(&head[..12]).into_owned();
            assert!(
                status.contains(" 200"),
                "{path}: {}",
                String::from_utf8_lossy(&head)
            );
            let rest = (head.len() - end - 4) as u64;
            if rest > 0 {
                first_byte = Some(started.elapsed());
                body += rest;
            }
        }
        if first_byte.is_none() && head.len() > 64 << 10 {
            panic!("{path}: no end of header");
        }
    }
    (first_byte.unwrap_or_default(), body, started.elapsed())
}

/// `serve` on a free loopback port, no token; `arenas`: MALLOC_ARENA_MAX for it.
async fn start_serve(
    config: &std::path::Path,
    arenas: Option<&str>,
) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut cmd = archiver(config, &["serve", "--listen", &format!("127.0.0.1:{port}")]);
    cmd.env("KVS_ARCHIVER_LOG", "error").kill_on_drop(true);
    if let Some(arenas) = arenas {
        cmd.env("MALLOC_ARENA_MAX", arenas);
    }
    let serve = cmd.spawn().expect("serve starts");
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (serve, port)
}

/// What the runs share: the archive, its configuration and its range.
struct Archived {
    emu: Emulator,
    /// Kept running for the runs that follow.
    _server: local_s3::S3Server,
    s3: aws_sdk_s3::Client,
    work: tempfile::TempDir,
    config: std::path::PathBuf,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
}

fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn run() {
    let archived = archive_a_day().await;
    export_the_day(&archived).await;
    the_day_through_the_api(&archived).await;
    let (mut serve, port) = start_serve(&archived.config, None).await;
    let pid = serve.id().expect("pid");
    first_bytes_of_an_hour(&archived, port).await;
    against_plain_gets(&archived, port).await;
    println!(
        "playback: serve's peak RSS over all of it {:.1} MiB",
        peak_rss_kib(pid) as f64 / 1024.0
    );
    let _ = serve.kill().await;
    drop(archived.emu);
}

/// A day of a 30 fps camera, archived into s3s-fs by `backfill`.
async fn archive_a_day() -> Archived {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let start = end - chrono::Duration::hours(24);
    let mut spec = StreamSpec::historical("cam30", start, end);
    spec.fragment_durations_ms = vec![2000];
    spec.frame_interval_ms = 33;
    spec.data_retention_hours = 24 * 30;
    spec.faults.throttling = false;
    let emu = Emulator::start(EmulatorConfig {
        streams: vec![spec],
        ..Default::default()
    })
    .await
    .expect("emulator");
    let server = local_s3::start_s3s().await;
    let s3 = local_s3::s3_client(&server.url);
    s3.create_bucket()
        .bucket("bench")
        .send()
        .await
        .expect("bucket");
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[aws]\nkinesis_video_endpoint_url = \"{}\"\ns3_endpoint_url = \"{}\"\ns3_force_path_style = true\n\
             [ledger]\ndatabase_url = \"sqlite://{}/state.db\"\n[destination]\nbucket = \"bench\"\nprefix = \"kvs/\"\n\
             payload_signing = \"never\"\n\
             [archive]\nconcurrency = 4\nmedia_points_per_second = 500\nmetadata_points_per_second = 10000\n\
             [[streams]]\nname = \"cam30\"\n",
            emu.base_url(),
            server.url,
            work.path().display(),
        ),
    )
    .expect("config");
    let (a, b) = (start.to_rfc3339(), end.to_rfc3339());
    let archived = Instant::now();
    let status = archiver(
        &config,
        &["backfill", "--stream", "cam30", "--start", &a, "--end", &b],
    )
    .status()
    .await
    .expect("backfill runs");
    assert!(status.success(), "backfill");
    let fragments = emu.fragments("cam30").len();
    println!(
        "playback: archived 24 h at 30 fps ({fragments} fragments) in {:.0} s",
        archived.elapsed().as_secs_f64()
    );

    Archived {
        emu,
        _server: server,
        s3,
        work,
        config,
        start,
        end,
    }
}

/// The whole day as one file, by `export`: its peak RSS.
async fn export_the_day(archived: &Archived) {
    let Archived {
        work,
        config,
        start,
        end,
        ..
    } = archived;
    let (a, b) = (start.to_rfc3339(), end.to_rfc3339());
    let config = config.as_path();
    let output = work.path().join("day.mp4");
    let output_text = output.display().to_string();
    let exported = Instant::now();
    let mut export = archiver(
        config,
        &[
            "export",
            "--stream",
            "cam30",
            "--start",
            &a,
            "--end",
            &b,
            "-o",
            &output_text,
        ],
    )
    .spawn()
    .expect("export starts");
    let export_pid = export.id().expect("pid");
    let mut export_peak = 0;
    let status = loop {
        export_peak = export_peak.max(peak_rss_kib(export_pid));
        tokio::select! {
            status = export.wait() => break status.expect("status"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    assert!(status.success(), "export");
    println!(
        "playback: export of 24 h at 30 fps: {:.1} MiB in {:.1} s, peak RSS {:.1} MiB",
        std::fs::metadata(&output).map_or(0, |m| m.len()) as f64 / (1u64 << 20) as f64,
        exported.elapsed().as_secs_f64(),
        export_peak as f64 / 1024.0
    );
    let _ = std::fs::remove_file(&output);
}

/// The whole day through the API.
async fn the_day_through_the_api(archived: &Archived) {
    let Archived {
        config, start, end, ..
    } = archived;
    let (start, end, config) = (*start, *end, config.as_path());
    // The whole day through the API, in a fresh `serve` each time: with the allocator's
    // defaults, and with two malloc arenas (what a memory-bound service may set).
    let day = format!(
        "/api/v1/streams/cam30/clip.mp4?start={}&end={}",
        iso(start),
        iso(end)
    );
    for arenas in [None, Some("2")] {
        let (mut serve, port) = start_serve(config, arenas).await;
        let pid = serve.id().expect("pid");
        let at_start = peak_rss_kib(pid);
        let (first, bytes, total) = get(port, &day).await;
        println!(
            "playback: 24 h clip at 30 fps{}: {:.1} MiB in {:.1} s ({:.0} MiB/s), first byte after {:.2} s, serve's RSS {:.1} MiB at start, peak {:.1} MiB",
            arenas.map_or(String::new(), |n| format!(" (MALLOC_ARENA_MAX={n})")),
            bytes as f64 / (1u64 << 20) as f64,
            total.as_secs_f64(),
            bytes as f64 / (1u64 << 20) as f64 / total.as_secs_f64(),
            first.as_secs_f64(),
            at_start as f64 / 1024.0,
            peak_rss_kib(pid) as f64 / 1024.0
        );
        let _ = serve.kill().await;
    }
}

/// Time to the first byte of an hour's clip and playlist.
async fn first_bytes_of_an_hour(archived: &Archived, port: u16) {
    let start = archived.start;
    // An hour in the middle: first bytes of its clip and its playlist, each asked for
    // three times over ranges a second apart (so each clip is laid out anew), then once
    // more over the same range (a seek: the clip laid out last is kept).
    let hour_start = start + chrono::Duration::hours(12) + chrono::Duration::milliseconds(700);
    let hour = |shift: i64| {
        let from = hour_start + chrono::Duration::seconds(shift);
        format!(
            "start={}&end={}",
            iso(from),
            iso(from + chrono::Duration::hours(1))
        )
    };
    for (what, file) in [("1 h clip", "clip.mp4"), ("1 h playlist", "index.m3u8")] {
        let mut firsts = Vec::new();
        for shift in 1..=3 {
            let path = format!("/api/v1/streams/cam30/{file}?{}", hour(shift));
            let (first, _, _) = get(port, &path).await;
            firsts.push(first.as_secs_f64() * 1000.0);
        }
        firsts.sort_by(f64::total_cmp);
        let path = format!("/api/v1/streams/cam30/{file}?{}", hour(3));
        let (again, _, _) = get(port, &path).await;
        println!(
            "playback: {what}: time to first byte {:.0} ms (median of 3 ranges; {:.0}..{:.0}), the same range again {:.0} ms",
            firsts[1],
            firsts[0],
            firsts[2],
            again.as_secs_f64() * 1000.0
        );
    }
}

/// The hour's clip whole against plain ranged GETs of its objects.
async fn against_plain_gets(archived: &Archived, port: u16) {
    let Archived { s3, start, .. } = archived;
    let hour_start = *start + chrono::Duration::hours(12) + chrono::Duration::milliseconds(700);
    let hour_end = hour_start + chrono::Duration::hours(1);
    let range = format!("start={}&end={}", iso(hour_start), iso(hour_end));
    let (_, clip_bytes, clip_time) =
        get(port, &format!("/api/v1/streams/cam30/clip.mp4?{range}")).await;
    let objects = s3
        .list_objects_v2()
        .bucket("bench")
        .prefix("kvs/cam30/")
        .send()
        .await
        .expect("listing");
    let keys: Vec<(String, i64)> = objects
        .contents()
        .iter()
        .filter_map(|o| Some((o.key()?.to_string(), o.size()?)))
        .filter(|(k, _)| k.ends_with(".mp4"))
        .collect();
    // The objects the hour reaches into: by the start time their names carry.
    let stamp = |t: chrono::DateTime<chrono::Utc>| t.format("%Y%m%dT%H%M%S").to_string();
    let (low, high) = (
        stamp(hour_start - chrono::Duration::minutes(10)),
        stamp(hour_end),
    );
    let chosen: Vec<&(String, i64)> = keys
        .iter()
        .filter(|(k, _)| {
            let name = k.rsplit('/').next().unwrap_or("");
            let at = name.split('_').nth(1).unwrap_or("");
            at >= low.as_str() && at < high.as_str()
        })
        .collect();
    let started = Instant::now();
    let mut plain = 0u64;
    for (key, size) in &chosen {
        let mut body = s3
            .get_object()
            .bucket("bench")
            .key(key)
            .range(format!("bytes=0-{}", size - 1))
            .send()
            .await
            .expect("a ranged GET")
            .body;
        while let Some(bytes) = body.try_next().await.expect("the body") {
            plain += bytes.len() as u64;
        }
    }
    let plain_time = started.elapsed();
    let mib = |b: u64, t: Duration| b as f64 / (1u64 << 20) as f64 / t.as_secs_f64();
    println!(
        "playback: 1 h clip through the API: {:.1} MiB at {:.0} MiB/s; plain GETs of its {} objects: {:.1} MiB at {:.0} MiB/s ({:.2}x)",
        clip_bytes as f64 / (1u64 << 20) as f64,
        mib(clip_bytes, clip_time),
        chosen.len(),
        plain as f64 / (1u64 << 20) as f64,
        mib(plain, plain_time),
        mib(clip_bytes, clip_time) / mib(plain, plain_time),
    );
}

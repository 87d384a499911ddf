//! End-to-end archiving memory, speed and CPU: the release binary backfills from the
//! emulator into s3s-fs (both in this process, on loopback).
//!
//! `cargo bench --bench archive_throughput` — prints, per case, the bytes archived, wall
//! time, throughput, CPU seconds per GiB and the archiver's peak RSS. Two questions:
//! - clips in flight: 1, 4, 8 and 16 clips of about 96 MB (4 MB fragments, so the size cap
//!   binds) at once; the peak should grow by about one part buffer per clip, not by the clip;
//! - range length: 1 hour and 7 days of a small stream with 4 clips in flight; the peak
//!   should not grow with the range (memory is bounded per clip, not per range).
//! - `export`: 10 minutes, 1 hour and 2 hours of an archived stream into one MP4; the peak
//!   should stay flat (the media is streamed; only the sample tables, a few bytes per
//!   frame, grow with the range). `cargo bench --bench archive_throughput export`.
//!
//! Quotas are off here (this measures the archiver, not KVS's pacing); benches/side-by-side
//! runs under them.

use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::time::{Duration, Instant};

#[path = "../tests/support/local_s3.rs"]
mod local_s3;

/// Kernel clock ticks per second, the unit of utime and stime in /proc/PID/stat.
const CLK_TCK: f64 = 100.0;

struct Case {
    label: &'static str,
    range: chrono::Duration,
    fragment_ms: u32,
    fragment_size: u64,
    concurrency: usize,
}

fn main() {
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let cases = [
        Case {
            label: "1 clip in flight, 96 MB clips",
            range: chrono::Duration::minutes(20),
            fragment_ms: 2000,
            fragment_size: 4_000_000,
            concurrency: 1,
        },
        Case {
            label: "4 clips in flight, 96 MB clips",
            range: chrono::Duration::minutes(20),
            fragment_ms: 2000,
            fragment_size: 4_000_000,
            concurrency: 4,
        },
        // The daemon's default (`daemon.max_clips_in_flight`).
        Case {
            label: "8 clips in flight, 96 MB clips",
            range: chrono::Duration::minutes(20),
            fragment_ms: 2000,
            fragment_size: 4_000_000,
            concurrency: 8,
        },
        Case {
            label: "16 clips in flight, 96 MB clips",
            range: chrono::Duration::minutes(20),
            fragment_ms: 2000,
            fragment_size: 4_000_000,
            concurrency: 16,
        },
        Case {
            label: "1 hour range, 4 in flight",
            range: chrono::Duration::hours(1),
            fragment_ms: 10_000,
            fragment_size: 50_000,
            concurrency: 4,
        },
        Case {
            label: "7 day range, 4 in flight",
            range: chrono::Duration::days(7),
            fragment_ms: 10_000,
            fragment_size: 50_000,
            concurrency: 4,
        },
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for case in cases
            .iter()
            .filter(|c| only.as_deref().is_none_or(|o| c.label.contains(o)))
        {
            run(case).await;
        }
        if only.as_deref().is_none_or(|o| "export".contains(o)) {
            export().await;
        }
    });
}

/// (peak RSS in KiB, CPU seconds) of a running process, from /proc.
fn sample(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((hwm, ticks / CLK_TCK))
}

/// A world for one case: the emulator, s3s-fs with a bucket, and a configuration.
struct Bench {
    emu: Emulator,
    _server: local_s3::S3Server,
    work: tempfile::TempDir,
    config: std::path::PathBuf,
}

/// Runs the archiver with `args` to the end: (wall seconds, peak RSS KiB, CPU seconds).
async fn measured(config: &std::path::Path, args: &[&str]) -> (f64, u64, f64) {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"))
        .args(["--config"])
        .arg(config)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("KVS_ARCHIVER_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("archiver starts");
    let pid = child.id().expect("pid");
    let (mut peak_kib, mut cpu) = (0, 0.0);
    let status = loop {
        if let Some((hwm, secs)) = sample(pid) {
            peak_kib = peak_kib.max(hwm);
            cpu = secs;
        }
        tokio::select! {
            status = child.wait() => break status.expect("status"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    assert!(status.success(), "kvs-archiver {args:?} failed");
    (started.elapsed().as_secs_f64(), peak_kib, cpu)
}

/// Exports of 10 minutes, 1 hour and 2 hours of a 2-hour archive (2 s fragments of
/// 250 kB, 1 Mbit/s): wall time, throughput and peak RSS of each.
async fn export() {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let start = end - chrono::Duration::hours(2);
    let bench = bench_world(start, end, 2000, 250_000, 4).await;
    let (a, b) = (start.to_rfc3339(), end.to_rfc3339());
    measured(
        &bench.config,
        &["backfill", "--stream", "bench", "--start", &a, "--end", &b],
    )
    .await;
    for minutes in [10, 60, 120] {
        let to = (start + chrono::Duration::minutes(minutes)).to_rfc3339();
        let output = bench.work.path().join(format!("export-{minutes}.mp4"));
        let output_text = output.display().to_string();
        let (secs, peak_kib, cpu) = measured(
            &bench.config,
            &[
                "export",
                "--stream",
                "bench",
                "--start",
                &a,
                "--end",
                &to,
                "-o",
                &output_text,
            ],
        )
        .await;
        let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
        println!(
            "archive_throughput: export of {minutes:>3} min: {:>7.1} MiB in {secs:>5.1} s = {:>4.0} MiB/s, CPU {cpu:.2} s, peak RSS {:.1} MiB",
            bytes as f64 / (1u64 << 20) as f64,
            bytes as f64 / (1u64 << 20) as f64 / secs,
            peak_kib as f64 / 1024.0
        );
        let _ = std::fs::remove_file(&output);
    }
    drop(bench.emu);
}

async fn bench_world(
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
    fragment_ms: u32,
    fragment_size: u64,
    concurrency: usize,
) -> Bench {
    let mut spec = StreamSpec::historical("bench", start, end);
    spec.fragment_durations_ms = vec![fragment_ms];
    spec.fragment_size = fragment_size;
    spec.data_retention_hours = 24 * 30;
    spec.faults.throttling = false;
    let emu = Emulator::start(EmulatorConfig {
        streams: vec![spec],
        ..Default::default()
    })
    .await
    .expect("emulator");
    let server = local_s3::start_s3s().await;
    let s3_url = server.url.clone();
    let s3 = local_s3::s3_client(&s3_url);
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
            "[aws]\nkinesis_video_endpoint_url = \"{}\"\ns3_endpoint_url = \"{s3_url}\"\ns3_force_path_style = true\n\
             [ledger]\ndatabase_url = \"sqlite://{}/state.db\"\n[destination]\nbucket = \"bench\"\n\
             payload_signing = \"never\"\n\
             [archive]\nconcurrency = {}\nmedia_points_per_second = 500\nmetadata_points_per_second = 10000\n\
             [[streams]]\nname = \"bench\"\n",
            emu.base_url(),
            work.path().display(),
            concurrency
        ),
    )
    .expect("config");
    Bench {
        emu,
        _server: server,
        work,
        config,
    }
}

async fn run(case: &Case) {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let start = end - case.range;
    let bench = bench_world(
        start,
        end,
        case.fragment_ms,
        case.fragment_size,
        case.concurrency,
    )
    .await;
    let (a, b) = (start.to_rfc3339(), end.to_rfc3339());
    let (secs, peak_kib, cpu) = measured(
        &bench.config,
        &["backfill", "--stream", "bench", "--start", &a, "--end", &b],
    )
    .await;
    let bytes: u64 = bench
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .map(|r| r.bytes)
        .sum();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "archive_throughput: {:<32} {:>6.2} GiB in {secs:>6.1} s = {:>4.0} MiB/s, CPU {:.2} s/GiB, peak RSS {:.1} MiB",
        case.label,
        gib,
        bytes as f64 / (1u64 << 20) as f64 / secs,
        cpu / gib,
        peak_kib as f64 / 1024.0
    );
}

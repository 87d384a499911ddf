//! End-to-end archiving speed, CPU and memory: the release binary backfills an HD stream
//! from the emulator into s3s-fs (both in this process, on loopback).
//!
//! `cargo bench --bench archive_throughput` — prints, for two range lengths, the bytes
//! archived, wall time, throughput, CPU seconds per GiB and the archiver's peak RSS; the
//! peak should not grow with the range (memory is bounded per clip, not per range).

use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::time::{Duration, Instant};

#[path = "../tests/support/local_s3.rs"]
mod local_s3;

/// Kernel clock ticks per second, the unit of utime and stime in /proc/PID/stat.
const CLK_TCK: f64 = 100.0;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for minutes in [15, 60] {
            run(minutes).await;
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

async fn run(minutes: i64) {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let start = end - chrono::Duration::minutes(minutes);
    let mut spec = StreamSpec::historical("bench", start, end);
    spec.fragment_durations_ms = vec![4000];
    spec.fragment_size = 1_500_000;
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
             [state]\ndatabase_url = \"sqlite://{}/state.db\"\n[destination]\nbucket = \"bench\"\n\
             [[streams]]\nname = \"bench\"\n",
            emu.base_url(),
            work.path().display()
        ),
    )
    .expect("config");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"))
        .args(["--config"])
        .arg(&config)
        .args([
            "backfill",
            "--stream",
            "bench",
            "--start",
            &start.to_rfc3339(),
            "--end",
            &end.to_rfc3339(),
        ])
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
    let secs = started.elapsed().as_secs_f64();
    assert!(status.success(), "backfill failed");
    let bytes: u64 = emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .map(|r| r.bytes)
        .sum();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "archive_throughput: {minutes:>3} min of 1.5 MB/4 s fragments: {:.2} GiB in {secs:.1} s = {:.0} MiB/s, CPU {:.1} s/GiB, peak RSS {:.1} MiB",
        gib,
        bytes as f64 / (1u64 << 20) as f64 / secs,
        cpu / gib,
        peak_kib as f64 / 1024.0
    );
}

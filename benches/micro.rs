//! Micro-benchmarks of the two pieces of CPU work per fragment and per clip that are the
//! archiver's own: packing listed fragments into chunks, and reading a clip's MP4 header
//! before any byte is uploaded.
//!
//! `cargo bench --bench micro` (criterion; figures in target/criterion).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvs_archiver::domain::Fragment;
use kvs_archiver::plan::{self, ChunkLimits, Holdings, Packer};

const LIMITS: ChunkLimits = ChunkLimits {
    max_fragments: 200,
    max_bytes: 99_000_000,
    clip_duration_ms: 600_000,
};

/// A day of 1 s fragments of 100 kB, numbered as KVS numbers them (47 digits).
fn day_of_fragments() -> Vec<Fragment> {
    let start = 1_764_000_000_000i64;
    (0..86_400i64)
        .map(|i| Fragment {
            number: format!("9134385233318{:034}", 1_000_000 + i * 37),
            start_ms: start + i * 1000,
            server_ms: start + i * 1000 + 200,
            duration_ms: 1000,
            size_bytes: 100_000,
        })
        .collect()
}

/// One window planned around `holdings`, as a planning pass does.
fn plan_all_of(
    fragments: &[Fragment],
    holdings: &Holdings,
) -> Vec<kvs_archiver::domain::ChunkPlan> {
    let mut packer = Packer::new(LIMITS);
    let mut out = Vec::new();
    plan::plan_window(&mut packer, fragments, holdings, &mut out);
    packer.finish(&mut out);
    out
}

fn planner(c: &mut Criterion) {
    let fragments = day_of_fragments();
    let mut group = c.benchmark_group("planner");
    group.throughput(Throughput::Elements(fragments.len() as u64));
    group.bench_function(
        "sort_and_dedup a day of 1 s fragments (shuffled pages)",
        |b| {
            b.iter_batched(
                || {
                    // Pages arrive in any order and may repeat: reverse, and list a tenth twice.
                    let mut listed: Vec<Fragment> = fragments.iter().rev().cloned().collect();
                    listed.extend(fragments.iter().step_by(10).cloned());
                    listed
                },
                |mut listed| {
                    plan::sort_and_dedup(&mut listed);
                    listed
                },
                BatchSize::LargeInput,
            )
        },
    );
    group.bench_function("plan_window over a day, nothing held", |b| {
        let holdings = Holdings::default();
        b.iter(|| plan_all_of(black_box(&fragments), &holdings))
    });
    group.bench_function("plan_window over a day, half of it held", |b| {
        let mut holdings = Holdings::default();
        for f in fragments.iter().take(fragments.len() / 2) {
            holdings.held.insert(f.number.clone());
        }
        b.iter(|| plan_all_of(black_box(&fragments), &holdings))
    });
    group.finish();
}

/// The header of a 200-fragment clip (2 s fragments) as the emulator serves it.
fn clip_header() -> Vec<u8> {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let mut spec =
        kvs_emulator::StreamSpec::historical("cam", end - chrono::Duration::seconds(400), end);
    spec.fragment_durations_ms = vec![2000];
    spec.fragment_size = 20_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bytes = runtime.block_on(async {
        let emu = kvs_emulator::Emulator::start(kvs_emulator::EmulatorConfig {
            streams: vec![spec],
            ..Default::default()
        })
        .await
        .expect("emulator");
        emu.clip_bytes("cam", 0, i64::MAX).concat()
    });
    bytes
}

fn mp4_header(c: &mut Criterion) {
    let clip = clip_header();
    let header = kvs_archiver::mp4::parse_header(&clip)
        .expect("a valid clip")
        .expect("a whole header");
    let mut group = c.benchmark_group("mp4");
    group.bench_function(
        format!(
            "parse_header of a {}-sample clip ({} ms)",
            header.video_samples, header.duration_ms
        ),
        |b| b.iter(|| kvs_archiver::mp4::parse_header(black_box(&clip))),
    );
    group.finish();
}

criterion_group!(benches, planner, mp4_header);
criterion_main!(benches);

//! The PostgreSQL ledger under several instances: chunks claimed per second with 1, 2
//! and 4 instances on one database, and the hot queries with a million chunk rows.
//!
//! `eval "$(.ci/postgres)"; cargo bench --bench ledger_claims` (reads
//! `KVS_TEST_POSTGRES_URL`, creates a fresh database). Prints figures; never fails on a
//! slow machine.

use kvs_archiver::domain::{ChunkKind, ChunkPlan, Fragment, TimestampSource};
use kvs_archiver::ledger::postgres::PgLedger;
use kvs_archiver::ledger::{Archived, Identity, Ledger, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/support/postgres.rs"]
mod postgres;

const SOURCE: TimestampSource = TimestampSource::Server;
const LEASE_MS: i64 = 60_000;
const T0: i64 = 1_795_564_800_000;
/// Chunks per claim round.
const CHUNKS: i64 = 4_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Some(server) = postgres::server_url() else {
            eprintln!("ledger_claims: set KVS_TEST_POSTGRES_URL (eval \"$(.ci/postgres)\")");
            return;
        };
        println!("claims: {CHUNKS} chunks of 10 fragments, each claimed then marked done");
        for instances in [1, 2, 4] {
            for shared in [false, true] {
                claims(&server, instances, shared).await;
            }
        }
        million(&server).await;
    });
}

fn fragment(stream: usize, i: i64) -> Fragment {
    Fragment {
        number: format!("{stream:02}{i:045}"),
        start_ms: T0 + i * 1000,
        server_ms: T0 + i * 1000,
        duration_ms: 1000,
        size_bytes: 50_000,
    }
}

async fn open(url: &str, instance: &str) -> Arc<dyn Ledger> {
    Arc::new(
        PgLedger::open(url, Identity::new(instance, Role::Daemon))
            .await
            .expect("ledger"),
    )
}

/// `instances` processes claim and finish every chunk: each its own streams (as stream
/// leases arrange), or all from one stream (`shared`, SKIP LOCKED contention).
async fn claims(server: &str, instances: usize, shared: bool) {
    let url = postgres::fresh_database_on(server).await;
    let setup = open(&url, "setup").await;
    let streams = if shared { 1 } else { instances };
    let per_stream = CHUNKS / streams as i64;
    for s in 0..streams {
        for c in 0..per_stream {
            let fragments: Vec<Fragment> = (c * 10..c * 10 + 10).map(|i| fragment(s, i)).collect();
            let plan = ChunkPlan::of(ChunkKind::Clip, fragments);
            setup
                .insert_planned(&format!("cam-{s}"), SOURCE, &plan, &format!("k/{s}/{c}"))
                .await
                .expect("insert");
        }
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..instances {
        let ledger = open(&url, &format!("bench-{i}")).await;
        let stream = format!("cam-{}", if shared { 0 } else { i });
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while let Some((_, lease)) = ledger
                .claim_next(&stream, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
                .await
                .expect("claim")
            {
                ledger
                    .mark_done(
                        &lease,
                        &Archived {
                            bytes: 1,
                            crc32c: "00000000".into(),
                        },
                    )
                    .await
                    .expect("done");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {instances} instance(s), {}: {total} chunks in {secs:.2} s = {:.0} claims/s (claim + done)",
        if shared { "one shared stream" } else { "a stream each" },
        total as f64 / secs
    );
}

async fn timed<T>(what: &str, runs: u32, mut f: impl AsyncFnMut() -> T) {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let started = Instant::now();
        f().await;
        best = best.min(started.elapsed());
    }
    println!(
        "  {what}: {:.2} ms (best of {runs})",
        best.as_secs_f64() * 1000.0
    );
}

/// A million chunk rows over 100 streams, one fragment row each; then the hot paths.
async fn million(server: &str) {
    let url = postgres::fresh_database_on(server).await;
    let pg = PgLedger::open(&url, Identity::new("million", Role::Daemon))
        .await
        .expect("ledger");
    let started = Instant::now();
    // Bulk load by SQL: 100 streams × 10,000 chunks of 20 s; 1 % still planned.
    sqlx::query(
        "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
             planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key,
             kind, state, archived_bytes, created_ms, updated_ms)
         SELECT 'cam-' || s, 'server', $1 + c * 20000, $1 + c * 20000 + 19000, 1, 1000, 20000,
             s || '-' || c, s || '-' || c, 'k/' || s || '/' || c, 'clip',
             CASE WHEN c >= 9900 THEN 'planned' ELSE 'done' END,
             CASE WHEN c >= 9900 THEN NULL ELSE 1000 END, 0, 0
         FROM generate_series(0, 99) AS s, generate_series(0, 9999) AS c",
    )
    .bind(T0)
    .execute(pg.pool())
    .await
    .expect("chunks loaded");
    sqlx::query(
        "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number, start_ms,
             server_ms, duration_ms, size_bytes, chunk_id)
         SELECT stream, timestamp_source, first_fragment, start_ms, start_ms, 20000, 1000, id
         FROM chunks",
    )
    .execute(pg.pool())
    .await
    .expect("fragments loaded");
    sqlx::query("ANALYZE")
        .execute(pg.pool())
        .await
        .expect("analyze");
    println!(
        "a million chunk rows (100 streams x 10,000; 1 % planned), loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ledger: &dyn Ledger = &pg;
    let hour = (T0 + 100_000_000, T0 + 103_600_000);
    timed("status (all 100 streams)", 3, async || {
        ledger.status().await.expect("status")
    })
    .await;
    timed("planning reads of one hour (holdings)", 5, async || {
        ledger
            .holdings("cam-42", SOURCE, hour.0, hour.1)
            .await
            .expect("holdings")
    })
    .await;
    timed("range summary of one stream's retention", 5, async || {
        ledger
            .range_summary("cam-42", SOURCE, T0, T0 + 200_000_000)
            .await
            .expect("summary")
    })
    .await;
    timed("claim of the next chunk (+ release)", 20, async || {
        let (_, lease) = ledger
            .claim_next("cam-42", SOURCE, T0, T0 + 200_000_000, T0, LEASE_MS, &[])
            .await
            .expect("claim")
            .expect("a planned chunk");
        ledger.release(&lease).await.expect("release");
    })
    .await;
    timed("insert of a planned chunk (10 fragments)", 20, async || {
        let base = 50_000_000 + fastrand::i64(0..1_000_000) * 20;
        let fragments: Vec<Fragment> = (base..base + 10).map(|i| fragment(99, i)).collect();
        ledger
            .insert_planned(
                "cam-new",
                SOURCE,
                &ChunkPlan::of(ChunkKind::Clip, fragments),
                "k/new",
            )
            .await
            .expect("insert")
    })
    .await;
    timed("abandoned-chunk scan (a pass's recovery)", 5, async || {
        ledger.abandoned(T0, &[]).await.expect("abandoned")
    })
    .await;
    for (name, plan) in pg
        .explain_hot_queries("cam-42", T0, T0 + 200_000_000)
        .await
        .expect("explain")
    {
        println!("EXPLAIN {name}:\n{plan}");
    }
}

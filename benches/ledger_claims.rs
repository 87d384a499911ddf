//! The ledger at scale. SQLite (the default): the hot queries with a million chunk rows,
//! and real daemon passes (`run --once`) with and without them. PostgreSQL, when
//! `KVS_TEST_POSTGRES_URL` is set: chunks claimed per second with 1, 2 and 4 instances on
//! one database, and the same million rows.
//!
//! `cargo bench --bench ledger_claims`, or with PostgreSQL
//! `eval "$(.ci/postgres)"; cargo bench --bench ledger_claims` (creates fresh databases).
//! Prints figures; never fails on a slow machine.

use kvs_archiver::domain::{ChunkKind, ChunkPlan, Fragment, TimestampSource};
use kvs_archiver::ledger::postgres::PgLedger;
use kvs_archiver::ledger::sqlite::SqliteLedger;
use kvs_archiver::ledger::{Archived, Identity, Ledger, Role};
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/support/local_s3.rs"]
mod local_s3;
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
        million_sqlite().await;
        let Some(server) = postgres::server_url() else {
            eprintln!(
                "ledger_claims: PostgreSQL skipped; set KVS_TEST_POSTGRES_URL (eval \"$(.ci/postgres)\")"
            );
            return;
        };
        println!("claims: {CHUNKS} chunks of 10 fragments, each claimed then marked done");
        for instances in [1, 2, 4] {
            for shared in [false, true] {
                claims(&server, instances, shared).await;
            }
        }
        million_postgres(&server).await;
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

/// 100 streams × 10,000 chunks of 20 s (1 % still planned) and one fragment row each, as
/// SQL that both SQLite and PostgreSQL run.
fn million_rows_sql() -> [String; 2] {
    let chunks = format!(
        "WITH RECURSIVE s(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM s WHERE x < 99),
             c(y) AS (SELECT 0 UNION ALL SELECT y + 1 FROM c WHERE y < 9999)
         INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
             planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key,
             kind, state, archived_bytes, created_ms, updated_ms)
         SELECT 'cam-' || CAST(x AS TEXT), 'server', {T0} + y * 20000, {T0} + y * 20000 + 19000,
             1, 1000, 20000, CAST(x AS TEXT) || '-' || CAST(y AS TEXT),
             CAST(x AS TEXT) || '-' || CAST(y AS TEXT),
             'k/' || CAST(x AS TEXT) || '/' || CAST(y AS TEXT), 'clip',
             CASE WHEN y >= 9900 THEN 'planned' ELSE 'done' END,
             CASE WHEN y >= 9900 THEN NULL ELSE 1000 END, 0, 0
         FROM s, c"
    );
    let fragments = "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number,
             start_ms, server_ms, duration_ms, size_bytes, chunk_id)
         SELECT stream, timestamp_source, first_fragment, start_ms, start_ms, 20000, 1000, id
         FROM chunks"
        .to_string();
    [chunks, fragments]
}

/// Loads [`million_rows_sql`] into either database and analyzes it.
async fn load_million<DB: sqlx::Database>(name: &str, pool: &sqlx::Pool<DB>)
where
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    let started = Instant::now();
    for sql in million_rows_sql()
        .iter()
        .map(String::as_str)
        .chain(["ANALYZE"])
    {
        sqlx::query(sql).execute(pool).await.expect("rows loaded");
    }
    println!(
        "{name}: a million chunk rows (100 streams x 10,000; 1 % planned), loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A million chunk rows in the default SQLite ledger: the hot paths, then real daemon
/// passes (the release binary, `run --once`) beside an empty ledger's.
async fn million_sqlite() {
    let work = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/state.db", work.path().display());
    let sqlite = SqliteLedger::open(&url, Identity::new("million", Role::Daemon))
        .await
        .expect("ledger");
    load_million("SQLite", sqlite.pool()).await;
    hot_paths(&sqlite).await;
    sqlite.close().await;
    page_of_ten_thousand_objects(work.path()).await;
    let empty = tempfile::tempdir().expect("tempdir");
    for (ledger, dir) in [
        ("an empty ledger", empty.path()),
        ("a million rows", work.path()),
    ] {
        daemon_passes(ledger, dir).await;
    }
}

/// `serve`'s page of one stream with its 10,000 chunks in view (9,900 objects, 100
/// planned), beside 99 other such streams: the binary of the bench's profile, timed from
/// request to the last byte, as a browser waits for it. Explicit views (the default view
/// depends on today's date; it reads the same chunks once).
async fn page_of_ten_thousand_objects(dir: &std::path::Path) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[ledger]\ndatabase_url = \"sqlite://{0}/state.db\"\n\
             [destination]\ndirectory = \"{0}/archive\"\n[[streams]]\nname = \"cam-42\"\n",
            dir.display()
        ),
    )
    .expect("config");
    std::fs::create_dir_all(dir.join("archive")).expect("archive directory");
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"))
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("KVS_ARCHIVER_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let get = async |path: &str| -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("request");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("response");
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&response[..response.len().min(300)])
        );
        response
    };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = format!("/streams/cam-42?from={T0}&to={}", T0 + 10_000 * 20_000);
    let page = get(&all).await;
    println!(
        "serve: the page of a stream with 10,000 chunks in view: {} KiB of HTML and SVG, {} rectangles",
        page.len() / 1024,
        String::from_utf8_lossy(&page).matches("<rect").count()
    );
    timed("  all 10,000 in view (2.3 days)", 5, async || {
        get(&all).await
    })
    .await;
    let hour = format!(
        "/streams/cam-42?from={}&to={}",
        T0 + 100_000_000,
        T0 + 103_600_000
    );
    timed(
        "  one hour in view (180 objects, fragment detail)",
        5,
        async || get(&hour).await,
    )
    .await;
    let _ = server.kill().await;
}

/// `run --once` twice for a stream of 6 hours of 2 s fragments: the first pass plans and
/// archives it, the second finds nothing new (an hourly daemon's steady state). Wall time
/// of the whole process, start-up included.
async fn daemon_passes(ledger: &str, dir: &std::path::Path) {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let mut spec = StreamSpec::historical("cam-live", end - chrono::Duration::hours(6), end);
    spec.fragment_durations_ms = vec![2000];
    spec.fragment_size = 20_000;
    spec.data_retention_hours = 24;
    spec.faults.throttling = false;
    let emu = Emulator::start(EmulatorConfig {
        streams: vec![spec],
        ..Default::default()
    })
    .await
    .expect("emulator");
    let s3 = local_s3::start_s3s().await;
    local_s3::s3_client(&s3.url)
        .create_bucket()
        .bucket("bench")
        .send()
        .await
        .expect("bucket");
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[aws]\nkinesis_video_endpoint_url = \"{}\"\ns3_endpoint_url = \"{}\"\ns3_force_path_style = true\n\
             [ledger]\ndatabase_url = \"sqlite://{}/state.db\"\n[destination]\nbucket = \"bench\"\n\
             [archive]\nmedia_points_per_second = 500\nmetadata_points_per_second = 10000\n\
             [[streams]]\nname = \"cam-live\"\n",
            emu.base_url(),
            s3.url,
            dir.display(),
        ),
    )
    .expect("config");
    for pass in [
        "first pass (plans and archives 6 h)",
        "next pass (nothing new)",
    ] {
        let requests_before = emu.requests().len();
        let started = Instant::now();
        let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"))
            .arg("--config")
            .arg(&config)
            .args(["run", "--once"])
            .env("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("KVS_ARCHIVER_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("archiver runs");
        assert!(status.success(), "run --once failed");
        let elapsed = started.elapsed();
        let requests = &emu.requests()[requests_before..];
        let count = |op: &str| requests.iter().filter(|r| r.op == op).count();
        println!(
            "  daemon pass, {ledger}, {pass}: {:.0} ms (process start to exit); \
             {} ListFragments, {} GetClip",
            elapsed.as_secs_f64() * 1000.0,
            count("ListFragments"),
            count("GetClip"),
        );
    }
}

/// A million chunk rows in PostgreSQL: the hot paths and their query plans.
async fn million_postgres(server: &str) {
    let url = postgres::fresh_database_on(server).await;
    let pg = PgLedger::open(&url, Identity::new("million", Role::Daemon))
        .await
        .expect("ledger");
    load_million("PostgreSQL", pg.pool()).await;
    hot_paths(&pg).await;
    for (name, plan) in pg
        .explain_hot_queries("cam-42", T0, T0 + 200_000_000)
        .await
        .expect("explain")
    {
        println!("EXPLAIN {name}:\n{plan}");
    }
}

/// The ledger's hot paths with a million rows, best of several runs each.
async fn hot_paths(ledger: &dyn Ledger) {
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
}

//! Several daemons on one PostgreSQL ledger: sharing streams, a SIGKILL, an outage of
//! the ledger.

use crate::support::checks::aborts_of_live_uploads;
use crate::support::postgres;
use crate::support::process::{count_env, signal, text};
use crate::support::world::{rfc3339, World};
use chrono::Utc;
use kvs_emulator::{scan_markers, StreamSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Starts `kvs-archiver run` as instance `id` with its own log file.
fn spawn_daemon(world: &World, id: &str, env: &[(&str, &str)]) -> (tokio::process::Child, PathBuf) {
    let log_path = world.work.path().join(format!("daemon-{id}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut command = world.command(&["run"]);
    command
        .env("KVS_ARCHIVER_LEDGER__INSTANCE_ID", id)
        .stdout(std::process::Stdio::null())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    (command.spawn().expect("daemon starts"), log_path)
}

/// The last warnings and errors of a daemon's log, and its last lines.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let troubles: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .copied()
        .collect();
    let last = |v: &[&str], n: usize| v[v.len().saturating_sub(n)..].join("\n");
    format!("{}\n...\n{}", last(&troubles, 25), last(&lines, 8))
}

/// Every fragment of `streams` that started before `cutoff` is in exactly one object,
/// and nothing is stored twice; else what is wrong.
fn fleet_exactly_once(
    world: &World,
    objects: &BTreeMap<String, Vec<u8>>,
    streams: &[String],
    cutoff: i64,
) -> Result<(), String> {
    for name in streams {
        let stored: Vec<String> = objects
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("kvs/{name}/")))
            .flat_map(|(_, b)| scan_markers(b))
            .collect();
        let unique: std::collections::HashSet<&String> = stored.iter().collect();
        if unique.len() != stored.len() {
            return Err(format!("{name}: a fragment stored twice"));
        }
        for f in world
            .emu
            .fragments(name)
            .iter()
            .filter(|f| f.server_ms < cutoff)
        {
            if !unique.contains(&f.number) {
                return Err(format!(
                    "{name}: fragment {} ({}) not archived",
                    f.number,
                    rfc3339(f.server_ms)
                ));
            }
        }
    }
    Ok(())
}

/// Panics with `problem`, the ledger's status and the daemons' last log lines.
async fn fleet_failed(world: &World, logs: &[&std::path::Path], problem: &str) -> ! {
    let status = world.run(&["status"]).await;
    let mut report = format!("{problem}\nstatus:\n{}", text(&status));
    let stream = problem.split(':').next().unwrap_or_default();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let about: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("\"{stream}\"")) || l.contains(&format!("/{stream}/")))
            .collect();
        report.push_str(&format!(
            "\n--- {}:\n{}\n--- its lines about {stream}:\n{}",
            log.display(),
            tail(log),
            about[about.len().saturating_sub(40)..].join("\n")
        ));
    }
    panic!("{report}");
}

async fn fleet_world(streams: usize, ledger_url: &str, lease: &str) -> (World, Vec<String>) {
    let mut specs = Vec::new();
    for i in 0..streams {
        let mut spec = StreamSpec::live(&format!("cam-{i:02}"));
        spec.backlog = Duration::from_secs(120);
        spec.fragment_durations_ms = vec![[1000, 2000][i % 2]];
        spec.fragment_size = 5_000;
        specs.push(spec);
    }
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let sections = "[daemon]\nschedule = \"*/5 * * * * *\"\nlag = \"5s\"\nmax_clips_in_flight = 4\nshutdown_grace = \"5s\"\n";
    let mut world = World::with_sections(
        specs,
        "clip_duration = \"20s\"\nconcurrency = 2",
        sections,
        &|_| String::new(),
    )
    .await;
    let text = std::fs::read_to_string(&world.config).expect("config");
    let text = text
        .replace(&world.ledger_url, ledger_url)
        .replace("lease = \"10s\"", &format!("lease = \"{lease}\""));
    std::fs::write(&world.config, text).expect("config");
    world.ledger_url = ledger_url.to_string();
    (world, names)
}

async fn pg_rows(url: &str, sql: &str) -> Vec<(String, i64)> {
    use sqlx::{Connection, Row};
    let mut db = sqlx::PgConnection::connect(url).await.expect("ledger");
    sqlx::query(sql)
        .fetch_all(&mut db)
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect()
}

/// The chunks `instance` holds in flight, looked for every 20 ms until there are some or
/// `patience` runs out (then none).
async fn held_in_flight_by(url: &str, instance: &str, patience: Duration) -> Vec<(String, i64)> {
    use sqlx::{Connection, Row};
    let mut db = sqlx::PgConnection::connect(url).await.expect("ledger");
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let held: Vec<(String, i64)> = sqlx::query("SELECT object_key, generation FROM chunks WHERE owner LIKE $1 AND state IN ('fetching', 'uploading')")
            .bind(format!("{instance}@%"))
            .fetch_all(&mut db)
            .await
            .expect("query")
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect();
        if !held.is_empty() || tokio::time::Instant::now() >= deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three daemons, one PostgreSQL ledger, 30 live streams: the work is spread, every
/// fragment archived once; one daemon killed half-way loses its streams and chunks to
/// the other two within the lease, and no live upload is ever aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_three_daemons_share_thirty_streams_and_survive_a_sigkill() {
    let url = postgres::fresh_database().await;
    const LEASE_SECS: i64 = 15;
    let (world, names) = fleet_world(30, &url, &format!("{LEASE_SECS}s")).await;
    let run_secs = count_env("KVS_TEST_FLEET_SECS", 150);
    let mut daemons: Vec<(String, tokio::process::Child, PathBuf)> =
        ["fleet-a", "fleet-b", "fleet-c"]
            .iter()
            .map(|id| {
                let (child, log) = spawn_daemon(&world, id, &[]);
                (id.to_string(), child, log)
            })
            .collect();
    tokio::time::sleep(Duration::from_secs(run_secs / 2)).await;
    // Half-way: fleet-b dies without a word, at a moment it holds chunks in flight.
    // Its clips last a fraction of a second on a quiet machine, and on a loaded one it can
    // sit between passes for a while: look often, for as long as the rest of the run.
    let held_by_b = held_in_flight_by(&url, "fleet-b", Duration::from_secs(run_secs / 2)).await;
    signal(&daemons[1].1, "KILL");
    let _ = daemons[1].1.wait().await;
    let killed_at = Utc::now().timestamp_millis();
    assert!(
        !held_by_b.is_empty(),
        "fleet-b never held a chunk to die with: {}",
        tail(&daemons[1].2)
    );
    // What it still held once dead (it may have finished one between the look and the kill).
    let held_by_b = pg_rows(&url, "SELECT object_key, generation FROM chunks WHERE owner LIKE 'fleet-b@%' AND state IN ('fetching', 'uploading')").await;
    eprintln!("fleet-b killed holding {held_by_b:?}");
    // Within the lease (plus the next firing, every 5 s), nothing is held by it any more.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS as u64 + 10)).await;
    let chunks_of_b = pg_rows(&url, "SELECT owner, COUNT(*) FROM chunks WHERE owner LIKE 'fleet-b@%' AND state IN ('fetching', 'uploading') GROUP BY owner").await;
    let streams_of_b = pg_rows(&url, &format!("SELECT owner, COUNT(*) FROM stream_leases WHERE owner LIKE 'fleet-b@%' AND lease_until_ms >= {} GROUP BY owner", Utc::now().timestamp_millis())).await;
    assert!(
        chunks_of_b.is_empty(),
        "chunks still held by the dead daemon {} s after: {chunks_of_b:?}",
        (Utc::now().timestamp_millis() - killed_at) / 1000
    );
    assert!(
        streams_of_b.is_empty(),
        "streams still held by the dead daemon: {streams_of_b:?}"
    );
    tokio::time::sleep(Duration::from_secs(run_secs - run_secs / 2)).await;
    // What fleet-b held is retried by its streams' new owners; on a loaded machine (CI runs
    // two tests at once) a retry can still be backing off here: give it a minute more.
    let keys: Vec<String> = held_by_b.iter().map(|(key, _)| key.clone()).collect();
    wait_until_done(&url, &keys, Duration::from_secs(60)).await;
    let stop = Utc::now().timestamp_millis();
    for (id, child, log) in daemons.iter_mut().filter(|(id, ..)| id != "fleet-b") {
        signal(child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{id} exits within the grace"))
            .expect("status");
        assert!(status.success(), "{id} exit {status:?}: {}", tail(log));
    }

    let objects = world.objects().await;
    // Windows that closed before the last passes (lag 5 s, passes every 5 s, 20 s
    // clips), with a firing to spare for a stream whose pass was skipped once.
    let cutoff = (stop - 20_000 - 5_000).div_euclid(20_000) * 20_000;
    if let Err(problem) = fleet_exactly_once(&world, &objects, &names, cutoff) {
        let logs: Vec<&std::path::Path> = daemons.iter().map(|(_, _, l)| l.as_path()).collect();
        fleet_failed(&world, &logs, &problem).await;
    }

    let status = world.run(&["status", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let mut per_instance: BTreeMap<String, u64> = BTreeMap::new();
    for stream in json["streams"].as_array().expect("streams") {
        for (instance, n) in stream["archived_by_instance"]
            .as_object()
            .expect("by instance")
        {
            *per_instance.entry(instance.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    println!("chunks archived per instance: {per_instance:?}");
    for id in ["fleet-a", "fleet-b", "fleet-c"] {
        assert!(
            per_instance.get(id).copied().unwrap_or(0) > 0,
            "{id} archived nothing: {per_instance:?}"
        );
    }
    let total: u64 = per_instance.values().sum();
    for id in ["fleet-a", "fleet-c"] {
        assert!(
            per_instance[id] * 6 > total,
            "{id} did under a sixth of the work: {per_instance:?}"
        );
    }
    let aborted_live = aborts_of_live_uploads(&world.s3.as_ref().expect("s3s").requests());
    assert!(
        aborted_live.is_empty(),
        "live uploads aborted: {aborted_live:?}"
    );
    assert_finished_by_others(&url, &keys, "fleet-b").await;
}

/// Polls until every chunk of `keys` is done, for at most `patience`.
async fn wait_until_done(url: &str, keys: &[String], patience: Duration) {
    let done = format!(
        "SELECT 'done', COUNT(*) FROM chunks WHERE state = 'done' AND object_key IN ('{}')",
        keys.join("', '")
    );
    let deadline = tokio::time::Instant::now() + patience;
    while tokio::time::Instant::now() < deadline {
        let rows = pg_rows(url, &done).await;
        if rows.first().is_some_and(|(_, n)| *n as usize == keys.len()) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The chunks a killed `dead` instance held are done, each archived by another instance;
/// else panics with their rows (state, owner, attempts, last error).
async fn assert_finished_by_others(url: &str, keys: &[String], dead: &str) {
    let within = keys.join("', '");
    let finished = pg_rows(url, &format!(
        "SELECT split_part(archived_by, '@', 1), COUNT(*) FROM chunks WHERE state = 'done' AND object_key IN ('{within}') GROUP BY 1"
    ))
    .await;
    if finished.iter().all(|(by, _)| by != dead)
        && finished.iter().map(|(_, n)| n).sum::<i64>() as usize == keys.len()
    {
        return;
    }
    let rows = pg_rows(url, &format!(
        "SELECT concat_ws(' ', object_key, state, owner, 'attempts', attempts, error_kind, last_error), 0::bigint FROM chunks WHERE object_key IN ('{within}')"
    ))
    .await;
    panic!("{dead}'s chunks {keys:?} were finished by {finished:?}; their rows now: {rows:#?}");
}

/// The shared ledger stops for a minute under load: the daemons report it, keep
/// running, and resume by themselves; nothing is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_postgresql_outage_is_waited_out_without_loss_or_doubles() {
    let (Ok(server), Ok(cluster)) = (
        std::env::var("KVS_TEST_PG_OUTAGE_URL"),
        std::env::var("KVS_TEST_PG_OUTAGE_CLUSTER"),
    ) else {
        panic!(
            "{} (KVS_TEST_PG_OUTAGE_URL/CLUSTER, a cluster to stop, are not set)",
            postgres::NEEDED
        );
    };
    let outage_secs = count_env("KVS_TEST_PG_OUTAGE_SECS", 60);
    let url = postgres::fresh_database_on(&server).await;
    let (world, names) = fleet_world(6, &url, "10s").await;
    let mut daemons: Vec<(String, tokio::process::Child, PathBuf)> = ["pg-a", "pg-b"]
        .iter()
        .map(|id| {
            let (child, log) = spawn_daemon(&world, id, &[]);
            (id.to_string(), child, log)
        })
        .collect();
    let pg_ctl = |action: &str| {
        let mut args: Vec<&str> = cluster.split_whitespace().collect();
        args.push(action);
        args.extend(["-m", "fast"].iter().filter(|_| action == "stop"));
        let status = std::process::Command::new("pg_ctlcluster")
            .args(&args)
            .status()
            .expect("pg_ctlcluster runs");
        assert!(status.success(), "pg_ctlcluster {args:?}");
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    pg_ctl("stop");
    tokio::time::sleep(Duration::from_secs(outage_secs)).await;
    pg_ctl("start");
    let back = Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stop = Utc::now().timestamp_millis();
    for (id, child, log) in &mut daemons {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{id} exited during the outage: {}",
            tail(log)
        );
        signal(child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{id} exits within the grace"))
            .expect("status");
        assert!(status.success(), "{id} exit {status:?}: {}", tail(log));
        let log_text = std::fs::read_to_string(&*log).unwrap_or_default();
        assert!(
            log_text.contains("heartbeat failed") && log_text.contains("ledger reachable again"),
            "{id} did not report the outage and the return: {}",
            tail(log)
        );
    }
    let objects = world.objects().await;
    let cutoff = (stop - 20_000 - 5_000).div_euclid(20_000) * 20_000;
    assert!(cutoff > back, "the run went on after the ledger came back");
    if let Err(problem) = fleet_exactly_once(&world, &objects, &names, cutoff) {
        let logs: Vec<&std::path::Path> = daemons.iter().map(|(_, _, l)| l.as_path()).collect();
        fleet_failed(&world, &logs, &problem).await;
    }
}

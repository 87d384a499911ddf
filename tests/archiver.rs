//! kvs-archiver as a user runs it: the binary, against the project's KVS emulator and a
//! real S3 server (s3s-fs in-process; moto when .ci/run starts it), on 127.0.0.1 only.

use chrono::{Duration as ChronoDuration, Utc};
use kvs_emulator::config::DEFAULT_SECRET_ACCESS_KEY;
use kvs_emulator::{scan_markers, Emulator, EmulatorConfig, GapSpec, StreamSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

#[path = "support/command.rs"]
mod command;
#[path = "support/local_s3.rs"]
mod local_s3;
#[path = "support/postgres.rs"]
mod postgres;

use local_s3::{s3_client, start_s3s, S3Server};

const BUCKET: &str = "archive";

/// One test's world: emulator, S3 server, a work directory with config and ledger.
struct World {
    emu: Emulator,
    s3: Option<S3Server>,
    s3_url: String,
    bucket: String,
    work: tempfile::TempDir,
    config: PathBuf,
    /// The ledger's `state.database_url`: SQLite in the work directory, or a fresh
    /// PostgreSQL database when KVS_TEST_LEDGER=postgres.
    ledger_url: String,
}

/// Whether this run tests the PostgreSQL ledger (`KVS_TEST_LEDGER=postgres`).
fn on_postgres() -> bool {
    std::env::var("KVS_TEST_LEDGER").is_ok_and(|v| v == "postgres")
}

/// A new, empty ledger of the kind under test.
async fn new_ledger_url(dir: &std::path::Path, name: &str) -> String {
    if on_postgres() {
        let server = std::env::var("KVS_TEST_POSTGRES_URL").expect(
            "KVS_TEST_LEDGER=postgres needs KVS_TEST_POSTGRES_URL (eval \"$(.ci/postgres)\")",
        );
        postgres::fresh_database_on(&server).await
    } else {
        format!("sqlite://{}/{name}", dir.display())
    }
}

impl World {
    async fn new(streams: Vec<StreamSpec>, archive_toml: &str) -> World {
        Self::with_sections(streams, archive_toml, "", &|_| String::new()).await
    }

    /// `sections`: more TOML tables after `[archive]`; `stream_toml`: keys per stream.
    async fn with_sections(
        streams: Vec<StreamSpec>,
        archive_toml: &str,
        sections: &str,
        stream_toml: &dyn Fn(&str) -> String,
    ) -> World {
        let s3 = start_s3s().await;
        let url = s3.url.clone();
        Self::build(
            streams,
            archive_toml,
            sections,
            stream_toml,
            Some(s3),
            url,
            BUCKET,
        )
        .await
    }

    async fn with_s3(
        streams: Vec<StreamSpec>,
        archive_toml: &str,
        s3: Option<S3Server>,
        s3_url: String,
        bucket: &str,
    ) -> World {
        Self::build(
            streams,
            archive_toml,
            "",
            &|_| String::new(),
            s3,
            s3_url,
            bucket,
        )
        .await
    }

    async fn build(
        streams: Vec<StreamSpec>,
        archive_toml: &str,
        sections: &str,
        stream_toml: &dyn Fn(&str) -> String,
        s3: Option<S3Server>,
        s3_url: String,
        bucket: &str,
    ) -> World {
        let configured: Vec<String> = streams.iter().map(|s| s.name.clone()).collect();
        let emu = Emulator::start(EmulatorConfig {
            streams,
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        let client = s3_client(&s3_url);
        client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("bucket created");
        let work = tempfile::tempdir().expect("tempdir");
        let config = work.path().join("kvs-archiver.toml");
        let ledger_url = new_ledger_url(work.path(), "state.db").await;
        // A short lease: a killed process's work moves within seconds on any ledger.
        let mut text = format!(
            "[aws]\nregion = \"us-east-1\"\nkinesis_video_endpoint_url = \"{}\"\ns3_endpoint_url = \"{}\"\ns3_force_path_style = true\n\
             [state]\ndatabase_url = \"{ledger_url}\"\nlease = \"10s\"\n\
             [destination]\nbucket = \"{bucket}\"\nprefix = \"kvs/\"\n\
             [archive]\nretry_base_delay = \"50ms\"\nretry_max_delay = \"2s\"\nmax_attempts = 10\n{archive_toml}\n{sections}\n",
            emu.base_url(),
            s3_url,
        );
        for name in configured {
            text.push_str(&format!(
                "[[streams]]\nname = \"{name}\"\n{}\n",
                stream_toml(&name)
            ));
        }
        std::fs::write(&config, text).expect("config written");
        World {
            emu,
            s3,
            s3_url,
            bucket: bucket.to_string(),
            work,
            config,
            ledger_url,
        }
    }

    /// Switches this world to a SQLite ledger (for tests of SQLite itself).
    fn use_sqlite(&mut self) {
        let sqlite = format!("sqlite://{}/state.db", self.work.path().display());
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&self.config, text.replace(&self.ledger_url, &sqlite)).expect("config");
        self.ledger_url = sqlite;
    }

    /// Runs one SQL statement with one text parameter on the ledger, whatever its kind.
    async fn ledger_sql(&self, sql: &str, param: &str) {
        use sqlx::Connection;
        if self.ledger_url.starts_with("sqlite:") {
            let mut db = sqlx::SqliteConnection::connect(&self.ledger_url)
                .await
                .expect("ledger opens");
            sqlx::query(sql)
                .bind(param)
                .execute(&mut db)
                .await
                .expect("statement");
        } else {
            let mut db = sqlx::PgConnection::connect(&self.ledger_url)
                .await
                .expect("ledger opens");
            sqlx::query(&sql.replace('?', "$1"))
                .bind(param)
                .execute(&mut db)
                .await
                .expect("statement");
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        command::kvs_archiver(&self.config, args)
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .await
            .expect("kvs-archiver runs")
    }

    async fn backfill(&self, stream: &str, start_ms: i64, end_ms: i64) -> Output {
        let (start, end) = (rfc3339(start_ms), rfc3339(end_ms));
        self.run(&[
            "backfill", "--stream", stream, "--start", &start, "--end", &end,
        ])
        .await
    }

    /// A backfill with more environment variables.
    async fn backfill_with(
        &self,
        stream: &str,
        start_ms: i64,
        end_ms: i64,
        envs: &[(&str, &str)],
    ) -> Output {
        let (start, end) = (rfc3339(start_ms), rfc3339(end_ms));
        let mut command = self.command(&[
            "backfill", "--stream", stream, "--start", &start, "--end", &end,
        ]);
        command.envs(envs.iter().copied());
        command.output().await.expect("kvs-archiver runs")
    }

    /// Every stored object under `kvs/`, with its bytes.
    async fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        self.objects_under("kvs/").await
    }

    async fn objects_under(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let client = s3_client(&self.s3_url);
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .expect("listed");
            for object in page.contents() {
                let key = object.key().expect("key").to_string();
                let body = client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .expect("get")
                    .body
                    .collect()
                    .await
                    .expect("body")
                    .into_bytes()
                    .to_vec();
                out.insert(key, body);
            }
            match page.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                None => return out,
            }
        }
    }

    /// Multipart uploads s3s-fs still holds open: its `.upload-ID.json` registrations.
    /// (Part files alone can outlive a CompleteMultipartUpload that the killed client
    /// cancelled half-way: s3s-fs drops the registration first, then consumes the parts.
    /// That is the server's own leftover, not an open upload, and AWS completes atomically.)
    fn open_multipart_uploads(&self) -> Vec<String> {
        let Some(s3) = &self.s3 else {
            return Vec::new();
        };
        std::fs::read_dir(s3.root.path())
            .expect("s3s root")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
            .collect()
    }

    fn fragment_numbers(&self, stream: &str, start_ms: i64, end_ms: i64) -> Vec<String> {
        self.emu
            .fragments(stream)
            .into_iter()
            .filter(|f| f.server_ms >= start_ms && f.server_ms <= end_ms)
            .map(|f| f.number)
            .collect()
    }
}

fn rfc3339(ms: i64) -> String {
    kvs_archiver::domain::rfc3339(ms)
}

/// The command failed with `code` and said `message`.
fn assert_fails_with(output: &Output, code: i32, message: &str) {
    assert_eq!(output.status.code(), Some(code), "{}", text(output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(message),
        "expected {message:?}: {}",
        text(output)
    );
}

/// The per-stream part of `status --json`.
fn streams_json(status: &Output) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("status json: {e}: {}", text(status)));
    json["streams"].clone()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every expected fragment appears in exactly one stored object, and nothing else does.
fn assert_exactly_once(objects: &BTreeMap<String, Vec<u8>>, expected: &[String]) {
    let mut seen: HashMap<String, Vec<&str>> = HashMap::new();
    for (key, bytes) in objects {
        for number in scan_markers(bytes) {
            seen.entry(number).or_default().push(key);
        }
    }
    let doubled: Vec<_> = seen
        .iter()
        .filter(|(_, keys)| keys.len() > 1)
        .take(5)
        .collect();
    assert!(doubled.is_empty(), "fragments stored twice: {doubled:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|n| !seen.contains_key(*n))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} fragments missing, e.g. {missing:?}",
        expected.iter().filter(|n| !seen.contains_key(*n)).count(),
        expected.len()
    );
    assert_eq!(
        seen.len(),
        expected.len(),
        "no fragment outside the range is stored"
    );
}

fn ffmpeg_available() -> bool {
    let found = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "ffmpeg not found: CI must install it (.ci/run does: apt-get install -y ffmpeg)"
        );
        eprintln!("ffmpeg not installed: playback checks skipped (apt-get install -y ffmpeg)");
    }
    found
}

/// Every object decodes without a single error.
fn assert_playable(objects: &BTreeMap<String, Vec<u8>>) {
    if !ffmpeg_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, bytes) in objects {
        let extension = key.rsplit('.').next().unwrap_or("mp4");
        let path = dir.path().join(format!("clip.{extension}"));
        std::fs::write(&path, bytes).expect("written");
        let out = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(&path)
            .args(["-f", "null", "-"])
            .output()
            .expect("ffmpeg runs");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{key} does not play cleanly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn no_clip_was_truncated(emu: &Emulator) {
    let truncated: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "GetClip" && r.status == 200 && r.truncated)
        .collect();
    assert!(truncated.is_empty(), "GetClip truncated: {truncated:?}");
}

fn historical(name: &str, start_ms: i64, end_ms: i64, duration_ms: u32, size: u64) -> StreamSpec {
    let start = chrono::DateTime::from_timestamp_millis(start_ms).expect("start");
    let end = chrono::DateTime::from_timestamp_millis(end_ms).expect("end");
    let mut spec = StreamSpec::historical(name, start, end);
    spec.fragment_durations_ms = vec![duration_ms];
    spec.fragment_size = size;
    spec
}

/// A range ending a few minutes ago, on a whole second.
fn recent(hours: f64) -> (i64, i64) {
    let end = (Utc::now() - ChronoDuration::minutes(5)).timestamp() * 1000;
    (end - (hours * 3_600_000.0) as i64, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hour_backfill_with_a_gap_archives_every_fragment_exactly_once() {
    let (start, end) = recent(6.0);
    let mut spec = historical("front-door", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(2 * 3600),
        length: Duration::from_secs(20 * 60),
    }];
    // One-hour objects, so the fragment cap (not the clock) cuts chunks.
    let world = World::new(vec![spec], "clip_duration = \"1h\"").await;
    let expected = world.fragment_numbers("front-door", start, end);
    assert_eq!(expected.len(), (6 * 3600 - 20 * 60) / 2);

    let out = world.backfill("front-door", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    no_clip_was_truncated(&world.emu);
    assert!(
        objects.len() >= expected.len() / 200,
        "the 200-fragment cap split the clips"
    );
    let clips: Vec<_> = world
        .emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .collect();
    assert!(
        clips.iter().all(|r| r.fragments <= 200),
        "chunks stay under the fragment cap"
    );
    assert_playable(&objects);

    // A second run finds everything archived and fetches nothing.
    world.emu.clear_requests();
    let again = world.backfill("front-door", start, end).await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        world.emu.requests().iter().all(|r| r.op != "GetClip"),
        "nothing re-fetched"
    );
    assert_eq!(world.objects().await.len(), objects.len());

    let status = world.run(&["status", "--json"]).await;
    assert!(status.status.success(), "{}", text(&status));
    let json = streams_json(&status);
    assert_eq!(json[0]["stream"], "front-door");
    assert_eq!(json[0]["archived_fragments"], expected.len() as u64);
    assert_eq!(json[0]["failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hd_backfill_is_cut_by_the_100_mb_cap_and_uploaded_in_parts() {
    let (start, end) = recent(0.25);
    let spec = historical("loading-dock", start, end, 4000, 1_500_000);
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("loading-dock", start, end);
    assert_eq!(expected.len(), 225);
    let out = world.backfill("loading-dock", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    no_clip_was_truncated(&world.emu);
    let biggest = objects.values().map(Vec::len).max().unwrap_or(0);
    assert!(
        biggest > 50_000_000 && biggest <= 100_000_000,
        "byte cap binds: biggest {biggest}"
    );
    assert!(world.open_multipart_uploads().is_empty());
    assert_playable(&objects);

    let client = s3_client(&world.s3_url);
    let key = objects.keys().next().expect("an object");
    let head = client
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .expect("head");
    let meta = head.metadata().expect("metadata");
    assert_eq!(
        meta.get("kvs-stream").map(String::as_str),
        Some("loading-dock")
    );
    assert_eq!(
        meta.get("kvs-timestamp-source").map(String::as_str),
        Some("server")
    );
    assert_eq!(meta.get("kvs-first-fragment"), Some(&expected[0]));
    assert!(meta.contains_key("kvs-fragment-count") && meta.contains_key("kvs-start"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_hour_range_is_fetched_in_clips_under_24_hours() {
    // A camera that records 10 minutes, is off for 29 hours, then records 10 minutes.
    let (start, end) = recent(30.0);
    let mut spec = historical("sparse", start, end, 10_000, 0);
    spec.data_retention_hours = 48;
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(600),
        length: Duration::from_secs(30 * 3600 - 1200),
    }];
    let world = World::new(vec![spec], "clip_duration = \"23h 59m\"").await;
    let expected = world.fragment_numbers("sparse", start, end);
    assert!(expected.len() >= 100, "{} fragments", expected.len());
    let out = world.backfill("sparse", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    for r in world.emu.requests().iter().filter(|r| r.op == "GetClip") {
        let span = r.end_ms.unwrap_or(0) - r.start_ms.unwrap_or(0);
        assert!(span < 24 * 3_600_000, "GetClip range of {span} ms");
        assert_eq!(r.status, 200, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_clips_are_split_and_fetched_again_never_recorded_as_done() {
    let (start, end) = recent(0.5);
    let spec = historical("cam", start, end, 2000, 20_000);
    let world = World::new(vec![spec], "").await;
    // The store-side cap is lower than the planner's: every full chunk comes back cut.
    world
        .emu
        .update_faults("cam", |f| f.max_clip_fragments = 70);
    let expected = world.fragment_numbers("cam", start, end);
    let out = world.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let cut = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.truncated)
        .count();
    assert!(cut > 0, "the emulator did truncate");
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_codec_change_inside_a_chunk_is_split_around_and_everything_is_archived() {
    let (start, end) = recent(0.25);
    let mut spec = historical("cam", start, end, 2000, 20_000);
    // The camera switches resolution twice; KVS refuses clips that span a switch.
    spec.codec_changes_at = vec![77, 301];
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("cam", start, end);
    let out = world.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let refused = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.error.as_deref() == Some("InvalidCodecPrivateDataException"))
        .count();
    assert!(
        refused >= 2,
        "GetClip refused the spanning clips ({refused})"
    );
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_server_errors_and_broken_bodies_are_retried_to_exactly_once() {
    let (start, end) = recent(1.0);
    let mut spec = historical("flaky", start, end, 2000, 20_000);
    spec.faults.quota_scale = 0.5;
    spec.faults.internal_failure_rate = 0.2;
    spec.faults.reset_rate = 0.2;
    // At least one for certain, whatever the random draws.
    spec.faults.resets_next = 1;
    spec.faults.reset_after_bytes = 500_000;
    let world = World::new(vec![spec], "concurrency = 4").await;
    let expected = world.fragment_numbers("flaky", start, end);
    let out = world.backfill("flaky", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let log = world.emu.requests();
    assert!(log.iter().any(|r| r.reset), "a body was cut off");
    assert!(log
        .iter()
        .any(|r| r.error.as_deref() == Some("InternalFailure")));
    assert_exactly_once(&world.objects().await, &expected);
    assert!(world.open_multipart_uploads().is_empty());
}

/// Kills the archiver at a crash point, then runs it again to completion.
///
/// One clip at a time: with several, a kill can fall between another clip's
/// CreateMultipartUpload and the ledger row that records it. Only a store that lists
/// multipart uploads (AWS, moto) lets the next start find such an upload; s3s-fs cannot,
/// so these tests pin the moments they name (see the moto test for the sweep).
async fn crash_and_resume(point: &str, spec: StreamSpec, start: i64, end: i64) {
    let name = spec.name.clone();
    let world = World::new(vec![spec], "concurrency = 1").await;
    let expected = world.fragment_numbers(&name, start, end);
    let (a, b) = (rfc3339(start), rfc3339(end));
    let crashed = world
        .command(&["backfill", "--stream", &name, "--start", &a, "--end", &b])
        .env(kvs_archiver::crashpoint::ENV, point)
        .output()
        .await
        .expect("runs");
    assert!(
        !crashed.status.success(),
        "the crash point {point} was reached: {}",
        text(&crashed)
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        crashed.status.signal(),
        Some(9),
        "killed by SIGKILL: {}",
        text(&crashed)
    );
    let resumed = world.backfill(&name, start, end).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert!(
        world.open_multipart_uploads().is_empty(),
        "left behind: {:?}",
        world.open_multipart_uploads()
    );
    assert_playable(&objects);
}

fn hd_stream(name: &str) -> (StreamSpec, i64, i64) {
    let (start, end) = recent(0.1);
    (historical(name, start, end, 4000, 1_500_000), start, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_planning_then_rerun_completes() {
    let (start, end) = recent(3.0);
    crash_and_resume(
        "planning",
        historical("cam", start, end, 2000, 20_000),
        start,
        end,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_getclip_body_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("mid-body", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_multipart_upload_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("mid-upload", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_upload_and_ledger_commit_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("after-upload", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_from_outside_at_a_random_moment_then_rerun_completes() {
    let (mut spec, start, end) = hd_stream("cam");
    spec.faults.bandwidth_bytes_per_sec = Some(20_000_000);
    let world = World::new(vec![spec], "concurrency = 1").await;
    let expected = world.fragment_numbers("cam", start, end);
    let (a, b) = (rfc3339(start), rfc3339(end));
    let mut child = world
        .command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawned");
    // Once a clip is streaming, kill -9.
    wait_for_a_streaming_clip(&world).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.start_kill().expect("killed");
    let _ = child.wait().await;
    let resumed = world.backfill("cam", start, end).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_exactly_once(&world.objects().await, &expected);
    assert!(world.open_multipart_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_the_ledger_intact() {
    let (start, end) = recent(0.2);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let ok = world.backfill("cam", start, end).await;
    assert!(ok.status.success(), "{}", text(&ok));
    let before = streams_json(&world.run(&["status", "--json"]).await);

    let reversed = world.backfill("cam", end, start).await;
    assert_fails_with(&reversed, 2, "is not after --start");

    let garbled = world
        .run(&[
            "backfill",
            "--stream",
            "cam",
            "--start",
            "yesterday",
            "--end",
            "now",
        ])
        .await;
    assert_fails_with(&garbled, 2, "not an RFC 3339 timestamp");

    let unknown = world.backfill("back-door", start, end).await;
    assert_fails_with(
        &unknown,
        2,
        "stream \"back-door\" is not in the configuration",
    );

    // Configured, but KVS has no such stream.
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        format!("{config}[[streams]]\nname = \"ghost\"\n"),
    )
    .expect("write");
    let ghost = world.backfill("ghost", start, end).await;
    assert_fails_with(&ghost, 1, "ResourceNotFoundException");

    let no_bucket = world
        .backfill_with(
            "cam",
            start,
            end,
            &[("KVS_ARCHIVER_DESTINATION__BUCKET", "no-such-bucket")],
        )
        .await;
    assert_fails_with(&no_bucket, 1, "bucket does not exist");
    let wrong_keys = world
        .backfill_with(
            "cam",
            start,
            end,
            &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
        )
        .await;
    // Keys KVS does not accept: the operator must fix them (exit 2), once retries (a
    // signature may fail from clock skew) are spent.
    assert_fails_with(&wrong_keys, 2, "the AWS credentials are not valid");
    // KVS unreachable: a closed port on loopback.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let dead = world
        .backfill_with(
            "cam",
            start,
            end,
            &[
                (
                    "KVS_ARCHIVER_AWS__KINESIS_VIDEO_ENDPOINT_URL",
                    closed.as_str(),
                ),
                ("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "2"),
            ],
        )
        .await;
    assert_fails_with(&dead, 1, &format!("cannot reach {closed}"));

    std::fs::write(
        &world.config,
        config.replace("max_attempts = 10", "max_attempts = \"ten\""),
    )
    .expect("write");
    let malformed = world.backfill("cam", start, end).await;
    assert_fails_with(&malformed, 2, "archive.max_attempts");
    std::fs::write(&world.config, &config).expect("restored");

    let after = streams_json(&world.run(&["status", "--json"]).await);
    assert_eq!(before, after, "the ledger is unchanged by failed commands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_lists_chunks_without_fetching_and_check_config_prints_the_config() {
    let (start, end) = recent(1.0);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let out = world
        .run(&[
            "plan",
            "--stream",
            "cam",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let chunks = plan["chunks"].as_array().expect("chunks");
    let fragments: u64 = chunks
        .iter()
        .map(|c| c["fragment_count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        fragments,
        world.fragment_numbers("cam", start, end).len() as u64
    );
    assert!(
        chunks.len() >= 12,
        "six 10-minute slots of 300 fragments, each split in two"
    );
    assert!(world.emu.requests().iter().all(|r| r.op != "GetClip"));
    assert!(world.objects().await.is_empty());

    // After a backfill of the first half, the plan shows only the second half.
    let half = start + (end - start) / 2;
    let first = world.backfill("cam", start, half).await;
    assert!(first.status.success(), "{}", text(&first));
    let out = world
        .run(&[
            "plan",
            "--stream",
            "cam",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
            "--json",
        ])
        .await;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let left: u64 = plan["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c["fragment_count"].as_u64().unwrap_or(0))
        .sum();
    let archived = world.fragment_numbers("cam", start, half).len() as u64;
    assert_eq!(
        left,
        fragments - archived,
        "archived fragments are not planned again"
    );
    assert_eq!(plan["already_covered"].as_u64(), Some(archived));

    let shown = world.run(&["check-config"]).await;
    assert!(shown.status.success(), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains("bucket = \"archive\"") && stdout.contains("max_fragments_per_clip = 200")
    );
    assert!(
        !stdout.contains(DEFAULT_SECRET_ACCESS_KEY),
        "no secrets printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_as_a_second_s3_implementation_gets_the_same_archive() {
    let Ok(url) = std::env::var("KVS_TEST_MOTO_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "KVS_TEST_MOTO_URL is not set: .ci/run must start moto_server"
        );
        eprintln!("moto not running: set KVS_TEST_MOTO_URL=http://127.0.0.1:PORT (pip install 'moto[server]')");
        return;
    };
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "moto must listen on loopback"
    );
    let (start, end) = recent(0.1);
    let bucket = format!("moto-{}", std::process::id());
    let world = World::with_s3(
        vec![
            historical("hd", start, end, 4000, 1_500_000),
            historical("sd", start, end, 2000, 20_000),
        ],
        "",
        None,
        url,
        &bucket,
    )
    .await;
    for stream in ["hd", "sd"] {
        let out = world.backfill(stream, start, end).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    // An upload a killed process created but never recorded: the start-up sweep finds it
    // by listing multipart uploads, which moto (like AWS) supports.
    let orphan = s3_client(&world.s3_url)
        .create_multipart_upload()
        .bucket(&bucket)
        .key("kvs/hd/orphan.mp4")
        .send()
        .await
        .expect("orphan upload created");
    assert!(orphan.upload_id().is_some());
    let swept = world.backfill("hd", start, end).await;
    assert!(swept.status.success(), "{}", text(&swept));
    let mut expected = world.fragment_numbers("hd", start, end);
    expected.extend(world.fragment_numbers("sd", start, end));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
    let uploads = s3_client(&world.s3_url)
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .expect("moto lists uploads");
    assert!(
        uploads.uploads().is_empty(),
        "no multipart upload left behind"
    );
    let _ = &world.work;
}

// ---------------------------------------------------------------------------------------
// The daemon (`run`, `run --once`).

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

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

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_keeps_twenty_live_streams_archived_exactly_once() {
    const SHORT: &str = "cam-13";
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
    assert!(metric(&metrics, "kvs_archiver_clips_archived_total", "cam-00").unwrap_or(0.0) > 0.0);
    assert_real_histograms(&metrics);

    let objects = world.objects().await;
    let clip_ms = 20_000;
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
    assert_aligned(&world, &objects, clip_ms).await;
    assert!(started < stop);

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

/// Returns once the emulator has started serving a clip (or after 10 s).
async fn wait_for_a_streaming_clip(world: &World) {
    for _ in 0..500 {
        if world
            .emu
            .requests()
            .iter()
            .any(|r| r.op == "GetClip" && r.status == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Fragment numbers of every object, with the keys holding each.
fn holders(objects: &BTreeMap<String, Vec<u8>>) -> HashMap<String, Vec<String>> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for (key, bytes) in objects {
        for number in scan_markers(bytes) {
            seen.entry(number).or_default().push(key.clone());
        }
    }
    seen
}

/// Every fragment whose producer timestamp lies between the first and the last archived
/// one is archived, exactly once: no hole where late media was skipped.
fn assert_contiguous_by_producer_time(
    world: &World,
    stream: &str,
    objects: &BTreeMap<String, Vec<u8>>,
) -> (i64, i64) {
    let seen = holders(objects);
    let doubled: Vec<_> = seen.iter().filter(|(_, k)| k.len() > 1).take(5).collect();
    assert!(doubled.is_empty(), "fragments stored twice: {doubled:?}");
    let mut all = world.emu.fragments(stream);
    all.sort_by_key(|f| (f.producer_ms, f.number.clone()));
    let archived: Vec<_> = all
        .iter()
        .filter(|f| seen.contains_key(&f.number))
        .collect();
    let (first, last) = (
        archived.first().expect("something archived").producer_ms,
        archived.last().expect("something archived").producer_ms,
    );
    let holes: Vec<_> = all
        .iter()
        .filter(|f| {
            f.producer_ms >= first && f.producer_ms <= last && !seen.contains_key(&f.number)
        })
        .map(|f| (rfc3339(f.producer_ms), f.number.clone()))
        .collect();
    assert!(
        holes.is_empty(),
        "{} fragments never archived, e.g. {:?}",
        holes.len(),
        &holes[..holes.len().min(5)]
    );
    (first, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_stream_delivered_late_is_archived_exactly_once_by_later_passes() {
    let mut spec = StreamSpec::live("late-cam");
    spec.backlog = Duration::from_secs(420);
    // Media reaches KVS two and a half minutes after the camera recorded it (batch
    // uploads), as in the report that opened this work.
    spec.producer_offset_ms = 150_000;
    let world = World::with_sections(
        vec![spec],
        "clip_duration = \"20s\"",
        "[daemon]\nlag = \"5s\"\n",
        &|_| "timestamp_source = \"producer\"\nretention_window = \"6m\"\nsettle = \"5m\"".into(),
    )
    .await;
    let first = world.run(&["run", "--once"]).await;
    assert!(first.status.success(), "{}", text(&first));
    let planned_through = (Utc::now().timestamp_millis() - 5_000).div_euclid(20_000) * 20_000 - 1;
    let (_, first_last) =
        assert_contiguous_by_producer_time(&world, "late-cam", &world.objects().await);
    assert!(
        first_last < planned_through - 4_000,
        "the first pass could not see the last {} s it planned",
        (planned_through - first_last) / 1000
    );
    tokio::time::sleep(Duration::from_secs(160)).await;
    let second = world.run(&["run", "--once"]).await;
    assert!(second.status.success(), "{}", text(&second));
    let objects = world.objects().await;
    let (_, last) = assert_contiguous_by_producer_time(&world, "late-cam", &objects);
    assert!(
        last > planned_through,
        "the second pass archived what reached KVS after the first planned it (through {}, archived through {})",
        rfc3339(planned_through),
        rfc3339(last)
    );
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(status[0]["failed"], 0, "{status}");
    assert_eq!(status[0]["pending"], 0, "{status}");
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_listed_after_its_window_was_archived_is_archived_alone() {
    let mut spec = StreamSpec::live("cell-cam");
    spec.backlog = Duration::from_secs(120);
    // Ingested about 10 s from now, but recorded 61 s before that: inside a window the
    // first pass archives.
    spec.late_fragments_at = vec![65];
    spec.late_by = Duration::from_secs(61);
    let world = World::with_sections(
        vec![spec],
        "clip_duration = \"20s\"",
        "[daemon]\nlag = \"5s\"\n",
        &|_| "timestamp_source = \"producer\"\nretention_window = \"3m\"".into(),
    )
    .await;
    let first = world.run(&["run", "--once"]).await;
    assert!(first.status.success(), "{}", text(&first));
    let before = world.objects().await;
    let late = loop {
        let late = world
            .emu
            .fragments("cell-cam")
            .into_iter()
            .find(|f| f.server_ms - f.producer_ms > 60_000);
        if let Some(late) = late {
            break late;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = world.run(&["run", "--once"]).await;
    assert!(second.status.success(), "{}", text(&second));
    let after = world.objects().await;
    for (key, bytes) in &before {
        assert_eq!(
            after.get(key),
            Some(bytes),
            "{key} was rewritten: its neighbours stay as they were"
        );
    }
    let seen = holders(&after);
    let keys = seen
        .get(&late.number)
        .expect("the late fragment is archived");
    assert_eq!(keys.len(), 1, "archived once: {keys:?}");
    assert!(
        keys[0].contains("_f"),
        "a late object of its own: {}",
        keys[0]
    );
    assert_eq!(
        scan_markers(&after[&keys[0]]),
        vec![late.number.clone()],
        "alone in its object"
    );
    assert_contiguous_by_producer_time(&world, "cell-cam", &after);
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(status[0]["late_fragments"], 1, "{status}");
    assert_playable(&after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_getclip_cannot_select_or_package_are_archived_as_matroska() {
    let (start, end) = recent(0.05);
    let mut spec = historical("dup-cam", start, end, 2000, 0);
    // Fragment 10 repeats fragment 9's producer timestamp (GetClip keeps only 9);
    // fragment 30 has no codec private data (GetClip refuses any range holding it), and
    // fragment 31 repeats its timestamp: a same-timestamp group GetClip refuses.
    spec.duplicate_producer_timestamp_at = vec![10, 31];
    spec.missing_codec_private_data_at = vec![30];
    let world = World::with_sections(vec![spec], "", "", &|_| {
        "timestamp_source = \"producer\"".into()
    })
    .await;
    let out = world.backfill("dup-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &world.fragment_numbers("dup-cam", start, end));
    let all = world.emu.fragments("dup-cam");
    let mkv: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.ends_with(".mkv"))
        .collect();
    let mut in_mkv: Vec<String> = mkv
        .iter()
        .flat_map(|(_, bytes)| scan_markers(bytes))
        .collect();
    in_mkv.sort();
    let mut wanted: Vec<String> = [10, 30, 31]
        .iter()
        .map(|i| all[*i].number.clone())
        .collect();
    wanted.sort();
    assert_eq!(in_mkv, wanted, "{:?}", objects.keys().collect::<Vec<_>>());
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(status[0]["mkv_fragments"], 3, "{status}");
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_deleted_corrupted_and_extra_objects_and_unarchived_fragments_and_repair_fixes_them(
) {
    let (start, end) = recent(0.25);
    let world = World::new(
        vec![historical("vcam", start, end, 2000, 20_000)],
        "clip_duration = \"2m\"",
    )
    .await;
    let out = world.backfill("vcam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    let keys: Vec<&String> = objects.keys().collect();
    assert!(keys.len() >= 6, "{keys:?}");
    let client = s3_client(&world.s3_url);
    // Deleted behind the archiver's back.
    client
        .delete_object()
        .bucket(BUCKET)
        .key(keys[0])
        .send()
        .await
        .expect("deleted");
    // Corrupted: same size, other bytes.
    let mut damaged = objects[keys[1]].clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    client
        .put_object()
        .bucket(BUCKET)
        .key(keys[1])
        .body(damaged.into())
        .send()
        .await
        .expect("overwritten");
    // An object the ledger does not know.
    let extra = "kvs/vcam/2026/01/01/stray.mp4";
    client
        .put_object()
        .bucket(BUCKET)
        .key(extra)
        .body(b"stray".to_vec().into())
        .send()
        .await
        .expect("put");
    // A chunk the ledger forgot, with its object: KVS still holds fragments no object has.
    let forgotten = keys[2].clone();
    let forgotten_fragments = scan_markers(&objects[&forgotten]).len();
    client
        .delete_object()
        .bucket(BUCKET)
        .key(&forgotten)
        .send()
        .await
        .expect("deleted");
    world
        .ledger_sql("DELETE FROM chunks WHERE object_key = ?", &forgotten)
        .await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let range = ["--stream", "vcam", "--start", &a, "--end", &b];
    let check = world
        .run(&[&["verify", "--json"][..], &range[..]].concat())
        .await;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("json report");
    let damaged: Vec<(String, String)> = report["damaged"]
        .as_array()
        .expect("damaged")
        .iter()
        .map(|d| {
            (
                d["object_key"].as_str().unwrap_or("").to_string(),
                d["problem"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(damaged.len(), 2, "{report}");
    assert!(
        damaged.iter().any(|(k, p)| k == keys[0] && p == "missing"),
        "{report}"
    );
    assert!(
        damaged
            .iter()
            .any(|(k, p)| k == keys[1] && p.starts_with("checksum")),
        "{report}"
    );
    assert_eq!(
        report["unarchived"].as_array().map(Vec::len),
        Some(forgotten_fragments),
        "{report}"
    );
    assert_eq!(
        report["extra_objects"],
        serde_json::json!([extra]),
        "{report}"
    );
    let human = world.run(&[&["verify"][..], &range[..]].concat()).await;
    let said = String::from_utf8_lossy(&human.stdout);
    assert!(
        said.contains("missing: ")
            && said.contains("extra object: ")
            && said.contains("not archived: "),
        "{said}"
    );

    let repair = world
        .run(&[&["verify", "--repair"][..], &range[..]].concat())
        .await;
    assert_eq!(
        repair.status.code(),
        Some(1),
        "the extra object is only reported: {}",
        text(&repair)
    );
    let mut after = world.objects().await;
    assert!(
        after.remove(extra).is_some(),
        "extra objects are never deleted"
    );
    assert_exactly_once(&after, &world.fragment_numbers("vcam", start, end));
    assert_playable(&after);
    client
        .delete_object()
        .bucket(BUCKET)
        .key(extra)
        .send()
        .await
        .expect("deleted");
    let clean = world.run(&[&["verify"][..], &range[..]].concat()).await;
    assert!(clean.status.success(), "{}", text(&clean));
}

fn upload_id_of(line: &str) -> Option<&str> {
    line.split(['?', '&'])
        .find_map(|p| p.strip_prefix("uploadId="))
}

/// AbortMultipartUpload requests for an upload that was used again afterwards: an abort
/// that hit an upload a live process owned.
fn aborts_of_live_uploads(log: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in log.iter().enumerate() {
        let Some(id) = line
            .starts_with("DELETE ")
            .then(|| upload_id_of(line))
            .flatten()
        else {
            continue;
        };
        if log[i + 1..]
            .iter()
            .any(|later| !later.starts_with("DELETE ") && upload_id_of(later) == Some(id))
        {
            found.push(line.clone());
        }
    }
    found
}

fn count_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SIGKILL at seeded random moments (planning, fetching, uploading, committing), with one,
/// two or three processes on one ledger; `KVS_TEST_TORTURE_KILLS` rounds (20 by default,
/// more for a soak), `KVS_TEST_TORTURE_SEED` to replay a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_torture_with_several_processes_loses_doubles_and_leaves_nothing() {
    let rounds = count_env("KVS_TEST_TORTURE_KILLS", 20);
    let seed = count_env("KVS_TEST_TORTURE_SEED", 20_261_126);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (start, end) = recent(0.4);
    let mut spec = historical("cam", start, end, 4000, 1_500_000);
    spec.faults.bandwidth_bytes_per_sec = Some(10_000_000);
    let world = World::new(vec![spec], "concurrency = 2").await;
    let expected = world.fragment_numbers("cam", start, end);
    let (a, b) = (rfc3339(start), rfc3339(end));
    let spawn = || {
        world
            .command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawned")
    };
    for round in 0..rounds {
        let processes = match round % 5 {
            2 => 2,
            4 => 3,
            _ => 1,
        };
        let mut children: Vec<_> = (0..processes).map(|_| spawn()).collect();
        for child in &mut children {
            tokio::time::sleep(Duration::from_millis(rng.u64(50..1500))).await;
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    let resumed = world.backfill("cam", start, end).await;
    assert!(resumed.status.success(), "seed {seed}: {}", text(&resumed));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    let s3 = world.s3.as_ref().expect("s3s");
    let live_aborts = aborts_of_live_uploads(&s3.requests());
    assert!(
        live_aborts.is_empty(),
        "seed {seed}: aborted uploads still in use: {live_aborts:?}"
    );
    assert!(
        world.open_multipart_uploads().is_empty(),
        "seed {seed}: left open: {:?}",
        world.open_multipart_uploads()
    );
    let check = world
        .run(&["verify", "--stream", "cam", "--start", &a, "--end", &b])
        .await;
    assert!(check.status.success(), "seed {seed}: {}", text(&check));
    assert_playable(&objects);
}

/// Two backfills of one range on one ledger, with multipart-sized clips, both running to
/// the end: every fragment once, and neither ever aborts the other's live upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_multipart_clips_never_abort_each_others_uploads() {
    let (start, end) = recent(0.15);
    let mut spec = historical("cam", start, end, 4000, 1_500_000);
    spec.faults.bandwidth_bytes_per_sec = Some(30_000_000);
    let world = World::new(vec![spec], "concurrency = 2").await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let args = ["backfill", "--stream", "cam", "--start", &a, "--end", &b];
    let (first, second) = tokio::join!(world.run(&args), world.run(&args));
    assert!(first.status.success(), "{}", text(&first));
    assert!(second.status.success(), "{}", text(&second));
    assert_exactly_once(
        &world.objects().await,
        &world.fragment_numbers("cam", start, end),
    );
    let log = world.s3.as_ref().expect("s3s").requests();
    assert!(
        log.iter().any(|l| l.contains("partNumber=")),
        "clips went up in parts"
    );
    assert_eq!(aborts_of_live_uploads(&log), Vec::<String>::new());
    assert!(
        !log.iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("uploadId=")),
        "no upload aborted at all: nothing failed"
    );
    assert!(world.open_multipart_uploads().is_empty());
}

/// GetClip requests that succeeded, and how many fragments they carried in all: equal to
/// the fragments of the range when nothing was fetched from KVS twice.
fn fragments_fetched(emu: &Emulator) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.status == 200 && !r.reset)
        .map(|r| r.fragments)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_slowdown_and_an_outage_are_waited_out_without_fetching_anything_twice() {
    let outage = Duration::from_secs(count_env("KVS_TEST_S3_OUTAGE_SECS", 120));
    let (start, end) = recent(0.15);
    let mut spec = historical("cam", start, end, 4000, 1_500_000);
    spec.faults.bandwidth_bytes_per_sec = Some(30_000_000);
    let world = World::new(vec![spec], "concurrency = 2").await;
    let expected = world.fragment_numbers("cam", start, end);
    let s3 = world.s3.as_ref().expect("s3s");
    s3.faults
        .slow_down_next
        .store(6, std::sync::atomic::Ordering::SeqCst);
    let faults = s3.faults.clone();
    // Patience for the outage: parts are retried from memory, never fetched again.
    let backfill = world.backfill_with(
        "cam",
        start,
        end,
        &[
            // Over three minutes of patience for a two-minute outage.
            ("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "45"),
            ("KVS_ARCHIVER_ARCHIVE__RETRY_MAX_DELAY", "5s"),
        ],
    );
    let outage_task = async {
        // Down once the first clip is on its way.
        wait_for_a_streaming_clip(&world).await;
        faults.down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(outage).await;
        faults
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    };
    let (out, ()) = tokio::join!(backfill, outage_task);
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    let log = s3.requests();
    assert_eq!(
        s3.faults
            .slow_down_next
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "SlowDown was answered"
    );
    assert!(log.iter().filter(|l| l.starts_with("PUT ")).count() > 6);
    assert_eq!(
        fragments_fetched(&world.emu),
        expected.len(),
        "nothing fetched from KVS twice"
    );
    assert!(world.open_multipart_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_mix_of_kvs_and_s3_faults_archives_everything_exactly_once() {
    let seed = count_env("KVS_TEST_FAULT_SEED", 7);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (start, end) = recent(0.5);
    let mut spec = historical("mixed", start, end, 2000, 200_000);
    spec.faults.quota_scale = [1.0, 0.5, 0.25][rng.usize(0..3)];
    spec.faults.internal_failure_rate = rng.f64() * 0.2;
    spec.faults.reset_rate = rng.f64() * 0.2;
    spec.faults.reset_after_bytes = rng.u64(1000..2_000_000);
    spec.faults.first_byte_delay_ms = rng.u64(0..200);
    let world = World::new(vec![spec], "concurrency = 3").await;
    let expected = world.fragment_numbers("mixed", start, end);
    let s3 = world.s3.as_ref().expect("s3s");
    s3.faults
        .slow_down_next
        .store(rng.u32(0..8), std::sync::atomic::Ordering::SeqCst);
    let faults = s3.faults.clone();
    let (blip_after, blip) = (rng.u64(200..3000), rng.u64(500..3000));
    let backfill = world.backfill_with(
        "mixed",
        start,
        end,
        &[("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "20")],
    );
    let blip_task = async {
        tokio::time::sleep(Duration::from_millis(blip_after)).await;
        faults.down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(blip)).await;
        faults
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    };
    let (out, ()) = tokio::join!(backfill, blip_task);
    assert!(out.status.success(), "seed {seed}: {}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    assert!(world.open_multipart_uploads().is_empty(), "seed {seed}");
    assert_eq!(
        aborts_of_live_uploads(&s3.requests()),
        Vec::<String>::new(),
        "seed {seed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_locked_by_another_process_for_a_while_only_delays_the_backfill() {
    let (start, end) = recent(0.2);
    let mut world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    // A lock on the file is SQLite's own matter (PostgreSQL has row locks).
    world.use_sqlite();
    // Create the ledger first, then hold its write lock from outside for five seconds.
    let plan = world
        .run(&[
            "plan",
            "--stream",
            "cam",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
        ])
        .await;
    assert!(plan.status.success(), "{}", text(&plan));
    use sqlx::{ConnectOptions, Connection};
    let mut db = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(world.work.path().join("state.db"))
        .connect()
        .await
        .expect("ledger opens");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut db)
        .await
        .expect("locked");
    let backfill = world.backfill("cam", start, end);
    let hold = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        sqlx::query("COMMIT")
            .execute(&mut db)
            .await
            .expect("unlocked");
    };
    let (out, ()) = tokio::join!(backfill, hold);
    let _ = db.close().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(
        &world.objects().await,
        &world.fragment_numbers("cam", start, end),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_the_output_even_at_trace_level() {
    const TOKEN: &str = "FwoGZXIvYXdzEXAMPLESESSIONTOKENkvsArchiverTest0123456789";
    let (start, end) = recent(0.05);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let out = world
        .command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b])
        .env("KVS_ARCHIVER_LOG", "trace")
        .env("AWS_SESSION_TOKEN", TOKEN)
        .output()
        .await
        .expect("runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.len() > 10_000,
        "trace logging is on: {} bytes",
        all.len()
    );
    for secret in [DEFAULT_SECRET_ACCESS_KEY, TOKEN, &TOKEN[..24]] {
        assert!(!all.contains(secret), "a secret is in the output: {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_kvs_answers_get_clear_errors_and_never_a_chunk_marked_done() {
    let (start, end) = recent(0.5);
    let mut spec = historical("odd", start, end, 2000, 20_000);
    // Cut-off JSON and empty 200s to the first listings, every page listed twice.
    spec.faults.malformed_listings_next = 4;
    spec.faults.duplicate_listings = true;
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("odd", start, end);
    let out = world.backfill("odd", start, end).await;
    assert!(out.status.success(), "retried past them: {}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    let refused: Vec<_> = world
        .emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "ListFragments")
        .collect();
    assert!(
        refused.len() > 4,
        "the malformed answers were sent and retried"
    );

    // A NextToken longer than the API allows ends the run with a clear error, and nothing
    // of the listing it came from is planned or archived.
    let (start2, end2) = (start - 3_600_000, start - 1);
    let mut later = historical("odd-token", start2, end2, 2000, 20_000);
    later.faults.huge_next_token = true;
    world.emu.add_stream(later).expect("stream added");
    let mut config = std::fs::read_to_string(&world.config).expect("config");
    config.push_str("[[streams]]\nname = \"odd-token\"\n");
    std::fs::write(&world.config, config).expect("config written");
    let refused = world.backfill("odd-token", start2, end2).await;
    assert_fails_with(&refused, 1, "NextToken of 5000 characters");
    assert!(
        world.objects_under("kvs/odd-token/").await.is_empty(),
        "nothing archived from it"
    );
    world
        .emu
        .update_faults("odd-token", |f| f.huge_next_token = false);
    let healed = world.backfill("odd-token", start2, end2).await;
    assert!(healed.status.success(), "{}", text(&healed));
    assert_exactly_once(
        &world.objects_under("kvs/odd-token/").await,
        &world.fragment_numbers("odd-token", start2, end2),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_expire_mid_pass_and_a_stalled_body_are_retried_to_exactly_once() {
    let (start, end) = recent(0.3);
    let mut spec = historical("cam", start, end, 2000, 100_000);
    spec.faults.expired_tokens_next = 3;
    spec.faults.stalls_next = 1;
    spec.faults.reset_after_bytes = 300_000;
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("cam", start, end);
    // A read that waits two seconds for the next byte gives up: the stalled clip is
    // fetched again.
    let out = world
        .backfill_with(
            "cam",
            start,
            end,
            &[("KVS_ARCHIVER_AWS__READ_TIMEOUT", "2s")],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    let log = world.emu.requests();
    assert_eq!(
        log.iter()
            .filter(|r| r.error.as_deref() == Some("ExpiredTokenException"))
            .count(),
        3,
        "expired credentials were answered"
    );
    assert!(
        log.iter().any(|r| r.op == "GetClip" && r.reset),
        "a body stalled"
    );
    assert!(world.open_multipart_uploads().is_empty());
}

/// A small filesystem of its own (tmpfs), unmounted when dropped; `None` when this
/// machine does not let the test mount one (not root), which CI must.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "could not mount a tmpfs: CI runs the suite as root so that the disk-full test can"
            );
            eprintln!("cannot mount a tmpfs here (needs root): disk-full test skipped");
            return None;
        }
        Some(SmallDisk { path })
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("remount runs");
        assert!(status.success(), "remounted");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// Every file under `dir` (metadata side files and partial files apart), with its bytes.
fn files_under(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path
                .extension()
                .is_some_and(|e| e == "mp4" || e == "mkv" || e == "partial")
            {
                let key = path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                out.insert(key, std::fs::read(&path).expect("readable"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_destination_disk_gets_a_clear_error_corrupts_nothing_and_resumes_when_space_returns(
) {
    let (start, end) = recent(0.1);
    let world = World::new(vec![historical("cam", start, end, 2000, 100_000)], "").await;
    let Some(disk) = SmallDisk::mount(world.work.path().join("archive"), "6m") else {
        return;
    };
    // The same configuration, with the small disk as the destination.
    let config = std::fs::read_to_string(&world.config)
        .expect("config")
        .replace(
            &format!("bucket = \"{BUCKET}\""),
            &format!("directory = \"{}\"", disk.path.display()),
        );
    let dir_config = world.work.path().join("dir.toml");
    std::fs::write(&dir_config, config).expect("written");
    let (a, b) = (rfc3339(start), rfc3339(end));
    let backfill = || {
        let mut command =
            world.command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b]);
        command
            .env("KVS_ARCHIVER_CONFIG", &dir_config)
            .env("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "2");
        command
    };
    let full = backfill().output().await.expect("runs");
    assert_fails_with(&full, 1, "the disk is full");
    let stored = files_under(&disk.path);
    assert!(
        !stored.keys().any(|k| k.ends_with(".partial")),
        "no partial file is left: {:?}",
        stored.keys().collect::<Vec<_>>()
    );
    // What was stored is whole and recorded; nothing else is.
    assert_playable(&stored);
    let status = world
        .command(&["status", "--json"])
        .env("KVS_ARCHIVER_CONFIG", &dir_config)
        .output()
        .await
        .expect("status");
    let status = streams_json(&status);
    assert_eq!(
        status[0]["done"].as_u64(),
        Some(stored.len() as u64),
        "{status}"
    );
    assert!(status[0]["failed"].as_u64() > Some(0), "{status}");

    disk.resize("64m");
    let resumed = backfill().output().await.expect("runs");
    assert!(resumed.status.success(), "{}", text(&resumed));
    let archived = files_under(&disk.path);
    for (key, bytes) in &stored {
        assert_eq!(archived.get(key), Some(bytes), "{key} kept as it was");
    }
    assert_exactly_once(&archived, &world.fragment_numbers("cam", start, end));
    assert_playable(&archived);
}

/// Starts `kvs-archiver run` as instance `id` with its own log file.
fn spawn_daemon(world: &World, id: &str, env: &[(&str, &str)]) -> (tokio::process::Child, PathBuf) {
    let log_path = world.work.path().join(format!("daemon-{id}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut command = world.command(&["run"]);
    command
        .env("KVS_ARCHIVER_STATE__INSTANCE_ID", id)
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

/// Three daemons, one PostgreSQL ledger, 30 live streams: the work is spread, every
/// fragment archived once; one daemon killed half-way loses its streams and chunks to
/// the other two within the lease, and no live upload is ever aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_three_daemons_share_thirty_streams_and_survive_a_sigkill() {
    let Some(url) = postgres::fresh_database().await else {
        return;
    };
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
    let mut held_by_b = Vec::new();
    for _ in 0..300 {
        held_by_b = pg_rows(&url, "SELECT object_key, generation FROM chunks WHERE owner LIKE 'fleet-b@%' AND state IN ('fetching', 'uploading')").await;
        if !held_by_b.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    // What fleet-b held when it died was finished by the others.
    let keys: Vec<String> = held_by_b.iter().map(|(key, _)| key.clone()).collect();
    let finished = pg_rows(&url, &format!(
        "SELECT split_part(archived_by, '@', 1), COUNT(*) FROM chunks WHERE state = 'done' AND object_key IN ('{}') GROUP BY 1",
        keys.join("', '")
    ))
    .await;
    assert!(
        finished.iter().all(|(by, _)| by != "fleet-b")
            && finished.iter().map(|(_, n)| n).sum::<i64>() as usize == keys.len(),
        "fleet-b's chunks {keys:?} were finished by {finished:?}"
    );
}

/// The shared ledger stops for a minute under load: the daemons report it, keep
/// running, and resume by themselves; nothing is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_a_postgresql_outage_is_waited_out_without_loss_or_doubles() {
    let (Ok(server), Ok(cluster)) = (
        std::env::var("KVS_TEST_PG_OUTAGE_URL"),
        std::env::var("KVS_TEST_PG_OUTAGE_CLUSTER"),
    ) else {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "KVS_TEST_PG_OUTAGE_URL/CLUSTER are not set: CI must run .ci/postgres"
        );
        eprintln!("note: no PostgreSQL cluster to stop (KVS_TEST_PG_OUTAGE_URL); run: eval \"$(.ci/postgres)\"");
        return;
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

/// The S3 operation of a logged request ("METHOD /bucket/key?query"), as AWS names it.
fn s3_operation(line: &str) -> String {
    let (method, target) = line.split_once(' ').unwrap_or((line, ""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has = |name: &str| {
        query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    };
    let object = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty());
    let op = match (method, object) {
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        ("PUT", true) if has("uploadId") => "UploadPart",
        ("PUT", true) => "PutObject",
        ("DELETE", true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", true) => "DeleteObject",
        ("GET", true) if has("uploadId") => "ListParts",
        ("GET", true) => "GetObject",
        ("HEAD", true) => "HeadObject",
        ("GET", false) if has("uploads") => "ListMultipartUploads",
        ("GET", false) if has("list-type") => "ListObjectsV2",
        ("GET", false) => "ListObjects",
        ("HEAD", false) => "HeadBucket",
        ("PUT", false) => "CreateBucket",
        _ => "unknown",
    };
    op.to_string()
}

/// The IAM action each API operation needs (AWS's service authorization reference).
fn iam_action(op: &str) -> &'static str {
    match op {
        "DescribeStream" => "kinesisvideo:DescribeStream",
        "GetDataEndpoint" => "kinesisvideo:GetDataEndpoint",
        "ListFragments" => "kinesisvideo:ListFragments",
        "GetClip" => "kinesisvideo:GetClip",
        "GetMediaForFragmentList" => "kinesisvideo:GetMediaForFragmentList",
        "GetMedia" => "kinesisvideo:GetMedia",
        "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload" | "PutObject" => {
            "s3:PutObject"
        }
        "AbortMultipartUpload" => "s3:AbortMultipartUpload",
        "GetObject" | "HeadObject" => "s3:GetObject",
        "DeleteObject" => "s3:DeleteObject",
        "ListParts" => "s3:ListMultipartUploadParts",
        "ListMultipartUploads" => "s3:ListBucketMultipartUploads",
        "ListObjectsV2" | "ListObjects" | "HeadBucket" => "s3:ListBucket",
        "CreateBucket" => "s3:CreateBucket",
        _ => "unknown",
    }
}

/// `iam-policy` allows exactly the actions the program calls: every request the emulator
/// and the S3 server saw from a backfill killed mid-upload and resumed (multipart, abort
/// of the dead upload, the orphan sweep, Matroska fragments), `verify`, a daemon pass,
/// `export` and `rebuild-ledger`, and no action those runs did not need. Keys and listings stay under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_policy_allows_exactly_the_calls_the_program_makes() {
    let (start, end) = recent(0.05);
    let mut spec = historical("dock-cam", start, end, 4000, 1_500_000);
    spec.duplicate_producer_timestamp_at = vec![10, 31];
    spec.missing_codec_private_data_at = vec![30];
    let world = World::with_sections(vec![spec], "concurrency = 1", "", &|_| {
        "timestamp_source = \"producer\"".into()
    })
    .await;
    let s3_before = world.s3.as_ref().expect("s3s").requests().len();
    let kvs_before = world.emu.requests().len();
    let (a, b) = (rfc3339(start), rfc3339(end));
    let exported = world.work.path().join("range.mp4").display().to_string();
    let crashed = world
        .command(&[
            "backfill", "--stream", "dock-cam", "--start", &a, "--end", &b,
        ])
        .env(kvs_archiver::crashpoint::ENV, "mid-upload")
        .output()
        .await
        .expect("runs");
    assert!(!crashed.status.success(), "{}", text(&crashed));
    for args in [
        vec![
            "backfill", "--stream", "dock-cam", "--start", &a, "--end", &b,
        ],
        vec!["verify", "--stream", "dock-cam", "--start", &a, "--end", &b],
        vec!["run", "--once"],
        vec![
            "export", "--stream", "dock-cam", "--start", &a, "--end", &b, "-o", &exported,
        ],
        vec!["rebuild-ledger", "--merge"],
    ] {
        let out = world.run(&args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let s3_log = world.s3.as_ref().expect("s3s").requests()[s3_before..].to_vec();
    let kvs_log = world.emu.requests()[kvs_before..].to_vec();
    let ops: BTreeSet<String> = kvs_log
        .iter()
        .map(|r| r.op.clone())
        .chain(s3_log.iter().map(|l| s3_operation(l)))
        .collect();
    for op in [
        "AbortMultipartUpload",
        "UploadPart",
        "GetMediaForFragmentList",
    ] {
        assert!(ops.contains(op), "the runs called {op}: {ops:?}");
    }
    let called: BTreeSet<&str> = ops.iter().map(|op| iam_action(op)).collect();

    let out = world.run(&["iam-policy"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let policy: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON policy");
    let allowed: BTreeSet<String> = kvs_archiver::iam::actions(&policy).into_iter().collect();
    let allowed: BTreeSet<&str> = allowed.iter().map(String::as_str).collect();
    assert_eq!(allowed, called, "policy against calls; S3 log: {s3_log:?}");

    // Every object request stays under the prefix the policy names.
    let object_resource = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find_map(|s| s["Resource"].as_str().filter(|r| r.ends_with('*')))
        .expect("an object resource")
        .to_string();
    assert_eq!(
        object_resource,
        format!("arn:aws:s3:::{}/kvs/*", world.bucket)
    );
    for line in &s3_log {
        let path = line
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("");
        let key = path.trim_start_matches('/').split_once('/').map(|(_, k)| k);
        if let Some(key) = key.filter(|k| !k.is_empty()) {
            assert!(key.starts_with("kvs/"), "outside the prefix: {line}");
        } else {
            assert!(
                line.contains("prefix=kvs%2F") || line.contains("prefix=kvs/"),
                "a listing outside the prefix: {line}"
            );
        }
    }
    let stream_arn = policy["Statement"][0]["Resource"][0].as_str().unwrap_or("");
    assert!(stream_arn.ends_with(":stream/dock-cam/*"), "{stream_arn}");
}

/// `find --json` for `stream` at `t`: the finding, the URL, and the exit status.
/// `dock-cam`: 2 s fragments of 20 kB over `[start, end]`, and 7 minutes without media
/// after the first 20.
fn dock_cam_with_a_gap(start: i64, end: i64) -> StreamSpec {
    let mut spec = historical("dock-cam", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(20 * 60),
        length: Duration::from_secs(7 * 60),
    }];
    spec
}

/// The fragments on either side of the first gap of more than a minute.
fn the_gap(fragments: &[kvs_emulator::FragmentInfo]) -> [kvs_emulator::FragmentInfo; 2] {
    fragments
        .windows(2)
        .find(|w| w[1].server_ms - w[0].server_ms > 60_000)
        .map(|w| [w[0].clone(), w[1].clone()])
        .expect("the gap")
}

async fn find_at(world: &World, stream: &str, t: i64) -> (serde_json::Value, bool) {
    let out = world
        .run(&["find", "--stream", stream, "--at", &rfc3339(t), "--json"])
        .await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("find prints JSON ({e}): {}", text(&out)));
    (shown, out.status.success())
}

/// `find` picks the object and the offset at object boundaries, explains a gap with the
/// media on either side, says what is not archived yet, and its URL plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_names_the_object_and_offset_at_boundaries_and_explains_gaps() {
    let (start, end) = recent(0.75);
    let spec = dock_cam_with_a_gap(start, end);
    let world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("dock-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    let fragments = world.emu.fragments("dock-cam");
    let by_number: HashMap<&str, &kvs_emulator::FragmentInfo> =
        fragments.iter().map(|f| (f.number.as_str(), f)).collect();
    // Each object's fragments, in time order, from the markers in its media.
    let mut spans: Vec<(String, Vec<&kvs_emulator::FragmentInfo>)> = objects
        .iter()
        .map(|(key, bytes)| {
            let mut held: Vec<_> = scan_markers(bytes)
                .iter()
                .map(|n| by_number[n.as_str()])
                .collect();
            held.sort_by_key(|f| f.server_ms);
            (key.clone(), held)
        })
        .collect();
    spans.sort_by_key(|(_, held)| held[0].server_ms);
    assert!(spans.len() >= 4, "several objects: {:?}", objects.keys());

    // A boundary: the first instant of the second object, and the last of the first.
    let (first_key, first) = &spans[0];
    let (second_key, second) = &spans[1];
    let boundary = second[0].server_ms;
    let (at, found) = find_at(&world, "dock-cam", boundary).await;
    assert!(found, "{at}");
    assert_eq!(at["finding"]["object_key"], second_key.as_str(), "{at}");
    assert_eq!(at["finding"]["offset_ms"], 0, "{at}");
    let (at, _) = find_at(&world, "dock-cam", boundary - 1).await;
    let first_duration: u64 = first.iter().map(|f| u64::from(f.duration_ms)).sum();
    assert_eq!(at["finding"]["object_key"], first_key.as_str(), "{at}");
    assert_eq!(at["finding"]["offset_ms"], first_duration - 1, "{at}");
    // Inside an object: 3.5 fragments in.
    let t = second[3].server_ms + 500;
    let (at, _) = find_at(&world, "dock-cam", t).await;
    assert_eq!(at["finding"]["offset_ms"], 6_500, "{at}");
    assert_eq!(at["finding"]["fragment"], second[3].number.as_str(), "{at}");

    // Inside the gap: no media, with where it ends and resumes.
    let gap = the_gap(&fragments);
    let gap_end_of_media = gap[0].server_ms + i64::from(gap[0].duration_ms);
    let (at, found) = find_at(&world, "dock-cam", gap_end_of_media + 60_000).await;
    assert!(!found, "nothing holds a gap: {at}");
    assert_eq!(at["finding"]["found"], "no_media", "{at}");
    assert_eq!(at["finding"]["before"][0], gap_end_of_media, "{at}");
    assert_eq!(at["finding"]["after"][0], gap[1].server_ms, "{at}");
    let out = world
        .run(&[
            "find",
            "--stream",
            "dock-cam",
            "--at",
            &rfc3339(gap_end_of_media + 60_000),
        ])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(""),
        format!(
            "dock-cam at {}: KVS had no media then",
            rfc3339(gap_end_of_media + 60_000)
        )
    );

    // After what was archived: not planned yet.
    let (at, found) = find_at(&world, "dock-cam", end + 3_600_000).await;
    assert!(!found);
    assert_eq!(at["finding"]["found"], "not_planned_yet", "{at}");

    // The URL plays from S3 (a presigned GET).
    let (at, _) = find_at(&world, "dock-cam", t).await;
    let url = at["url"].as_str().expect("a URL").to_string();
    if ffmpeg_available() {
        let out = std::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "format=duration",
                "-of",
                "csv=p=0",
            ])
            .arg(&url)
            .output()
            .expect("ffprobe runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seconds: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a duration");
        let expected = second.iter().map(|f| f64::from(f.duration_ms)).sum::<f64>() / 1000.0;
        assert!((seconds - expected).abs() < 0.1, "{seconds} vs {expected}");
    }
}

/// ffprobe's view of a file: (duration in seconds, decoded video frames), or its error.
fn probe_frames(path: &std::path::Path) -> Result<(f64, u64), String> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "format=duration:stream=nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("ffprobe runs: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || !stderr.trim().is_empty() {
        return Err(format!("ffprobe: {stderr}"));
    }
    let shown: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ffprobe JSON: {e}"))?;
    let duration = shown["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or("no duration")?;
    let frames = shown["streams"][0]["nb_read_frames"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or("no frame count")?;
    Ok((duration, frames))
}

/// `export` over a range spanning three objects and a gap: one MP4 that ffprobe reads
/// without error, cut at the keyframe before the start and at the frame before the end,
/// holding exactly the expected fragments; the gap is reported, held (the default) or
/// joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_spans_objects_and_a_gap_cut_at_keyframes() {
    let (start, end) = recent(0.75);
    let spec = dock_cam_with_a_gap(start, end);
    let world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("dock-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let fragments = world.emu.fragments("dock-cam");
    let gap = the_gap(&fragments);
    // From 0.7 s into a fragment ten minutes before the gap to 1.3 s into one five
    // minutes after it: not on keyframes, and at least three objects.
    let first = fragments
        .iter()
        .find(|f| f.server_ms >= gap[0].server_ms - 600_000)
        .expect("a first fragment");
    let last = fragments
        .iter()
        .find(|f| f.server_ms >= gap[1].server_ms + 300_000)
        .expect("a last fragment");
    let (from, to) = (first.server_ms + 700, last.server_ms + 1_300);
    let expected: Vec<String> = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < to)
        .map(|f| f.number.clone())
        .collect();
    // 100 ms frames: whole fragments, then the frames of the last that start before `to`.
    let expected_frames: u64 = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < to)
        .map(|f| {
            (0..u64::from(f.duration_ms) / 100)
                .filter(|k| f.server_ms + (*k as i64) * 100 < to)
                .count() as u64
        })
        .sum();
    let media_ms: i64 = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < last.server_ms)
        .map(|f| i64::from(f.duration_ms))
        .sum::<i64>()
        + 1_300;

    let export = |gaps: &'static str| {
        let path = world.work.path().join(format!("export-{gaps}.mp4"));
        let args = [
            "export".to_string(),
            "--stream".into(),
            "dock-cam".into(),
            "--start".into(),
            rfc3339(from),
            "--end".into(),
            rfc3339(to),
            "-o".into(),
            path.display().to_string(),
            "--gaps".into(),
            gaps.into(),
            "--json".into(),
        ];
        let world = &world;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = world.run(&args).await;
            assert!(out.status.success(), "export --gaps {gaps}: {}", text(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("export prints JSON ({e}): {}", text(&out)));
            (path, report)
        }
    };
    let (held, report) = export("hold").await;
    assert_eq!(report["first_frame_ms"], first.server_ms, "{report}");
    assert_eq!(report["last_frame_end_ms"], to, "{report}");
    assert!(
        report["objects"].as_array().map_or(0, Vec::len) >= 3,
        "three objects or more: {report}"
    );
    let gaps = report["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 1, "{report}");
    assert_eq!(
        gaps[0]["from_ms"],
        gap[0].server_ms + i64::from(gap[0].duration_ms),
        "{report}"
    );
    assert_eq!(gaps[0]["to_ms"], gap[1].server_ms, "{report}");
    assert_eq!(gaps[0]["why"], "KVS had no media then", "{report}");
    let bytes = std::fs::read(&held).expect("the export");
    assert_eq!(
        scan_markers(&bytes),
        expected,
        "exactly the fragments of the range"
    );
    assert_eq!(report["frames"], expected_frames, "{report}");
    assert!(
        !world.work.path().join("export-hold.mp4.partial").exists(),
        "no partial file is left"
    );

    let (joined, report) = export("join").await;
    assert_eq!(report["duration_ms"], media_ms, "{report}");
    assert_eq!(
        scan_markers(&std::fs::read(&joined).expect("export")),
        expected
    );

    if !ffmpeg_available() {
        return;
    }
    let (seconds, frames) = probe_frames(&held).expect("ffprobe reads the held export");
    assert_eq!(frames, expected_frames);
    let wall = (to - first.server_ms) as f64 / 1000.0;
    assert!(
        (seconds - wall).abs() < 0.05,
        "held: {seconds} s, wall time {wall} s"
    );
    let (seconds, frames) = probe_frames(&joined).expect("ffprobe reads the joined export");
    assert_eq!(frames, expected_frames);
    let media = media_ms as f64 / 1000.0;
    assert!(
        (seconds - media).abs() < 0.05,
        "joined: {seconds} s, media {media} s"
    );
}

fn media_requests(emu: &Emulator) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.op == "GetClip" || r.op == "GetMediaForFragmentList")
        .count()
}

/// The fields of `status` that describe the archive (not the processes that made it).
fn archive_view(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| {
            serde_json::json!({
                "stream": s["stream"], "done": s["done"], "pending": s["pending"],
                "in_flight": s["in_flight"], "failed": s["failed"], "expired": s["expired"],
                "archived_bytes": s["archived_bytes"], "archived_fragments": s["archived_fragments"],
                "late_fragments": s["late_fragments"], "mkv_fragments": s["mkv_fragments"],
                "archived_through_ms": s["archived_through_ms"],
                "oldest_unarchived_ms": s["oldest_unarchived_ms"],
            })
        })
        .collect()
}

/// Losing the ledger costs one listing: `rebuild-ledger` restores it from the objects'
/// metadata and one ListFragments, the same backfill then fetches nothing (no GetClip),
/// `status` shows what it showed before, and `verify` finds the archive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_ledger_restores_the_archive_so_a_backfill_fetches_nothing_again() {
    let (start, end) = recent(0.75);
    let mut spec = historical("yard-cam", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(15 * 60),
        length: Duration::from_secs(5 * 60),
    }];
    let mut world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("yard-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let before = archive_view(&streams_json(&world.run(&["status", "--json"]).await));
    assert!(before[0]["done"].as_u64().unwrap_or(0) >= 5, "{before:?}");

    // The ledger is lost: a new, empty one in its place.
    let lost = world.ledger_url.clone();
    if let Some(path) = lost.strip_prefix("sqlite://") {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    let fresh = new_ledger_url(world.work.path(), "rebuilt.db").await;
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, config.replace(&lost, &fresh)).expect("config");
    world.ledger_url = fresh;

    let fetched = media_requests(&world.emu);
    let out = world.run(&["rebuild-ledger", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["chunks_restored"], before[0]["done"], "{report}");
    assert_eq!(
        report["from_metadata_only"].as_array().map(Vec::len),
        Some(0)
    );
    // A ledger that holds chunks is not rebuilt over.
    let again = world.run(&["rebuild-ledger"]).await;
    assert_fails_with(&again, 2, "already holds chunks");

    let out = world.backfill("yard-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        media_requests(&world.emu),
        fetched,
        "nothing was fetched from KVS again"
    );
    let after = archive_view(&streams_json(&world.run(&["status", "--json"]).await));
    assert_eq!(after, before);
    let out = world.run(&["verify", "--stream", "yard-cam"]).await;
    assert!(
        out.status.success(),
        "verify after a rebuild: {}",
        text(&out)
    );
}

/// A raw HTTP/1.1 GET on loopback: (status code, whole response).
async fn http_request(port: u16, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("listener");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// Waits until something answers HTTP on `port`.
async fn wait_for_http(port: u16, path: &str, child: &mut tokio::process::Child) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let (code, _) = http_request(port, path, "").await;
            if code != 0 {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server on port {port} exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answers on port {port}");
}

/// Whether Chromium and its WebDriver are installed; under CI they must be.
fn chromium_available() -> bool {
    let found = ["chromium", "chromedriver"].iter().all(|tool| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium or chromedriver not found: CI must install them (.ci/run does: apt-get install -y chromium chromium-driver)"
        );
        eprintln!("chromium/chromedriver not installed: the page test is skipped (apt-get install -y chromium chromium-driver)");
    }
    found
}

/// The archive's page in a real headless Chromium, for a ledger a real backfill with
/// injected faults built: the timeline shows every archived object, the failed chunks and
/// the gap where KVS had no media; clicking an object plays it (the video's currentTime
/// advances), streamed with range requests from a directory destination; a screenshot is
/// left in target/. With a token, the page takes it once in the URL and plays the video
/// on the session cookie it sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_page_shows_the_timeline_and_plays_a_clicked_object_in_chromium() {
    if !chromium_available() {
        return;
    }
    let (start, end) = recent(1.0);
    let mut spec = dock_cam_with_a_gap(start, end);
    // Three GetClip bodies cut off, each chunk tried once: three failed chunks.
    spec.faults.resets_next = 3;
    let world = World::new(vec![spec], "clip_duration = \"10m\"\nconcurrency = 1").await;
    let archive = world.work.path().join("archive");
    std::fs::create_dir_all(&archive).expect("archive directory");
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        config.replace(
            &format!("bucket = \"{}\"", world.bucket),
            &format!("directory = \"{}\"", archive.display()),
        ),
    )
    .expect("config");
    let out = world
        .backfill_with(
            "dock-cam",
            start,
            end,
            &[("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "1")],
        )
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "three chunks fail: {}",
        text(&out)
    );
    let status = streams_json(&world.run(&["status", "--json"]).await);
    let failed = status[0]["failed"].as_u64().expect("failed count");
    assert!(failed >= 1, "{status}");
    // `find` says why a failed chunk's time is not archived.
    let failed_at = status[0]["failures"][0]["object_key"]
        .as_str()
        .and_then(|key| {
            world
                .emu
                .fragments("dock-cam")
                .into_iter()
                .find(|f| key.contains(&kvs_archiver::domain::compact_time(f.server_ms)))
        })
        .expect("a failed chunk's first fragment")
        .server_ms;
    let (at, found) = find_at(&world, "dock-cam", failed_at + 500).await;
    assert!(!found, "{at}");
    assert_eq!(at["finding"]["found"], "not_archived", "{at}");
    assert_eq!(at["finding"]["state"], "failed", "{at}");
    let objects: BTreeSet<String> = files_under(&archive)
        .into_keys()
        .filter(|k| k.ends_with(".mp4"))
        .collect();
    assert!(objects.len() >= 4, "{objects:?}");
    let fragments = world.emu.fragments("dock-cam");
    let gap = the_gap(&fragments);
    let (gap_from, gap_to) = (
        gap[0].server_ms + i64::from(gap[0].duration_ms),
        gap[1].server_ms,
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = world
        .command(&["serve", "--listen", &listen])
        .env(
            "KVS_ARCHIVER_SERVE_TOKEN",
            "s3cret-token-of-at-least-32-bytes",
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("serve starts");
    wait_for_http(port, "/", &mut server).await;
    let (code, _) = http_request(port, "/streams/dock-cam", "").await;
    assert_eq!(code, 401, "no token, no page");
    let (code, page) = http_request(
        port,
        "/streams/dock-cam",
        "Authorization: Bearer s3cret-token-of-at-least-32-bytes\r\n",
    )
    .await;
    assert_eq!(code, 200, "{page}");
    // A directory object is served with range requests, as video elements ask.
    let key = objects.iter().next().expect("an object");
    let (code, partial) = http_request(
        port,
        &format!("/media/{key}"),
        "Authorization: Bearer s3cret-token-of-at-least-32-bytes\r\nRange: bytes=4-11\r\n",
    )
    .await;
    assert_eq!(code, 206, "{partial}");
    assert!(
        partial.ends_with("ftypisom"),
        "bytes 4-11 of an MP4: {partial}"
    );

    let driver_port = free_port();
    let mut driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={driver_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    // chromedriver keeps connections open: a TCP connect is the readiness check.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", driver_port))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            driver.try_wait().ok().flatten().is_none(),
            "chromedriver exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,900", "--autoplay-policy=no-user-gesture-required",
            "--no-first-run", "--no-proxy-server", "--disable-background-networking",
        ]}),
    );
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a Chromium session");
    let result = async {
        use fantoccini::Locator;
        // The token once in the URL; the cookie carries it to the page and the video.
        browser
            .goto(&format!(
                "http://{listen}/streams/dock-cam?token=s3cret-token-of-at-least-32-bytes"
            ))
            .await
            .expect("page opens");
        let shown = |class: &'static str| {
            let browser = &browser;
            async move {
                let mut spans = Vec::new();
                for rect in browser
                    .find_all(Locator::Css(&format!(
                        "#timeline rect[data-class='{class}']"
                    )))
                    .await
                    .expect("rects")
                {
                    let attr = |name: &'static str| {
                        let rect = rect.clone();
                        async move {
                            rect.attr(name)
                                .await
                                .expect("attribute")
                                .unwrap_or_default()
                        }
                    };
                    let start: i64 = attr("data-start").await.parse().expect("start");
                    let end: i64 = attr("data-end").await.parse().expect("end");
                    spans.push((start, end, attr("data-key").await));
                }
                spans
            }
        };
        let archived = shown("archived").await;
        let keys: BTreeSet<String> = archived.iter().map(|(_, _, k)| k.clone()).collect();
        assert_eq!(
            keys, objects,
            "every archived object, and only those, is drawn"
        );
        let failures = shown("failed").await;
        assert_eq!(failures.len() as u64, failed, "every failed chunk is drawn");
        for (start, end, key) in archived.iter().chain(&failures) {
            assert!(
                *end <= gap_from || *start >= gap_to,
                "nothing is drawn inside the gap: {key} {start}..{end}, gap {gap_from}..{gap_to}"
            );
        }
        // The gap shows as "KVS had no media": the background under the spans covers it,
        // and (above) no span is drawn over it.
        let no_media = shown("no-media").await;
        assert_eq!(no_media.len(), 1, "one no-media background: {no_media:?}");
        let (covered_from, covered_to, _) = &no_media[0];
        assert!(
            *covered_from <= gap_from && *covered_to >= gap_to,
            "the gap {gap_from}..{gap_to} lies in the no-media background {covered_from}..{covered_to}"
        );

        // Click an archived object (the widest span, as a person would): it plays.
        let (_, _, key) = archived
            .iter()
            .max_by_key(|(start, end, _)| end - start)
            .expect("an archived span")
            .clone();
        browser
            .find(Locator::Css(&format!("#timeline rect[data-key='{key}']")))
            .await
            .expect("the span")
            .click()
            .await
            .expect("clicked");
        let mut played = 0.0;
        for _ in 0..100 {
            let state = browser
                .execute(
                    "var p = document.getElementById('player'); return [p.currentTime, p.error ? p.error.message || String(p.error.code) : null, p.dataset.key || null];",
                    vec![],
                )
                .await
                .expect("script runs");
            assert!(state[1].is_null(), "the video fails: {state}");
            played = state[0].as_f64().unwrap_or(0.0);
            if played > 1.0 {
                assert_eq!(state[2], key.as_str());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(played > 1.0, "the video's currentTime advances: {played}");
        let png = browser.screenshot().await.expect("screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(dir.join("timeline.png"), png).expect("screenshot written");

        // Zooming in narrows the window the SVG draws.
        let before: i64 = browser
            .find(Locator::Id("timeline"))
            .await
            .expect("svg")
            .attr("data-to")
            .await
            .expect("attr")
            .unwrap_or_default()
            .parse()
            .unwrap_or(0);
        browser
            .find(Locator::Id("zoom-in"))
            .await
            .expect("zoom link")
            .click()
            .await
            .expect("clicked");
        let svg = browser.find(Locator::Id("timeline")).await.expect("svg");
        let (from, to): (i64, i64) = (
            svg.attr("data-from")
                .await
                .expect("a")
                .unwrap_or_default()
                .parse()
                .unwrap_or(0),
            svg.attr("data-to")
                .await
                .expect("a")
                .unwrap_or_default()
                .parse()
                .unwrap_or(0),
        );
        assert!(to - from > 0 && to != before, "zoomed: {from}..{to}");
    };
    // A panic must not leave Chromium running.
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = browser.close().await;
    let _ = server.kill().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
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
        "kvs_archiver_clip_seconds",
        "kvs_archiver_clip_bytes",
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

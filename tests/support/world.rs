//! One test's world: the KVS emulator, an S3 server and a work directory with the
//! configuration and the ledger; the streams a test puts in it.

use crate::support::command;
use crate::support::local_s3::{s3_client, start_s3s, S3Server};
use crate::support::postgres;
use chrono::Duration as ChronoDuration;
use chrono::Utc;
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

pub const BUCKET: &str = "archive";

/// One test's world: emulator, S3 server, a work directory with config and ledger.
pub struct World {
    pub emu: Emulator,
    pub s3: Option<S3Server>,
    pub s3_url: String,
    pub bucket: String,
    pub work: tempfile::TempDir,
    pub config: PathBuf,
    /// The ledger's `ledger.database_url`: SQLite in the work directory, or a fresh
    /// PostgreSQL database when KVS_TEST_LEDGER=postgres.
    pub ledger_url: String,
}

/// Whether this run tests the PostgreSQL ledger (`KVS_TEST_LEDGER=postgres`).
pub fn on_postgres() -> bool {
    std::env::var("KVS_TEST_LEDGER").is_ok_and(|v| v == "postgres")
}

/// A new, empty ledger of the kind under test.
pub async fn new_ledger_url(dir: &std::path::Path, name: &str) -> String {
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
    pub async fn new(streams: Vec<StreamSpec>, archive_toml: &str) -> World {
        Self::with_sections(streams, archive_toml, "", &|_| String::new()).await
    }

    /// `sections`: more TOML tables after `[archive]`; `stream_toml`: keys per stream.
    pub async fn with_sections(
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

    pub async fn with_s3(
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

    pub async fn build(
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
             [ledger]\ndatabase_url = \"{ledger_url}\"\nlease = \"10s\"\n\
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
    pub fn use_sqlite(&mut self) {
        let sqlite = format!("sqlite://{}/state.db", self.work.path().display());
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&self.config, text.replace(&self.ledger_url, &sqlite)).expect("config");
        self.ledger_url = sqlite;
    }

    /// Runs one SQL statement with one text parameter on the ledger, whatever its kind.
    pub async fn ledger_sql(&self, sql: &str, param: &str) {
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

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        command::kvs_archiver(&self.config, args)
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .await
            .expect("kvs-archiver runs")
    }

    pub async fn backfill(&self, stream: &str, start_ms: i64, end_ms: i64) -> Output {
        let (start, end) = (rfc3339(start_ms), rfc3339(end_ms));
        self.run(&[
            "backfill", "--stream", stream, "--start", &start, "--end", &end,
        ])
        .await
    }

    /// A backfill started in the background, its output discarded: for a test that kills it.
    pub fn spawn_backfill(
        &self,
        stream: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> tokio::process::Child {
        let (start, end) = (rfc3339(start_ms), rfc3339(end_ms));
        self.command(&[
            "backfill", "--stream", stream, "--start", &start, "--end", &end,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kvs-archiver starts")
    }

    /// A backfill with more environment variables.
    pub async fn backfill_with(
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
    pub async fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        self.objects_under("kvs/").await
    }

    pub async fn objects_under(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
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
    pub fn open_multipart_uploads(&self) -> Vec<String> {
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

    pub fn fragment_numbers(&self, stream: &str, start_ms: i64, end_ms: i64) -> Vec<String> {
        self.emu
            .fragments(stream)
            .into_iter()
            .filter(|f| f.server_ms >= start_ms && f.server_ms <= end_ms)
            .map(|f| f.number)
            .collect()
    }
}

pub fn rfc3339(ms: i64) -> String {
    kvs_archiver::domain::rfc3339(ms)
}

pub fn historical(
    name: &str,
    start_ms: i64,
    end_ms: i64,
    duration_ms: u32,
    size: u64,
) -> StreamSpec {
    let start = chrono::DateTime::from_timestamp_millis(start_ms).expect("start");
    let end = chrono::DateTime::from_timestamp_millis(end_ms).expect("end");
    let mut spec = StreamSpec::historical(name, start, end);
    spec.fragment_durations_ms = vec![duration_ms];
    spec.fragment_size = size;
    spec
}

/// A range ending a few minutes ago, on a whole second.
pub fn recent(hours: f64) -> (i64, i64) {
    let end = (Utc::now() - ChronoDuration::minutes(5)).timestamp() * 1000;
    (end - (hours * 3_600_000.0) as i64, end)
}

pub fn hd_stream(name: &str) -> (StreamSpec, i64, i64) {
    let (start, end) = recent(0.1);
    (historical(name, start, end, 4000, 1_500_000), start, end)
}

/// Returns once the emulator has started serving a clip (or after 10 s).
pub async fn wait_for_a_streaming_clip(world: &World) {
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

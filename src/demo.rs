//! `kvs-archiver demo`: the main job on an embedded default. Starts the bundled emulator
//! with a synthetic camera, archives ten minutes of it into a local directory with a local
//! ledger, and says where the MP4 files are and how to play one.

use crate::config::{Config, StreamConfig};
use crate::domain::TimestampSource;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

const CAMERA: &str = "demo-camera";

pub async fn run(output: &Path, shutdown: &Shutdown) -> Result<PathBuf> {
    let mut camera = StreamSpec::live(CAMERA);
    camera.backlog = Duration::from_secs(15 * 60);
    camera.fragment_durations_ms = vec![2000];
    camera.fragment_size = 40_000;
    let emulator = Emulator::start(EmulatorConfig {
        streams: vec![camera],
        ..EmulatorConfig::default()
    })
    .await
    .map_err(|e| Error::Usage(format!("demo: cannot start the bundled KVS emulator: {e}")))?;
    eprintln!(
        "demo: bundled KVS emulator at {} with camera {CAMERA:?}",
        emulator.base_url()
    );

    let archive = output.join("archive");
    let mut config = Config::default();
    config.aws.kinesis_video_endpoint_url = Some(emulator.base_url().to_string());
    config.state.database_url = format!("sqlite://{}", output.join("state.db").display());
    config.destination.directory = Some(archive.clone());
    config.destination.prefix = String::new();
    config.streams = vec![StreamConfig::named(CAMERA)];
    config.validate()?;

    // The emulator is a sandbox with its own keys: the user's AWS credentials stay unused.
    let credentials = aws_sdk_kinesisvideo::config::Credentials::new(
        DEFAULT_ACCESS_KEY_ID,
        DEFAULT_SECRET_ACCESS_KEY,
        None,
        None,
        "kvs-archiver-demo",
    );
    let sdk = crate::app::sdk_loader(&config.aws)
        .credentials_provider(credentials)
        .load()
        .await;
    let archiver = crate::app::build(config, &sdk, crate::ledger::Role::Backfill).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let (start, end) = (now - 11 * 60_000, now - 60_000);
    eprintln!(
        "demo: archiving {} .. {} into {}",
        crate::domain::rfc3339(start),
        crate::domain::rfc3339(end),
        archive.display()
    );
    let summary = crate::app::backfill(&archiver, CAMERA, start, end, shutdown).await?;
    eprintln!("demo: {}", crate::app::describe_run(&summary));
    let chunks = archiver
        .ledger
        .done_in(CAMERA, TimestampSource::Server, start - 60_000, end)
        .await?;
    let first = chunks
        .first()
        .map(|c| archive.join(&c.object_key))
        .ok_or_else(|| Error::Usage("demo: nothing was archived".into()))?;
    println!(
        "Archived {} MP4 files under {}",
        summary.done,
        archive.display()
    );
    println!("Play one:   ffplay {}", first.display());
    println!(
        "Check one:  ffprobe -v error -show_entries format=duration {}",
        first.display()
    );
    println!(
        "Ledger:     kvs-archiver status (with state.database_url = sqlite://{})",
        output.join("state.db").display()
    );
    archiver.close().await;
    if summary.complete() {
        Ok(first)
    } else {
        Err(Error::Usage(format!(
            "demo: {}",
            crate::app::describe_run(&summary)
        )))
    }
}

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
    archiver.close().await;
    let config_path = write_config(output, &archive)?;
    // As this process was started (`target/debug/kvs-archiver` under `cargo run`), so the
    // commands work as printed.
    let program = std::env::args()
        .next()
        .unwrap_or_else(|| "kvs-archiver".to_string());
    let with = format!("{program} --config {}", config_path.display());
    let middle = crate::domain::rfc3339(start + (end - start) / 2);
    let export_end = crate::domain::rfc3339(start + (end - start) / 2 + 60_000);
    println!(
        "The demo left its configuration in {}; with it:",
        config_path.display()
    );
    println!("  {with} status");
    println!("  {with} find --stream {CAMERA} --at {middle}");
    println!(
        "  {with} export --stream {CAMERA} --start {middle} --end {export_end} -o {}",
        output.join("one-minute.mp4").display()
    );
    println!("  {with} serve    # the archive's page on http://127.0.0.1:8080/");
    println!(
        "(the bundled KVS emulator stops with the demo: `plan`, `backfill` and `verify` need a KVS, so they are not listed)"
    );
    if summary.complete() {
        Ok(first)
    } else {
        Err(Error::Usage(format!(
            "demo: {}",
            crate::app::describe_run(&summary)
        )))
    }
}

/// Writes the demo's configuration (its ledger and archive, with absolute paths) beside
/// them, for the commands the demo prints.
fn write_config(output: &Path, archive: &Path) -> Result<PathBuf> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let path = output.join("kvs-archiver.toml");
    let text = format!(
        "# Written by `kvs-archiver demo`: the demo's ledger and archive. The bundled KVS\n\
         # emulator stopped with the demo, so `status`, `find`, `export` and `serve` work\n\
         # from here; `plan`, `backfill` and `verify` need a KVS.\n\
         [aws]\nregion = \"us-east-1\"\n\n\
         [state]\ndatabase_url = \"sqlite://{}\"\n\n\
         [destination]\ndirectory = \"{}\"\nprefix = \"\"\n\n\
         [[streams]]\nname = \"{CAMERA}\"\n",
        absolute(&output.join("state.db")).display(),
        absolute(archive).display(),
    );
    std::fs::write(&path, text).map_err(|e| {
        Error::Usage(format!(
            "demo: cannot write {}: {e}; check that the directory is writable",
            path.display()
        ))
    })?;
    Ok(path)
}

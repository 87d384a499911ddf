//! `kvs-archiver demo`: the main job on an embedded default. Starts the bundled emulator
//! with a synthetic camera, archives ten minutes of it into a local directory with a local
//! ledger, and says where the MP4 files are and how to play one.

use crate::config::{Config, StreamConfig};
use crate::domain::TimestampSource;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use kvs_emulator::{EmulatorConfig, StreamSpec};
use std::path::{Path, PathBuf};

const CAMERA: &str = "demo-camera";

/// `kvs-archiver demo`: archives ten minutes of the bundled emulator's camera under
/// `output` and leaves a configuration there for the other commands; returns the first MP4
/// written.
pub async fn run(output: &Path, shutdown: &Shutdown) -> Result<PathBuf> {
    // A finished stretch of camera (not a live one): the emulator makes the same
    // fragments from the same description, so the configuration the demo leaves starts
    // it again for `plan`, `verify` and the rest, and they see what the demo archived.
    let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 0);
    let mut camera = StreamSpec::historical(CAMERA, now - chrono::Duration::minutes(15), now);
    camera.fragment_durations_ms = vec![2000];
    camera.fragment_size = 40_000;
    // KVS's longest retention (10 years): the stream the emulator makes again later still
    // holds what the demo archived, so `verify` checks it for as long as the demo's files
    // are kept.
    camera.data_retention_hours = 87_600;
    let emulator_config = EmulatorConfig {
        streams: vec![camera],
        ..EmulatorConfig::default()
    };
    let emulator_file = write_emulator_config(output, &emulator_config)?;

    // The same configuration the demo leaves behind, and the same start-up a user's
    // command with it goes through: the bundled emulator, signed with its own keys.
    let archive = output.join("archive");
    let mut config = Config::default();
    config.aws.bundled_emulator = Some(emulator_file.clone());
    config.ledger.database_url = format!("sqlite://{}", output.join("state.db").display());
    config.destination.directory = Some(archive.clone());
    config.destination.prefix = String::new();
    config.streams = vec![StreamConfig::named(CAMERA)];
    config.validate()?;
    let emulator = crate::app::start_bundled_emulator(&mut config).await?;
    eprintln!(
        "demo: bundled KVS emulator at {} with camera {CAMERA:?}",
        config
            .aws
            .kinesis_video_endpoint_url
            .as_deref()
            .unwrap_or_default()
    );
    let sdk = crate::app::sdk_config(&config.aws).await?;
    let archiver = crate::app::build(config, &sdk, crate::ledger::Role::Backfill).await?;
    let now = now.timestamp_millis();
    let (start, end) = (now - 11 * 60_000, now - 60_000);
    eprintln!(
        "demo: archiving {} .. {} into {}",
        crate::domain::rfc3339(start),
        crate::domain::rfc3339(end),
        archive.display()
    );
    let summary = crate::app::backfill_with(&archiver, CAMERA, start, end, shutdown).await?;
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
    drop(emulator);
    let config_path = write_config(output, &archive, &emulator_file)?;
    print_next_commands(output, &config_path, start, end);
    if summary.complete() {
        Ok(first)
    } else {
        Err(Error::Usage(format!(
            "demo: {}",
            crate::app::describe_run(&summary)
        )))
    }
}

/// What to run next with the configuration the demo left, over its archived range.
fn print_next_commands(output: &Path, config_path: &Path, start: i64, end: i64) {
    // As this process was started (`target/debug/kvs-archiver` under `cargo run`), so the
    // commands work as printed.
    let program = std::env::args()
        .next()
        .unwrap_or_else(|| "kvs-archiver".to_string());
    let with = format!("{program} --config {}", config_path.display());
    let range = format!(
        "--stream {CAMERA} --start {} --end {}",
        crate::domain::rfc3339(start),
        crate::domain::rfc3339(end)
    );
    let middle = crate::domain::rfc3339(start + (end - start) / 2);
    let export_end = crate::domain::rfc3339(start + (end - start) / 2 + 60_000);
    println!(
        "The demo left its configuration in {} (KVS: the bundled emulator, started by each command); with it:",
        config_path.display()
    );
    println!("  {with} status");
    println!("  {with} plan {range}      # nothing left to fetch");
    println!("  {with} verify {range}    # every fragment in an object, every object whole");
    println!("  {with} find --stream {CAMERA} --at {middle}");
    println!(
        "  {with} export --stream {CAMERA} --start {middle} --end {export_end} -o {}",
        output.join("one-minute.mp4").display()
    );
    println!("  {with} serve    # the archive's page on http://127.0.0.1:8080/");
}

/// Writes the bundled emulator's configuration (the demo camera) beside the archive.
fn write_emulator_config(output: &Path, emulator: &EmulatorConfig) -> Result<PathBuf> {
    let path = output.join("emulator.toml");
    let text = toml::to_string(emulator)
        .map_err(|e| Error::Usage(format!("demo: cannot describe the demo camera: {e}")))?;
    let text = format!(
        "# Written by `kvs-archiver demo`: the bundled KVS emulator's demo camera, started\n\
         # again by every command run with kvs-archiver.toml beside this file.\n{text}"
    );
    write(&path, &text)?;
    Ok(path)
}

/// Writes the demo's configuration (its ledger, archive and emulator, with absolute
/// paths) beside them, for the commands the demo prints.
fn write_config(output: &Path, archive: &Path, emulator: &Path) -> Result<PathBuf> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let path = output.join("kvs-archiver.toml");
    let text = format!(
        "# Written by `kvs-archiver demo`: the demo's ledger and archive, and KVS as the\n\
         # bundled emulator (started inside each command from emulator.toml).\n\
         [aws]\nregion = \"us-east-1\"\nbundled_emulator = {}\n\n\
         [ledger]\ndatabase_url = {}\n\n\
         [destination]\ndirectory = {}\nprefix = \"\"\n\n\
         [[streams]]\nname = \"{CAMERA}\"\n",
        quoted(absolute(emulator).display().to_string()),
        quoted(format!(
            "sqlite://{}",
            absolute(&output.join("state.db")).display()
        )),
        quoted(absolute(archive).display().to_string()),
    );
    write(&path, &text)?;
    Ok(path)
}

/// `text` as a TOML string, escaped as TOML escapes.
fn quoted(text: String) -> String {
    toml::Value::String(text).to_string()
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| {
        Error::Usage(format!(
            "demo: cannot write {}: {e}; check that the directory is writable",
            path.display()
        ))
    })
}

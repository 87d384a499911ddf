//! The command line: parse, hand over to the library, map the outcome to an exit code
//! (0: done; 1: the run finished with failures; 2: bad input or configuration).

use kvs_archiver::app;
use kvs_archiver::cli::{Cli, Command, RangeArgs};
use kvs_archiver::config::Config;
use kvs_archiver::error::Error;
use kvs_archiver::find::Finding;
use kvs_archiver::ledger::ChunkState;
use kvs_archiver::shutdown::Shutdown;
use std::process::ExitCode;

/// `backfill`'s, `restore`'s and `plan`'s range in epoch milliseconds, with an error
/// naming the flag that is wrong.
fn range_ms(range: &RangeArgs) -> Result<(i64, i64), Error> {
    Ok((
        app::parse_time(&range.start, "--start")?,
        app::parse_time(&range.end, "--end")?,
    ))
}

/// Prints `value` as pretty JSON on stdout (`--json`).
fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn print_finding(stream: &str, t: i64, finding: &Finding, url: Option<&str>, json: bool) {
    use kvs_archiver::domain::rfc3339;
    if json {
        let shown = serde_json::json!({ "stream": stream, "at": rfc3339(t), "finding": finding, "url": url });
        print_json(&shown);
        return;
    }
    let at = rfc3339(t);
    match finding {
        Finding::Archived {
            object_key,
            offset_ms,
            ..
        } => {
            let seconds = *offset_ms as f64 / 1000.0;
            println!("{stream} at {at}: {object_key}, {seconds:.3} s in");
            if let Some(url) = url {
                println!("play: ffplay -ss {seconds:.3} '{url}'");
            }
        }
        Finding::NotArchived {
            state,
            object_key,
            last_error,
        } => {
            let why = match state {
                ChunkState::Failed => format!(
                    "its chunk failed ({}); `kvs-archiver backfill` over this time tries again",
                    last_error.as_deref().unwrap_or("no error recorded")
                ),
                ChunkState::Expired => {
                    "KVS deleted the media (its retention ran out) before it was archived".into()
                }
                _ => format!("its chunk is {}: not archived yet", state.as_str()),
            };
            println!("{stream} at {at}: not archived: {why} (object {object_key})");
        }
        Finding::NotPlannedYet { planned_through_ms } => println!(
            "{stream} at {at}: not archived yet: planning has reached {}",
            planned_through_ms
                .map(rfc3339)
                .unwrap_or_else(|| "nothing of this stream".into())
        ),
        Finding::NoMedia { before, after } => {
            println!("{stream} at {at}: KVS had no media then");
            if let Some((end, key)) = before {
                println!("  before: media ends at {} in {key}", rfc3339(*end));
            }
            if let Some((start, key)) = after {
                println!("  after: media resumes at {} in {key}", rfc3339(*start));
            }
        }
    }
}

/// 2 for what the operator must fix (input, configuration, credentials, permissions),
/// 1 for work that failed.
fn exit_for(error: &Error) -> ExitCode {
    match error {
        Error::Config(_) | Error::Usage(_) | Error::Credentials(_) => ExitCode::from(2),
        e if e.is_denied() => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    return_large_buffers_to_the_system();
    let cli = Cli::parse();
    kvs_archiver::telemetry::init_logging();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            tracing::debug!(?error, "the command failed");
            eprintln!("kvs-archiver: {error}");
            exit_for(&error)
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(output: &std::path::Path) -> Result<ExitCode, Error> {
    let shutdown = Shutdown::on_signals(std::time::Duration::from_secs(5));
    std::fs::create_dir_all(output)
        .map_err(|e| Error::Usage(format!("demo: cannot create {}: {e}", output.display())))?;
    kvs_archiver::demo::run(output, &shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Exit status 0 when `ok`, else 1 (the work failed; what failed was printed).
fn status_for(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Prints `value` as JSON with `json`, else its human text.
fn print_report<T: serde::Serialize>(value: &T, json: bool, text: impl FnOnce(&T) -> String) {
    if json {
        print_json(value);
    } else {
        println!("{}", text(value));
    }
}

/// glibc raises its mmap threshold each time a large buffer is freed, so later buffers of
/// that size (a clip's sample tables, a day long: megabytes) come from the heap and their
/// pages stay resident after they are freed. A fixed threshold keeps every buffer over
/// 128 KiB mapped on its own and returned when freed: a 24-hour export peaks at about
/// 61 MiB instead of 86 (docs/PERFORMANCE.md).
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; the value is in its valid range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// The commands that need no configuration; `None` for the others.
async fn run_without_configuration(command: &Command) -> Result<Option<ExitCode>, Error> {
    match command {
        #[cfg(feature = "demo")]
        Command::Demo { output } => demo(output).await.map(Some),
        Command::Completions { shell } => {
            let mut command = kvs_archiver::cli::command();
            clap_complete::generate(*shell, &mut command, "kvs-archiver", &mut std::io::stdout());
            Ok(Some(ExitCode::SUCCESS))
        }
        Command::Man => {
            let page = clap_mangen::Man::new(kvs_archiver::cli::command());
            page.render(&mut std::io::stdout())
                .map_err(|e| Error::Usage(format!("man: cannot write the page: {e}")))?;
            Ok(Some(ExitCode::SUCCESS))
        }
        _ => Ok(None),
    }
}

/// Parses nothing more: loads the configuration, starts the bundled emulator for the
/// commands that ask KVS, hands the command over, and maps its result to an exit status.
async fn run(cli: Cli) -> Result<ExitCode, Error> {
    if let Some(code) = run_without_configuration(&cli.command).await? {
        return Ok(code);
    }
    let mut config = Config::load(cli.config.as_deref())?;
    // The bundled emulator serves for as long as the command runs.
    let _bundled_emulator = if asks_kvs(&cli.command) {
        app::start_bundled_emulator(&mut config).await?
    } else {
        None
    };
    let shutdown = Shutdown::on_signals(config.daemon.shutdown_grace);
    match cli.command {
        Command::CheckConfig => {
            println!("# configuration is valid");
            print!("{}", config.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::IamPolicy { account } => {
            print_iam_policy(&config, account.as_deref());
            Ok(ExitCode::SUCCESS)
        }
        Command::Find { stream, at, json } => run_find(config, &stream, &at, json).await,
        Command::Export {
            stream,
            start,
            end,
            output,
            bundle,
            gaps,
            cut,
            wall_clock,
            json,
        } => {
            let spec = kvs_archiver::playback::clip::ClipSpec {
                start: app::parse_time(&start, "--start")?,
                end: app::parse_time(&end, "--end")?,
                gaps,
                cut,
                wall_clock_text: wall_clock,
            };
            let exported = app::export(config, &stream, spec, &output, bundle).await?;
            print_report(&exported, json, app::Exported::describe);
            Ok(ExitCode::SUCCESS)
        }
        Command::RebuildLedger {
            stream,
            merge,
            json,
        } => run_rebuild_ledger(config, stream.as_deref(), merge, json).await,
        Command::Serve { listen, token_file } => {
            let token = serve_token(token_file.as_deref())?;
            app::serve(config, listen, token, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => run_status(&config, json).await,
        Command::Plan { range, json } => {
            let (start, end) = range_ms(&range)?;
            let plan = app::plan(config, &range.stream, start, end).await?;
            print_report(&plan, json, |p| p.describe());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            stream,
            start,
            end,
            repair,
            json,
        } => {
            let range = (start.as_deref(), end.as_deref());
            let report = app::verify(config, &stream, range, repair, &shutdown).await?;
            print_report(&report, json, |r| r.describe());
            Ok(status_for(report.clean()))
        }
        Command::Backfill { range } => run_backfill(config, range, &shutdown).await,
        Command::Restore {
            range,
            tier,
            days,
            wait,
            json,
        } => run_restore(config, range, tier, days, wait, json).await,
        Command::Run { once } => {
            let sdk = app::sdk_config(&config.aws).await?;
            let ok = app::run_daemon(config, &sdk, once, shutdown).await?;
            Ok(status_for(ok))
        }
        // Answered before the configuration was read.
        #[cfg(feature = "demo")]
        Command::Demo { .. } => Ok(ExitCode::SUCCESS),
        Command::Completions { .. } | Command::Man => Ok(ExitCode::SUCCESS),
    }
}

/// Whether the command asks KVS (only those start the bundled emulator).
fn asks_kvs(command: &Command) -> bool {
    matches!(
        command,
        Command::Backfill { .. }
            | Command::Plan { .. }
            | Command::Verify { .. }
            | Command::Run { .. }
            | Command::RebuildLedger { .. }
    )
}

/// `find`: exit status 1 when no object holds the instant.
async fn run_find(config: Config, stream: &str, at: &str, json: bool) -> Result<ExitCode, Error> {
    let t = app::parse_time(at, "--at")?;
    let (finding, url, readiness) = app::find(config, stream, t).await?;
    let cold = readiness.filter(|r| r.blocks_reads());
    match &cold {
        Some(cold) => print_cold(stream, t, &finding, cold, json),
        None => print_finding(stream, t, &finding, url.as_deref(), json),
    }
    Ok(status_for(
        matches!(finding, Finding::Archived { .. }) && cold.is_none(),
    ))
}

/// `find` of an instant whose object must be restored before it can be played.
fn print_cold(
    stream: &str,
    t: i64,
    finding: &Finding,
    readiness: &kvs_archiver::destination::Readiness,
    json: bool,
) {
    use kvs_archiver::domain::rfc3339;
    let at = rfc3339(t);
    if json {
        print_json(
            &serde_json::json!({ "stream": stream, "at": at, "finding": finding, "readiness": readiness }),
        );
        return;
    }
    if let Finding::Archived { object_key, .. } = finding {
        println!(
            "{stream} at {at}: {object_key}: {}",
            kvs_archiver::restore::describe(readiness)
        );
        println!(
            "restore: kvs-archiver restore --stream {stream} --start {at} --end {at} [--tier Bulk]"
        );
    }
}

/// `iam-policy`: one policy, or with `destination.role_arn` one for the credentials and
/// one for the role.
fn print_iam_policy(config: &Config, account: Option<&str>) {
    let policy = kvs_archiver::iam::policy(config, account);
    match kvs_archiver::iam::split_for_role(config, &policy) {
        Some(split) => print_json(&split),
        None => print_json(&policy),
    }
}

/// `restore`: exit status 1 while a restore is still under way.
async fn run_restore(
    config: Config,
    range: RangeArgs,
    tier: kvs_archiver::destination::RestoreTier,
    days: i32,
    wait: bool,
    json: bool,
) -> Result<ExitCode, Error> {
    let poll = wait.then_some(std::time::Duration::from_secs(60));
    let report = app::restore(config, &range.stream, range_ms(&range)?, tier, days, poll).await?;
    print_report(&report, json, |r| r.describe());
    Ok(status_for(report.restoring.is_empty()))
}

/// `rebuild-ledger`: exit status 1 when an object's metadata was refused.
async fn run_rebuild_ledger(
    config: Config,
    stream: Option<&str>,
    merge: bool,
    json: bool,
) -> Result<ExitCode, Error> {
    let report = app::rebuild_ledger(config, stream, merge).await?;
    print_report(&report, json, |r| r.describe());
    // Objects left out for their metadata are work not done: the operator looks.
    Ok(status_for(report.untrusted.is_empty()))
}

/// `status`: every stream's chunks and the instances alive, as JSON or a table.
async fn run_status(config: &Config, json: bool) -> Result<ExitCode, Error> {
    let (streams, instances) = app::status(config).await?;
    if json {
        print_json(&serde_json::json!({ "streams": streams, "instances": instances }));
    } else {
        print!(
            "{}",
            kvs_archiver::status::describe(
                &streams,
                &instances,
                chrono::Utc::now().timestamp_millis(),
                config.daemon.retention_alarm,
                config.ledger.lease,
            )
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `backfill`: exit status 1 when a chunk is left undone, with a hint that running it
/// again retries them.
async fn run_backfill(
    config: Config,
    range: RangeArgs,
    shutdown: &Shutdown,
) -> Result<ExitCode, Error> {
    let (start, end) = range_ms(&range)?;
    let stream = range.stream;
    let summary = app::backfill(config, &stream, start, end, shutdown).await?;
    let text = app::describe_run(&summary);
    if summary.complete() {
        eprintln!("backfill {stream}: complete: {text}");
    } else {
        eprintln!("backfill {stream}: incomplete: {text}\nrun the same command again to retry what failed");
    }
    Ok(status_for(summary.complete()))
}

/// `serve`'s bearer token: from `--token-file`, else `KVS_ARCHIVER_SERVE_TOKEN`.
fn serve_token(token_file: Option<&std::path::Path>) -> Result<Option<String>, Error> {
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Error::Usage(format!("--token-file {}: {e}", path.display())))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("KVS_ARCHIVER_SERVE_TOKEN")
            .ok()
            .map(|t| t.trim().to_string()),
    };
    Ok(token.filter(|t| !t.is_empty()))
}

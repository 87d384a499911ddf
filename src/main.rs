//! The command line: parse, hand over to the library, map the outcome to an exit code
//! (0: done; 1: the run finished with failures; 2: bad input or configuration).

use clap::{Parser, Subcommand};
use kvs_archiver::app;
use kvs_archiver::config::Config;
use kvs_archiver::error::Error;
use kvs_archiver::find::Finding;
use kvs_archiver::ledger::ChunkState;
use kvs_archiver::shutdown::Shutdown;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kvs-archiver",
    version,
    about = "Archives Kinesis Video Streams media to S3 as playable MP4 files",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// Configuration file (TOML); KVS_ARCHIVER_* environment variables override it.
    #[arg(long, global = true, env = "KVS_ARCHIVER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

const EXIT_STATUS: &str = "Exit status: 0 done; 1 the work failed (what failed is printed; run the same command again to retry); 2 bad input or configuration (the message says what to fix); 130 stopped at once by a second signal.";

/// A stream and a time range, as `backfill` and `plan` take them.
#[derive(clap::Args)]
struct RangeArgs {
    /// A stream listed under [[streams]] in the configuration (its name or ARN's name).
    #[arg(long)]
    stream: String,
    /// RFC 3339, e.g. 2026-11-20T00:00:00Z
    #[arg(long)]
    start: String,
    /// RFC 3339; fragments starting at this instant are included.
    #[arg(long)]
    end: String,
}

impl RangeArgs {
    /// The range in epoch milliseconds, with an error naming the flag that is wrong.
    fn parse(&self) -> Result<(i64, i64), Error> {
        Ok((
            app::parse_time(&self.start, "--start")?,
            app::parse_time(&self.end, "--end")?,
        ))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check a stream's archive: every done chunk's object against the ledger (size,
    /// checksum, metadata), KVS's fragments against the ledger, and objects the ledger
    /// does not know. Exit status 1 on any discrepancy.
    Verify {
        /// A stream listed under [[streams]] in the configuration.
        #[arg(long)]
        stream: String,
        /// RFC 3339; default: KVS's retention edge.
        #[arg(long)]
        start: Option<String>,
        /// RFC 3339; default: now.
        #[arg(long)]
        end: Option<String>,
        /// Plan missing or damaged chunks again and archive them now (extra objects are
        /// only reported).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Archive every fragment of a stream whose start lies in [start, end]; resumable.
    Backfill {
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Start restores of a range's objects that are in GLACIER or DEEP_ARCHIVE (or an
    /// Intelligent-Tiering archive tier), and show where they stand. Exit status 1 while
    /// any is still under way.
    Restore {
        #[command(flatten)]
        range: RangeArgs,
        /// Expedited (minutes, the highest price; not for DEEP_ARCHIVE), Standard (hours)
        /// or Bulk (the slowest and cheapest).
        #[arg(long, value_enum, ignore_case = true, default_value = "standard")]
        tier: kvs_archiver::destination::RestoreTier,
        /// How long the restored copy stays readable.
        #[arg(long, default_value_t = 7)]
        days: i32,
        /// Check every minute until every restore has finished.
        #[arg(long)]
        wait: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the chunks a backfill would fetch, without calling GetClip or S3.
    Plan {
        #[command(flatten)]
        range: RangeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Per stream: what is archived, pending and failed (with the last error).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Keep every configured stream archived, on each stream's schedule (a daemon).
    Run {
        /// One pass over every stream, then exit (for systemd timers and cron); the exit
        /// status tells whether anything failed.
        #[arg(long)]
        once: bool,
    },
    /// Which archived object holds an instant, how far into it, and a command that plays
    /// it from there; or why no object holds it. Exit status 1 when none does.
    Find {
        /// A stream listed under [[streams]] in the configuration.
        #[arg(long)]
        stream: String,
        /// The instant, RFC 3339 (e.g. 2026-03-03T14:07:00Z or 2026-03-03T15:07:00+01:00).
        #[arg(long)]
        at: String,
        /// Print the finding as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write one MP4 of [start, end) from the archive (S3 or the directory), not from
    /// KVS: it spans as many objects as it needs, starts on the frame at --start (decoded
    /// from the keyframe before it, which the file holds), and copies the video as it is
    /// (no re-encoding). Gaps and objects left out are reported. With several --stream
    /// (or none and --bundle, for all), writes an incident bundle: a folder of one MP4 per
    /// stream, manifest.json and SHA256SUMS (check it with `sha256sum -c SHA256SUMS`).
    Export {
        /// A stream listed under [[streams]]; repeat it for a bundle. None: every
        /// configured stream (a bundle).
        #[arg(long)]
        stream: Vec<String>,
        /// RFC 3339, e.g. 2026-11-20T14:07:10Z
        #[arg(long)]
        start: String,
        /// RFC 3339: frames starting at or after it are left out.
        #[arg(long)]
        end: String,
        /// The MP4 file to write, or the bundle's new folder (written whole or not at
        /// all).
        #[arg(short, long)]
        output: PathBuf,
        /// Write a bundle folder even for one stream.
        #[arg(long)]
        bundle: bool,
        /// Where the archive has no media: `hold` keeps the frame before the gap on
        /// screen, so output time t is wall time start + t; `join` plays on at once.
        #[arg(long, value_enum, default_value = "hold")]
        gaps: kvs_archiver::playback::GapMode,
        /// `exact`: start on the frame at --start (an edit list hides the frames before
        /// it); `keyframe`: start on the keyframe at or before --start, every frame shown.
        #[arg(long, value_enum, default_value = "exact")]
        cut: kvs_archiver::playback::clip::Cut,
        /// Add a subtitle track showing each second's wall-clock time (UTC).
        #[arg(long)]
        wall_clock: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the ledger from the destination after its database was lost: a listing of
    /// the objects, a HeadObject of each for its metadata, and one ListFragments per
    /// stream (no GetClip).
    /// Refuses a ledger that already holds chunks unless --merge.
    RebuildLedger {
        /// Only this configured stream (default: all).
        #[arg(long)]
        stream: Option<String>,
        /// Add the objects the ledger lacks to a ledger that already holds chunks.
        #[arg(long)]
        merge: bool,
        #[arg(long)]
        json: bool,
    },
    /// Serve a read-only web page of the archive: a coverage timeline per stream
    /// (archived, gaps, failed, expired, at risk, late and Matroska), and playback of
    /// any object in the page. Loopback by default; elsewhere only with a token (one is
    /// made and printed once when none is given).
    Serve {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// A file holding the bearer token, at least 32 bytes (or set
        /// KVS_ARCHIVER_SERVE_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Validate the configuration and print it.
    CheckConfig,
    /// Print the least-privilege IAM policy (JSON) for the configured streams and
    /// destination: exactly the actions this program calls.
    IamPolicy {
        /// The streams' AWS account id, for streams configured by name (default `*`).
        #[arg(long)]
        account: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `kvs-archiver completions bash > /etc/bash_completion.d/kvs-archiver`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), e.g. `kvs-archiver man | man -l -`.
    Man,
    /// Archive ten minutes of a bundled emulated camera into ./demo-output.
    // Only in builds with the emulator: the Debian package's binary has no `demo` to offer.
    #[cfg(feature = "demo")]
    Demo {
        #[arg(long, default_value = "demo-output")]
        output: PathBuf,
    },
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
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "kvs-archiver", &mut std::io::stdout());
            Ok(Some(ExitCode::SUCCESS))
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
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
            let (start, end) = range.parse()?;
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
    let report = app::restore(config, &range.stream, range.parse()?, tier, days, poll).await?;
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
    let (start, end) = range.parse()?;
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

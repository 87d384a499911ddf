//! The command line's grammar: every command, its flags and their help, as one
//! `clap::Command` that the parser, the shell completions and the manual page all read;
//! and the typed [`Cli`] a command line parses into.
//!
//! Written with clap's builder rather than its derive macros: the grammar is the same
//! data either way, and the derive's proc-macro crate was a tenth of what the README's
//! first command built above the floor of the prescribed crates (docs/PERFORMANCE.md,
//! "Build").

use crate::destination::RestoreTier;
use crate::playback::clip::Cut;
use crate::playback::GapMode;
use clap::builder::{EnumValueParser, PossibleValue};
use clap::error::ErrorKind;
use clap::{value_parser, Arg, ArgAction, ArgMatches, ValueEnum};
use clap_complete::Shell;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A command line, parsed.
pub struct Cli {
    /// The configuration file (`--config` or `KVS_ARCHIVER_CONFIG`).
    pub config: Option<PathBuf>,
    /// What to do.
    pub command: Command,
}

/// A stream and a time range, as `backfill`, `restore` and `plan` take them (the times as
/// given: the command names the flag when one does not parse).
pub struct RangeArgs {
    /// A stream listed under `[[streams]]`.
    pub stream: String,
    /// `--start`, RFC 3339.
    pub start: String,
    /// `--end`, RFC 3339.
    pub end: String,
}

/// The commands, with their flags (the flags' help is in [`command`]).
// Each field is the flag of the same name, whose help `command` gives once.
#[allow(missing_docs)]
pub enum Command {
    /// `verify`: a stream's archive checked against the ledger and KVS.
    Verify {
        stream: String,
        start: Option<String>,
        end: Option<String>,
        repair: bool,
        json: bool,
    },
    /// `backfill`: a range archived, resumably.
    Backfill { range: RangeArgs },
    /// `restore`: restores of a range's objects in archive storage classes.
    Restore {
        range: RangeArgs,
        tier: RestoreTier,
        days: i32,
        wait: bool,
        json: bool,
    },
    /// `plan`: the chunks a backfill would fetch.
    Plan { range: RangeArgs, json: bool },
    /// `status`: what is archived, pending and failed, per stream.
    Status { json: bool },
    /// `run`: the daemon, or with `--once` one pass.
    Run { once: bool },
    /// `find`: the object holding an instant.
    Find {
        stream: String,
        at: String,
        json: bool,
    },
    /// `export`: one MP4 (or an incident bundle) of a range, from the archive.
    Export {
        stream: Vec<String>,
        start: String,
        end: String,
        output: PathBuf,
        bundle: bool,
        gaps: GapMode,
        cut: Cut,
        wall_clock: bool,
        json: bool,
    },
    /// `rebuild-ledger`: the ledger again from the destination.
    RebuildLedger {
        stream: Option<String>,
        merge: bool,
        json: bool,
    },
    /// `serve`: the archive's read-only page and API.
    Serve {
        listen: SocketAddr,
        token_file: Option<PathBuf>,
    },
    /// `check-config`: the configuration, validated and printed.
    CheckConfig,
    /// `iam-policy`: the least-privilege policy.
    IamPolicy { account: Option<String> },
    /// `completions`: a shell completion script.
    Completions { shell: Shell },
    /// `man`: the manual page.
    Man,
    /// `demo`: the bundled example.
    #[cfg(feature = "demo")]
    Demo { output: PathBuf },
}

const EXIT_STATUS: &str = "Exit status: 0 done; 1 the work failed (what failed is printed; run the same command again to retry); 2 bad input or configuration (the message says what to fix); 130 stopped at once by a second signal.";

impl Cli {
    /// The process's command line, parsed; on a mistake (or `--help`, `--version`) prints
    /// clap's message and exits, 2 for a mistake.
    pub fn parse() -> Cli {
        Cli::parse_from(std::env::args_os())
            .unwrap_or_else(|error| error.format(&mut command()).exit())
    }

    /// `args` (the program's name first), parsed.
    pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut matches = command().try_get_matches_from(args)?;
        let config = matches.remove_one::<PathBuf>("config");
        let Some((name, mut args)) = matches.remove_subcommand() else {
            return Err(clap::Error::raw(
                ErrorKind::MissingSubcommand,
                "a command is required\n",
            ));
        };
        let command = Command::from_matches(&name, &mut args)?;
        Ok(Cli { config, command })
    }
}

impl Command {
    fn from_matches(name: &str, m: &mut ArgMatches) -> Result<Command, clap::Error> {
        Ok(match name {
            "verify" => Command::Verify {
                stream: required(m, "stream")?,
                start: m.remove_one("start"),
                end: m.remove_one("end"),
                repair: m.get_flag("repair"),
                json: m.get_flag("json"),
            },
            "backfill" => Command::Backfill {
                range: RangeArgs::from_matches(m)?,
            },
            "restore" => Command::Restore {
                range: RangeArgs::from_matches(m)?,
                tier: required(m, "tier")?,
                days: required(m, "days")?,
                wait: m.get_flag("wait"),
                json: m.get_flag("json"),
            },
            "plan" => Command::Plan {
                range: RangeArgs::from_matches(m)?,
                json: m.get_flag("json"),
            },
            "status" => Command::Status {
                json: m.get_flag("json"),
            },
            "run" => Command::Run {
                once: m.get_flag("once"),
            },
            "find" => Command::Find {
                stream: required(m, "stream")?,
                at: required(m, "at")?,
                json: m.get_flag("json"),
            },
            "export" => Command::Export {
                stream: m
                    .remove_many("stream")
                    .map(Iterator::collect)
                    .unwrap_or_default(),
                start: required(m, "start")?,
                end: required(m, "end")?,
                output: required(m, "output")?,
                bundle: m.get_flag("bundle"),
                gaps: required(m, "gaps")?,
                cut: required(m, "cut")?,
                wall_clock: m.get_flag("wall-clock"),
                json: m.get_flag("json"),
            },
            "rebuild-ledger" => Command::RebuildLedger {
                stream: m.remove_one("stream"),
                merge: m.get_flag("merge"),
                json: m.get_flag("json"),
            },
            "serve" => Command::Serve {
                listen: required(m, "listen")?,
                token_file: m.remove_one("token-file"),
            },
            "check-config" => Command::CheckConfig,
            "iam-policy" => Command::IamPolicy {
                account: m.remove_one("account"),
            },
            "completions" => Command::Completions {
                shell: required(m, "shell")?,
            },
            "man" => Command::Man,
            #[cfg(feature = "demo")]
            "demo" => Command::Demo {
                output: required(m, "output")?,
            },
            other => {
                return Err(clap::Error::raw(
                    ErrorKind::InvalidSubcommand,
                    format!("no command `{other}`\n"),
                ))
            }
        })
    }
}

impl RangeArgs {
    fn from_matches(m: &mut ArgMatches) -> Result<RangeArgs, clap::Error> {
        Ok(RangeArgs {
            stream: required(m, "stream")?,
            start: required(m, "start")?,
            end: required(m, "end")?,
        })
    }

    fn args() -> [Arg; 3] {
        [
            option(
                "stream",
                "STREAM",
                "A stream listed under [[streams]] in the configuration (its name or ARN's name)",
            )
            .required(true),
            option("start", "START", "RFC 3339, e.g. 2026-11-20T00:00:00Z").required(true),
            option(
                "end",
                "END",
                "RFC 3339; fragments starting at this instant are included",
            )
            .required(true),
        ]
    }
}

/// A value the grammar requires or defaults, so clap has checked it is there.
fn required<T: Clone + Send + Sync + 'static>(
    m: &mut ArgMatches,
    id: &str,
) -> Result<T, clap::Error> {
    m.remove_one(id).ok_or_else(|| {
        clap::Error::raw(
            ErrorKind::MissingRequiredArgument,
            format!("--{id} is required\n"),
        )
    })
}

/// `--name <VALUE_NAME>`, taking text.
fn option(name: &'static str, value_name: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).value_name(value_name).help(help)
}

/// `--name`, a switch.
fn switch(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .action(ArgAction::SetTrue)
        .help(help)
}

fn json() -> Arg {
    switch("json", "Print the report as JSON")
}

/// The whole grammar.
pub fn command() -> clap::Command {
    clap::Command::new("kvs-archiver")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Archives Kinesis Video Streams media to S3 as playable MP4 files")
        .after_help(EXIT_STATUS)
        .subcommand_required(true)
        .arg_required_else_help(true)
        .arg(
            option(
                "config",
                "CONFIG",
                "Configuration file (TOML); KVS_ARCHIVER_* environment variables override it",
            )
            .global(true)
            .env("KVS_ARCHIVER_CONFIG")
            .value_parser(value_parser!(PathBuf)),
        )
        .subcommands(archiving_commands())
        .subcommands(reading_commands())
        .subcommands(other_commands())
}

/// The commands that archive, or say what archiving would do.
fn archiving_commands() -> Vec<clap::Command> {
    vec![
        clap::Command::new("verify")
            .about(
                "Check a stream's archive: every done chunk's object against the ledger (size, \
                 checksum, metadata), KVS's fragments against the ledger, and objects the \
                 ledger does not know. Exit status 1 on any discrepancy",
            )
            .args([
                option(
                    "stream",
                    "STREAM",
                    "A stream listed under [[streams]] in the configuration",
                )
                .required(true),
                option("start", "START", "RFC 3339; default: KVS's retention edge"),
                option("end", "END", "RFC 3339; default: now"),
                switch(
                    "repair",
                    "Plan missing or damaged chunks again and archive them now (extra objects \
                     are only reported)",
                ),
                json(),
            ]),
        clap::Command::new("backfill")
            .about("Archive every fragment of a stream whose start lies in [start, end]; resumable")
            .args(RangeArgs::args()),
        clap::Command::new("restore")
            .about(
                "Start restores of a range's objects that are in GLACIER or DEEP_ARCHIVE (or an \
                 Intelligent-Tiering archive tier), and show where they stand. Exit status 1 \
                 while any is still under way",
            )
            .args(RangeArgs::args())
            .args([
                option(
                    "tier",
                    "TIER",
                    "Expedited (minutes, the highest price; not for DEEP_ARCHIVE), Standard \
                     (hours) or Bulk (the slowest and cheapest)",
                )
                .value_parser(EnumValueParser::<RestoreTier>::new())
                .ignore_case(true)
                .default_value("standard"),
                option("days", "DAYS", "How long the restored copy stays readable")
                    .value_parser(value_parser!(i32))
                    .default_value("7"),
                switch(
                    "wait",
                    "Check every minute until every restore has finished",
                ),
                json(),
            ]),
        clap::Command::new("plan")
            .about("Print the chunks a backfill would fetch, without calling GetClip or S3")
            .args(RangeArgs::args())
            .arg(json()),
        clap::Command::new("status")
            .about("Per stream: what is archived, pending and failed (with the last error)")
            .arg(json()),
        clap::Command::new("run")
            .about("Keep every configured stream archived, on each stream's schedule (a daemon)")
            .arg(switch(
                "once",
                "One pass over every stream, then exit (for systemd timers and cron); the exit \
                 status tells whether anything failed",
            )),
    ]
}

/// The commands that read the archive back.
fn reading_commands() -> Vec<clap::Command> {
    vec![
        clap::Command::new("find")
            .about(
                "Which archived object holds an instant, how far into it, and a command that \
                 plays it from there; or why no object holds it. Exit status 1 when none does",
            )
            .args([
                option(
                    "stream",
                    "STREAM",
                    "A stream listed under [[streams]] in the configuration",
                )
                .required(true),
                option(
                    "at",
                    "AT",
                    "The instant, RFC 3339 (e.g. 2026-03-03T14:07:00Z or \
                     2026-03-03T15:07:00+01:00)",
                )
                .required(true),
                switch("json", "Print the finding as JSON"),
            ]),
        export_command(),
        clap::Command::new("rebuild-ledger")
            .about(
                "Rebuild the ledger from the destination after its database was lost: a \
                 listing of the objects, a HeadObject of each for its metadata, and one \
                 ListFragments per stream (no GetClip). Refuses a ledger that already holds \
                 chunks unless --merge",
            )
            .args([
                option(
                    "stream",
                    "STREAM",
                    "Only this configured stream (default: all)",
                ),
                switch(
                    "merge",
                    "Add the objects the ledger lacks to a ledger that already holds chunks",
                ),
                json(),
            ]),
        clap::Command::new("serve")
            .about(
                "Serve a read-only web page of the archive: a coverage timeline per stream \
                 (archived, gaps, failed, expired, at risk, late and Matroska), and playback of \
                 any object in the page. Loopback by default; elsewhere only with a token (one \
                 is made and printed once when none is given)",
            )
            .args([
                option("listen", "LISTEN", "The address to listen on")
                    .value_parser(value_parser!(SocketAddr))
                    .default_value("127.0.0.1:8080"),
                option(
                    "token-file",
                    "TOKEN_FILE",
                    "A file holding the bearer token, at least 32 bytes (or set \
                     KVS_ARCHIVER_SERVE_TOKEN)",
                )
                .value_parser(value_parser!(PathBuf)),
            ]),
    ]
}

fn export_command() -> clap::Command {
    clap::Command::new("export")
        .about(
            "Write one MP4 of [start, end) from the archive (S3 or the directory), not from \
             KVS: it spans as many objects as it needs, starts on the frame at --start (decoded \
             from the keyframe before it, which the file holds), and copies the video as it is \
             (no re-encoding). Gaps and objects left out are reported. With several --stream \
             (or none and --bundle, for all), writes an incident bundle: a folder of one MP4 \
             per stream, manifest.json and SHA256SUMS (check it with `sha256sum -c SHA256SUMS`)",
        )
        .args([
            option(
                "stream",
                "STREAM",
                "A stream listed under [[streams]]; repeat it for a bundle. None: every \
                 configured stream (a bundle)",
            )
            .action(ArgAction::Append),
            option("start", "START", "RFC 3339, e.g. 2026-11-20T14:07:10Z").required(true),
            option(
                "end",
                "END",
                "RFC 3339: frames starting at or after it are left out",
            )
            .required(true),
            option(
                "output",
                "OUTPUT",
                "The MP4 file to write, or the bundle's new folder (written whole or not at all)",
            )
            .short('o')
            .required(true)
            .value_parser(value_parser!(PathBuf)),
            switch("bundle", "Write a bundle folder even for one stream"),
            option(
                "gaps",
                "GAPS",
                "Where the archive has no media: `hold` keeps the frame before the gap on \
                 screen, so output time t is wall time start + t; `join` plays on at once",
            )
            .value_parser(EnumValueParser::<GapMode>::new())
            .default_value("hold"),
            option(
                "cut",
                "CUT",
                "`exact`: start on the frame at --start (an edit list hides the frames before \
                 it); `keyframe`: start on the keyframe at or before --start, every frame shown",
            )
            .value_parser(EnumValueParser::<Cut>::new())
            .default_value("exact"),
            switch(
                "wall-clock",
                "Add a subtitle track showing each second's wall-clock time (UTC)",
            ),
            json(),
        ])
}

/// Configuration, the shell and the bundled example.
fn other_commands() -> Vec<clap::Command> {
    let commands = vec![
        clap::Command::new("check-config").about("Validate the configuration and print it"),
        clap::Command::new("iam-policy")
            .about(
                "Print the least-privilege IAM policy (JSON) for the configured streams and \
                 destination: exactly the actions this program calls",
            )
            .arg(option(
                "account",
                "ACCOUNT",
                "The streams' AWS account id, for streams configured by name (default `*`)",
            )),
        clap::Command::new("completions")
            .about(
                "Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g. \
                 `kvs-archiver completions bash > /etc/bash_completion.d/kvs-archiver`",
            )
            .arg(
                Arg::new("shell")
                    .value_name("SHELL")
                    .required(true)
                    .value_parser(EnumValueParser::<Shell>::new()),
            ),
        clap::Command::new("man")
            .about("Print the manual page (roff), e.g. `kvs-archiver man | man -l -`"),
    ];
    // Only in builds with the emulator: the Debian package's binary has no `demo` to offer.
    #[cfg(feature = "demo")]
    let commands = {
        let mut commands = commands;
        commands.push(
            clap::Command::new("demo")
                .about("Archive ten minutes of a bundled emulated camera into ./demo-output")
                .arg(
                    option("output", "OUTPUT", "The folder to write")
                        .value_parser(value_parser!(PathBuf))
                        .default_value("demo-output"),
                ),
        );
        commands
    };
    commands
}

/// `ValueEnum` for a flag that takes one of a few words: each value, its word and what it
/// means, listed once (what clap's derive generated from the variants' doc comments).
macro_rules! words {
    ($type:ty { $($value:expr => $word:literal: $help:expr,)+ }) => {
        impl ValueEnum for $type {
            fn value_variants<'a>() -> &'a [Self] {
                &[$($value),+]
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                [$(($value, $word, $help)),+]
                    .into_iter()
                    .find(|(value, _, _)| value == self)
                    .map(|(_, word, help)| PossibleValue::new(word).help(help))
            }
        }
    };
}

words!(RestoreTier {
    RestoreTier::Expedited => "expedited": "Minutes, at the highest price (not for DEEP_ARCHIVE)",
    RestoreTier::Standard => "standard": "Hours",
    RestoreTier::Bulk => "bulk": "The slowest and cheapest",
});

words!(GapMode {
    GapMode::Hold => "hold":
        "The frame before a gap stays on screen for the gap's length: the output's time `t` \
         is always wall time `first frame + t` (the first frame is the keyframe at or before \
         the requested start)",
    GapMode::Join => "join":
        "Media on either side of a gap plays back to back, as GetClip's own MP4s do",
});

words!(Cut {
    Cut::Exact => "exact":
        "On the frame showing at the start (and the end): the frames before it from the \
         keyframe are in the file, decoded but not shown",
    Cut::Keyframe => "keyframe":
        "On the keyframe at or before the start: every frame in the file is shown",
});

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::parse_from(std::iter::once("kvs-archiver").chain(line.split_whitespace()))
    }

    #[test]
    fn the_grammar_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_word_names_its_value() {
        fn round_trip<T: ValueEnum + PartialEq + std::fmt::Debug>() {
            for value in T::value_variants() {
                let word = value.to_possible_value().expect("every value has a word");
                let parsed = T::from_str(word.get_name(), false).expect("its word parses");
                assert_eq!(&parsed, value);
            }
        }
        round_trip::<RestoreTier>();
        round_trip::<GapMode>();
        round_trip::<Cut>();
    }

    #[test]
    fn every_command_parses_into_its_typed_form() {
        let cli = parse(
            "--config a.toml restore --stream s --start 2026-01-01T00:00:00Z \
             --end 2026-01-02T00:00:00Z --tier BULK --days 3 --wait --json",
        )
        .expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("a.toml")));
        let Command::Restore {
            range,
            tier,
            days,
            wait,
            json,
        } = cli.command
        else {
            panic!("restore")
        };
        assert_eq!(
            (range.stream.as_str(), tier, days, wait, json),
            ("s", RestoreTier::Bulk, 3, true, true)
        );

        let cli = parse("export --stream a --stream b --start x --end y -o out --cut keyframe")
            .expect("parses");
        let Command::Export {
            stream,
            output,
            gaps,
            cut,
            wall_clock,
            ..
        } = cli.command
        else {
            panic!("export")
        };
        assert_eq!(stream, ["a", "b"]);
        assert_eq!(output, PathBuf::from("out"));
        assert_eq!(
            (gaps, cut, wall_clock),
            (GapMode::Hold, Cut::Keyframe, false)
        );

        let cli = parse("serve --token-file t check-config").map(|_| ());
        assert!(cli.is_err(), "one command at a time");
        let Command::Serve { listen, token_file } =
            parse("serve --token-file t").expect("parses").command
        else {
            panic!("serve")
        };
        assert_eq!(listen.to_string(), "127.0.0.1:8080");
        assert_eq!(token_file, Some(PathBuf::from("t")));
        // `--config` is global: it may follow the command.
        let cli = parse("status --json --config c.toml").expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("c.toml")));
        assert!(matches!(cli.command, Command::Status { json: true }));
        for line in [
            "verify --stream s --repair",
            "backfill --stream s --start a --end b",
            "plan --stream s --start a --end b --json",
            "run --once",
            "find --stream s --at t",
            "rebuild-ledger --merge",
            "check-config",
            "iam-policy --account 123",
            "completions fish",
            "man",
        ] {
            parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    #[test]
    fn mistakes_are_refused_with_clap_s_kinds() {
        let kind = |line| parse(line).err().map(|e| e.kind());
        assert_eq!(
            kind("backfill --stream s --start a"),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            kind("restore --stream s --start a --end b --tier fast"),
            Some(ErrorKind::InvalidValue)
        );
        assert_eq!(
            kind("restore --stream s --start a --end b --days x"),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(kind("frobnicate"), Some(ErrorKind::InvalidSubcommand));
        assert_eq!(
            kind(""),
            Some(ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
        );
    }
}

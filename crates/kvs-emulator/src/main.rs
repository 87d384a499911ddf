//! `kvs-emulator --config emulator.toml --listen 127.0.0.1:4567`

use clap::{value_parser, Arg};
use kvs_emulator::{Emulator, EmulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `--config` and `--listen`.
fn command() -> clap::Command {
    clap::Command::new("kvs-emulator")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A Kinesis Video Streams emulator on loopback")
        .arg(
            Arg::new("config")
                .long("config")
                .value_name("CONFIG")
                .value_parser(value_parser!(PathBuf))
                .help("TOML file with credentials and streams (see crates/kvs-emulator/emulator.example.toml)"),
        )
        .arg(
            Arg::new("listen")
                .long("listen")
                .value_name("LISTEN")
                .value_parser(value_parser!(SocketAddr))
                .default_value("127.0.0.1:4567")
                .help("Address to listen on; keep it on loopback"),
        )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kvs_emulator=info".into()),
        )
        .init();
    let mut args = command().get_matches();
    let listen = args
        .remove_one::<SocketAddr>("listen")
        // Defaulted in the grammar, so always there.
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4567)));
    let config = match &args.remove_one::<PathBuf>("config") {
        Some(path) => match EmulatorConfig::from_toml_file(path) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("kvs-emulator: {error}");
                return std::process::ExitCode::from(2);
            }
        },
        None => EmulatorConfig::default(),
    };
    let access_key = config.access_key_id.clone();
    let emulator = match Emulator::start_on(config, listen).await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("kvs-emulator: cannot start on {}: {error}", listen);
            return std::process::ExitCode::from(1);
        }
    };
    println!(
        "kvs-emulator listening on {} (sign requests with access key {access_key}, service kinesisvideo)",
        emulator.base_url()
    );
    let _ = tokio::signal::ctrl_c().await;
    std::process::ExitCode::SUCCESS
}

//! `kvs-emulator --config emulator.toml --listen 127.0.0.1:4567`

use clap::Parser;
use kvs_emulator::{Emulator, EmulatorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "A Kinesis Video Streams emulator on loopback")]
struct Args {
    /// TOML file with credentials and streams (see crates/kvs-emulator/emulator.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on; keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:4567")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kvs_emulator=info".into()),
        )
        .init();
    let args = Args::parse();
    let config = match &args.config {
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
    let emulator = match Emulator::start_on(config, args.listen).await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("kvs-emulator: cannot start on {}: {error}", args.listen);
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

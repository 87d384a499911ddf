//! The servers of `benches/side-by-side`: the KVS emulator and s3s-fs on loopback, in one
//! process, so every client in a benchmark run talks to the same two servers.
//!
//! `bench_servers EMULATOR.toml` prints one JSON line, `{"kvs": URL, "s3": URL,
//! "s3_root": DIR}`, with the bucket `bench` created. Then, for each line on stdin:
//! `requests` prints the emulator's request log since the last `requests` as one JSON
//! line (and clears it); `fragments STREAM` prints `[server_ms, size]` of each fragment
//! the stream holds. End of input stops both servers.

use kvs_emulator::{Emulator, EmulatorConfig};
use std::io::BufRead;

#[path = "../tests/support/local_s3.rs"]
mod local_s3;

fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: bench_servers EMULATOR.toml");
        return std::process::ExitCode::from(2);
    };
    let config = match EmulatorConfig::from_toml_file(std::path::Path::new(&path)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("bench_servers: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench_servers: no runtime: {error}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let emulator = match Emulator::start(config).await {
            Ok(emulator) => emulator,
            Err(error) => {
                eprintln!("bench_servers: the emulator cannot start: {error}");
                return std::process::ExitCode::from(1);
            }
        };
        let s3 = local_s3::start_s3s().await;
        if let Err(error) = local_s3::s3_client(&s3.url)
            .create_bucket()
            .bucket("bench")
            .send()
            .await
        {
            eprintln!("bench_servers: cannot create the bucket: {error}");
            return std::process::ExitCode::from(1);
        }
        println!(
            "{}",
            serde_json::json!({
                "kvs": emulator.base_url(),
                "s3": s3.url,
                "s3_root": s3.root.path(),
            })
        );
        // Commands arrive one at a time; read them on a thread that forwards each.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            let line = line.trim();
            if line == "requests" {
                let records = emulator.requests();
                emulator.clear_requests();
                println!("{}", serde_json::to_string(&records).unwrap_or_default());
            } else if let Some(stream) = line.strip_prefix("fragments ") {
                let fragments: Vec<_> = emulator
                    .fragments(stream)
                    .iter()
                    .map(|f| serde_json::json!([f.server_ms, f.reported_size]))
                    .collect();
                println!("{}", serde_json::Value::Array(fragments));
            } else {
                println!("null");
            }
        }
        std::process::ExitCode::SUCCESS
    })
}

//! The servers of `benches/side-by-side`: the KVS emulator and s3s-fs on loopback, in one
//! process, so every client in a benchmark run talks to the same two servers.
//!
//! `bench_servers EMULATOR.toml [--tls]` prints one JSON line, `{"kvs": URL, "s3": URL,
//! "s3_root": DIR, "ca": PEM}`, with the bucket `bench` created. With `--tls` both are
//! `https://` URLs: a TLS front (tests/support/tls.rs) with a throwaway CA, whose
//! certificate `ca` names, before each server; GetDataEndpoint names the front too.
//! Then, for each line on stdin: `requests` prints the emulator's request log since the
//! last `requests` as one JSON line (and clears it); `s3requests` the same for the S3
//! server (`["METHOD /path?query", status]` each); `tls` the cipher suites the fronts negotiated;
//! `fragments STREAM` prints `[server_ms, size]` of each fragment the stream holds. End
//! of input stops both servers.

use kvs_emulator::{Emulator, EmulatorConfig};
use std::io::BufRead;

#[path = "../tests/support/local_s3.rs"]
mod local_s3;
#[path = "../tests/support/tls.rs"]
mod tls;

fn main() -> std::process::ExitCode {
    let over_tls = std::env::args().nth(2).is_some_and(|a| a == "--tls");
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: bench_servers EMULATOR.toml [--tls]");
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
        let ca = if over_tls {
            match tls::throwaway_ca() {
                Ok(ca) => Some(ca),
                Err(error) => {
                    eprintln!("bench_servers: no CA: {error}");
                    return std::process::ExitCode::from(1);
                }
            }
        } else {
            None
        };
        let fronts = match &ca {
            Some(ca) => {
                let kvs = tls::serve(ca, emulator.base_url()).await;
                let s3 = tls::serve(ca, &s3.url).await;
                emulator.set_data_endpoint(&kvs.url);
                Some((kvs, s3))
            }
            None => None,
        };
        let (kvs_url, s3_url) = match &fronts {
            Some((kvs, s3)) => (kvs.url.clone(), s3.url.clone()),
            None => (emulator.base_url().to_string(), s3.url.clone()),
        };
        println!(
            "{}",
            serde_json::json!({
                "kvs": kvs_url,
                "s3": s3_url,
                "s3_root": s3.root.path(),
                "ca": ca.as_ref().map(|ca| ca.ca_pem.clone()),
            })
        );
        answer_commands(&emulator, &s3, fronts.as_ref()).await;
        std::process::ExitCode::SUCCESS
    })
}

/// Answers the commands on stdin (see the module's documentation) until it closes.
async fn answer_commands(
    emulator: &Emulator,
    s3: &local_s3::S3Server,
    fronts: Option<&(tls::TlsFront, tls::TlsFront)>,
) {
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
        } else if line == "s3requests" {
            s3.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let exchanges =
                std::mem::take(&mut *s3.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
            let records: Vec<_> = exchanges
                .iter()
                .map(|e| serde_json::json!([e.line, e.status]))
                .collect();
            println!("{}", serde_json::Value::Array(records));
        } else if line == "tls" {
            let suites: Vec<Option<String>> = fronts
                .into_iter()
                .flat_map(|(kvs, s3)| [kvs, s3])
                .map(|front| front.cipher.lock().map(|c| c.clone()).unwrap_or(None))
                .collect();
            println!("{}", serde_json::json!(suites));
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
}

//! kvs-archiver's processes as a test sees them: their output, signals, ports, and the
//! environment knobs that size a run.

use std::process::Output;

/// The command failed with `code` and said `message`.
pub fn assert_fails_with(output: &Output, code: i32, message: &str) {
    assert_eq!(output.status.code(), Some(code), "{}", text(output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(message),
        "expected {message:?}: {}",
        text(output)
    );
}

/// The per-stream part of `status --json`.
pub fn streams_json(status: &Output) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("status json: {e}: {}", text(status)));
    json["streams"].clone()
}

pub fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-s", name, &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

pub fn count_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

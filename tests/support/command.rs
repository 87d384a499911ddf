//! kvs-archiver as a user runs it, for the integration tests.

use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};

/// The built binary with its configuration at `config` (see [`in_test_environment`]);
/// killed if the test drops it.
pub fn kvs_archiver(config: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvs-archiver"));
    cmd.args(args).kill_on_drop(true);
    in_test_environment(&mut cmd, config);
    cmd
}

/// The configuration at `config`, the emulator's static credentials and an explicit
/// region, and nothing of this machine's AWS profile or instance metadata.
pub fn in_test_environment(cmd: &mut tokio::process::Command, config: &std::path::Path) {
    cmd.env("KVS_ARCHIVER_CONFIG", config)
        .env("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove(kvs_archiver::crashpoint::ENV);
}

//! Named points where the process kills itself with SIGKILL when
//! `KVS_ARCHIVER_CRASHPOINT` names them: crash-torture tests use them to stop the
//! archiver at exact moments (between an upload and its ledger commit, say) that an
//! outside `kill -9` could only hit by luck. Unset, a crash point costs one lookup.

use std::sync::OnceLock;

/// The environment variable naming the crash point to die at.
pub const ENV: &str = "KVS_ARCHIVER_CRASHPOINT";

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT.get_or_init(|| std::env::var(ENV).ok()).as_deref()
}

/// Dies here, as `kill -9` would, if this point is armed.
pub fn hit(point: &str) {
    if armed() == Some(point) {
        eprintln!("kvs-archiver: crash point {point}: killing this process with SIGKILL");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        // SIGKILL takes effect at once; abort in case `kill` was unavailable.
        std::process::abort();
    }
}

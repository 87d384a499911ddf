//! Two-stage shutdown. The first SIGTERM or SIGINT stops new work (`soft`); clips in
//! flight may finish for the grace period, then the rest are aborted cleanly (`hard`):
//! their multipart uploads aborted, their chunks back to pending. A second signal exits
//! at once; the ledger still names any upload left open, and the next start aborts it.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The two-stage stop: the first signal takes no new work and aborts work in flight after
/// the grace; a second exits at once.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Take no new work.
    pub soft: CancellationToken,
    /// Abort work in flight.
    pub hard: CancellationToken,
}

/// Exit status for a process stopped by a second signal (128 + SIGINT, as shells do).
const EXIT_AT_ONCE: i32 = 130;

impl Shutdown {
    /// Neither stage started.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Starts the soft stage now and the hard stage after `grace`.
    pub fn begin(&self, grace: Duration) {
        if self.soft.is_cancelled() {
            return;
        }
        self.soft.cancel();
        let hard = self.hard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            hard.cancel();
        });
    }

    /// Wires SIGTERM and SIGINT: the first begins the shutdown, the second exits.
    pub fn on_signals(grace: Duration) -> Self {
        let shutdown = Shutdown::new();
        let handle = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "stopping: no new clips; clips in flight get the grace period; a second signal exits at once"
            );
            handle.begin(grace);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now; the next start cleans up");
            std::process::exit(EXIT_AT_ONCE);
        });
        shutdown
    }
}

//! Logs and progress. In a terminal: readable logs and a progress bar (chunks, bytes,
//! ETA). Otherwise (systemd, cron, CI): JSON logs, one line per event, progress included.

use crate::error::Error;
use crate::ledger::Chunk;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing_subscriber::EnvFilter;

mod bars;
use bars::{Bar, Unit};

/// Installs the tracing subscriber; `KVS_ARCHIVER_LOG` sets the filter (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_env("KVS_ARCHIVER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        // Log lines go out between redraws of the progress bars, never through them.
        builder.with_target(false).with_writer(|| BelowBars).init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// Standard error, written above the progress bars.
struct BelowBars;

impl std::io::Write for BelowBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars::print_above(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Progress of one range: a bar in a terminal, log lines otherwise.
pub struct Progress {
    bar: Option<Bar>,
    bytes: AtomicU64,
}

impl Progress {
    /// A bar labelled `label` in a terminal; log lines otherwise.
    pub fn new(label: &str) -> Self {
        let bar = bars::drawable().then(|| Bar::new(label, Unit::Chunks, 0));
        Progress {
            bar,
            bytes: AtomicU64::new(0),
        }
    }

    /// A progress that shows nothing (library callers, tests).
    pub fn hidden() -> Self {
        Progress {
            bar: None,
            bytes: AtomicU64::new(0),
        }
    }

    /// Planning has listed `listed_ms` of a `range_ms` range and made `chunks` chunks so
    /// far.
    pub fn planned(&self, listed_ms: i64, range_ms: i64, chunks: usize) {
        let percent = (listed_ms.max(0) as f64 / range_ms.max(1) as f64 * 100.0).min(100.0);
        match &self.bar {
            Some(bar) => bar.set_message(format!("planning {percent:.0}%, {chunks} new chunks")),
            None => tracing::debug!(percent, chunks, "planning"),
        }
    }

    /// The range holds `chunks` chunks, `done` of them archived already.
    pub fn set_totals(&self, chunks: usize, done: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(chunks as u64, done as u64);
        }
    }

    /// One chunk archived, `bytes` long.
    pub fn chunk_done(&self, bytes: u64, chunk: &Chunk) {
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match &self.bar {
            Some(bar) => {
                bar.inc_with_message(format!("{:.1} MB", total as f64 / 1e6));
            }
            None => tracing::info!(
                key = %chunk.object_key,
                bytes,
                fragments = chunk.plan.fragment_count,
                total_bytes = total,
                "archived"
            ),
        }
    }

    /// One more of the range's items handled (a restore asked for, say).
    pub fn step(&self) {
        if let Some(bar) = &self.bar {
            bar.inc();
        }
    }

    /// Where the work stands: the bar's message, or a log line.
    pub fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => tracing::info!(message, "progress"),
        }
    }

    /// One chunk failed: said above the bar, in a terminal.
    pub fn chunk_failed(&self, chunk: &Chunk, error: &Error) {
        if self.bar.is_some() {
            let line = format!("failed: {}: {error}\n", chunk.object_key);
            // A terminal that went away is no reason to stop the work.
            let _ = bars::print_above(line.as_bytes());
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Progress of one transfer measured in bytes (`export`): a bar in a terminal, a log line
/// every tenth otherwise.
pub struct ByteProgress {
    bar: Option<Bar>,
    total: u64,
    done: AtomicU64,
}

impl ByteProgress {
    /// A bar of `total` bytes labelled `label` in a terminal; log lines otherwise.
    pub fn new(label: &str, total: u64) -> Self {
        let bar = bars::drawable().then(|| Bar::new(label, Unit::Bytes, total));
        ByteProgress {
            bar,
            total,
            done: AtomicU64::new(0),
        }
    }

    /// `bytes` more are done.
    pub fn advance(&self, bytes: u64) {
        let before = self.done.fetch_add(bytes, Ordering::Relaxed);
        let after = before + bytes;
        match &self.bar {
            Some(bar) => bar.set_position(after),
            None => {
                let tenth = self.total.max(10) / 10;
                if before / tenth != after / tenth {
                    tracing::info!(bytes = after, total = self.total, "exporting");
                }
            }
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

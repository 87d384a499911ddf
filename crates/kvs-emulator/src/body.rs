//! GetClip bodies as streams of shared chunks, with the body faults: a connection reset
//! part-way through, and a bandwidth cap.

use bytes::Bytes;
use futures_util::Stream;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Pieces a capped body is cut into, so the pacing is smooth.
const PACED_PIECE: usize = 64 * 1024;
/// Pause before an injected reset, long enough for hyper to flush what was sent.
const RESET_AFTER_FLUSH: Duration = Duration::from_millis(50);

/// Whether a cut-off body resets the connection or stalls with it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The connection is reset: the client sees an error mid-body.
    Reset,
    /// Sending stops and the connection stays open: only a client's timeout ends it.
    Stall,
}

struct BodyState {
    chunks: VecDeque<Bytes>,
    sent: u64,
    reset_at: Option<u64>,
    cut: Cut,
    bandwidth: Option<u64>,
    started: Option<Instant>,
}

/// Streams `chunks`; with `reset_at`, fails after that many bytes so the server drops the
/// connection mid-body (the client sees fewer bytes than Content-Length).
pub fn clip_body(
    chunks: Vec<Bytes>,
    reset_at: Option<u64>,
    bandwidth: Option<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    cut_body(chunks, reset_at, Cut::Reset, bandwidth)
}

/// [`clip_body`], cut at `cut_at` bytes the way `cut` says.
pub fn cut_body(
    chunks: Vec<Bytes>,
    cut_at: Option<u64>,
    cut: Cut,
    bandwidth: Option<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let state = BodyState {
        chunks: chunks.into(),
        sent: 0,
        reset_at: cut_at,
        cut,
        bandwidth,
        started: None,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let mut chunk = state.chunks.pop_front()?;
        if let Some(limit) = state.reset_at {
            if state.sent >= limit && state.cut == Cut::Stall {
                // The connection stays open and silent: only the client's read timeout
                // ends it. An hour is longer than any test.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return None;
            }
            if state.sent >= limit {
                state.chunks.clear();
                // Let the bytes so far reach the client before the connection drops, as a
                // reset in the middle of a long download does.
                tokio::time::sleep(RESET_AFTER_FLUSH).await;
                let error = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "kvs-emulator: injected connection reset",
                );
                return Some((Err(error), state));
            }
            let room = (limit - state.sent) as usize;
            if chunk.len() > room {
                let rest = chunk.split_off(room);
                state.chunks.push_front(rest);
            }
        }
        if let Some(rate) = state.bandwidth.filter(|r| *r > 0) {
            if chunk.len() > PACED_PIECE {
                let rest = chunk.split_off(PACED_PIECE);
                state.chunks.push_front(rest);
            }
            let started = *state.started.get_or_insert_with(Instant::now);
            let due = started + Duration::from_secs_f64(state.sent as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        state.sent += chunk.len() as u64;
        Some((Ok(chunk), state))
    })
}

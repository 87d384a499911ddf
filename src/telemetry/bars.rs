//! Progress bars at the foot of a terminal: each a line redrawn in place, at most ten
//! times a second, with log lines printed above them.
//!
//! Two kinds of bar, drawn by hand rather than by a template engine (indicatif, until
//! 2026-12: its crates were a twentieth of what the first build compiled above the
//! prescribed crates' floor, for two lines of text).

use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Whether bars can be drawn: standard error is a terminal that understands cursor
/// movement (not `TERM=dumb`, as in an Emacs shell, nor no `TERM` at all).
pub fn drawable() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
        && std::env::var_os("TERM").is_some_and(|term| !term.is_empty() && term != "dumb")
}

/// Redraws closer together than this are skipped: a terminal cannot show them anyway.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Characters of the bar itself between its brackets.
const BAR_WIDTH: usize = 30;

/// What a bar counts.
#[derive(Clone, Copy)]
pub enum Unit {
    /// Chunks: `3/10 chunks <message>`.
    Chunks,
    /// Bytes: `1.50 MiB/12.00 MiB 3.10 MiB/s`.
    Bytes,
}

/// One bar on the board, cleared by [`Bar::finish`] or when dropped (a command that
/// fails half-way leaves no bar behind).
pub struct Bar {
    id: u64,
}

struct BarState {
    id: u64,
    label: String,
    unit: Unit,
    position: u64,
    length: u64,
    message: String,
    /// The position when the length was set, and when: the ETA counts what was done
    /// since, not what was already done before this run.
    counted_from: (u64, Instant),
}

/// Every bar of the process, and how many lines of the terminal they hold now.
struct Board {
    bars: Vec<BarState>,
    next_id: u64,
    lines_drawn: usize,
    last_draw: Option<Instant>,
}

static BOARD: Mutex<Board> = Mutex::new(Board {
    bars: Vec::new(),
    next_id: 0,
    lines_drawn: 0,
    last_draw: None,
});

fn board() -> MutexGuard<'static, Board> {
    // A panic while drawing leaves nothing half-updated that matters: draw on.
    BOARD.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Bar {
    /// A new bar at the foot of the terminal.
    pub fn new(label: &str, unit: Unit, length: u64) -> Bar {
        let mut board = board();
        let id = board.next_id;
        board.next_id += 1;
        board.bars.push(BarState {
            id,
            label: label.to_string(),
            unit,
            position: 0,
            length,
            message: String::new(),
            counted_from: (0, Instant::now()),
        });
        board.redraw(true);
        Bar { id }
    }

    fn update(&self, change: impl FnOnce(&mut BarState)) {
        let mut board = board();
        if let Some(bar) = board.bars.iter_mut().find(|b| b.id == self.id) {
            change(bar);
        }
        board.redraw(false);
    }

    /// How many there are to do, `position` of them done already.
    pub fn set_length(&self, length: u64, position: u64) {
        self.update(|bar| {
            bar.length = length;
            bar.position = position;
            bar.counted_from = (position, Instant::now());
        });
    }

    /// `position` are done.
    pub fn set_position(&self, position: u64) {
        self.update(|bar| bar.position = position);
    }

    /// One more is done.
    pub fn inc(&self) {
        self.update(|bar| bar.position += 1);
    }

    /// One more is done, and the text after the count says `message` (one update, so a
    /// skipped redraw cannot show the one without the other).
    pub fn inc_with_message(&self, message: String) {
        self.update(|bar| {
            bar.position += 1;
            bar.message = message;
        });
    }

    /// The text after the count.
    pub fn set_message(&self, message: String) {
        self.update(|bar| bar.message = message);
    }

    /// Clears the bar from the terminal.
    pub fn finish(&self) {
        let mut board = board();
        board.bars.retain(|b| b.id != self.id);
        board.redraw(true);
    }
}

/// Writes `text` to standard error above the bars.
pub fn print_above(text: &[u8]) -> std::io::Result<()> {
    let mut board = board();
    let mut stderr = std::io::stderr().lock();
    stderr.write_all(board.clear().as_bytes())?;
    stderr.write_all(text)?;
    board.lines_drawn = 0;
    drop(stderr);
    board.redraw(true);
    Ok(())
}

impl Board {
    /// Escape codes that erase the bars' lines and leave the cursor where the first was.
    /// Each bar's line ends in a newline, so the cursor rests on the line below them: what
    /// else writes to the terminal (the shell's prompt after a second signal's exit)
    /// starts on a line of its own.
    fn clear(&self) -> String {
        if self.lines_drawn == 0 {
            return String::new();
        }
        format!("\r\x1b[{}A\x1b[J", self.lines_drawn)
    }

    fn redraw(&mut self, now: bool) {
        let at = Instant::now();
        if !now
            && self
                .last_draw
                .is_some_and(|t| at.duration_since(t) < REDRAW_EVERY)
        {
            return;
        }
        self.last_draw = Some(at);
        let width = terminal_width();
        let mut out = self.clear();
        for bar in &self.bars {
            out.push_str(&bar.line(at, width));
            out.push('\n');
        }
        self.lines_drawn = self.bars.len();
        // Progress is a courtesy: a terminal that went away is no reason to stop work.
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }
}

impl BarState {
    fn line(&self, now: Instant, width: usize) -> String {
        // In u128: a byte count near u64's range times the width must not overflow.
        let filled = (u128::from(self.position.min(self.length)) * BAR_WIDTH as u128)
            .checked_div(u128::from(self.length))
            .unwrap_or(0) as usize;
        let mut bar = "=".repeat(filled);
        if filled < BAR_WIDTH {
            bar.push(if filled > 0 { '>' } else { ' ' });
            bar.push_str(&" ".repeat(BAR_WIDTH - filled - 1));
        }
        let (from, since) = self.counted_from;
        let elapsed = now.duration_since(since).as_secs_f64();
        let done_since = self.position.saturating_sub(from);
        let eta = (done_since > 0)
            .then(|| {
                let left = self.length.saturating_sub(self.position);
                Duration::try_from_secs_f64(elapsed * left as f64 / done_since as f64).ok()
            })
            .flatten();
        let eta = eta.map_or_else(|| "?".to_string(), human_duration);
        let count = match self.unit {
            Unit::Chunks => format!("{}/{} chunks {}", self.position, self.length, self.message)
                .trim_end()
                .to_string(),
            Unit::Bytes => format!(
                "{}/{} {}/s",
                binary_bytes(self.position as f64),
                binary_bytes(self.length as f64),
                binary_bytes(done_since as f64 / elapsed.max(0.001)),
            ),
        };
        let line = format!("{} [{bar}] {count} (ETA {eta})", self.label);
        // A line longer than the terminal would wrap, and the next redraw would erase
        // the wrong lines.
        line.chars().take(width.saturating_sub(1)).collect()
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

fn binary_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Columns of the terminal on standard error; 80 when it does not say.
fn terminal_width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given, which lives
    // for the call; on a descriptor that is not a terminal it fails and writes nothing.
    let answered = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if answered && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(unit: Unit, position: u64, length: u64) -> BarState {
        BarState {
            id: 0,
            label: "cam-1".into(),
            unit,
            position,
            length,
            message: "3.2 MB".into(),
            counted_from: (0, Instant::now()),
        }
    }

    #[test]
    fn a_bar_shows_its_count_fill_and_eta() {
        let mut bar = state(Unit::Chunks, 5, 10);
        let start = Instant::now();
        bar.counted_from = (0, start);
        let line = bar.line(start + Duration::from_secs(20), 200);
        assert_eq!(
            line,
            "cam-1 [===============>              ] 5/10 chunks 3.2 MB (ETA 20s)"
        );
        let line = state(Unit::Chunks, 0, 10).line(Instant::now(), 200);
        assert!(
            line.contains("[                              ] 0/10 chunks"),
            "{line}"
        );
        assert!(line.ends_with("(ETA ?)"), "{line}");
    }

    #[test]
    fn a_byte_bar_counts_in_binary_units_and_a_line_never_wraps() {
        let mut bar = state(Unit::Bytes, 3 << 20, 12 << 20);
        let start = Instant::now();
        bar.counted_from = (1 << 20, start);
        let line = bar.line(start + Duration::from_secs(2), 200);
        assert!(
            line.contains("3.00 MiB/12.00 MiB 1.00 MiB/s (ETA 9s)"),
            "{line}"
        );
        assert_eq!(bar.line(start, 20).chars().count(), 19);
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h 2m");
    }
}

//! The coverage timeline of one stream over a window, as server-rendered SVG: what is
//! archived (one rectangle per object, or per run of objects narrower than a pixel),
//! where KVS had no media, and what failed, expired, waits, or is at risk. Pure: chunks
//! in, markup out.

use crate::domain::{rfc3339, ChunkKind, EpochMs};
use std::fmt::Write;

/// Drawing width in SVG units (the page scales it to the window).
pub const WIDTH: f64 = 1200.0;
const BAR_Y: f64 = 28.0;
const BAR_HEIGHT: f64 = 44.0;

/// What a span of the timeline shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpanClass {
    /// Archived, by GetClip.
    Archived,
    /// A fragment archived alone after its range was (it reached KVS late).
    Late,
    /// Archived as Matroska (GetClip could not package it).
    Mkv,
    /// Not archived yet: planned or in flight.
    Pending,
    /// The last attempt failed; a later pass tries again.
    Failed,
    /// KVS deleted the media before it was archived.
    Expired,
    /// Not archived, and KVS deletes it within `daemon.retention_alarm`.
    AtRisk,
}

impl SpanClass {
    /// The class's name in the page's CSS and legend.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanClass::Archived => "archived",
            SpanClass::Late => "late",
            SpanClass::Mkv => "mkv",
            SpanClass::Pending => "pending",
            SpanClass::Failed => "failed",
            SpanClass::Expired => "expired",
            SpanClass::AtRisk => "at-risk",
        }
    }

    /// How an archived chunk of `kind` is drawn.
    pub fn of_kind(kind: ChunkKind) -> SpanClass {
        match kind {
            ChunkKind::Clip => SpanClass::Archived,
            ChunkKind::Late => SpanClass::Late,
            ChunkKind::Mkv => SpanClass::Mkv,
        }
    }

    /// Late and Matroska fragments are drawn on a lane of their own, below the others.
    fn lane(self) -> (f64, f64) {
        match self {
            SpanClass::Late | SpanClass::Mkv => (BAR_Y + BAR_HEIGHT + 4.0, 10.0),
            _ => (BAR_Y, BAR_HEIGHT),
        }
    }
}

/// One thing on the timeline: a chunk, or a run of fragments of one.
#[derive(Debug, Clone)]
pub struct Span {
    /// Start of the span (wall time).
    pub start_ms: EpochMs,
    /// Where it ends.
    pub end_ms: EpochMs,
    /// What the span shows: its colour and lane.
    pub class: SpanClass,
    /// The object (archived spans).
    pub object_key: Option<String>,
    /// Where `start_ms` is in the object's timeline.
    pub offset_ms: u64,
    /// Why (failed chunks: the error).
    pub note: Option<String>,
}

/// A drawn rectangle: one span, or several of one class closer than a pixel.
#[derive(Debug, Clone)]
struct Drawn {
    start_ms: EpochMs,
    end_ms: EpochMs,
    class: SpanClass,
    count: usize,
    first: Span,
}

/// Merges spans of a class that would be drawn less than a pixel apart, so a window of
/// any length costs at most a few rectangles per pixel.
fn merge(mut spans: Vec<Span>, ms_per_px: f64) -> Vec<Drawn> {
    spans.sort_by_key(|s| (s.class, s.start_ms));
    let mut drawn: Vec<Drawn> = Vec::new();
    for span in spans {
        match drawn.last_mut() {
            // Only spans too narrow to click on their own: a wide one after a narrow one
            // keeps its own rectangle (and its object).
            Some(d)
                if d.class == span.class
                    && ((span.start_ms - d.end_ms) as f64) < ms_per_px
                    && ((d.end_ms - d.start_ms) as f64) < ms_per_px * 2.0
                    && ((span.end_ms - span.start_ms) as f64) < ms_per_px =>
            {
                d.end_ms = d.end_ms.max(span.end_ms);
                d.count += 1;
            }
            _ => drawn.push(Drawn {
                start_ms: span.start_ms,
                end_ms: span.end_ms,
                class: span.class,
                count: 1,
                first: span,
            }),
        }
    }
    drawn
}

/// Text for HTML and SVG, attributes included.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick spacing: the first step giving at most 12 ticks over `span_ms`.
fn tick_step(span_ms: i64) -> i64 {
    const MINUTE: i64 = 60_000;
    const STEPS: [i64; 13] = [
        MINUTE,
        2 * MINUTE,
        5 * MINUTE,
        10 * MINUTE,
        30 * MINUTE,
        60 * MINUTE,
        3 * 60 * MINUTE,
        6 * 60 * MINUTE,
        12 * 60 * MINUTE,
        24 * 60 * MINUTE,
        2 * 24 * 60 * MINUTE,
        7 * 24 * 60 * MINUTE,
        14 * 24 * 60 * MINUTE,
    ];
    STEPS
        .into_iter()
        .find(|step| span_ms / step <= 12)
        .unwrap_or(30 * 24 * 60 * MINUTE)
}

/// The SVG of `spans` over `[from, to]`; `planned`: the span planning has covered
/// (outside it, "not planned yet" rather than "no media").
pub fn svg(
    spans: Vec<Span>,
    from: EpochMs,
    to: EpochMs,
    planned: Option<(EpochMs, EpochMs)>,
) -> String {
    let range = (to - from).max(1) as f64;
    let ms_per_px = range / WIDTH;
    let x = |t: EpochMs| ((t - from) as f64 / range * WIDTH).clamp(0.0, WIDTH);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg id="timeline" viewBox="0 0 {WIDTH} 110" preserveAspectRatio="none" data-from="{from}" data-to="{to}" role="img" aria-label="archive coverage">"#
    );
    // Background: not planned yet outside what planning has covered, no media inside.
    let _ = write!(
        out,
        r#"<rect class="unplanned" data-class="unplanned" x="0" y="{BAR_Y}" width="{WIDTH}" height="{BAR_HEIGHT}"><title>not planned yet: nothing is known of this time</title></rect>"#
    );
    if let Some((planned_from, planned_to)) = planned.filter(|(a, b)| a < b) {
        let (left, right) = (x(planned_from), x(planned_to));
        if right > left {
            let _ = write!(
                out,
                r#"<rect class="no-media" data-class="no-media" data-start="{planned_from}" data-end="{planned_to}" x="{left:.2}" y="{BAR_Y}" width="{:.2}" height="{BAR_HEIGHT}"><title>KVS had no media</title></rect>"#,
                right - left
            );
        }
    }
    let step = tick_step(to - from);
    let mut tick = from.div_euclid(step) * step + step;
    while tick < to {
        let label = chrono::DateTime::from_timestamp_millis(tick)
            .map(|t| {
                if step >= 86_400_000 {
                    t.format("%Y-%m-%d").to_string()
                } else {
                    t.format("%m-%d %H:%M").to_string()
                }
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            r#"<line class="tick" x1="{0:.2}" x2="{0:.2}" y1="18" y2="{1}"/><text class="tick" x="{0:.2}" y="13">{label}</text>"#,
            x(tick),
            BAR_Y + BAR_HEIGHT + 16.0
        );
        tick += step;
    }
    for d in merge(spans, ms_per_px) {
        let (y, height) = d.class.lane();
        let left = x(d.start_ms);
        // At least two units wide, so that a short span can still be clicked.
        let width = (x(d.end_ms) - left).max(2.0);
        let class = d.class.as_str();
        let mut title = format!("{class} {} .. {}", rfc3339(d.start_ms), rfc3339(d.end_ms));
        let mut attributes = format!(
            r#" data-class="{class}" data-start="{}" data-end="{}" data-count="{}""#,
            d.start_ms, d.end_ms, d.count
        );
        if d.count == 1 {
            if let Some(key) = &d.first.object_key {
                let _ = write!(
                    attributes,
                    r#" data-key="{}" data-offset="{}""#,
                    escape(key),
                    d.first.offset_ms
                );
                let _ = write!(title, "\n{key}\nclick to play");
            }
            if let Some(note) = &d.first.note {
                let _ = write!(title, "\n{note}");
            }
        } else {
            let _ = write!(title, "\n{} spans: click to zoom in", d.count);
        }
        let _ = write!(
            out,
            r#"<rect class="span {class}"{attributes} x="{left:.2}" y="{y}" width="{width:.2}" height="{height}"><title>{}</title></rect>"#,
            escape(&title)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start_ms: EpochMs, end_ms: EpochMs, class: SpanClass) -> Span {
        Span {
            start_ms,
            end_ms,
            class,
            object_key: Some(format!("k{start_ms}")),
            offset_ms: 0,
            note: None,
        }
    }

    #[test]
    fn ten_thousand_objects_in_view_cost_a_few_rectangles_per_pixel() {
        // 10,000 ten-minute objects (69 days) in a 30-day window.
        let spans: Vec<Span> = (0..10_000)
            .map(|i| span(i * 600_000, i * 600_000 + 600_000, SpanClass::Archived))
            .collect();
        let svg = svg(spans, 0, 30 * 86_400_000, Some((0, 30 * 86_400_000)));
        let rects = svg.matches("<rect class=\"span").count();
        assert!(rects <= 2 * WIDTH as usize, "{rects} rectangles");
        assert!(rects > 100, "spans are still told apart: {rects}");
    }

    #[test]
    fn a_wide_object_after_a_narrow_one_keeps_its_own_rectangle() {
        // One pixel is 500 ms here: a 200 ms object, then a 60 s one right after it.
        let spans = vec![
            span(0, 200, SpanClass::Archived),
            span(200, 60_200, SpanClass::Archived),
        ];
        let svg = svg(spans, 0, 600_000, Some((0, 600_000)));
        assert!(svg.contains(r#"data-key="k0""#), "{svg}");
        assert!(svg.contains(r#"data-key="k200""#), "{svg}");
    }

    #[test]
    fn single_objects_play_and_merged_ones_zoom() {
        let spans = vec![
            span(0, 60_000, SpanClass::Archived),
            span(120_000, 180_000, SpanClass::Failed),
        ];
        let svg = svg(spans, 0, 600_000, Some((0, 600_000)));
        assert!(svg.contains(
            r#"data-class="archived" data-start="0" data-end="60000" data-count="1" data-key="k0""#
        ));
        assert!(svg.contains(r#"data-class="failed""#));
    }
}

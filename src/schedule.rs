//! Cron firings become queued triggers: one task per stream sleeps until its schedule's
//! next instant in `daemon.time_zone`, then enqueues the stream's name (never blocking:
//! a full queue means the stream already waits); the daemon's runner does the work.
//!
//! The firing instants come from croner, the cron engine tokio-cron-scheduler itself
//! uses, with the same dialect (seconds required, day-of-month and day-of-week both
//! honoured). tokio-cron-scheduler is not used for the firing: it takes a zone's UTC
//! offset once, when a job is created, and keeps it, so after a daylight-saving change
//! every firing of an IANA zone was an hour off. Here each next instant is computed in
//! the zone itself, so it follows the zone's rules (a firing in a skipped hour runs when
//! the clocks have moved on; a wall-clock time the fall-back repeats fires at both of its
//! instants), and time is read from a clock the tests can drive under paused tokio time.

use crate::domain::EpochMs;
use crate::error::{Error, Result};
use chrono::{DateTime, FixedOffset, Offset, TimeZone, Utc};
use croner::Cron;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where the schedules' wall-clock times are read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// A fixed offset from UTC (`UTC`, `+01:00`): no daylight saving.
    Fixed(FixedOffset),
    /// An IANA zone (`Europe/Paris`), with its daylight-saving rules.
    Named(chrono_tz::Tz),
    /// The machine's zone (`TZ`, /etc/localtime), with its rules.
    Local,
}

impl Zone {
    /// `UTC`, `local`, an offset (`+01:00`) or an IANA name (`Europe/Paris`).
    pub fn parse(text: &str) -> Option<Zone> {
        match text {
            "UTC" | "utc" | "Z" => FixedOffset::east_opt(0).map(Zone::Fixed),
            "local" => Some(Zone::Local),
            other => other
                .parse::<FixedOffset>()
                .ok()
                .map(Zone::Fixed)
                .or_else(|| chrono_tz::Tz::from_str(other).ok().map(Zone::Named)),
        }
    }
}

/// Parses a schedule in the daemon's dialect: cron with seconds.
pub fn parse_cron(schedule: &str) -> Option<Cron> {
    let fields = schedule.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return None;
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(schedule)
        .ok()
}

fn next_in<Z: TimeZone>(cron: &Cron, zone: &Z, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after.with_timezone(zone), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The first firing after `after` in a zone with daylight-saving changes. Each of the
/// zone's offsets near `after` is tried as a fixed offset, and an instant counts only if
/// the zone really has that offset then: so a wall-clock time the fall-back repeats fires
/// at both of its instants, in order, and none fires in the past. croner's own answer in
/// the zone adds the case no offset covers: a time inside the spring-forward gap fires
/// when the clocks have moved on, as cron does.
fn next_in_zone<Z: TimeZone + Copy>(
    cron: &Cron,
    zone: Z,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let offset_at = |t: DateTime<Utc>| zone.offset_from_utc_datetime(&t.naive_utc()).fix();
    let mut candidates: Vec<DateTime<Utc>> = next_in(cron, &zone, after).into_iter().collect();
    for probe in [after, after + chrono::Duration::hours(2)] {
        let mut offset = offset_at(probe);
        // A firing far away (a monthly schedule) may lie in the other offset: one more try.
        for _ in 0..2 {
            let Some(t) = next_in(cron, &offset, after) else {
                break;
            };
            let actual = offset_at(t);
            if actual == offset {
                candidates.push(t);
                break;
            }
            offset = actual;
        }
    }
    candidates.into_iter().filter(|t| *t > after).min()
}

/// The first firing of `cron` strictly after `after`, read in `zone`.
pub fn next_firing(cron: &Cron, zone: Zone, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match zone {
        Zone::Fixed(offset) => next_in(cron, &offset, after).filter(|t| *t > after),
        Zone::Named(tz) => next_in_zone(cron, tz, after),
        Zone::Local => next_in_zone(cron, chrono::Local, after),
    }
}

/// What time it is: the system's clock, or a test's.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Fires each stream's cron schedule into the daemon's queue, each on a task of its own.
pub struct Scheduler {
    next: Arc<Mutex<HashMap<String, EpochMs>>>,
    stop: CancellationToken,
}

impl Scheduler {
    /// Starts firing each `(stream, cron)` pair, read in `zone`, into `tx`.
    pub async fn start(
        streams: &[(String, String)],
        zone: Zone,
        tx: mpsc::Sender<String>,
    ) -> Result<Scheduler> {
        Self::start_with_clock(streams, zone, tx, Arc::new(Utc::now))
    }

    /// [`Scheduler::start`] with the time read from `clock`.
    pub fn start_with_clock(
        streams: &[(String, String)],
        zone: Zone,
        tx: mpsc::Sender<String>,
        clock: Clock,
    ) -> Result<Scheduler> {
        let next: Arc<Mutex<HashMap<String, EpochMs>>> = Arc::default();
        let stop = CancellationToken::new();
        for (stream, schedule) in streams {
            let cron = parse_cron(schedule).ok_or_else(|| {
                Error::Usage(format!(
                    "schedule {schedule:?} of stream {stream}: not a cron expression with seconds (e.g. \"0 */5 * * * *\")"
                ))
            })?;
            tokio::spawn(fire(
                stream.clone(),
                cron,
                zone,
                tx.clone(),
                clock.clone(),
                next.clone(),
                stop.clone(),
            ));
        }
        Ok(Scheduler { next, stop })
    }

    /// When the stream's schedule fires next.
    pub async fn next_firing(&mut self, stream: &str) -> Option<EpochMs> {
        self.next.lock().ok()?.get(stream).copied()
    }

    /// Stops every firing task.
    pub async fn stop(self) {
        self.stop.cancel();
    }
}

async fn fire(
    stream: String,
    cron: Cron,
    zone: Zone,
    tx: mpsc::Sender<String>,
    clock: Clock,
    next_of: Arc<Mutex<HashMap<String, EpochMs>>>,
    stop: CancellationToken,
) {
    let mut after = clock();
    loop {
        let Some(next) = next_firing(&cron, zone, after) else {
            tracing::warn!(stream = %stream, "its schedule never fires again");
            return;
        };
        if let Ok(mut map) = next_of.lock() {
            map.insert(stream.clone(), next.timestamp_millis());
        }
        // Sleep until the instant; waking early (a clock that moved) sleeps again.
        loop {
            let now = clock();
            let Ok(wait) = (next - now).to_std() else {
                break;
            };
            if wait.is_zero() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
        // A full queue means the stream already waits: this firing would be coalesced.
        if tx.try_send(stream.clone()).is_err() {
            if tx.is_closed() {
                return;
            }
            tracing::debug!(stream = %stream, "firing dropped: queue full");
        }
        // Firings missed while the process was stopped or stalled are not made up.
        after = next.max(clock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paris() -> Zone {
        Zone::parse("Europe/Paris").expect("an IANA zone")
    }

    /// Wall time from the start of the test plus paused tokio time.
    fn paused_clock(start: DateTime<Utc>) -> Clock {
        let origin = tokio::time::Instant::now();
        Arc::new(move || start + chrono::Duration::from_std(origin.elapsed()).unwrap_or_default())
    }

    #[test]
    fn zones_are_names_offsets_utc_or_local() {
        assert!(matches!(Zone::parse("Europe/Paris"), Some(Zone::Named(_))));
        assert!(matches!(Zone::parse("+05:30"), Some(Zone::Fixed(_))));
        assert!(matches!(Zone::parse("UTC"), Some(Zone::Fixed(_))));
        assert_eq!(Zone::parse("local"), Some(Zone::Local));
        assert_eq!(Zone::parse("Mars/Olympus"), None);
    }

    /// Firings in Paris across the spring-forward night (2027-03-28: 02:00 CET becomes
    /// 03:00 CEST) and the fall-back night (2027-10-31: 03:00 CEST becomes 02:00 CET).
    #[tokio::test(start_paused = true)]
    async fn firings_follow_daylight_saving_changes_in_the_zone() {
        let start = Utc
            .with_ymd_and_hms(2027, 3, 26, 12, 0, 0)
            .single()
            .expect("t");
        let (tx, mut rx) = mpsc::channel(16);
        let streams = vec![("dock".to_string(), "0 30 9 * * *".to_string())];
        let mut scheduler = Scheduler::start_with_clock(&streams, paris(), tx, paused_clock(start))
            .expect("starts");
        let clock = paused_clock(start);
        let mut fired = Vec::new();
        for _ in 0..4 {
            rx.recv().await.expect("a firing");
            fired.push(clock());
        }
        // 09:30 in Paris: 08:30 UTC in winter time, 07:30 UTC from the 28th on.
        let utc = |d, h| {
            Utc.with_ymd_and_hms(2027, 3, d, h, 30, 0)
                .single()
                .expect("t")
        };
        assert_eq!(fired, [utc(27, 8), utc(28, 7), utc(29, 7), utc(30, 7)]);
        assert_eq!(
            scheduler.next_firing("dock").await,
            Some(utc(31, 7).timestamp_millis())
        );
        scheduler.stop().await;

        // Spring forward, a daily 02:30, which does not exist on the 28th: it runs when
        // the clocks have moved on (03:00 CEST), then at 02:30 CEST again.
        let cron = parse_cron("0 30 2 * * *").expect("cron");
        let after = Utc
            .with_ymd_and_hms(2027, 3, 27, 12, 0, 0)
            .single()
            .expect("t");
        let first = next_firing(&cron, paris(), after).expect("fires");
        let second = next_firing(&cron, paris(), first).expect("fires");
        let utc = |d, h, m| {
            Utc.with_ymd_and_hms(2027, 3, d, h, m, 0)
                .single()
                .expect("t")
        };
        assert_eq!((first, second), (utc(28, 1, 0), utc(29, 0, 30)));

        // Fall back, every 5 minutes across 03:00 CEST -> 02:00 CET, under paused time:
        // the firings go on every 5 minutes of real time, the repeated hour included,
        // never twice at one instant and never in the past.
        let start = Utc
            .with_ymd_and_hms(2027, 10, 31, 0, 40, 0)
            .single()
            .expect("t");
        let (tx, mut rx) = mpsc::channel(64);
        let streams = vec![("dock".to_string(), "0 */5 * * * *".to_string())];
        let scheduler = Scheduler::start_with_clock(&streams, paris(), tx, paused_clock(start))
            .expect("starts");
        let clock = paused_clock(start);
        let mut fired = Vec::new();
        for _ in 0..20 {
            rx.recv().await.expect("a firing");
            fired.push(clock());
        }
        scheduler.stop().await;
        assert_eq!(fired[0], start + chrono::Duration::minutes(5));
        assert!(
            fired
                .windows(2)
                .all(|w| w[1] - w[0] == chrono::Duration::minutes(5)),
            "every 5 minutes of real time: {fired:?}"
        );
        let local: Vec<String> = fired
            .iter()
            .map(|t| {
                t.with_timezone(&chrono_tz::Europe::Paris)
                    .format("%H:%M %Z")
                    .to_string()
            })
            .collect();
        assert!(local.contains(&"02:50 CEST".to_string()), "{local:?}");
        assert!(local.contains(&"02:50 CET".to_string()), "{local:?}");
    }

    /// Started inside the repeated hour (the second 02:20), the next firing is ahead.
    #[test]
    fn a_start_inside_the_repeated_hour_never_fires_in_the_past() {
        let cron = parse_cron("0 */5 * * * *").expect("cron");
        let start = Utc
            .with_ymd_and_hms(2027, 10, 31, 1, 20, 0)
            .single()
            .expect("t");
        let next = next_firing(&cron, paris(), start).expect("fires");
        assert_eq!(next, start + chrono::Duration::minutes(5));
    }

    #[test]
    fn a_fixed_offset_never_moves() {
        let cron = parse_cron("0 30 9 * * *").expect("cron");
        let zone = Zone::parse("+01:00").expect("offset");
        let after = Utc
            .with_ymd_and_hms(2027, 3, 28, 0, 0, 0)
            .single()
            .expect("t");
        let next = next_firing(&cron, zone, after).expect("fires");
        assert_eq!(
            next,
            Utc.with_ymd_and_hms(2027, 3, 28, 8, 30, 0)
                .single()
                .expect("t")
        );
    }
}

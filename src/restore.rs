//! Objects in S3's archive classes (GLACIER, DEEP_ARCHIVE, Intelligent-Tiering's archive
//! tiers) are never read blindly: `find`, `export`, `serve` and `verify` say which need a
//! restore, and `kvs-archiver restore` starts the restores of a range and follows them.

use crate::archive::ArchiveView;
use crate::config::StreamConfig;
use crate::destination::{restore_tiers, Readiness, RestoreTier};
use crate::domain::{rfc3339, EpochMs};
use crate::error::{Error, Result};
use crate::playback::footage::chunks_reaching_into;
use crate::telemetry::Progress;
use serde::Serialize;

/// One archived object and whether it can be read now.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectReadiness {
    /// The object.
    pub object_key: String,
    /// Whether it can be read now.
    #[serde(flatten)]
    pub readiness: Readiness,
}

/// Every archived object of `stream` over `[start, end]`, with whether it can be read
/// now (a HEAD each).
pub async fn readiness(
    archive: &ArchiveView,
    stream: &StreamConfig,
    start: EpochMs,
    end: EpochMs,
) -> Result<Vec<ObjectReadiness>> {
    // Exactly the objects a read of the range reads.
    let label = stream.label();
    let source = stream.timestamp_source;
    let done = chunks_reaching_into(archive.ledger.as_ref(), &label, source, start, end).await?;
    let mut found = Vec::with_capacity(done.len());
    for (chunk, _) in done {
        let readiness = match archive.destination.head(&chunk.object_key).await? {
            Some(head) => head.readiness(),
            // Missing: reads report it (`verify` names it).
            None => Readiness::Readable,
        };
        found.push(ObjectReadiness {
            object_key: chunk.object_key,
            readiness,
        });
    }
    Ok(found)
}

/// Stops a read of `[start, end]` before it starts when an object in it cannot be read
/// yet: the error names them, their class, the tiers and the command that restores them.
pub async fn ensure_readable(
    archive: &ArchiveView,
    stream: &StreamConfig,
    start: EpochMs,
    end: EpochMs,
) -> Result<()> {
    if matches!(
        *archive.destination,
        crate::destination::Destination::Dir(_)
    ) {
        return Ok(());
    }
    let cold: Vec<ObjectReadiness> = readiness(archive, stream, start, end)
        .await?
        .into_iter()
        .filter(|o| o.readiness.blocks_reads())
        .collect();
    if cold.is_empty() {
        return Ok(());
    }
    Err(Error::NeedsRestore(describe_cold(
        &stream.label(),
        &cold,
        start,
        end,
    )))
}

/// What must be restored, and how: a line, then one per object (at most 20).
pub fn describe_cold(
    label: &str,
    cold: &[ObjectReadiness],
    start: EpochMs,
    end: EpochMs,
) -> String {
    let restoring = cold
        .iter()
        .filter(|o| matches!(o.readiness, Readiness::Restoring { .. }))
        .count();
    let mut text = format!(
        "{label}: {} of the objects over {} .. {} are in an archive storage class and cannot be read before a restore ({restoring} restoring now); nothing was read. Start the restores with: kvs-archiver restore --stream {label} --start {} --end {} [--tier Bulk|Standard|Expedited] [--days N]",
        cold.len(),
        rfc3339(start),
        rfc3339(end),
        rfc3339(start),
        rfc3339(end),
    );
    for o in cold.iter().take(20) {
        text.push_str(&format!("\n  {}: {}", o.object_key, describe(&o.readiness)));
    }
    text
}

/// One object's readiness, with the class's tiers where a restore is needed.
pub fn describe(readiness: &Readiness) -> String {
    match readiness {
        Readiness::Readable => "readable".into(),
        Readiness::NeedsRestore { class } if class.starts_with("INTELLIGENT_TIERING") => format!(
            "in {class}: needs a restore, which moves it back to a readable tier (no retrieval fee)"
        ),
        Readiness::NeedsRestore { class } => format!(
            "in {class}: needs a restore, a retrieval billed per GB ({})",
            restore_tiers(class)
        ),
        Readiness::Restoring { class } => format!("in {class}: a restore is under way"),
        Readiness::Restored { class, until } => {
            format!("in {class}: restored, readable until {until}")
        }
    }
}

/// What `restore` did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// The stream's label.
    pub stream: String,
    /// Archived objects over the range.
    pub objects: usize,
    /// Readable without a restore.
    pub readable: usize,
    /// Restores this run started.
    pub started: Vec<String>,
    /// Restores under way (started now or before), when the run ended.
    pub restoring: Vec<String>,
    /// Restored copies, readable now.
    pub restored: Vec<String>,
    /// The tier asked for.
    pub tier: Option<RestoreTier>,
}

impl RestoreReport {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "restore {}: {} objects: {} readable without a restore, {} restores started now ({}), {} restoring, {} restored and readable",
            self.stream,
            self.objects,
            self.readable,
            self.started.len(),
            self.tier.map_or("", RestoreTier::as_str),
            self.restoring.len(),
            self.restored.len(),
        );
        if !self.restoring.is_empty() {
            text.push_str("\n  run it again (or with --wait) to follow them; export and serve read them once restored");
        }
        text
    }
}

/// Starts the restores of `stream`'s objects over `[start, end]` that need one, at `tier`
/// for `days`, then (with `wait`) checks every `poll` until none is under way.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    archive: &ArchiveView,
    stream: &StreamConfig,
    (start, end): (EpochMs, EpochMs),
    tier: RestoreTier,
    days: i32,
    wait: Option<std::time::Duration>,
    progress: &Progress,
) -> Result<RestoreReport> {
    if matches!(
        *archive.destination,
        crate::destination::Destination::Dir(_)
    ) {
        return Err(Error::Usage(
            "restore: the destination is a directory, whose files need no restore".into(),
        ));
    }
    let mut report = RestoreReport {
        stream: stream.label(),
        tier: Some(tier),
        ..RestoreReport::default()
    };
    let objects = readiness(archive, stream, start, end).await?;
    // Refused before any restore starts, not half-way.
    if let Some(o) = objects.iter().find(|o| {
        tier == RestoreTier::Expedited
            && matches!(&o.readiness, Readiness::NeedsRestore { class } if class.contains("DEEP_ARCHIVE"))
    }) {
        return Err(Error::Usage(format!(
            "restore --tier expedited: {} is in DEEP_ARCHIVE, which has no Expedited tier; use standard or bulk",
            o.object_key
        )));
    }
    report.objects = objects.len();
    progress.set_totals(objects.len(), 0);
    let mut objects = objects;
    loop {
        report.readable = 0;
        report.restoring.clear();
        report.restored.clear();
        for o in objects {
            match o.readiness {
                Readiness::Readable => report.readable += 1,
                Readiness::Restored { .. } => report.restored.push(o.object_key),
                Readiness::Restoring { .. } => report.restoring.push(o.object_key),
                // Not restored yet, or a restored copy that expired meanwhile.
                Readiness::NeedsRestore { .. } => {
                    if archive
                        .destination
                        .restore(&o.object_key, days, tier)
                        .await?
                    {
                        tracing::info!(key = %o.object_key, tier = tier.as_str(), "restore started");
                        if !report.started.contains(&o.object_key) {
                            report.started.push(o.object_key.clone());
                        }
                    }
                    report.restoring.push(o.object_key);
                }
            }
            progress.step();
        }
        progress.note(&format!(
            "{} restored, {} restoring",
            report.restored.len(),
            report.restoring.len()
        ));
        match wait {
            Some(poll) if !report.restoring.is_empty() => {
                tokio::time::sleep(poll).await;
                progress.set_totals(report.objects, 0);
                objects = readiness(archive, stream, start, end).await?;
            }
            _ => break,
        }
    }
    // Where the restores stand now (moto and a restore already done answer at once).
    let now = readiness(archive, stream, start, end).await?;
    report.restoring.retain(|key| {
        now.iter()
            .any(|o| o.object_key == *key && o.readiness.blocks_reads())
    });
    report.restored = now
        .iter()
        .filter(|o| matches!(o.readiness, Readiness::Restored { .. }))
        .map(|o| o.object_key.clone())
        .collect();
    Ok(report)
}

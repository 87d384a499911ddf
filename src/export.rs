//! `export`: one MP4 of any time range, taken from the archive (never from KVS, which may
//! have deleted the media long ago), or an incident bundle of several streams' MP4s.
//!
//! The file is a [`Clip`]: the samples copied out of the archived objects as they are,
//! cut on the frame at the start (or the keyframe before it, `--cut keyframe`). Memory
//! holds the clip's sample tables in their written form, never the media.
//!
//! A bundle is a folder: one MP4 per stream, `manifest.json` (the range, each stream's
//! gaps with their reasons, fragments and SHA-256) and `SHA256SUMS`, which
//! `sha256sum -c SHA256SUMS` checks. It is written under a temporary name and renamed
//! into place whole.

use crate::archive::ArchiveView;
use crate::destination::Destination;
use crate::domain::{rfc3339, TimestampSource};
use crate::error::{Error, Result};
use crate::playback::clip::{Clip, ClipReport, ClipSpec};
use crate::retry::RetryPolicy;
use crate::telemetry::ByteProgress;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// What `export` wrote, for its summary and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The file written.
    pub output: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// What the file holds.
    #[serde(flatten)]
    pub clip: ClipReport,
}

impl ExportReport {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        let clip = &self.clip;
        let mut out = format!(
            "wrote {}: {:.1} s, {} frames, {:.1} MB from {} objects ({} fragments), {} .. {}",
            self.output,
            clip.duration_ms as f64 / 1000.0,
            clip.frames,
            clip.bytes as f64 / 1e6,
            clip.objects.len(),
            clip.fragments.len(),
            rfc3339(clip.shown_from_ms),
            rfc3339(clip.last_frame_end_ms),
        );
        out.push_str(&describe_gaps(clip));
        out
    }
}

/// The gaps and objects left out of a clip, a line each.
fn describe_gaps(clip: &ClipReport) -> String {
    let mut out = String::new();
    for gap in &clip.gaps {
        out.push_str(&format!(
            "\ngap {} .. {} ({:.1} s): {}{}",
            rfc3339(gap.from_ms),
            rfc3339(gap.to_ms),
            (gap.to_ms - gap.from_ms) as f64 / 1000.0,
            gap.why,
            if gap.held {
                "; the frame before it stays on screen"
            } else {
                ""
            }
        ));
    }
    for left in &clip.left_out {
        out.push_str(&format!("\nleft out {}: {}", left.object_key, left.reason));
    }
    out
}

/// Writes `spec`'s range of `stream` from the archive to `output`.
pub async fn export(
    archive: &ArchiveView,
    stream: &str,
    source: TimestampSource,
    spec: ClipSpec,
    output: &Path,
    policy: &RetryPolicy,
) -> Result<ExportReport> {
    let clip = Clip::build(
        archive.ledger.as_ref(),
        &archive.destination,
        stream,
        source,
        spec,
    )
    .await?;
    let clip = Arc::new(clip);
    // A name no one knows in advance, created new: a file or link planted beside the
    // output is never written through.
    let partial = PathBuf::from(format!(
        "{}.{:016x}.partial",
        output.display(),
        fastrand::u64(..)
    ));
    let label = format!("export {stream}");
    let written = write_clip(&clip, &archive.destination, &partial, &label, policy).await;
    let sha256 = match written.and_then(|sha256| {
        std::fs::rename(&partial, output)
            .map(|()| sha256)
            .map_err(|e| file_error("rename", output, e))
    }) {
        Ok(sha256) => sha256,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    Ok(ExportReport {
        output: output.display().to_string(),
        sha256,
        clip: clip.report.clone(),
    })
}

/// One stream of a bundle: its file, or why it has none.
#[derive(Debug, Clone, Serialize)]
pub struct BundledStream {
    /// The stream's label.
    pub stream: String,
    /// The MP4's name in the folder; `None` when the archive holds no video of the range.
    pub file: Option<String>,
    /// SHA-256 of the file, hex.
    pub sha256: Option<String>,
    /// What the file holds.
    pub clip: Option<ClipReport>,
    /// Why there is no file.
    pub missing: Option<String>,
}

/// A bundle's `manifest.json`, and `export`'s report of it.
#[derive(Debug, Clone, Serialize)]
pub struct BundleReport {
    /// The folder written.
    pub folder: String,
    /// The range asked for.
    pub start: String,
    /// Its end.
    pub end: String,
    /// When the bundle was written.
    pub created: String,
    /// The program that wrote it.
    pub written_by: String,
    /// Each stream asked for.
    pub streams: Vec<BundledStream>,
}

impl BundleReport {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "wrote {} ({} .. {}); check it with: cd {} && sha256sum -c SHA256SUMS",
            self.folder, self.start, self.end, self.folder
        );
        for s in &self.streams {
            match (&s.file, &s.clip, &s.missing) {
                (Some(file), Some(clip), _) => {
                    out.push_str(&format!(
                        "\n{}: {file}, {:.1} s, {} frames, {} fragments",
                        s.stream,
                        clip.duration_ms as f64 / 1000.0,
                        clip.frames,
                        clip.fragments.len()
                    ));
                    out.push_str(&describe_gaps(clip).replace('\n', "\n  "));
                }
                (_, _, Some(why)) => out.push_str(&format!("\n{}: no file: {why}", s.stream)),
                _ => {}
            }
        }
        out
    }
}

/// Writes a bundle of `streams` over one range into the new folder `folder`.
pub async fn export_bundle(
    archive: &ArchiveView,
    streams: &[(String, TimestampSource)],
    spec: ClipSpec,
    folder: &Path,
    policy: &RetryPolicy,
) -> Result<BundleReport> {
    if folder.exists() {
        return Err(Error::Usage(format!(
            "-o {}: already exists; a bundle is written into a new folder",
            folder.display()
        )));
    }
    let partial = PathBuf::from(format!(
        "{}.{:016x}.partial",
        folder.display(),
        fastrand::u64(..)
    ));
    std::fs::create_dir(&partial).map_err(|e| file_error("create", &partial, e))?;
    let written = write_bundle(archive, streams, spec, folder, &partial, policy).await;
    match written.and_then(|report| {
        std::fs::rename(&partial, folder)
            .map(|()| report)
            .map_err(|e| file_error("rename", folder, e))
    }) {
        Ok(report) => Ok(report),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

async fn write_bundle(
    archive: &ArchiveView,
    streams: &[(String, TimestampSource)],
    spec: ClipSpec,
    folder: &Path,
    partial: &Path,
    policy: &RetryPolicy,
) -> Result<BundleReport> {
    let mut report = BundleReport {
        folder: folder.display().to_string(),
        start: rfc3339(spec.start),
        end: rfc3339(spec.end),
        created: rfc3339(chrono::Utc::now().timestamp_millis()),
        written_by: format!("kvs-archiver {}", env!("CARGO_PKG_VERSION")),
        streams: Vec::new(),
    };
    let mut sums = String::new();
    for (stream, source) in streams {
        let built = Clip::build(
            archive.ledger.as_ref(),
            &archive.destination,
            stream,
            *source,
            spec,
        )
        .await;
        let clip = match built {
            Ok(clip) => Arc::new(clip),
            // No video of the range is part of what the bundle says, not a failure.
            Err(Error::Usage(why)) => {
                report.streams.push(BundledStream {
                    stream: stream.clone(),
                    file: None,
                    sha256: None,
                    clip: None,
                    missing: Some(why),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        // Labels are checked names (letters, digits, `_.-`): a plain file name.
        let file = format!("{stream}.mp4");
        let label = format!("bundle {stream}");
        let sha256 = write_clip(
            &clip,
            &archive.destination,
            &partial.join(&file),
            &label,
            policy,
        )
        .await?;
        sums.push_str(&format!("{sha256}  {file}\n"));
        report.streams.push(BundledStream {
            stream: stream.clone(),
            file: Some(file),
            sha256: Some(sha256),
            clip: Some(clip.report.clone()),
            missing: None,
        });
    }
    let manifest = serde_json::to_vec_pretty(&report)
        .map_err(|e| Error::Usage(format!("manifest.json: {e}")))?;
    let manifest_path = partial.join("manifest.json");
    write_new(&manifest_path, &manifest)?;
    sums.push_str(&format!(
        "{}  manifest.json\n",
        hex::encode(Sha256::digest(&manifest))
    ));
    write_new(&partial.join("SHA256SUMS"), sums.as_bytes())?;
    Ok(report)
}

/// A new file holding `bytes`.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = create_new(path)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| file_error("write", path, e))
}

/// Creates `path`, which must not exist (nor be a link), with mode 0666 before the umask.
fn create_new(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| file_error("create", path, e))
}

fn file_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    let hint = if e.raw_os_error() == Some(28) {
        " (the disk is full: free space or write the export elsewhere)"
    } else {
        ""
    };
    Error::Destination {
        op,
        target: path.display().to_string(),
        message: format!("{e}{hint}"),
        retry: crate::error::Retryability::Permanent,
    }
}

/// Writes `clip` to the new file `path`, showing progress. Returns its SHA-256, hex.
async fn write_clip(
    clip: &Arc<Clip>,
    destination: &Arc<Destination>,
    path: &Path,
    label: &str,
    policy: &RetryPolicy,
) -> Result<String> {
    let progress = ByteProgress::new(label, clip.len());
    let mut file = tokio::fs::File::from_std(create_new(path)?);
    let mut hash = Sha256::new();
    let mut body = clip
        .clone()
        .stream(destination.clone(), 0, clip.len(), *policy);
    let mut written = 0u64;
    while let Some(bytes) = body.recv().await {
        let bytes = bytes?;
        hash.update(&bytes);
        file.write_all(&bytes)
            .await
            .map_err(|e| file_error("write", path, e))?;
        written += bytes.len() as u64;
        progress.advance(bytes.len() as u64);
    }
    progress.finish();
    if written != clip.len() {
        return Err(Error::Usage(format!(
            "{}: wrote {written} of {} bytes",
            path.display(),
            clip.len()
        )));
    }
    file.sync_all()
        .await
        .map_err(|e| file_error("sync", path, e))?;
    Ok(hex::encode(hash.finalize()))
}

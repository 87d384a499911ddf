//! A local directory as the destination: the clip is written to `KEY.<upload>.partial`,
//! synced, then renamed to `KEY` and the directory synced, so a file under its final name
//! is always whole and survives a power cut once the ledger says done. Metadata goes to
//! `KEY.json` beside it, written the same way.
//!
//! Everything under the root may have been planted by someone else: a key is used only
//! if it is an object key ([`is_object_key`]), no directory on its way is a symbolic
//! link, files are created new (`O_EXCL`) without following a link (`O_NOFOLLOW`) and
//! read without following one, modes are set through the open handle, and walks never
//! follow links (so a link loop cannot make them endless).

use super::{Crc32c, ObjectMeta};
use crate::domain::is_object_key;
use crate::error::{Error, Result, Retryability};
use crate::ledger::Archived;
use bytes::Bytes;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Numbers this process's uploads, for their partial files' names.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A metadata side file holds a handful of short pairs; a larger one was not written by
/// this program and is not read whole.
const MAX_SIDECAR_BYTES: u64 = 64 * 1024;

/// A local directory as [`super::Destination`]: objects are files under `root`.
pub struct DirDestination {
    root: PathBuf,
    /// `destination.prefix`: the root and the prefix are the operator's configuration,
    /// where links are followed; below them, none is.
    prefix: String,
}

/// One file on its way: written to a partial file beside the target, renamed into place at
/// the end.
pub struct DirUpload {
    partial: PathBuf,
    target: PathBuf,
    token: String,
    meta: ObjectMeta,
    file: tokio::fs::File,
    written: u64,
    crc: Crc32c,
}

fn io_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    let retry = match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound => {
            Retryability::Permanent
        }
        // A full disk may be freed by the operator; the chunk stays pending meanwhile.
        _ => Retryability::Transient,
    };
    let hint = match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            " (the disk is full: free space or point destination.directory elsewhere)"
        }
        // O_NOFOLLOW on a link: ELOOP.
        Some(libc::ELOOP) => {
            " (a symbolic link stands where the file should be: the directory destination never follows links; remove it)"
        }
        Some(libc::EEXIST) => " (a file is already there: remove it if it is not an object this program wrote)",
        _ => "",
    };
    let retry = if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EEXIST))
        || e.kind() == std::io::ErrorKind::InvalidInput
    {
        Retryability::Permanent
    } else {
        retry
    };
    Error::Destination {
        op,
        target: path.display().to_string(),
        message: format!("{e}{hint}"),
        retry,
    }
}

fn refused(key: &str, why: &str) -> Error {
    Error::Destination {
        op: "resolve",
        target: format!("{:?}", key.chars().take(160).collect::<String>()),
        message: why.to_string(),
        retry: Retryability::Permanent,
    }
}

/// Opens the regular file at `path` for reading, without following a link at its last
/// component. `O_NONBLOCK`: a FIFO planted there would otherwise block the open forever;
/// it is refused, as is anything else that is not a regular file (for which the flag
/// changes nothing).
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or directory stands where an object should be)",
        ))
    }
}

/// Creates `path`, which must not exist, owner-only, without following a link there.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The mode a finished object gets: what `open(…, 0666)` would give under the process's
/// umask (read from /proc, since setting the umask to learn it would race other threads).
fn finished_mode() -> u32 {
    static MODE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            // Without /proc, the most common umask: owner writes, everyone reads.
            .unwrap_or(0o022);
        0o666 & !umask
    })
}

/// The metadata side file (`KEY.json`) of the file at `path`; empty if it has none or it
/// is not a JSON object of strings.
fn read_metadata(path: &Path) -> std::collections::BTreeMap<String, String> {
    use std::io::Read;
    let sidecar = PathBuf::from(format!("{}.json", path.display()));
    let mut text = Vec::new();
    let read = open_no_follow(&sidecar)
        .and_then(|file| file.take(MAX_SIDECAR_BYTES + 1).read_to_end(&mut text));
    match read {
        Ok(n) if n as u64 <= MAX_SIDECAR_BYTES => serde_json::from_slice(&text).unwrap_or_default(),
        _ => Default::default(),
    }
}

/// Every regular file under `start`, depth first, never through a link: `(path, size,
/// modified)`. A missing start is an empty tree. Links met on the way are logged, once
/// per walk, so an archive spread by links is not silently half-read.
fn walk_files(start: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut files = Vec::new();
    let mut links = Vec::new();
    let mut dirs = vec![start.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // The entry's own type (lstat): a link is neither a directory nor a file.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_symlink() {
                links.push(entry.path());
            } else if kind.is_file() {
                if let Ok(meta) = entry.metadata() {
                    files.push((entry.path(), meta));
                }
            }
        }
    }
    if let Some(first) = links.first() {
        tracing::warn!(
            links = links.len(),
            first = %first.display(),
            "symbolic links in the directory destination were not followed (use directories, or bind mounts for other disks)"
        );
    }
    files
}

impl DirDestination {
    /// Objects under `root`, keys under `prefix`.
    pub fn new(root: PathBuf, prefix: &str) -> Self {
        DirDestination {
            root,
            prefix: prefix.to_string(),
        }
    }

    /// The root's path, for logs and messages.
    pub fn describe(&self) -> String {
        self.root.display().to_string()
    }

    /// The file of `key`, once `key` is shown to be an object key and no directory
    /// between the root and the file is a link. Directories not there yet are fine: they
    /// are created as real directories.
    pub fn path_of(&self, key: &str) -> Result<PathBuf> {
        if !is_object_key(key) || !key.starts_with(&self.prefix) {
            return Err(refused(
                key,
                "not an object key this program writes (under destination.prefix, relative parts, no `.` or `..`, ending in .mp4 or .mkv): refused before it became a path",
            ));
        }
        self.no_links_below_prefix(Path::new(&key[self.prefix.len()..]).parent())?;
        Ok(self.root.join(key))
    }

    /// Where a walk of `prefix` (the destination's prefix, or a folder below it) starts,
    /// once no folder below the destination's prefix on the way is a link.
    fn walk_start(&self, prefix: &str) -> Result<PathBuf> {
        let below = prefix
            .strip_prefix(&self.prefix)
            .ok_or_else(|| refused(prefix, "not under destination.prefix: not walked"))?;
        if below.split('/').any(|part| part == "..") {
            return Err(refused(prefix, "a `..` part: not walked"));
        }
        self.no_links_below_prefix(Some(Path::new(below)))?;
        Ok(self.root.join(prefix))
    }

    /// Errs if a directory on the way from the root and prefix (the operator's own
    /// configuration, links allowed) down `relative` is a symbolic link.
    fn no_links_below_prefix(&self, relative: Option<&Path>) -> Result<()> {
        let mut at = self.root.join(&self.prefix);
        for part in relative.into_iter().flat_map(Path::components) {
            let Component::Normal(part) = part else {
                return Err(refused(
                    &relative
                        .map(|r| r.display().to_string())
                        .unwrap_or_default(),
                    "a path part that is not a name",
                ));
            };
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Error::Destination {
                        op: "resolve",
                        target: at.display().to_string(),
                        message: "is a symbolic link: the directory destination never follows links below destination.directory and destination.prefix (anyone who can write there could point one anywhere); replace it with a directory, or a bind mount for another disk".into(),
                        retry: Retryability::Permanent,
                    })
                }
                Ok(_) => {}
                // Not there yet: created later as a directory.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error("stat", &at, e)),
            }
        }
        Ok(())
    }

    /// Creates the root if missing and proves a file can be written in it.
    pub async fn check(&self) -> Result<()> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| io_error("create directory", &self.root, e))?;
        // A name of this process's own: a link planted at a fixed name is never written
        // through (and create_new refuses it).
        let probe = self.root.join(format!(
            ".kvs-archiver-write-test.{}.partial",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&probe);
        create_new(&probe).map_err(|e| io_error("create", &probe, e))?;
        let _ = std::fs::remove_file(&probe);
        // A stream's folder that is a link (an archive spread over disks, say) would make
        // every upload of the stream fail: said at start, not chunk by chunk.
        let streams = self.root.join(&self.prefix);
        for entry in std::fs::read_dir(&streams).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                self.no_links_below_prefix(Some(Path::new(&entry.file_name())))?;
            }
        }
        Ok(())
    }

    /// Opens a partial file for `key`; nothing is visible at `key` until
    /// [`DirUpload::finish`].
    pub async fn begin(&self, key: &str, meta: ObjectMeta) -> Result<DirUpload> {
        let target = self.path_of(key)?;
        // Each upload writes a file of its own: a worker that lost its lease can never
        // write into, or remove, the file of the chunk's new holder.
        let token = format!(
            "{}-{}",
            std::process::id(),
            UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let partial = PathBuf::from(format!("{}.{token}.partial", target.display()));
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error("create directory", parent, e))?;
        }
        // A link swapped in while the directories were made is caught here.
        self.no_links_below_prefix(Path::new(&key[self.prefix.len()..]).parent())?;
        // Owner-only while partial; the finished object gets the umask's mode.
        let file = create_new(&partial).map_err(|e| io_error("create", &partial, e))?;
        Ok(DirUpload {
            partial,
            target,
            token,
            meta,
            file: tokio::fs::File::from_std(file),
            written: 0,
            crc: Crc32c::default(),
        })
    }

    /// Removes `.partial` files under `prefix` untouched for `min_age`: a live upload
    /// writes to its file all the time, so only a killed process's file gets that old.
    /// The walk runs on a blocking thread and never follows a link.
    pub async fn sweep_orphans(&self, prefix: &str, min_age: std::time::Duration) -> usize {
        let Ok(start) = self.walk_start(prefix) else {
            return 0;
        };
        let walk = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            for (path, meta) in walk_files(&start) {
                let stale = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > min_age);
                if path.extension().is_some_and(|e| e == "partial")
                    && stale
                    && std::fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
            removed
        });
        walk.await.unwrap_or(0)
    }

    /// See [`super::Destination::inspect`].
    pub async fn inspect(&self, key: &str) -> Result<Option<super::StoredObject>> {
        use tokio::io::AsyncReadExt;
        let path = self.path_of(key)?;
        let mut file = match open_no_follow(&path) {
            Ok(file) => tokio::fs::File::from_std(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open", &path, e)),
        };
        let mut crc = Crc32c::default();
        let mut size = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buffer)
                .await
                .map_err(|e| io_error("read", &path, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            crc.update(&buffer[..n]);
        }
        let meta = read_metadata(&path);
        Ok(Some(super::StoredObject {
            size,
            crc32c: crc.hex(),
            meta,
        }))
    }

    /// `len` bytes of the file of `key` from byte `start`.
    pub async fn read_range(&self, key: &str, start: u64, len: u64) -> Result<super::RangeBody> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(key)?;
        let mut file = open_no_follow(&path)
            .map(tokio::fs::File::from_std)
            .map_err(|e| io_error("open", &path, e))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| io_error("seek", &path, e))?;
        Ok(super::RangeBody::Dir {
            file: file.take(len),
            path,
        })
    }

    /// Size and metadata (its `.json` side file) of the file of `key`.
    pub async fn head(&self, key: &str) -> Result<Option<super::ObjectHead>> {
        let path = self.path_of(key)?;
        let size = match open_no_follow(&path).and_then(|file| file.metadata()) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("stat", &path, e)),
        };
        let meta = read_metadata(&path);
        Ok(Some(super::ObjectHead {
            size,
            meta,
            ..super::ObjectHead::default()
        }))
    }

    /// Removes every partial file of `key`; returns how many.
    pub async fn abort_partial(&self, key: &str) -> Result<usize> {
        let target = self.path_of(key)?;
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Ok(0);
        };
        let stem = format!("{}.", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&stem) && file.ends_with(".partial") {
                let path = entry.path();
                // Unlinking never follows a link: a planted one is removed, not its target.
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove", &path, e)),
                }
            }
        }
        Ok(removed)
    }

    /// The object keys under `prefix`: regular files that are object keys, found by a
    /// walk on a blocking thread that never follows a link.
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let root = self.root.clone();
        let start = self.walk_start(prefix)?;
        let walk = tokio::task::spawn_blocking(move || {
            walk_files(&start)
                .into_iter()
                .filter_map(|(path, _)| {
                    let relative = path.strip_prefix(&root).ok()?.to_str()?.to_string();
                    is_object_key(&relative).then_some(relative)
                })
                .collect()
        });
        walk.await.map_err(|e| Error::Destination {
            op: "list",
            target: self.root.display().to_string(),
            message: format!("the walk stopped: {e}"),
            retry: Retryability::Transient,
        })
    }
}

impl DirUpload {
    /// Appends bytes to the partial file.
    pub async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.written += bytes.len() as u64;
        self.crc.update(&bytes);
        self.file
            .write_all(&bytes)
            .await
            .map_err(|e| io_error("write", &self.partial, e))
    }

    /// Makes the object visible, whole; on any failure (a full disk often shows only at
    /// the flush) the partial file is removed, as by [`DirUpload::abort`].
    pub async fn finish(mut self) -> Result<Archived> {
        let partial = self.partial.clone();
        let finished = self.complete().await;
        if finished.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        finished
    }

    async fn complete(&mut self) -> Result<Archived> {
        let mode = std::fs::Permissions::from_mode(finished_mode());
        self.file
            .flush()
            .await
            .map_err(|e| io_error("flush", &self.partial, e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| io_error("sync", &self.partial, e))?;
        self.write_sidecar(&mode).await?;
        // Through the handle: a link put in the partial file's place is never chmod-ed.
        self.file
            .set_permissions(mode)
            .await
            .map_err(|e| io_error("set permissions", &self.partial, e))?;
        // rename replaces whatever is at the target, a link included; it never follows it.
        tokio::fs::rename(&self.partial, &self.target)
            .await
            .map_err(|e| io_error("rename", &self.target, e))?;
        // The rename is durable only once the directory is synced.
        if let Some(parent) = self.target.parent() {
            let dir = tokio::fs::File::open(parent)
                .await
                .map_err(|e| io_error("open directory", parent, e))?;
            dir.sync_all()
                .await
                .map_err(|e| io_error("sync directory", parent, e))?;
        }
        Ok(Archived {
            bytes: self.written,
            crc32c: self.crc.hex(),
        })
    }

    /// `KEY.json`, written to a new file of this upload's own and renamed into place.
    async fn write_sidecar(&self, mode: &std::fs::Permissions) -> Result<()> {
        let meta: serde_json::Map<String, serde_json::Value> = self
            .meta
            .pairs
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        let sidecar = PathBuf::from(format!("{}.json", self.target.display()));
        let partial = PathBuf::from(format!("{}.{}.partial", sidecar.display(), self.token));
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
        let mut side = create_new(&partial)
            .map(tokio::fs::File::from_std)
            .map_err(|e| io_error("create", &partial, e))?;
        let written = async {
            side.write_all(text.as_bytes()).await?;
            side.sync_all().await?;
            side.set_permissions(mode.clone()).await?;
            tokio::fs::rename(&partial, &sidecar).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(io_error("write", &sidecar, e));
        }
        Ok(())
    }

    /// Removes the partial file.
    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.partial).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ObjectMeta {
        ObjectMeta { pairs: Vec::new() }
    }

    #[tokio::test]
    async fn keys_that_climb_out_or_pass_through_links_are_refused() {
        let work = tempfile::tempdir().expect("tempdir");
        let root = work.path().join("root");
        let outside = work.path().join("outside");
        std::fs::create_dir_all(root.join("kvs")).expect("root");
        std::fs::create_dir_all(&outside).expect("outside");
        let destination = DirDestination::new(root.clone(), "kvs/");
        for key in [
            "kvs/../../outside/x.mp4",
            "/tmp/x.mp4",
            "kvs/x.json",
            "kvs/x.mp4/..",
        ] {
            assert!(destination.begin(key, meta()).await.is_err(), "{key}");
            assert!(destination.read_range(key, 0, 1).await.is_err(), "{key}");
        }
        // A directory on the way that is a link.
        std::os::unix::fs::symlink(&outside, root.join("kvs/cam")).expect("link");
        let refused = destination
            .begin("kvs/cam/2026/x.mp4", meta())
            .await
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        // A file that is a link is neither read nor counted.
        std::fs::write(outside.join("secret"), b"secret").expect("secret");
        std::os::unix::fs::symlink(outside.join("secret"), root.join("kvs/y.mp4")).expect("link");
        assert!(destination.read_range("kvs/y.mp4", 0, 6).await.is_err());
        assert!(destination.head("kvs/y.mp4").await.is_err());
        assert_eq!(
            destination.list_keys("kvs/").await.expect("listed"),
            Vec::<String>::new()
        );
        assert!(std::fs::read_dir(&outside).expect("outside").count() == 1);
    }

    #[tokio::test]
    async fn an_upload_lands_whole_under_its_key_and_nothing_else_is_listed() {
        let work = tempfile::tempdir().expect("tempdir");
        let destination = DirDestination::new(work.path().to_path_buf(), "kvs/");
        let mut upload = destination
            .begin(
                "kvs/cam/x.mp4",
                ObjectMeta {
                    pairs: vec![("kvs-stream", "cam".into())],
                },
            )
            .await
            .expect("begun");
        upload
            .write(Bytes::from_static(b"video"))
            .await
            .expect("written");
        let archived = upload.finish().await.expect("finished");
        assert_eq!(archived.bytes, 5);
        assert_eq!(
            destination.list_keys("kvs/").await.expect("listed"),
            vec!["kvs/cam/x.mp4"]
        );
        let head = destination
            .head("kvs/cam/x.mp4")
            .await
            .expect("head")
            .expect("there");
        assert_eq!(head.meta.get("kvs-stream").map(String::as_str), Some("cam"));
    }
}

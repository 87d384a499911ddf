//! A local directory as the destination: the clip is written to `KEY.partial`, synced,
//! then renamed to `KEY` and the directory synced, so a file under its final name is
//! always whole and survives a power cut once the ledger says done. Metadata goes to
//! `KEY.json` beside it.

use super::{Crc32c, ObjectMeta};
use crate::error::{Error, Result, Retryability};
use crate::ledger::Archived;
use bytes::Bytes;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Numbers this process's uploads, for their partial files' names.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct DirSink {
    root: PathBuf,
}

pub struct DirUpload {
    partial: PathBuf,
    target: PathBuf,
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
    let hint = if e.raw_os_error() == Some(28) {
        " (the disk is full: free space or point destination.directory elsewhere)"
    } else {
        ""
    };
    Error::Sink {
        op,
        target: path.display().to_string(),
        message: format!("{e}{hint}"),
        retry,
    }
}

/// The metadata side file (`KEY.json`) of the file at `path`; empty if it has none.
async fn read_metadata(path: &Path) -> std::collections::BTreeMap<String, String> {
    let sidecar = PathBuf::from(format!("{}.json", path.display()));
    tokio::fs::read(&sidecar)
        .await
        .ok()
        .and_then(|text| serde_json::from_slice(&text).ok())
        .unwrap_or_default()
}

impl DirSink {
    pub fn new(root: PathBuf) -> Self {
        DirSink { root }
    }

    pub fn describe(&self) -> String {
        self.root.display().to_string()
    }

    /// The file that holds the object at `key`.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub async fn check(&self) -> Result<()> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| io_error("create directory", &self.root, e))?;
        let probe = self.root.join(".kvs-archiver-write-test");
        tokio::fs::write(&probe, b"ok")
            .await
            .map_err(|e| io_error("write", &probe, e))?;
        let _ = tokio::fs::remove_file(&probe).await;
        Ok(())
    }

    pub async fn begin(&self, key: &str, meta: ObjectMeta) -> Result<DirUpload> {
        let target = self.root.join(key);
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
        // Owner-only while partial; the finished object gets the usual mode (umask).
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .await
            .map_err(|e| io_error("create", &partial, e))?;
        Ok(DirUpload {
            partial,
            target,
            meta,
            file,
            written: 0,
            crc: Crc32c::default(),
        })
    }

    /// Removes `.partial` files under `prefix` untouched for `min_age`: a live upload
    /// writes to its file all the time, so only a killed process's file gets that old.
    pub fn sweep_orphans(&self, prefix: &str, min_age: std::time::Duration) -> usize {
        fn walk(dir: &Path, min_age: std::time::Duration, removed: &mut usize) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, min_age, removed);
                    continue;
                }
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > min_age);
                if path.extension().is_some_and(|e| e == "partial")
                    && stale
                    && std::fs::remove_file(&path).is_ok()
                {
                    *removed += 1;
                }
            }
        }
        let mut removed = 0;
        walk(&self.root.join(prefix), min_age, &mut removed);
        removed
    }
}

impl DirSink {
    pub async fn inspect(&self, key: &str) -> Result<Option<super::StoredObject>> {
        use tokio::io::AsyncReadExt;
        let path = self.root.join(key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
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
        let meta = read_metadata(&path).await;
        Ok(Some(super::StoredObject {
            size,
            crc32c: crc.hex(),
            meta,
        }))
    }

    /// `len` bytes of the file of `key` from byte `start`.
    pub async fn read_range(&self, key: &str, start: u64, len: u64) -> Result<super::RangeBody> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.root.join(key);
        let mut file = tokio::fs::File::open(&path)
            .await
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
        let path = self.root.join(key);
        let size = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("stat", &path, e)),
        };
        let meta = read_metadata(&path).await;
        Ok(Some(super::ObjectHead { size, meta }))
    }

    pub async fn abort_partial(&self, key: &str) -> Result<usize> {
        let target = self.root.join(key);
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
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("remove", &path, e)),
                }
            }
        }
        Ok(removed)
    }

    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        fn walk(root: &Path, dir: &Path, keys: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(root, &path, keys);
                } else if !path
                    .extension()
                    .is_some_and(|e| e == "json" || e == "partial")
                {
                    if let Ok(relative) = path.strip_prefix(root) {
                        keys.push(relative.to_string_lossy().into_owned());
                    }
                }
            }
        }
        let mut keys = Vec::new();
        walk(&self.root, &self.root.join(prefix), &mut keys);
        Ok(keys)
    }
}

impl DirUpload {
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
        self.file
            .flush()
            .await
            .map_err(|e| io_error("flush", &self.partial, e))?;
        self.file
            .sync_all()
            .await
            .map_err(|e| io_error("sync", &self.partial, e))?;
        let meta: serde_json::Map<String, serde_json::Value> = self
            .meta
            .pairs
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        let sidecar = PathBuf::from(format!("{}.json", self.target.display()));
        let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
        let mut side = tokio::fs::File::create(&sidecar)
            .await
            .map_err(|e| io_error("create", &sidecar, e))?;
        side.write_all(text.as_bytes())
            .await
            .map_err(|e| io_error("write", &sidecar, e))?;
        side.sync_all()
            .await
            .map_err(|e| io_error("sync", &sidecar, e))?;
        let mode = std::fs::Permissions::from_mode(0o644);
        tokio::fs::set_permissions(&self.partial, mode)
            .await
            .map_err(|e| io_error("set permissions", &self.partial, e))?;
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

    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.partial).await;
    }
}

//! A local directory as the destination: the clip is written to `KEY.partial`, synced,
//! then renamed to `KEY`, so a file under its final name is always whole. Metadata goes
//! to `KEY.json` beside it.

use super::ObjectMeta;
use crate::error::{Error, Result};
use crate::retry::Retryability;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

pub struct DirSink {
    root: PathBuf,
}

pub struct DirUpload {
    partial: PathBuf,
    target: PathBuf,
    meta: ObjectMeta,
    file: tokio::fs::File,
    written: u64,
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

impl DirSink {
    pub fn new(root: PathBuf) -> Self {
        DirSink { root }
    }

    pub fn describe(&self) -> String {
        self.root.display().to_string()
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
        let partial = PathBuf::from(format!("{}.partial", target.display()));
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error("create directory", parent, e))?;
        }
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| io_error("create", &partial, e))?;
        Ok(DirUpload {
            partial,
            target,
            meta,
            file,
            written: 0,
        })
    }

    /// Removes `.partial` files a killed process left under `prefix`.
    pub fn sweep_orphans(&self, prefix: &str) -> usize {
        fn walk(dir: &Path, removed: &mut usize) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, removed);
                } else if path.extension().is_some_and(|e| e == "partial")
                    && std::fs::remove_file(&path).is_ok()
                {
                    *removed += 1;
                }
            }
        }
        let mut removed = 0;
        walk(&self.root.join(prefix), &mut removed);
        removed
    }
}

impl DirUpload {
    pub async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.written += bytes.len() as u64;
        self.file
            .write_all(&bytes)
            .await
            .map_err(|e| io_error("write", &self.partial, e))
    }

    pub async fn finish(mut self) -> Result<u64> {
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
        tokio::fs::write(&sidecar, text)
            .await
            .map_err(|e| io_error("write", &sidecar, e))?;
        tokio::fs::rename(&self.partial, &self.target)
            .await
            .map_err(|e| io_error("rename", &self.target, e))?;
        Ok(self.written)
    }

    pub async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.partial).await;
    }
}

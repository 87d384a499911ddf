//! The ledger in SQLite: the embedded default, one host's file. Its queries are the
//! shared core's ([`super::sql`]); this module opens the file and answers how SQLite
//! differs ([`Dialect`]): one writer at a time, id lists as JSON, and a holder known to
//! be dead when it is a process of this host that no longer runs.

use super::sql::Dialect;
use super::Identity;
use crate::error::{Error, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Writers wait this long for each other (daemon and backfill share one file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The ledger in one SQLite file.
pub struct SqliteLedger {
    /// Connections to the file.
    pool: SqlitePool,
    /// This process, as its claims name it.
    identity: Identity,
}

super::sql::sql_ledger!(SqliteLedger, sqlx::Sqlite);

impl Dialect for SqliteLedger {
    const GREATEST: &'static str = "MAX";
    const CLAIM_LOCK: &'static str = "";
    const STREAM_LOCK: Option<&'static str> = None;
    type Ids = String;

    fn ids(ids: &[i64]) -> String {
        // A list of integers always serializes; "[]" only keeps this total.
        serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_string())
    }

    fn id_in(param: &str) -> String {
        format!("id IN (SELECT value FROM json_each({param}))")
    }

    /// SQLite is one host's database: a killed process's chunks and stream are taken
    /// over at once instead of after its lease.
    fn owner_is_gone(owner: &str, this_host: &str) -> bool {
        let mut parts = owner.rsplitn(3, ':');
        let (_nonce, pid, host) = (parts.next(), parts.next(), parts.next());
        let pid = pid.and_then(|pid| pid.parse::<libc::pid_t>().ok());
        let (Some(pid), Some(host)) = (pid, host) else {
            return false;
        };
        let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
        host == this_host && pid > 0 && !process_exists(pid)
    }
}

/// Whether a process `pid` exists, whoever owns it: signal 0 is checked, not sent, and
/// EPERM means it lives under another user. (Not `/proc/PID`, which systemd's
/// `ProtectProc=invisible` hides for other users' processes.)
fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only reports whether pid exists.
    let answer = unsafe { libc::kill(pid, 0) };
    answer == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl SqliteLedger {
    /// The pool, for benchmarks that load rows in bulk.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens (creating if missing, owner-only) the database and applies the migrations.
    pub async fn open(database_url: &str, identity: Identity) -> Result<SqliteLedger> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(Error::ledger("open"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let io = |op: &'static str| move |e: std::io::Error| Error::ledger(op)(sqlx::Error::Io(e));
        let path = options.get_filename().to_path_buf();
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(io("open"))?;
            }
        }
        // Creating the file, switching it to WAL and migrating take no lock SQLite's busy
        // timeout covers: two processes starting on a new file would collide. A lock file
        // next to it serializes opening.
        let lock_path = PathBuf::from(format!("{}.open-lock", path.display()));
        let lock = owner_only()
            .open(&lock_path)
            .and_then(|file| file.lock().map(|()| file))
            .map_err(io("lock for opening"))?;
        // The ledger names buckets, keys and upload ids: create it readable by its owner
        // only (SQLite's own files then inherit the mode).
        if !path.exists() && path.as_os_str() != ":memory:" && !path.as_os_str().is_empty() {
            owner_only().open(&path).map_err(io("create"))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(Error::ledger("open"))?;
        let migrated = match super::migrations::sqlite().await {
            Ok(migrator) => migrator.run(&pool).await,
            Err(e) => Err(e),
        };
        drop(lock);
        migrated?;
        Ok(SqliteLedger { pool, identity })
    }
}

/// Opens a file for writing, creating it readable by its owner only.
fn owner_only() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

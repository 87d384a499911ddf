//! The ledger: every chunk and its state, in SQLite. The only module that runs SQL.
//!
//! A chunk moves `planned → fetching → uploading → done`, or to `failed` (with attempts
//! and the last error) or `expired` (KVS deleted the media first). Each transition is
//! one statement, hence one transaction. A claim carries an owner (`host:pid`) and a
//! lease, so two processes on one database never work on the same chunk, and a chunk
//! left behind by a killed process is taken over at once.

use crate::domain::{ChunkPlan, EpochMs, TimestampSource};
use crate::error::{Error, Result};
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How long a claim holds without renewal; a live worker renews it at every transition.
const LEASE: Duration = Duration::from_secs(15 * 60);
/// Writers wait this long for each other (daemon and backfill share one file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A chunk row.
#[derive(Debug, Clone, Serialize)]
pub struct Chunk {
    pub id: i64,
    pub stream: String,
    pub timestamp_source: String,
    pub plan: ChunkPlan,
    pub object_key: String,
    pub state: String,
    pub attempts: u32,
    /// A failed chunk may be claimed again (its error was not permanent).
    pub retryable: bool,
    pub last_error: Option<String>,
    pub upload_id: Option<String>,
    pub owner: Option<String>,
}

/// Per-stream totals for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StreamStatus {
    pub stream: String,
    pub done: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub failed: u64,
    pub expired: u64,
    pub archived_bytes: u64,
    pub archived_fragments: u64,
    /// Start of the last fragment of the newest archived chunk.
    pub archived_through_ms: Option<EpochMs>,
    pub last_error: Option<String>,
    /// Start of the oldest chunk not archived (nor expired) yet.
    pub oldest_unarchived_ms: Option<EpochMs>,
    /// The daemon's view (`run`), when it has run.
    pub retention_ms: Option<i64>,
    pub next_run_ms: Option<EpochMs>,
    pub last_run_ms: Option<EpochMs>,
    pub last_run_error: Option<String>,
}

/// A chunk row to insert: planned, or (with a reason) expired.
struct NewChunk<'a> {
    stream: &'a str,
    source: &'a str,
    plan: &'a ChunkPlan,
    object_key: &'a str,
    expired: Option<&'a str>,
}

/// Inserts a chunk unless a chunk of the stream already overlaps its GetClip range, which
/// keeps the ledger free of overlaps whoever plans; returns whether it was inserted.
async fn insert_chunk<'e, E>(executor: E, row: &NewChunk<'_>) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let now = now_ms();
    let (start, end) = row.plan.clip_range();
    let done = sqlx::query(
        "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
             planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key,
             state, retryable, last_error, error_kind, created_ms, updated_ms)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
             CASE WHEN ?13 IS NULL THEN 'planned' ELSE 'expired' END,
             ?13 IS NULL, ?13, CASE WHEN ?13 IS NULL THEN NULL ELSE 'expired' END, ?11, ?11
         WHERE NOT EXISTS (
             SELECT 1 FROM chunks WHERE stream = ?1 AND timestamp_source = ?2
               AND start_ms <= ?12 AND MAX(end_ms, start_ms + 1) >= ?3)",
    )
    .bind(row.stream)
    .bind(row.source)
    .bind(start)
    .bind(row.plan.end_ms)
    .bind(i64::from(row.plan.fragment_count))
    .bind(row.plan.bytes as i64)
    .bind(row.plan.duration_ms as i64)
    .bind(&row.plan.first_fragment)
    .bind(&row.plan.last_fragment)
    .bind(row.object_key)
    .bind(now)
    .bind(end)
    .bind(row.expired)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The daemon's per-stream memory (`stream_progress`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamProgress {
    pub planned_through_ms: Option<EpochMs>,
    pub retention_ms: Option<i64>,
    pub next_run_ms: Option<EpochMs>,
    pub last_run_ms: Option<EpochMs>,
    pub last_run_error: Option<String>,
}

#[derive(Clone)]
pub struct Ledger {
    pool: SqlitePool,
    owner: String,
}

fn now_ms() -> EpochMs {
    chrono::Utc::now().timestamp_millis()
}

fn row_to_chunk(row: &sqlx::sqlite::SqliteRow) -> Chunk {
    Chunk {
        id: row.get("id"),
        stream: row.get("stream"),
        timestamp_source: row.get("timestamp_source"),
        plan: ChunkPlan {
            start_ms: row.get("start_ms"),
            end_ms: row.get("end_ms"),
            fragment_count: row.get::<i64, _>("fragment_count") as u32,
            bytes: row.get::<i64, _>("planned_bytes") as u64,
            duration_ms: row.get::<i64, _>("planned_duration_ms") as u64,
            first_fragment: row.get("first_fragment"),
            last_fragment: row.get("last_fragment"),
        },
        object_key: row.get("object_key"),
        state: row.get("state"),
        attempts: row.get::<i64, _>("attempts") as u32,
        retryable: row.get::<i64, _>("retryable") != 0,
        last_error: row.get("last_error"),
        upload_id: row.get("upload_id"),
        owner: row.get("owner"),
    }
}

/// This process's name in `owner`: host and pid.
fn process_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string());
    format!("{host}:{}", std::process::id())
}

/// Whether `owner` is a process of this host that no longer runs.
fn owner_is_gone(owner: &str, this_host: &str) -> bool {
    let Some((host, pid)) = owner.rsplit_once(':') else {
        return false;
    };
    host == this_host && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Ledger {
    /// Opens (creating if missing) the database and applies the migrations.
    pub async fn open(database_url: &str) -> Result<Ledger> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(Error::store("open"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        if let Some(dir) = options.get_filename().parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| Error::Store {
                    op: "open",
                    source: sqlx::Error::Io(e),
                })?;
            }
        }
        // Creating the file, switching it to WAL and migrating take no lock SQLite's busy
        // timeout covers: two processes starting on a new file would collide. A lock file
        // next to it serializes opening.
        let lock_path = PathBuf::from(format!("{}.open-lock", options.get_filename().display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .and_then(|file| file.lock().map(|()| file))
            .map_err(|e| Error::Store {
                op: "lock for opening",
                source: sqlx::Error::Io(e),
            })?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(Error::store("open"))?;
        let migrated = MIGRATOR.run(&pool).await;
        drop(lock);
        migrated?;
        Ok(Ledger {
            pool,
            owner: process_owner(),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Inserts a planned chunk unless an existing chunk of the stream overlaps its range
    /// (then the chunk is already covered: returns false). One statement, so two planners
    /// on one database cannot both insert overlapping chunks.
    pub async fn insert_planned(
        &self,
        stream: &str,
        source: TimestampSource,
        plan: &ChunkPlan,
        object_key: &str,
    ) -> Result<bool> {
        let row = NewChunk {
            stream,
            source: source.as_str(),
            plan,
            object_key,
            expired: None,
        };
        insert_chunk(&self.pool, &row)
            .await
            .map_err(Error::store("insert chunk"))
    }

    /// GetClip ranges of the stream's chunks that reach into `[from, to]`, by start.
    pub async fn covered(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<(EpochMs, EpochMs)>> {
        let rows = sqlx::query(
            "SELECT start_ms, MAX(end_ms, start_ms + 1) AS clip_end FROM chunks
             WHERE stream = ? AND timestamp_source = ? AND end_ms >= ? - 1 AND start_ms <= ?
             ORDER BY start_ms",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("read covered ranges"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i64, _>("start_ms"), r.get::<i64, _>("clip_end")))
            .collect())
    }

    /// Chunks of the stream starting in `[from, to]`, in time order.
    pub async fn chunks_in(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<Chunk>> {
        let rows = sqlx::query(
            "SELECT * FROM chunks WHERE stream = ? AND timestamp_source = ?
               AND start_ms >= ? AND start_ms <= ? ORDER BY start_ms",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("list chunks"))?;
        Ok(rows.iter().map(row_to_chunk).collect())
    }

    /// Chunks whose claim is dead: owned by a process of this host that is gone, or with
    /// an expired lease. Their uploads must be aborted before they are released.
    pub async fn abandoned(&self) -> Result<Vec<Chunk>> {
        let rows = sqlx::query(
            "SELECT * FROM chunks WHERE state IN ('fetching', 'uploading') ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("find abandoned chunks"))?;
        let host = self
            .owner
            .rsplit_once(':')
            .map_or("", |(h, _)| h)
            .to_string();
        let now = now_ms();
        let mut out = Vec::new();
        for row in &rows {
            let owner: Option<String> = row.get("owner");
            let lease: Option<i64> = row.get("lease_until_ms");
            let dead = match owner.as_deref() {
                Some(o) if o == self.owner => false,
                Some(o) => owner_is_gone(o, &host) || lease.is_none_or(|l| l < now),
                None => true,
            };
            if dead {
                out.push(row_to_chunk(row));
            }
        }
        Ok(out)
    }

    /// Takes a chunk for this process: planned, retryable-failed, or abandoned. False if
    /// another process holds it or it is finished.
    pub async fn claim(&self, id: i64, take_over_from: Option<&str>) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = ?1,
                 lease_until_ms = ?2, updated_ms = ?3
             WHERE id = ?4 AND (state = 'planned' OR (state = 'failed' AND retryable = 1)
                 OR (state IN ('fetching', 'uploading') AND (owner IS ?5 OR lease_until_ms < ?3)))",
        )
        .bind(&self.owner)
        .bind(now + LEASE.as_millis() as i64)
        .bind(now)
        .bind(id)
        .bind(take_over_from)
        .execute(&self.pool)
        .await
        .map_err(Error::store("claim chunk"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that bytes go to the store now, and under which multipart upload.
    pub async fn mark_uploading(&self, id: i64, upload_id: Option<&str>) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE chunks SET state = 'uploading', upload_id = ?1, lease_until_ms = ?2,
                 updated_ms = ?3 WHERE id = ?4 AND owner = ?5",
        )
        .bind(upload_id)
        .bind(now + LEASE.as_millis() as i64)
        .bind(now)
        .bind(id)
        .bind(&self.owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store("mark uploading"))?;
        Ok(())
    }

    /// Extends this process's claim on a chunk that is still streaming.
    pub async fn renew(&self, id: i64) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE chunks SET lease_until_ms = ?1, updated_ms = ?2 WHERE id = ?3 AND owner = ?4",
        )
        .bind(now + LEASE.as_millis() as i64)
        .bind(now)
        .bind(id)
        .bind(&self.owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store("renew claim"))?;
        Ok(())
    }

    /// The object is stored: the chunk is done.
    pub async fn mark_done(&self, id: i64, archived_bytes: u64) -> Result<()> {
        sqlx::query(
            "UPDATE chunks SET state = 'done', archived_bytes = ?1, upload_id = NULL,
                 owner = NULL, lease_until_ms = NULL, last_error = NULL, error_kind = NULL,
                 updated_ms = ?2 WHERE id = ?3",
        )
        .bind(archived_bytes as i64)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(Error::store("mark done"))?;
        Ok(())
    }

    /// The attempt failed; a retryable failure may be claimed again.
    pub async fn mark_failed(&self, id: i64, error: &Error) -> Result<()> {
        let (state, retryable) = match error {
            Error::Expired { .. } => ("expired", false),
            e => ("failed", e.retryability().can_retry()),
        };
        sqlx::query(
            "UPDATE chunks SET state = ?1, retryable = ?2, last_error = ?3, error_kind = ?4,
                 upload_id = NULL, owner = NULL, lease_until_ms = NULL, updated_ms = ?5
             WHERE id = ?6",
        )
        .bind(state)
        .bind(retryable)
        .bind(error.to_string())
        .bind(error.kind())
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(Error::store("mark failed"))?;
        Ok(())
    }

    /// Gives a chunk back (shutdown, or its abandoned upload was aborted): planned again.
    pub async fn release(&self, id: i64) -> Result<()> {
        sqlx::query(
            "UPDATE chunks SET state = 'planned', upload_id = NULL, owner = NULL,
                 lease_until_ms = NULL, updated_ms = ?1
             WHERE id = ?2 AND state IN ('fetching', 'uploading')",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(Error::store("release chunk"))?;
        Ok(())
    }

    /// Replaces a truncated chunk by smaller ones covering its remaining fragments, and
    /// records those KVS already deleted (`expired`, with the reason), in one transaction.
    pub async fn split(
        &self,
        chunk: &Chunk,
        parts: &[(ChunkPlan, String)],
        expired: Option<(&ChunkPlan, &str)>,
    ) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(Error::store("split chunk"))?;
        sqlx::query("DELETE FROM chunks WHERE id = ?")
            .bind(chunk.id)
            .execute(&mut *tx)
            .await
            .map_err(Error::store("split chunk"))?;
        if let Some((plan, reason)) = expired {
            let row = NewChunk {
                stream: &chunk.stream,
                source: &chunk.timestamp_source,
                plan,
                object_key: "",
                expired: Some(reason),
            };
            insert_chunk(&mut *tx, &row)
                .await
                .map_err(Error::store("record expired fragments"))?;
        }
        for (plan, key) in parts {
            let row = NewChunk {
                stream: &chunk.stream,
                source: &chunk.timestamp_source,
                plan,
                object_key: key,
                expired: None,
            };
            insert_chunk(&mut *tx, &row)
                .await
                .map_err(Error::store("split chunk"))?;
        }
        tx.commit().await.map_err(Error::store("split chunk"))?;
        Ok(())
    }

    /// Per-stream totals.
    pub async fn status(&self) -> Result<Vec<StreamStatus>> {
        let rows = sqlx::query(
            "SELECT stream, state, COUNT(*) AS n, COALESCE(SUM(archived_bytes), 0) AS bytes,
                    COALESCE(SUM(fragment_count), 0) AS fragments, MAX(end_ms) AS through
             FROM chunks GROUP BY stream, state ORDER BY stream",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("status"))?;
        let mut out: Vec<StreamStatus> = Vec::new();
        for row in &rows {
            let stream: String = row.get("stream");
            if out.last().is_none_or(|s| s.stream != stream) {
                out.push(StreamStatus {
                    stream: stream.clone(),
                    ..StreamStatus::default()
                });
            }
            let Some(s) = out.last_mut() else { continue };
            let n = row.get::<i64, _>("n") as u64;
            match row.get::<String, _>("state").as_str() {
                "done" => {
                    s.done = n;
                    s.archived_bytes = row.get::<i64, _>("bytes") as u64;
                    s.archived_fragments = row.get::<i64, _>("fragments") as u64;
                    s.archived_through_ms = row.get("through");
                }
                "planned" => s.pending += n,
                "fetching" | "uploading" => s.in_flight += n,
                "failed" => s.failed = n,
                "expired" => s.expired = n,
                _ => {}
            }
        }
        for s in &mut out {
            s.oldest_unarchived_ms = sqlx::query_scalar(
                "SELECT MIN(start_ms) FROM chunks WHERE stream = ? AND state NOT IN ('done', 'expired')",
            )
            .bind(&s.stream)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("status"))?;
            if let Some(row) = sqlx::query(
                "SELECT retention_ms, next_run_ms, last_run_ms, last_run_error FROM stream_progress
                 WHERE stream = ? ORDER BY last_run_ms DESC LIMIT 1",
            )
            .bind(&s.stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("status"))?
            {
                s.retention_ms = row.get("retention_ms");
                s.next_run_ms = row.get("next_run_ms");
                s.last_run_ms = row.get("last_run_ms");
                s.last_run_error = row.get("last_run_error");
            }
            s.last_error = sqlx::query_scalar(
                "SELECT last_error FROM chunks WHERE stream = ? AND last_error IS NOT NULL
                 AND state IN ('failed', 'expired') ORDER BY updated_ms DESC LIMIT 1",
            )
            .bind(&s.stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("status"))?;
        }
        Ok(out)
    }

    /// The chunk as stored now.
    pub async fn chunk(&self, id: i64) -> Result<Option<Chunk>> {
        let row = sqlx::query("SELECT * FROM chunks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("read chunk"))?;
        Ok(row.as_ref().map(row_to_chunk))
    }

    /// Marks pending chunks that end before `edge` (KVS's retention edge) as expired: KVS
    /// has deleted their fragments. Returns how many fragments that was.
    pub async fn expire_before(
        &self,
        stream: &str,
        source: TimestampSource,
        edge: EpochMs,
    ) -> Result<u64> {
        let fragments: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(fragment_count), 0) FROM chunks WHERE stream = ? AND timestamp_source = ?
               AND state IN ('planned', 'failed') AND end_ms < ?",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(edge)
        .fetch_one(&self.pool)
        .await
        .map_err(Error::store("expire chunks"))?;
        sqlx::query(
            "UPDATE chunks SET state = 'expired', retryable = 0, error_kind = 'expired',
                 last_error = 'deleted by KVS retention before it was archived', updated_ms = ?
             WHERE stream = ? AND timestamp_source = ? AND state IN ('planned', 'failed') AND end_ms < ?",
        )
        .bind(now_ms())
        .bind(stream)
        .bind(source.as_str())
        .bind(edge)
        .execute(&self.pool)
        .await
        .map_err(Error::store("expire chunks"))?;
        Ok(fragments as u64)
    }

    /// Start of the oldest chunk of the stream that is not archived yet (nor expired).
    pub async fn oldest_unarchived(
        &self,
        stream: &str,
        source: TimestampSource,
    ) -> Result<Option<EpochMs>> {
        sqlx::query_scalar(
            "SELECT MIN(start_ms) FROM chunks WHERE stream = ? AND timestamp_source = ?
               AND state NOT IN ('done', 'expired')",
        )
        .bind(stream)
        .bind(source.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(Error::store("oldest unarchived"))
    }

    /// Chunk counts by state for one stream, for the metrics.
    pub async fn counts(&self, stream: &str) -> Result<Vec<(String, i64)>> {
        let rows =
            sqlx::query("SELECT state, COUNT(*) AS n FROM chunks WHERE stream = ? GROUP BY state")
                .bind(stream)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store("count chunks"))?;
        Ok(rows.iter().map(|r| (r.get("state"), r.get("n"))).collect())
    }

    pub async fn progress(&self, stream: &str, source: TimestampSource) -> Result<StreamProgress> {
        let row =
            sqlx::query("SELECT * FROM stream_progress WHERE stream = ? AND timestamp_source = ?")
                .bind(stream)
                .bind(source.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store("read progress"))?;
        Ok(
            row.map_or_else(StreamProgress::default, |r| StreamProgress {
                planned_through_ms: r.get("planned_through_ms"),
                retention_ms: r.get("retention_ms"),
                next_run_ms: r.get("next_run_ms"),
                last_run_ms: r.get("last_run_ms"),
                last_run_error: r.get("last_run_error"),
            }),
        )
    }

    /// Stores what the daemon learned in a run; `None` keeps the stored value.
    pub async fn update_progress(
        &self,
        stream: &str,
        source: TimestampSource,
        update: &StreamProgress,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO stream_progress (stream, timestamp_source, planned_through_ms,
                 retention_ms, next_run_ms, last_run_ms, last_run_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                 planned_through_ms = COALESCE(?3, planned_through_ms),
                 retention_ms = COALESCE(?4, retention_ms),
                 next_run_ms = COALESCE(?5, next_run_ms),
                 last_run_ms = COALESCE(?6, last_run_ms),
                 last_run_error = CASE WHEN ?6 IS NOT NULL THEN ?7 ELSE last_run_error END",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(update.planned_through_ms)
        .bind(update.retention_ms)
        .bind(update.next_run_ms)
        .bind(update.last_run_ms)
        .bind(&update.last_run_error)
        .execute(&self.pool)
        .await
        .map_err(Error::store("update progress"))?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

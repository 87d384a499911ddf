//! The ledger in SQLite: the embedded default. The only module with SQL for it.

use super::{
    Archived, Chunk, ChunkState, Failure, FailureView, HeldChunk, Identity, InstanceView, Lease,
    Ledger, RangeSummary, Registration, Role, StreamClaim, StreamHolder, StreamProgress,
    StreamStatus,
};
use crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use crate::plan::Holdings;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Writers wait this long for each other (daemon and backfill share one file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The columns of a chunk row, in [`row_to_chunk`]'s order.
const CHUNK_COLUMNS: &str = "id, stream, timestamp_source, start_ms, end_ms, fragment_count,
    planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key, kind, state,
    attempts, last_error, error_kind, next_attempt_ms, archived_bytes, archived_crc32c,
    upload_id, owner, generation, lease_until_ms";

pub struct SqliteLedger {
    pool: SqlitePool,
    identity: Identity,
}

super::row_decoders!(SqliteRow);

fn now_ms() -> EpochMs {
    chrono::Utc::now().timestamp_millis()
}

/// Whether `owner` is a process of this host that no longer runs. SQLite is one host's
/// database: a killed process's chunks and stream are taken over at once instead of
/// after its lease. (The PostgreSQL ledger, shared by hosts, relies on leases alone.)
fn owner_is_gone(owner: &str, this_host: &str) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (_nonce, pid, host) = (parts.next(), parts.next(), parts.next());
    let (Some(pid), Some(host)) = (pid, host) else {
        return false;
    };
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    let Ok(pid) = pid.parse::<libc::pid_t>() else {
        return false;
    };
    host == this_host && pid > 0 && !process_exists(pid)
}

/// Whether a process `pid` exists, whoever owns it: signal 0 is checked, not sent, and
/// EPERM means it lives under another user. (Not `/proc/PID`, which systemd's
/// `ProtectProc=invisible` hides for other users' processes.)
fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only reports whether pid exists.
    let answer = unsafe { libc::kill(pid, 0) };
    answer == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The active chunk ids as a JSON array, for `json_each`.
fn id_list(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_string())
}

/// Fails with [`Error::LeaseLost`] unless exactly one row changed.
fn fenced(done: sqlx::sqlite::SqliteQueryResult, lease: &Lease) -> Result<()> {
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost {
            chunk: lease.chunk,
            generation: lease.generation,
        })
    }
}

/// The condition every fenced transition carries: `?1` id, `?2` owner, `?3` generation.
const HELD: &str =
    "id = ?1 AND owner = ?2 AND generation = ?3 AND state IN ('fetching', 'uploading')";

type Update<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl SqliteLedger {
    /// The pool, for benchmarks that load rows in bulk.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens (creating if missing, owner-only) the database and applies the migrations.
    pub async fn open(database_url: &str, identity: Identity) -> Result<SqliteLedger> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(Error::store("open"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let io = |op: &'static str| {
            move |e: std::io::Error| Error::Store {
                op,
                source: sqlx::Error::Io(e),
            }
        };
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
            .map_err(Error::store("open"))?;
        let migrated = match super::migrations::sqlite().await {
            Ok(migrator) => migrator.run(&pool).await,
            Err(e) => Err(e),
        };
        drop(lock);
        migrated?;
        Ok(SqliteLedger { pool, identity })
    }

    async fn insert_fragments(
        tx: &mut sqlx::SqliteConnection,
        stream: &str,
        source: &str,
        chunk: i64,
        fragments: &[Fragment],
        or_skip: bool,
    ) -> Result<u64, sqlx::Error> {
        let sql = if or_skip {
            "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number, start_ms,
                 server_ms, duration_ms, size_bytes, chunk_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT DO NOTHING"
        } else {
            "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number, start_ms,
                 server_ms, duration_ms, size_bytes, chunk_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        };
        let mut inserted = 0;
        for f in fragments {
            inserted += sqlx::query(sql)
                .bind(stream)
                .bind(source)
                .bind(&f.number)
                .bind(f.start_ms)
                .bind(f.server_ms)
                .bind(f.duration_ms as i64)
                .bind(f.size_bytes as i64)
                .bind(chunk)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        Ok(inserted)
    }

    /// Inserts a chunk row (and its fragments) inside `tx`; `Ok(None)` if it would overlap
    /// a clip chunk or hold a fragment another chunk holds.
    async fn insert_chunk(
        tx: &mut sqlx::SqliteConnection,
        stream: &str,
        source: &str,
        plan: &ChunkPlan,
        object_key: &str,
        expired: Option<&str>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let now = now_ms();
        let (start, end) = plan.clip_range();
        // Clip chunks never overlap each other; late and Matroska chunks lie inside archived
        // ranges by design and are kept apart by their fragments.
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
                 planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key,
                 kind, state, last_error, error_kind, fragments_known, created_ms, updated_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
                 CASE WHEN ?14 IS NULL THEN 'planned' ELSE 'expired' END,
                 ?14, CASE WHEN ?14 IS NULL THEN NULL ELSE 'expired' END, ?15, ?12, ?12
             WHERE ?11 <> 'clip' OR NOT EXISTS (
                 SELECT 1 FROM chunks WHERE stream = ?1 AND timestamp_source = ?2 AND kind = 'clip'
                   AND start_ms <= ?13 AND MAX(end_ms, start_ms + 1) >= ?3)
             RETURNING id",
        )
        .bind(stream)
        .bind(source)
        .bind(start)
        .bind(plan.end_ms)
        .bind(i64::from(plan.fragment_count))
        .bind(plan.bytes as i64)
        .bind(plan.duration_ms as i64)
        .bind(&plan.first_fragment)
        .bind(&plan.last_fragment)
        .bind(object_key)
        .bind(plan.kind.as_str())
        .bind(now)
        .bind(end)
        .bind(expired)
        .bind(!plan.fragments.is_empty())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else { return Ok(None) };
        match Self::insert_fragments(tx, stream, source, id, &plan.fragments, false).await {
            Ok(_) => Ok(Some(id)),
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One fenced transition: `UPDATE chunks SET {set}, updated_ms = ?4 WHERE` the lease
    /// holds; `bind` adds the parameters from `?5` on. Exactly one row changes, or none and
    /// [`Error::LeaseLost`].
    async fn transition(
        &self,
        op: &'static str,
        set: &str,
        lease: &Lease,
        bind: impl for<'q> FnOnce(Update<'q>) -> Update<'q>,
    ) -> Result<()> {
        let sql = format!("UPDATE chunks SET {set}, updated_ms = ?4 WHERE {HELD}");
        let query = sqlx::query(&sql)
            .bind(lease.chunk)
            .bind(self.identity.owner.as_str())
            .bind(lease.generation)
            .bind(now_ms());
        let done = bind(query)
            .execute(&self.pool)
            .await
            .map_err(Error::store(op))?;
        fenced(done, lease)
    }

    /// Inside `tx`: checks the lease holds (touching the row, so the transaction owns it
    /// from here) and returns the chunk's stream and timestamp source.
    async fn hold_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        op: &'static str,
        lease: &Lease,
    ) -> Result<(String, String)> {
        let row = sqlx::query(&format!(
            "UPDATE chunks SET updated_ms = ?4 WHERE {HELD} RETURNING stream, timestamp_source"
        ))
        .bind(lease.chunk)
        .bind(&self.identity.owner)
        .bind(lease.generation)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        match row {
            Some(row) => Ok((row.get("stream"), row.get("timestamp_source"))),
            None => Err(Error::LeaseLost {
                chunk: lease.chunk,
                generation: lease.generation,
            }),
        }
    }

    /// Records this process as seen at `now` (registering it if new).
    async fn upsert_instance(&self, now: EpochMs, conn: &mut sqlx::SqliteConnection) -> Result<()> {
        let me = &self.identity;
        sqlx::query(
            "INSERT INTO instances (owner, instance, role, host, pid, started_ms, last_seen_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (owner) DO UPDATE SET last_seen_ms = ?6",
        )
        .bind(&me.owner)
        .bind(&me.instance)
        .bind(me.role.as_str())
        .bind(&me.host)
        .bind(i64::from(me.pid))
        .bind(now)
        .execute(conn)
        .await
        .map_err(Error::store("register instance"))?;
        Ok(())
    }

    async fn chunks_where(
        &self,
        op: &'static str,
        condition: &str,
        binds: ChunkQuery<'_>,
    ) -> Result<Vec<Chunk>> {
        let sql =
            format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE {condition} ORDER BY start_ms, id");
        let mut query = sqlx::query(&sql);
        for b in binds.text {
            query = query.bind(b);
        }
        for b in binds.numbers {
            query = query.bind(b);
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
        Ok(rows.iter().map(row_to_chunk).collect())
    }
}

/// Binds for [`SqliteLedger::chunks_where`]: text parameters first (`?1`, `?2`, …), then
/// numbers.
struct ChunkQuery<'a> {
    text: Vec<&'a str>,
    numbers: Vec<i64>,
}

fn owner_only() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

#[async_trait::async_trait]
impl Ledger for SqliteLedger {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    async fn register(&self, now: EpochMs, lease_ms: i64) -> Result<Registration> {
        let op = "register instance";
        let me = &self.identity;
        if me.role == Role::Daemon {
            let rows = sqlx::query(
                "SELECT * FROM instances WHERE instance = ?1 AND role = 'daemon' AND owner <> ?2
                   AND last_seen_ms >= ?3 ORDER BY last_seen_ms DESC",
            )
            .bind(&me.instance)
            .bind(&me.owner)
            .bind(now - lease_ms)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            if let Some(other) = rows
                .iter()
                .map(row_to_instance)
                .find(|other| !owner_is_gone(&other.owner, &me.host))
            {
                return Ok(Registration::InstanceInUse(other));
            }
        }
        // Processes not seen for a day are history.
        sqlx::query("DELETE FROM instances WHERE last_seen_ms < ?")
            .bind(now - 86_400_000)
            .execute(&self.pool)
            .await
            .map_err(Error::store(op))?;
        let mut conn = self.pool.acquire().await.map_err(Error::store(op))?;
        self.upsert_instance(now, &mut conn).await?;
        Ok(Registration::Registered)
    }

    async fn heartbeat(&self, now: EpochMs, lease_ms: i64, active: &[i64]) -> Result<()> {
        let op = "heartbeat";
        let me = &self.identity;
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        self.upsert_instance(now, &mut tx).await?;
        sqlx::query("UPDATE stream_leases SET lease_until_ms = ?2 WHERE owner = ?1")
            .bind(&me.owner)
            .bind(now + lease_ms)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        sqlx::query(
            "UPDATE chunks SET lease_until_ms = MAX(COALESCE(lease_until_ms, 0), ?2)
             WHERE owner = ?1 AND state IN ('fetching', 'uploading')
               AND id IN (SELECT value FROM json_each(?3))",
        )
        .bind(&me.owner)
        .bind(now + lease_ms)
        .bind(id_list(active))
        .execute(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        tx.commit().await.map_err(Error::store(op))
    }

    async fn unregister(&self) -> Result<()> {
        let op = "unregister";
        sqlx::query(
            "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                 lease_until_ms = NULL WHERE owner = ?",
        )
        .bind(&self.identity.owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store(op))?;
        sqlx::query("DELETE FROM instances WHERE owner = ?")
            .bind(&self.identity.owner)
            .execute(&self.pool)
            .await
            .map_err(Error::store(op))?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceView>> {
        let rows = sqlx::query("SELECT * FROM instances ORDER BY last_seen_ms DESC, owner")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list instances"))?;
        Ok(rows.iter().map(row_to_instance).collect())
    }

    async fn acquire_stream(
        &self,
        stream: &str,
        source: TimestampSource,
        now: EpochMs,
        lease_ms: i64,
    ) -> Result<StreamClaim> {
        let op = "acquire stream";
        let me = &self.identity;
        let current =
            sqlx::query("SELECT * FROM stream_leases WHERE stream = ? AND timestamp_source = ?")
                .bind(stream)
                .bind(source.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store(op))?
                .map(|row| row_to_holder(&row));
        // A holder of this host that no longer runs gives the stream up at once.
        let gone = current
            .as_ref()
            .filter(|h| !h.owner.is_empty() && owner_is_gone(&h.owner, &me.host))
            .map(|h| h.owner.clone());
        let acquired: Option<i64> = sqlx::query_scalar(
            "INSERT INTO stream_leases (stream, timestamp_source, owner, instance, role,
                 acquired_ms, lease_until_ms, generation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1)
             ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                 owner = excluded.owner, instance = excluded.instance, role = excluded.role,
                 acquired_ms = CASE WHEN stream_leases.owner IS excluded.owner
                     THEN stream_leases.acquired_ms ELSE excluded.acquired_ms END,
                 lease_until_ms = excluded.lease_until_ms,
                 generation = stream_leases.generation + 1
             WHERE stream_leases.owner IS NULL OR stream_leases.owner = excluded.owner
                OR stream_leases.lease_until_ms IS NULL OR stream_leases.lease_until_ms < ?6
                OR stream_leases.owner IS ?8
             RETURNING generation",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(&me.owner)
        .bind(&me.instance)
        .bind(me.role.as_str())
        .bind(now)
        .bind(now + lease_ms)
        .bind(gone)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store(op))?;
        if acquired.is_some() {
            return Ok(StreamClaim::Acquired);
        }
        let holder =
            sqlx::query("SELECT * FROM stream_leases WHERE stream = ? AND timestamp_source = ?")
                .bind(stream)
                .bind(source.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store(op))?
                .map(|row| row_to_holder(&row));
        match holder {
            Some(holder) => Ok(StreamClaim::HeldBy(holder)),
            // Released between the two statements: try again next time.
            None => Ok(StreamClaim::HeldBy(StreamHolder::released(
                stream, source, now,
            ))),
        }
    }

    async fn release_stream(&self, stream: &str, source: TimestampSource) -> Result<()> {
        sqlx::query(
            "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                 lease_until_ms = NULL
             WHERE stream = ?1 AND timestamp_source = ?2 AND owner = ?3",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(&self.identity.owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store("release stream"))?;
        Ok(())
    }

    async fn stream_holders(&self, now: EpochMs) -> Result<Vec<StreamHolder>> {
        let rows = sqlx::query(
            "SELECT * FROM stream_leases WHERE owner IS NOT NULL AND lease_until_ms >= ?
             ORDER BY stream, timestamp_source",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("list stream leases"))?;
        Ok(rows.iter().map(row_to_holder).collect())
    }

    async fn claim_next(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
        now: EpochMs,
        lease_ms: i64,
        skip: &[i64],
    ) -> Result<Option<(Chunk, Lease)>> {
        // SQLite has one writer: the UPDATE selects and claims in one step.
        let row = sqlx::query(&format!(
            "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = ?1,
                 generation = generation + 1, lease_until_ms = ?2, updated_ms = ?3
             WHERE id = (
                 SELECT id FROM chunks
                 WHERE stream = ?4 AND timestamp_source = ?5 AND end_ms >= ?6 AND start_ms <= ?7
                   -- The partial index chunks_claimable's own term, so SQLite uses it.
                   AND state IN ('planned', 'failed')
                   AND (state = 'planned' OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= ?3))
                   AND id NOT IN (SELECT value FROM json_each(?8))
                 ORDER BY start_ms, id LIMIT 1)
             RETURNING {CHUNK_COLUMNS}"
        ))
        .bind(&self.identity.owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .bind(id_list(skip))
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("claim next chunk"))?;
        Ok(row.map(|row| {
            let chunk = row_to_chunk(&row);
            let lease = Lease {
                chunk: chunk.id,
                generation: chunk.generation,
            };
            (chunk, lease)
        }))
    }

    async fn insert_planned(
        &self,
        stream: &str,
        source: TimestampSource,
        plan: &ChunkPlan,
        object_key: &str,
    ) -> Result<bool> {
        let op = "insert chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let id = Self::insert_chunk(&mut tx, stream, source.as_str(), plan, object_key, None)
            .await
            .map_err(Error::store(op))?;
        if id.is_none() {
            tx.rollback().await.map_err(Error::store(op))?;
            return Ok(false);
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(true)
    }

    async fn insert_archived(
        &self,
        stream: &str,
        source: TimestampSource,
        plan: &ChunkPlan,
        object_key: &str,
        bytes: u64,
    ) -> Result<bool> {
        let op = "insert archived chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let id = Self::insert_chunk(&mut tx, stream, source.as_str(), plan, object_key, None)
            .await
            .map_err(Error::store(op))?;
        let Some(id) = id else {
            tx.rollback().await.map_err(Error::store(op))?;
            return Ok(false);
        };
        sqlx::query("UPDATE chunks SET state = 'done', archived_bytes = ?1 WHERE id = ?2")
            .bind(bytes as i64)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        tx.commit().await.map_err(Error::store(op))?;
        Ok(true)
    }

    async fn holdings(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Holdings> {
        let op = "read holdings";
        let numbers: Vec<String> = sqlx::query_scalar(
            "SELECT fragment_number FROM chunk_fragments
             WHERE stream = ? AND timestamp_source = ? AND start_ms >= ? AND start_ms <= ?",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let rows = sqlx::query(
            "SELECT start_ms, MAX(end_ms, start_ms + 1) AS clip_end, state, fragments_known
             FROM chunks WHERE stream = ? AND timestamp_source = ? AND kind = 'clip'
               AND end_ms >= ? - 1 AND start_ms <= ? ORDER BY start_ms",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let mut holdings = Holdings {
            held: numbers.into_iter().collect(),
            ..Holdings::default()
        };
        for row in &rows {
            let range = (row.get::<i64, _>("start_ms"), row.get::<i64, _>("clip_end"));
            if row.get::<i64, _>("fragments_known") == 0 {
                holdings.legacy.push(range);
            } else {
                // An expired range is fetched no more: what is listed inside it now is late.
                let state = row.get::<String, _>("state");
                let done = state == "done" || state == "expired";
                holdings.ranges.push((range.0, range.1, done));
            }
        }
        Ok(holdings)
    }

    async fn fragments_of(&self, chunk: i64) -> Result<Vec<Fragment>> {
        let rows = sqlx::query(
            "SELECT fragment_number, start_ms, server_ms, duration_ms, size_bytes
             FROM chunk_fragments WHERE chunk_id = ?",
        )
        .bind(chunk)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("read fragments"))?;
        let mut fragments: Vec<Fragment> = rows.iter().map(row_to_fragment).collect();
        fragments.sort_by(Fragment::order);
        Ok(fragments)
    }

    async fn claimable(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
        now: EpochMs,
    ) -> Result<Vec<Chunk>> {
        self.chunks_where(
            "list claimable chunks",
            "stream = ?1 AND timestamp_source = ?2 AND end_ms >= ?3 AND start_ms <= ?4
               AND (state = 'planned' OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= ?5))",
            ChunkQuery {
                text: vec![stream, source.as_str()],
                numbers: vec![from, to, now],
            },
        )
        .await
    }

    async fn range_summary(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<RangeSummary> {
        let op = "summarize range";
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(archived_bytes), 0) AS bytes FROM chunks
             WHERE stream = ? AND timestamp_source = ? AND end_ms >= ? AND start_ms <= ?
             GROUP BY state",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let mut summary = RangeSummary::default();
        for row in &rows {
            let n = row.get::<i64, _>("n") as usize;
            summary.chunks += n;
            match ChunkState::parse(&row.get::<String, _>("state")) {
                Some(ChunkState::Done) => {
                    summary.done = n;
                    summary.archived_bytes = row.get::<i64, _>("bytes") as u64;
                }
                Some(ChunkState::Planned) => summary.pending += n,
                Some(ChunkState::Fetching | ChunkState::Uploading) => summary.in_flight += n,
                _ => {}
            }
        }
        let unfinished = self
            .chunks_where(
                op,
                "stream = ?1 AND timestamp_source = ?2 AND end_ms >= ?3 AND start_ms <= ?4
                   AND state IN ('failed', 'expired')",
                ChunkQuery {
                    text: vec![stream, source.as_str()],
                    numbers: vec![from, to],
                },
            )
            .await?;
        for chunk in unfinished {
            match chunk.state {
                ChunkState::Failed => summary.failed.push(chunk),
                _ => summary.expired.push(chunk),
            }
        }
        Ok(summary)
    }

    async fn claim(&self, id: i64, now: EpochMs, lease_ms: i64) -> Result<Option<Lease>> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = ?1,
                 generation = generation + 1, lease_until_ms = ?2, updated_ms = ?3
             WHERE id = ?4 AND (state = 'planned'
                 OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= ?3))
             RETURNING generation",
        )
        .bind(&self.identity.owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("claim chunk"))?;
        Ok(generation.map(|generation| Lease {
            chunk: id,
            generation,
        }))
    }

    async fn abandoned(&self, now: EpochMs, active: &[i64]) -> Result<Vec<Chunk>> {
        let in_flight = self
            .chunks_where(
                "find abandoned chunks",
                "state IN ('fetching', 'uploading')",
                ChunkQuery {
                    text: Vec::new(),
                    numbers: Vec::new(),
                },
            )
            .await?;
        let me = &self.identity;
        Ok(in_flight
            .into_iter()
            .filter(|c| {
                let expired = c.lease_until_ms.is_none_or(|l| l < now);
                match c.owner.as_deref() {
                    Some(o) if o == me.owner => expired || !active.contains(&c.id),
                    Some(o) => expired || owner_is_gone(o, &me.host),
                    None => true,
                }
            })
            .collect())
    }

    async fn take_over(&self, chunk: &Chunk, now: EpochMs, lease_ms: i64) -> Result<Option<Lease>> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE chunks SET owner = ?1, generation = generation + 1, lease_until_ms = ?2,
                 updated_ms = ?3
             WHERE id = ?4 AND generation = ?5 AND lease_until_ms IS ?6
               AND state IN ('fetching', 'uploading')
             RETURNING generation",
        )
        .bind(&self.identity.owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(chunk.id)
        .bind(chunk.generation)
        // A holder that renewed since it was seen as dead keeps its chunk.
        .bind(chunk.lease_until_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("take over chunk"))?;
        Ok(generation.map(|generation| Lease {
            chunk: chunk.id,
            generation,
        }))
    }

    async fn mark_uploading(&self, lease: &Lease, upload_id: Option<&str>) -> Result<()> {
        let upload_id = upload_id.map(str::to_string);
        self.transition(
            "mark uploading",
            "state = 'uploading', upload_id = COALESCE(?5, upload_id)",
            lease,
            |q| q.bind(upload_id),
        )
        .await
    }

    async fn renew(&self, lease: &Lease, until: EpochMs) -> Result<()> {
        self.transition("renew claim", "lease_until_ms = ?5", lease, |q| {
            q.bind(until)
        })
        .await
    }

    async fn attach_fragments(
        &self,
        lease: &Lease,
        fragments: &[Fragment],
    ) -> Result<Vec<Fragment>> {
        let op = "attach fragments";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
        let added = Self::insert_fragments(&mut tx, &stream, &source, lease.chunk, fragments, true)
            .await
            .map_err(Error::store(op))?;
        let rows = sqlx::query(
            "SELECT fragment_number, start_ms, server_ms, duration_ms, size_bytes
             FROM chunk_fragments WHERE chunk_id = ?",
        )
        .bind(lease.chunk)
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        let mut held: Vec<Fragment> = rows.iter().map(row_to_fragment).collect();
        held.sort_by(Fragment::order);
        if added > 0 {
            let plan = ChunkPlan::of(ChunkKind::Clip, held.clone());
            sqlx::query(
                "UPDATE chunks SET fragment_count = ?1, planned_bytes = ?2, planned_duration_ms = ?3,
                     first_fragment = ?4, last_fragment = ?5, fragments_known = 1 WHERE id = ?6",
            )
            .bind(i64::from(plan.fragment_count))
            .bind(plan.bytes as i64)
            .bind(plan.duration_ms as i64)
            .bind(&plan.first_fragment)
            .bind(&plan.last_fragment)
            .bind(lease.chunk)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(held)
    }

    async fn mark_done(&self, lease: &Lease, archived: &Archived) -> Result<()> {
        let (bytes, crc) = (archived.bytes as i64, archived.crc32c.clone());
        self.transition(
            "mark done",
            "state = 'done', archived_bytes = ?5, archived_crc32c = ?6, upload_id = NULL,
             archived_by = owner, owner = NULL, lease_until_ms = NULL, last_error = NULL, error_kind = NULL,
             next_attempt_ms = NULL",
            lease,
            |q| q.bind(bytes).bind(crc),
        )
        .await
    }

    async fn mark_failed(&self, lease: &Lease, failure: &Failure) -> Result<()> {
        let f = failure.clone();
        self.transition(
            "mark failed",
            "state = 'failed', last_error = ?5, error_kind = ?6, next_attempt_ms = ?7,
             owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q.bind(f.message).bind(f.kind).bind(f.next_attempt_ms),
        )
        .await
    }

    async fn mark_expired(&self, lease: &Lease, reason: &str) -> Result<()> {
        let reason = reason.to_string();
        self.transition(
            "mark expired",
            "state = 'expired', last_error = ?5, error_kind = 'expired', next_attempt_ms = NULL,
             upload_id = NULL, owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q.bind(reason),
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.transition(
            "release chunk",
            "state = 'planned', owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q,
        )
        .await
    }

    async fn split(
        &self,
        lease: &Lease,
        parts: &[(ChunkPlan, String)],
        expired: Option<(&ChunkPlan, &str)>,
    ) -> Result<()> {
        let op = "split chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
        sqlx::query("DELETE FROM chunks WHERE id = ?")
            .bind(lease.chunk)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        if let Some((plan, reason)) = expired {
            Self::insert_chunk(&mut tx, &stream, &source, plan, "", Some(reason))
                .await
                .map_err(Error::store(op))?;
        }
        for (plan, key) in parts {
            let inserted = Self::insert_chunk(&mut tx, &stream, &source, plan, key, None)
                .await
                .map_err(Error::store(op))?;
            if inserted.is_none() {
                // A part overlapping something else would lose or double media: keep the
                // chunk as it was.
                tx.rollback().await.map_err(Error::store(op))?;
                return Err(Error::Usage(format!(
                    "ledger split chunk {}: a part overlaps another chunk; left as it was",
                    lease.chunk
                )));
            }
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(())
    }

    async fn convert(&self, lease: &Lease, kind: ChunkKind, object_key: &str) -> Result<()> {
        let key = object_key.to_string();
        self.transition(
            "convert chunk",
            "kind = ?5, object_key = ?6, state = 'planned', upload_id = NULL, owner = NULL,
             lease_until_ms = NULL",
            lease,
            |q| q.bind(kind.as_str()).bind(key),
        )
        .await
    }

    async fn requeue_failed(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE chunks SET next_attempt_ms = NULL, updated_ms = ?5
             WHERE stream = ?1 AND timestamp_source = ?2 AND end_ms >= ?3 AND start_ms <= ?4
               AND state = 'failed'",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(Error::store("requeue failed chunks"))?;
        Ok(done.rows_affected())
    }

    async fn requeue_chunk(&self, id: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'planned', next_attempt_ms = NULL, archived_bytes = NULL,
                 archived_crc32c = NULL, updated_ms = ?2
             WHERE id = ?1 AND state IN ('done', 'failed')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(Error::store("requeue chunk"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn live_upload_ids(&self) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT upload_id FROM chunks WHERE state IN ('fetching', 'uploading')
               AND upload_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("list live uploads"))
    }

    async fn done_in(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<Chunk>> {
        self.chunks_where(
            "list done chunks",
            "stream = ?1 AND timestamp_source = ?2 AND end_ms >= ?3 AND start_ms <= ?4
               AND state = 'done'",
            ChunkQuery {
                text: vec![stream, source.as_str()],
                numbers: vec![from, to],
            },
        )
        .await
    }

    async fn object_keys(&self, stream: &str) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT object_key FROM chunks WHERE stream = ? AND object_key <> ''")
            .bind(stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list object keys"))
    }

    async fn chunk(&self, id: i64) -> Result<Option<Chunk>> {
        let row = sqlx::query(&format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("read chunk"))?;
        Ok(row.as_ref().map(row_to_chunk))
    }

    async fn status(&self) -> Result<Vec<StreamStatus>> {
        let op = "status";
        let rows = sqlx::query(
            "SELECT stream, state, COUNT(*) AS n, COALESCE(SUM(archived_bytes), 0) AS bytes,
                    COALESCE(SUM(fragment_count), 0) AS fragments, MAX(end_ms) AS through,
                    COALESCE(SUM(CASE WHEN kind = 'late' THEN fragment_count END), 0) AS late,
                    COALESCE(SUM(CASE WHEN kind = 'mkv' THEN fragment_count END), 0) AS mkv
             FROM chunks GROUP BY stream, state ORDER BY stream",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let holders = self.stream_holders(now_ms()).await?;
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
            match ChunkState::parse(&row.get::<String, _>("state")) {
                Some(ChunkState::Done) => {
                    s.done = n;
                    s.archived_bytes = row.get::<i64, _>("bytes") as u64;
                    s.archived_fragments = row.get::<i64, _>("fragments") as u64;
                    s.archived_through_ms = row.get("through");
                    s.late_fragments = row.get::<i64, _>("late") as u64;
                    s.mkv_fragments = row.get::<i64, _>("mkv") as u64;
                }
                Some(ChunkState::Planned) => s.pending += n,
                Some(ChunkState::Fetching | ChunkState::Uploading) => s.in_flight += n,
                Some(ChunkState::Failed) => s.failed = n,
                Some(ChunkState::Expired) => s.expired = n,
                None => {}
            }
        }
        for s in &mut out {
            s.oldest_unarchived_ms = sqlx::query_scalar(
                "SELECT MIN(start_ms) FROM chunks WHERE stream = ? AND state NOT IN ('done', 'expired')",
            )
            .bind(&s.stream)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store(op))?;
            if let Some(row) = sqlx::query(
                "SELECT retention_ms, next_run_ms, last_run_ms, last_run_error FROM stream_progress
                 WHERE stream = ? ORDER BY last_run_ms DESC LIMIT 1",
            )
            .bind(&s.stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store(op))?
            {
                s.retention_ms = row.get("retention_ms");
                s.next_run_ms = row.get("next_run_ms");
                s.last_run_ms = row.get("last_run_ms");
                s.last_run_error = row.get("last_run_error");
            }
            let failed = sqlx::query(
                "SELECT object_key, start_ms, error_kind, last_error, attempts, next_attempt_ms
                 FROM chunks WHERE stream = ? AND state IN ('failed', 'expired')
                 ORDER BY updated_ms DESC LIMIT 20",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            s.failures = failed.iter().map(row_to_failure).collect();
            s.last_error = s.failures.first().map(|f| f.reason.clone());
            s.held_by = holders.iter().find(|h| h.stream == s.stream).cloned();
            let by = sqlx::query(
                "SELECT archived_by, COUNT(*) AS n FROM chunks
                 WHERE stream = ? AND state = 'done' AND archived_by IS NOT NULL
                 GROUP BY archived_by",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            for row in &by {
                let owner: String = row.get("archived_by");
                *s.archived_by_instance
                    .entry(Identity::instance_of(&owner).to_string())
                    .or_default() += row.get::<i64, _>("n") as u64;
            }
            let held = sqlx::query(
                "SELECT object_key, state, owner, lease_until_ms FROM chunks
                 WHERE stream = ? AND state IN ('fetching', 'uploading') AND owner IS NOT NULL
                 ORDER BY start_ms LIMIT 50",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            s.in_flight_chunks = held.iter().map(row_to_held_chunk).collect();
        }
        Ok(out)
    }

    async fn oldest_unarchived(
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

    async fn archived_through(&self, stream: &str) -> Result<Option<EpochMs>> {
        sqlx::query_scalar("SELECT MAX(end_ms) FROM chunks WHERE stream = ? AND state = 'done'")
            .bind(stream)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("archived through"))
    }

    async fn counts(&self, stream: &str) -> Result<Vec<(String, i64)>> {
        let rows =
            sqlx::query("SELECT state, COUNT(*) AS n FROM chunks WHERE stream = ? GROUP BY state")
                .bind(stream)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store("count chunks"))?;
        Ok(rows.iter().map(|r| (r.get("state"), r.get("n"))).collect())
    }

    async fn progress(&self, stream: &str, source: TimestampSource) -> Result<StreamProgress> {
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

    async fn update_progress(
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
                 planned_through_ms = MAX(COALESCE(?3, planned_through_ms),
                                          COALESCE(planned_through_ms, ?3)),
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

    async fn close(&self) {
        self.pool.close().await;
    }
}

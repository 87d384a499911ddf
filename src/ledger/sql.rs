//! The SQL both ledgers run: every query, every rule and every row decoder written once.
//! [`sql_ledger!`] stamps the [`Ledger`](super::Ledger) implementation for a backend's
//! struct and sqlx driver; the backend itself only opens its database and answers
//! [`Dialect`], the few points where SQLite and PostgreSQL truly differ. sqlx's SQLite
//! driver reads `$N` placeholders as PostgreSQL does, so one query text serves both.
//!
//! Why a macro, not code generic over `sqlx::Database`: every method would carry
//! `for<'c> &'c mut DB::Connection: Executor<'c>` and a bound per column type, and `Send`
//! futures over such bounds meet rustc's "higher-ranked lifetime error" (rust#64552); the
//! macro's body is ordinary code over one concrete driver. Not `sqlx::Any` either: it
//! loses connect options, typed database errors and array binds.

use super::{
    Chunk, ChunkState, FailureView, HeldChunk, Identity, InstanceView, Lease, StreamHolder,
    StreamProgress, UndecodableRow,
};
use crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use std::fmt::Display;

/// How SQLite and PostgreSQL differ, and nothing else.
pub(super) trait Dialect {
    /// The larger of two values: SQLite's two-argument `MAX`, PostgreSQL's `GREATEST`.
    const GREATEST: &'static str;
    /// How the claim of the next chunk locks the row it picks. SQLite: nothing, its one
    /// writer at a time already serializes claims. PostgreSQL: `FOR UPDATE SKIP LOCKED`,
    /// so concurrent claimers pass over a row another is taking instead of waiting for it,
    /// and the lock re-checks the condition on the row it takes.
    const CLAIM_LOCK: &'static str;
    /// A list of chunk ids as one bound parameter (a JSON array, a `BIGINT[]`).
    type Ids;
    /// `ids` as [`Dialect::Ids`].
    fn ids(ids: &[i64]) -> Self::Ids;
    /// SQL that is true when `id` is in the list bound at `param`.
    fn id_in(param: &str) -> String;
    /// Whether `owner` is a process known to be gone, so its leases end before they run
    /// out. SQLite: a process of this host that no longer runs. PostgreSQL: never, a
    /// holder on another host can only be outlived.
    fn owner_is_gone(owner: &str, this_host: &str) -> bool;
    /// Takes, inside a transaction and until it ends, the lock that queues the
    /// transactions adding chunks or fragments to one stream (`$1` stream, `$2` timestamp
    /// source); `None` where one writer at a time already queues them all (SQLite).
    const STREAM_LOCK: Option<&'static str>;
}

/// The columns of a chunk row, as [`chunk_from`] reads them.
pub(super) const CHUNK_COLUMNS: &str = "id, stream, timestamp_source, start_ms, end_ms,
    fragment_count, planned_bytes, planned_duration_ms, first_fragment, last_fragment,
    object_key, kind, state, attempts, last_error, error_kind, next_attempt_ms,
    archived_bytes, archived_crc32c, upload_id, owner, generation, lease_until_ms";

/// The condition every fenced transition carries: `$1` id, `$2` owner, `$3` generation.
pub(super) const HELD: &str =
    "id = $1 AND owner = $2 AND generation = $3 AND state IN ('fetching', 'uploading')";

/// Chunks of stream `$1` and timestamp source `$2` reaching into `[$3, $4]`.
pub(super) const IN_RANGE: &str =
    "stream = $1 AND timestamp_source = $2 AND end_ms >= $3 AND start_ms <= $4";

/// Registrations not seen for a day are history: `register` deletes them.
pub(super) const INSTANCE_HISTORY_MS: i64 = 86_400_000;

/// Fragments inserted per statement: 8 parameters each stays far below SQLite's limit of
/// 32,766 parameters a statement (PostgreSQL's is 65,535).
pub(super) const FRAGMENT_BATCH: usize = 1_000;

/// The planner's first read: fragments held in `[$3, $4]` of `$1`/`$2`.
pub const HELD_FRAGMENTS_SQL: &str = "SELECT fragment_number FROM chunk_fragments
     WHERE stream = $1 AND timestamp_source = $2 AND start_ms >= $3 AND start_ms <= $4";

/// The planner's second read: clip ranges reaching into `[$3, $4]` of `$1`/`$2`.
pub(super) fn clip_ranges_sql<D: Dialect>() -> String {
    format!(
        "SELECT start_ms, {greatest}(end_ms, start_ms + 1) AS clip_end, state, fragments_known
         FROM chunks WHERE stream = $1 AND timestamp_source = $2 AND kind = 'clip'
           AND end_ms >= $3 - 1 AND start_ms <= $4 ORDER BY start_ms",
        greatest = D::GREATEST
    )
}

/// The claim of the next chunk: `$1` owner, `$2` lease end, `$3` now, `$4` stream, `$5`
/// timestamp source, `$6`..`$7` range, `$8` ids to skip.
pub(super) fn claim_next_sql<D: Dialect>() -> String {
    format!(
        "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = $1,
             generation = generation + 1, lease_until_ms = $2, updated_ms = $3
         WHERE id = (
             SELECT id FROM chunks
             WHERE stream = $4 AND timestamp_source = $5 AND end_ms >= $6 AND start_ms <= $7
               -- The partial index chunks_claimable's own term, so the planner uses it.
               AND state IN ('planned', 'failed')
               AND (state = 'planned' OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $3))
               AND NOT ({skip})
             ORDER BY start_ms, id LIMIT 1
             {lock})
         RETURNING {CHUNK_COLUMNS}",
        skip = D::id_in("$8"),
        lock = D::CLAIM_LOCK,
    )
}

pub(super) fn now_ms() -> EpochMs {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn lease_lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        chunk: lease.chunk,
        generation: lease.generation,
    }
}

/// Fails with [`Error::LeaseLost`] unless exactly one row changed.
pub(super) fn fenced(rows_affected: u64, lease: &Lease) -> Result<()> {
    (rows_affected == 1)
        .then_some(())
        .ok_or_else(|| lease_lost(lease))
}

/// The database refused a row as overlapping: a fragment another chunk holds (a primary
/// key) or, on PostgreSQL, a second clip chunk over the same instants (the exclusion
/// constraint, SQLSTATE 23P01).
pub(super) fn is_overlap(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.is_unique_violation() || db.code().as_deref() == Some("23P01"))
}

/// One row's columns, whichever the database; every read can fail and none panics.
pub(super) trait Columns {
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;

    /// A count or a size: never negative.
    fn unsigned(&self, column: &str) -> Result<u64, sqlx::Error> {
        let value = self.int(column)?;
        u64::try_from(value).map_err(|_| bad_value(column, value))
    }

    /// A value one of our enums names (`parse` is its parser).
    fn named<T>(&self, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, sqlx::Error> {
        let text = self.text(column)?;
        parse(&text).ok_or_else(|| bad_value(column, format!("{text:?}")))
    }
}

impl<R> Columns for R
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
    fn maybe_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(column)
    }
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }
    fn maybe_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }
}

fn bad_value(column: &str, value: impl Display) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: format!("{column:?}"),
        source: format!("{value} is not a value the ledger knows").into(),
    }
}

/// Names the row in a decoding error.
pub(super) fn undecodable(
    table: &'static str,
    key: impl Display,
) -> impl FnOnce(sqlx::Error) -> sqlx::Error {
    move |problem| {
        sqlx::Error::Decode(Box::new(UndecodableRow {
            table,
            key: key.to_string(),
            problem,
        }))
    }
}

pub(super) fn chunk_from(row: &impl Columns) -> Result<Chunk, sqlx::Error> {
    let id = row.int("id")?;
    let read = || -> Result<Chunk, sqlx::Error> {
        Ok(Chunk {
            id,
            stream: row.text("stream")?,
            timestamp_source: row.named("timestamp_source", TimestampSource::parse)?,
            plan: ChunkPlan {
                kind: row.named("kind", ChunkKind::parse)?,
                start_ms: row.int("start_ms")?,
                end_ms: row.int("end_ms")?,
                fragment_count: u32::try_from(row.unsigned("fragment_count")?)
                    .map_err(|e| bad_value("fragment_count", e))?,
                bytes: row.unsigned("planned_bytes")?,
                duration_ms: row.unsigned("planned_duration_ms")?,
                first_fragment: row.text("first_fragment")?,
                last_fragment: row.text("last_fragment")?,
                fragments: Vec::new(),
            },
            object_key: row.text("object_key")?,
            state: row.named("state", ChunkState::parse)?,
            attempts: attempts(row)?,
            last_error: row.maybe_text("last_error")?,
            error_kind: row.maybe_text("error_kind")?,
            next_attempt_ms: row.maybe_int("next_attempt_ms")?,
            archived_bytes: (row.maybe_int("archived_bytes")?.is_some())
                .then(|| row.unsigned("archived_bytes"))
                .transpose()?,
            archived_crc32c: row.maybe_text("archived_crc32c")?,
            upload_id: row.maybe_text("upload_id")?,
            owner: row.maybe_text("owner")?,
            generation: row.int("generation")?,
            lease_until_ms: row.maybe_int("lease_until_ms")?,
        })
    };
    read().map_err(undecodable("chunks", id))
}

fn attempts(row: &impl Columns) -> Result<u32, sqlx::Error> {
    u32::try_from(row.unsigned("attempts")?).map_err(|e| bad_value("attempts", e))
}

pub(super) fn fragment_from(row: &impl Columns) -> Result<Fragment, sqlx::Error> {
    let number = row.text("fragment_number")?;
    let read = || -> Result<Fragment, sqlx::Error> {
        Ok(Fragment {
            number: number.clone(),
            start_ms: row.int("start_ms")?,
            server_ms: row.int("server_ms")?,
            duration_ms: row.unsigned("duration_ms")?,
            size_bytes: row.unsigned("size_bytes")?,
        })
    };
    read().map_err(undecodable("chunk_fragments", &number))
}

pub(super) fn instance_from(row: &impl Columns) -> Result<InstanceView, sqlx::Error> {
    let owner = row.text("owner")?;
    let read = || -> Result<InstanceView, sqlx::Error> {
        Ok(InstanceView {
            owner: owner.clone(),
            instance: row.text("instance")?,
            role: row.text("role")?,
            host: row.text("host")?,
            pid: row.int("pid")?,
            started_ms: row.int("started_ms")?,
            last_seen_ms: row.int("last_seen_ms")?,
        })
    };
    read().map_err(undecodable("instances", &owner))
}

/// A stream lease; a released one has no owner, and reads as empty names.
pub(super) fn holder_from(row: &impl Columns) -> Result<StreamHolder, sqlx::Error> {
    let stream = row.text("stream")?;
    let read = || -> Result<StreamHolder, sqlx::Error> {
        Ok(StreamHolder {
            stream: stream.clone(),
            timestamp_source: row.named("timestamp_source", TimestampSource::parse)?,
            owner: row.maybe_text("owner")?.unwrap_or_default(),
            instance: row.maybe_text("instance")?.unwrap_or_default(),
            role: row.maybe_text("role")?.unwrap_or_default(),
            acquired_ms: row.maybe_int("acquired_ms")?.unwrap_or_default(),
            lease_until_ms: row.maybe_int("lease_until_ms")?.unwrap_or_default(),
        })
    };
    read().map_err(undecodable("stream_leases", &stream))
}

pub(super) fn held_chunk_from(row: &impl Columns) -> Result<HeldChunk, sqlx::Error> {
    let key = row.text("object_key")?;
    let read = || -> Result<HeldChunk, sqlx::Error> {
        let owner = row.text("owner")?;
        Ok(HeldChunk {
            object_key: key.clone(),
            state: row.named("state", ChunkState::parse)?,
            instance: Identity::instance_of(&owner).to_string(),
            owner,
            lease_until_ms: row.maybe_int("lease_until_ms")?,
        })
    };
    read().map_err(undecodable("chunks", &key))
}

pub(super) fn failure_from(row: &impl Columns) -> Result<FailureView, sqlx::Error> {
    let key = row.text("object_key")?;
    let read = || -> Result<FailureView, sqlx::Error> {
        Ok(FailureView {
            object_key: key.clone(),
            start_ms: row.int("start_ms")?,
            // A failure recorded before kinds were: its kind is not known.
            kind: row
                .maybe_text("error_kind")?
                .unwrap_or_else(|| "unknown".into()),
            reason: row.maybe_text("last_error")?.unwrap_or_default(),
            attempts: attempts(row)?,
            next_attempt_ms: row.maybe_int("next_attempt_ms")?,
        })
    };
    read().map_err(undecodable("chunks", &key))
}

/// A stream's row of `stream_progress`.
pub(super) fn progress_from(
    row: &impl Columns,
    stream: &str,
) -> Result<StreamProgress, sqlx::Error> {
    let read = || -> Result<StreamProgress, sqlx::Error> {
        Ok(StreamProgress {
            planned_through_ms: row.maybe_int("planned_through_ms")?,
            retention_ms: row.maybe_int("retention_ms")?,
            next_run_ms: row.maybe_int("next_run_ms")?,
            last_run_ms: row.maybe_int("last_run_ms")?,
            last_run_error: row.maybe_text("last_run_error")?,
        })
    };
    read().map_err(undecodable("stream_progress", stream))
}

/// Stamps the [`Ledger`](super::Ledger) implementation for `$ledger`, a struct with
/// `pool: sqlx::Pool<$db>` and `identity: Identity` that implements [`Dialect`]: every
/// query and rule of [`sql_ledger_helpers!`] and [`sql_ledger_methods!`] is the one both
/// databases run.
macro_rules! sql_ledger {
    ($ledger:ident, $db:ty) => {
        mod queries {
            use super::$ledger as This;
            use sqlx::Row as _;
            use $crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment, TimestampSource};
            use $crate::error::{Error, Result};
            use $crate::ledger::sql::{self, Columns as _, Dialect, CHUNK_COLUMNS, HELD, IN_RANGE};
            use $crate::ledger::{
                Archived, Chunk, ChunkState, Failure, Identity, InstanceView, Lease, Ledger,
                Pending, RangeSummary, Registration, Role, StreamClaim, StreamHolder,
                StreamProgress, StreamStatus,
            };
            use $crate::plan::Holdings;

            type Db = $db;
            type Connection = <Db as sqlx::Database>::Connection;
            type Statement<'q> = sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>;

            $crate::ledger::sql::sql_ledger_helpers!();
            $crate::ledger::sql::sql_ledger_methods!();
        }
    };
}
pub(super) use sql_ledger;

/// [`sql_ledger!`]'s helpers: inserts, fenced transitions and reads several methods share.
macro_rules! sql_ledger_helpers {
    () => {
        impl This {
            /// Inserts fragments of a chunk inside `tx`, [`sql::FRAGMENT_BATCH`] a statement;
            /// `or_skip` passes over fragments another chunk holds.
            async fn insert_fragments(
                tx: &mut Connection, (stream, source): (&str, &str), chunk: i64,
                fragments: &[Fragment], or_skip: bool,
            ) -> Result<u64, sqlx::Error> {
                let mut inserted = 0;
                for batch in fragments.chunks(sql::FRAGMENT_BATCH) {
                    let mut insert = sqlx::QueryBuilder::<Db>::new(
                        "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number,
                             start_ms, server_ms, duration_ms, size_bytes, chunk_id) ",
                    );
                    insert.push_values(batch, |mut row, f| {
                        row.push_bind(stream).push_bind(source).push_bind(f.number.as_str());
                        row.push_bind(f.start_ms).push_bind(f.server_ms);
                        row.push_bind(f.duration_ms as i64).push_bind(f.size_bytes as i64);
                        row.push_bind(chunk);
                    });
                    if or_skip {
                        insert.push(" ON CONFLICT DO NOTHING");
                    }
                    inserted += insert.build().execute(&mut *tx).await?.rows_affected();
                }
                Ok(inserted)
            }

            /// Inserts a chunk row (and its fragments) inside `tx`: planned, or expired for
            /// `expired`'s reason. `Ok(None)` if it would overlap a clip chunk or hold a
            /// fragment another chunk holds; the caller then rolls `tx` back (on PostgreSQL
            /// the refused statement has spoiled it).
            async fn insert_chunk(
                tx: &mut Connection, (stream, source): (&str, &str), plan: &ChunkPlan,
                object_key: &str, expired: Option<&str>,
            ) -> Result<Option<i64>, sqlx::Error> {
                // Clip chunks never overlap each other; late and Matroska chunks lie inside
                // archived ranges by design and are kept apart by their fragments. The
                // check is the guard under the stream's queue (SQLite's one writer at a
                // time, PostgreSQL's stream lock); PostgreSQL's exclusion constraint
                // refuses an overlap whoever writes it.
                let inserted = sqlx::query_scalar(&format!(
                    "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
                         planned_bytes, planned_duration_ms, first_fragment, last_fragment,
                         object_key, kind, state, last_error, error_kind, fragments_known,
                         created_ms, updated_ms)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                         CASE WHEN CAST($14 AS TEXT) IS NULL THEN 'planned' ELSE 'expired' END,
                         $14, CASE WHEN CAST($14 AS TEXT) IS NULL THEN NULL ELSE 'expired' END,
                         $15, $12, $12
                     WHERE $11 <> 'clip' OR NOT EXISTS (
                         SELECT 1 FROM chunks WHERE stream = $1 AND timestamp_source = $2
                           AND kind = 'clip' AND start_ms <= $13
                           AND {greatest}(end_ms, start_ms + 1) >= $3)
                     RETURNING id",
                    greatest = This::GREATEST
                ))
                .bind(stream).bind(source).bind(plan.start_ms).bind(plan.end_ms)
                .bind(i64::from(plan.fragment_count)).bind(plan.bytes as i64)
                .bind(plan.duration_ms as i64).bind(&plan.first_fragment).bind(&plan.last_fragment)
                .bind(object_key).bind(plan.kind.as_str()).bind(sql::now_ms())
                .bind(plan.clip_range().1).bind(expired).bind(i64::from(!plan.fragments.is_empty()))
                .fetch_optional(&mut *tx)
                .await;
                let id: i64 = match inserted {
                    Ok(Some(id)) => id,
                    Ok(None) => return Ok(None),
                    Err(e) if sql::is_overlap(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let fragments = &plan.fragments;
                match This::insert_fragments(tx, (stream, source), id, fragments, false).await {
                    Ok(_) => Ok(Some(id)),
                    Err(e) if sql::is_overlap(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            }

            /// One chunk in a transaction of its own: planned, or done with `archived` bytes.
            /// `false`, recording nothing, if it would overlap what the ledger holds.
            async fn insert_one(
                &self, op: &'static str, at: (&str, &str), plan: &ChunkPlan, key: &str,
                archived: Option<u64>,
            ) -> Result<bool> {
                let mut tx = self.pool.begin().await.map_err(Error::ledger(op))?;
                This::lock_stream(&mut tx, op, at).await?;
                let id = This::insert_chunk(&mut tx, at, plan, key, None).await;
                let Some(id) = id.map_err(Error::ledger(op))? else {
                    tx.rollback().await.map_err(Error::ledger(op))?;
                    return Ok(false);
                };
                if let Some(bytes) = archived {
                    let sql = "UPDATE chunks SET state = 'done', archived_bytes = $1 WHERE id = $2";
                    sqlx::query(sql).bind(bytes as i64).bind(id)
                        .execute(&mut *tx).await.map_err(Error::ledger(op))?;
                }
                tx.commit().await.map_err(Error::ledger(op))?;
                Ok(true)
            }

            /// One fenced transition: `UPDATE chunks SET {set}, updated_ms = $4 WHERE` the
            /// lease holds; `bind` adds the parameters from `$5` on. Exactly one row
            /// changes, or none and [`Error::LeaseLost`].
            async fn transition(
                &self, op: &'static str, set: &str, lease: &Lease,
                bind: impl for<'q> FnOnce(Statement<'q>) -> Statement<'q>,
            ) -> Result<()> {
                let sql = format!("UPDATE chunks SET {set}, updated_ms = $4 WHERE {HELD}");
                let query = sqlx::query(&sql).bind(lease.chunk).bind(self.identity.owner.as_str());
                let query = query.bind(lease.generation).bind(sql::now_ms());
                let done = bind(query).execute(&self.pool).await.map_err(Error::ledger(op))?;
                sql::fenced(done.rows_affected(), lease)
            }

            /// Inside `tx`, before any write or row lock: takes [`Dialect::STREAM_LOCK`] for
            /// the stream `at`. Every transaction that adds chunks or fragments takes it, so
            /// the planners of a stream queue for it. Without it, PostgreSQL checks
            /// concurrent inserts against the exclusion constraint by waiting for each
            /// other's transactions, and overlapping inserts wait in a cycle: a deadlock.
            /// With it, each insert's `NOT EXISTS` reads (READ COMMITTED) every clip chunk
            /// committed before it, so none is refused by the constraint after waiting, and
            /// the unlocked transitions never meet an uncommitted overlapping row either.
            async fn lock_stream(
                tx: &mut Connection, op: &'static str, (stream, source): (&str, &str),
            ) -> Result<()> {
                if let Some(lock) = This::STREAM_LOCK {
                    sqlx::query(lock).bind(stream).bind(source)
                        .execute(&mut *tx).await.map_err(Error::ledger(op))?;
                }
                Ok(())
            }

            /// Inside `tx`, first: checks the lease holds, touching the row so that the
            /// transaction owns it from here (SQLite takes its write lock; PostgreSQL locks
            /// the row, after the stream's lock), and returns the chunk's stream and
            /// timestamp source.
            async fn hold_in(
                &self, tx: &mut Connection, op: &'static str, lease: &Lease,
            ) -> Result<(String, String)> {
                if This::STREAM_LOCK.is_some() {
                    let sql = "SELECT stream, timestamp_source FROM chunks WHERE id = $1";
                    let at: Option<(String, String)> = sqlx::query_as(sql).bind(lease.chunk)
                        .fetch_optional(&mut *tx).await.map_err(Error::ledger(op))?;
                    let Some((stream, source)) = at else { return Err(sql::lease_lost(lease)) };
                    This::lock_stream(tx, op, (&stream, &source)).await?;
                }
                let sql = format!(
                    "UPDATE chunks SET updated_ms = $4 WHERE {HELD}
                     RETURNING stream, timestamp_source"
                );
                let row = sqlx::query(&sql)
                    .bind(lease.chunk).bind(&self.identity.owner).bind(lease.generation)
                    .bind(sql::now_ms()).fetch_optional(&mut *tx).await.map_err(Error::ledger(op))?;
                let Some(row) = row else { return Err(sql::lease_lost(lease)) };
                let read = || -> Result<(String, String), sqlx::Error> {
                    Ok((row.try_get("stream")?, row.try_get("timestamp_source")?))
                };
                read().map_err(sql::undecodable("chunks", lease.chunk)).map_err(Error::ledger(op))
            }

            /// Records this process as seen at `now` (registering it if new).
            async fn upsert_instance(&self, now: EpochMs, conn: &mut Connection) -> Result<()> {
                let me = &self.identity;
                sqlx::query(
                    "INSERT INTO instances (owner, instance, role, host, pid, started_ms,
                         last_seen_ms) VALUES ($1, $2, $3, $4, $5, $6, $6)
                     ON CONFLICT (owner) DO UPDATE SET last_seen_ms = $6",
                )
                .bind(&me.owner).bind(&me.instance).bind(me.role.as_str()).bind(&me.host)
                .bind(i64::from(me.pid)).bind(now)
                .execute(conn).await.map_err(Error::ledger("register instance"))?;
                Ok(())
            }

            /// Chunks of `stream`/`source` reaching into `[from, to]` that meet `condition`
            /// (which may name `now` as `$5`), by start.
            async fn chunks_in(
                &self, op: &'static str, condition: &str, (stream, source): (&str, TimestampSource),
                (from, to): (EpochMs, EpochMs), now: Option<EpochMs>,
            ) -> Result<Vec<Chunk>> {
                let sql = format!(
                    "SELECT {CHUNK_COLUMNS} FROM chunks WHERE {IN_RANGE} AND {condition}
                     ORDER BY start_ms, id"
                );
                let mut query = sqlx::query(&sql).bind(stream).bind(source.as_str()).bind(from);
                query = query.bind(to);
                if let Some(now) = now {
                    query = query.bind(now);
                }
                let rows = query.fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let chunks: Result<Vec<Chunk>, _> = rows.iter().map(sql::chunk_from).collect();
                chunks.map_err(Error::ledger(op))
            }

            /// The stream's lease row, held or not.
            async fn stream_lease(
                &self, op: &'static str, stream: &str, source: TimestampSource,
            ) -> Result<Option<StreamHolder>> {
                let row = sqlx::query(
                    "SELECT * FROM stream_leases WHERE stream = $1 AND timestamp_source = $2",
                )
                .bind(stream).bind(source.as_str())
                .fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                row.as_ref().map(sql::holder_from).transpose().map_err(Error::ledger(op))
            }

            /// The chunk's fragments, sorted.
            async fn fragments_in(
                conn: &mut Connection, op: &'static str, chunk: i64,
            ) -> Result<Vec<Fragment>> {
                let rows = sqlx::query(
                    "SELECT fragment_number, start_ms, server_ms, duration_ms, size_bytes
                     FROM chunk_fragments WHERE chunk_id = $1",
                )
                .bind(chunk).fetch_all(&mut *conn).await.map_err(Error::ledger(op))?;
                let fragments: Result<Vec<Fragment>, _> =
                    rows.iter().map(sql::fragment_from).collect();
                let mut fragments = fragments.map_err(Error::ledger(op))?;
                fragments.sort_by(Fragment::order);
                Ok(fragments)
            }

            /// Per-stream counts by state: the first part of `status`.
            async fn counts_by_stream(&self, op: &'static str) -> Result<Vec<StreamStatus>> {
                let rows = sqlx::query(
                    "SELECT stream, state, COUNT(*) AS n,
                         CAST(COALESCE(SUM(archived_bytes), 0) AS BIGINT) AS bytes,
                         CAST(COALESCE(SUM(fragment_count), 0) AS BIGINT) AS fragments,
                         MAX(end_ms) AS through, MIN(start_ms) AS since,
                         CAST(COALESCE(SUM(CASE WHEN kind = 'late' THEN fragment_count END), 0)
                             AS BIGINT) AS late,
                         CAST(COALESCE(SUM(CASE WHEN kind = 'mkv' THEN fragment_count END), 0)
                             AS BIGINT) AS mkv
                     FROM chunks GROUP BY stream, state ORDER BY stream",
                )
                .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let mut out: Vec<StreamStatus> = Vec::new();
                for row in &rows {
                    let stream: String = row.try_get("stream").map_err(Error::ledger(op))?;
                    if out.last().is_none_or(|s| s.stream != stream) {
                        let stream = stream.clone();
                        out.push(StreamStatus { stream, ..StreamStatus::default() });
                    }
                    let Some(s) = out.last_mut() else { continue };
                    let mut count = || -> Result<(), sqlx::Error> {
                        let n = row.unsigned("n")?;
                        match row.named("state", ChunkState::parse)? {
                            ChunkState::Done => {
                                s.done = n;
                                s.archived_bytes = row.unsigned("bytes")?;
                                s.archived_fragments = row.unsigned("fragments")?;
                                s.archived_through_ms = row.maybe_int("through")?;
                                s.archived_from_ms = row.maybe_int("since")?;
                                s.late_fragments = row.unsigned("late")?;
                                s.mkv_fragments = row.unsigned("mkv")?;
                            }
                            ChunkState::Planned => s.pending += n,
                            ChunkState::Fetching | ChunkState::Uploading => s.in_flight += n,
                            ChunkState::Failed => s.failed = n,
                            ChunkState::Expired => s.expired = n,
                        }
                        Ok(())
                    };
                    let named = sql::undecodable("chunks of stream", &stream);
                    count().map_err(named).map_err(Error::ledger(op))?;
                }
                Ok(out)
            }

            /// What `status` shows of one stream beyond its counts and holder.
            async fn stream_details(&self, op: &'static str, s: &mut StreamStatus) -> Result<()> {
                s.oldest_unarchived_ms = sqlx::query_scalar(
                    "SELECT MIN(start_ms) FROM chunks WHERE stream = $1
                       AND state NOT IN ('done', 'expired')",
                )
                .bind(&s.stream).fetch_one(&self.pool).await.map_err(Error::ledger(op))?;
                let progress = sqlx::query(
                    "SELECT * FROM stream_progress WHERE stream = $1
                     ORDER BY last_run_ms DESC NULLS LAST LIMIT 1",
                )
                .bind(&s.stream).fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                if let Some(row) = progress {
                    let p = sql::progress_from(&row, &s.stream).map_err(Error::ledger(op))?;
                    (s.retention_ms, s.next_run_ms) = (p.retention_ms, p.next_run_ms);
                    (s.last_run_ms, s.last_run_error) = (p.last_run_ms, p.last_run_error);
                }
                let failed = sqlx::query(
                    "SELECT object_key, start_ms, error_kind, last_error, attempts, next_attempt_ms
                     FROM chunks WHERE stream = $1 AND state IN ('failed', 'expired')
                     ORDER BY updated_ms DESC LIMIT 20",
                )
                .bind(&s.stream).fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let failures = failed.iter().map(sql::failure_from).collect::<Result<_, _>>();
                s.failures = failures.map_err(Error::ledger(op))?;
                s.last_error = s.failures.first().map(|f| f.reason.clone());
                let by: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT archived_by, COUNT(*) AS n FROM chunks
                     WHERE stream = $1 AND state = 'done' AND archived_by IS NOT NULL
                     GROUP BY archived_by",
                )
                .bind(&s.stream).fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                for (owner, n) in by {
                    let instance = Identity::instance_of(&owner).to_string();
                    *s.archived_by_instance.entry(instance).or_default() += n as u64;
                }
                let held = sqlx::query(
                    "SELECT object_key, state, owner, lease_until_ms FROM chunks
                     WHERE stream = $1 AND state IN ('fetching', 'uploading') AND owner IS NOT NULL
                     ORDER BY start_ms LIMIT 50",
                )
                .bind(&s.stream).fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let held = held.iter().map(sql::held_chunk_from).collect::<Result<_, _>>();
                s.in_flight_chunks = held.map_err(Error::ledger(op))?;
                Ok(())
            }
        }
    };
}
pub(super) use sql_ledger_helpers;

/// [`sql_ledger!`]'s [`Ledger`](super::Ledger) methods; each method's contract is on the
/// trait.
macro_rules! sql_ledger_methods {
    () => {
        // The methods as async fns; the `Ledger` impl below boxes each one's future.
        impl This {
            async fn register(&self, now: EpochMs, lease_ms: i64) -> Result<Registration> {
                let op = "register instance";
                let me = &self.identity;
                let mut conn = self.pool.acquire().await.map_err(Error::ledger(op))?;
                if me.role == Role::Daemon {
                    let rows = sqlx::query(
                        "SELECT * FROM instances WHERE instance = $1 AND role = 'daemon'
                           AND owner <> $2 AND last_seen_ms >= $3 ORDER BY last_seen_ms DESC",
                    )
                    .bind(&me.instance).bind(&me.owner).bind(now - lease_ms)
                    .fetch_all(&mut *conn).await.map_err(Error::ledger(op))?;
                    for row in &rows {
                        let other = sql::instance_from(row).map_err(Error::ledger(op))?;
                        if !This::owner_is_gone(&other.owner, &me.host) {
                            return Ok(Registration::InstanceInUse(other));
                        }
                    }
                }
                sqlx::query("DELETE FROM instances WHERE last_seen_ms < $1")
                    .bind(now - sql::INSTANCE_HISTORY_MS)
                    .execute(&mut *conn).await.map_err(Error::ledger(op))?;
                self.upsert_instance(now, &mut conn).await?;
                Ok(Registration::Registered)
            }

            async fn heartbeat(&self, now: EpochMs, lease_ms: i64, active: &[i64]) -> Result<()> {
                let op = "heartbeat";
                let owner = &self.identity.owner;
                let mut tx = self.pool.begin().await.map_err(Error::ledger(op))?;
                self.upsert_instance(now, &mut tx).await?;
                sqlx::query("UPDATE stream_leases SET lease_until_ms = $2 WHERE owner = $1")
                    .bind(owner).bind(now + lease_ms)
                    .execute(&mut *tx).await.map_err(Error::ledger(op))?;
                let sql = format!(
                    "UPDATE chunks SET lease_until_ms = {greatest}(COALESCE(lease_until_ms, 0), $2)
                     WHERE owner = $1 AND state IN ('fetching', 'uploading') AND {active}",
                    greatest = This::GREATEST,
                    active = This::id_in("$3"),
                );
                sqlx::query(&sql).bind(owner).bind(now + lease_ms).bind(This::ids(active))
                    .execute(&mut *tx).await.map_err(Error::ledger(op))?;
                tx.commit().await.map_err(Error::ledger(op))
            }

            async fn unregister(&self) -> Result<()> {
                let op = "unregister";
                let owner = &self.identity.owner;
                sqlx::query(
                    "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                         lease_until_ms = NULL WHERE owner = $1",
                )
                .bind(owner).execute(&self.pool).await.map_err(Error::ledger(op))?;
                sqlx::query("DELETE FROM instances WHERE owner = $1")
                    .bind(owner).execute(&self.pool).await.map_err(Error::ledger(op))?;
                Ok(())
            }

            async fn instances(&self) -> Result<Vec<InstanceView>> {
                let op = "list instances";
                let rows = sqlx::query("SELECT * FROM instances ORDER BY last_seen_ms DESC, owner")
                    .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let instances = rows.iter().map(sql::instance_from).collect::<Result<_, _>>();
                instances.map_err(Error::ledger(op))
            }

            async fn acquire_stream(
                &self, stream: &str, source: TimestampSource, now: EpochMs, lease_ms: i64,
            ) -> Result<StreamClaim> {
                let op = "acquire stream";
                let me = &self.identity;
                // A holder known to be gone gives the stream up at once (SQLite: a dead
                // process of this host); any other holder's lease moves once it lapsed.
                let gone = self.stream_lease(op, stream, source).await?
                    .filter(|h| !h.owner.is_empty() && This::owner_is_gone(&h.owner, &me.host))
                    .map(|h| h.owner);
                // One statement: concurrent acquirers queue on the row (SQLite's one writer,
                // PostgreSQL's row lock) and each sees the other's lease once it commits.
                let acquired: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO stream_leases AS l (stream, timestamp_source, owner, instance,
                         role, acquired_ms, lease_until_ms, generation)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1)
                     ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                         owner = excluded.owner, instance = excluded.instance,
                         role = excluded.role,
                         acquired_ms = CASE WHEN l.owner IS NOT DISTINCT FROM excluded.owner
                             THEN l.acquired_ms ELSE excluded.acquired_ms END,
                         lease_until_ms = excluded.lease_until_ms,
                         generation = l.generation + 1
                     WHERE l.owner IS NULL OR l.owner = excluded.owner
                        OR l.lease_until_ms IS NULL OR l.lease_until_ms < $6 OR l.owner = $8
                     RETURNING generation",
                )
                .bind(stream).bind(source.as_str()).bind(&me.owner).bind(&me.instance)
                .bind(me.role.as_str()).bind(now).bind(now + lease_ms).bind(gone)
                .fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                if acquired.is_some() {
                    return Ok(StreamClaim::Acquired);
                }
                let holder = self.stream_lease(op, stream, source).await?;
                // Released between the two statements: the caller tries again next time.
                let released = || StreamHolder::released(stream, source, now);
                Ok(StreamClaim::HeldBy(holder.unwrap_or_else(released)))
            }

            async fn release_stream(&self, stream: &str, source: TimestampSource) -> Result<()> {
                sqlx::query(
                    "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                         lease_until_ms = NULL
                     WHERE stream = $1 AND timestamp_source = $2 AND owner = $3",
                )
                .bind(stream).bind(source.as_str()).bind(&self.identity.owner)
                .execute(&self.pool).await.map_err(Error::ledger("release stream"))?;
                Ok(())
            }

            async fn stream_holders(&self, now: EpochMs) -> Result<Vec<StreamHolder>> {
                let op = "list stream leases";
                let rows = sqlx::query(
                    "SELECT * FROM stream_leases WHERE owner IS NOT NULL AND lease_until_ms >= $1
                     ORDER BY stream, timestamp_source",
                )
                .bind(now).fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let holders = rows.iter().map(sql::holder_from).collect::<Result<_, _>>();
                holders.map_err(Error::ledger(op))
            }

            #[allow(clippy::too_many_arguments)]
            async fn claim_next(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
                now: EpochMs, lease_ms: i64, skip: &[i64],
            ) -> Result<Option<(Chunk, Lease)>> {
                let op = "claim next chunk";
                let row = sqlx::query(&sql::claim_next_sql::<This>())
                    .bind(&self.identity.owner).bind(now + lease_ms).bind(now).bind(stream)
                    .bind(source.as_str()).bind(from).bind(to).bind(This::ids(skip))
                    .fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                let Some(row) = row else { return Ok(None) };
                let chunk = sql::chunk_from(&row).map_err(Error::ledger(op))?;
                let lease = Lease { chunk: chunk.id, generation: chunk.generation };
                Ok(Some((chunk, lease)))
            }

            async fn insert_planned(
                &self, stream: &str, source: TimestampSource, plan: &ChunkPlan, object_key: &str,
            ) -> Result<bool> {
                let at = (stream, source.as_str());
                self.insert_one("insert chunk", at, plan, object_key, None).await
            }

            async fn insert_archived(
                &self, stream: &str, source: TimestampSource, plan: &ChunkPlan, object_key: &str,
                bytes: u64,
            ) -> Result<bool> {
                let at = (stream, source.as_str());
                self.insert_one("insert archived chunk", at, plan, object_key, Some(bytes)).await
            }

            async fn holdings(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
            ) -> Result<Holdings> {
                let op = "read holdings";
                let numbers: Vec<String> = sqlx::query_scalar(sql::HELD_FRAGMENTS_SQL)
                    .bind(stream).bind(source.as_str()).bind(from).bind(to)
                    .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let rows = sqlx::query(&sql::clip_ranges_sql::<This>())
                    .bind(stream).bind(source.as_str()).bind(from).bind(to)
                    .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let held = numbers.into_iter().collect();
                let mut holdings = Holdings { held, ..Holdings::default() };
                for row in &rows {
                    let read = || -> Result<_, sqlx::Error> {
                        let range = (row.int("start_ms")?, row.int("clip_end")?);
                        let known = row.int("fragments_known")? != 0;
                        Ok((range, known, row.named("state", ChunkState::parse)?))
                    };
                    let named = sql::undecodable("clip chunk of stream", stream);
                    let read = read().map_err(named).map_err(Error::ledger(op));
                    let ((start, end), known, state) = read?;
                    if known {
                        // An expired range is fetched no more: what is listed inside it now
                        // is late.
                        let done = matches!(state, ChunkState::Done | ChunkState::Expired);
                        holdings.ranges.push((start, end, done));
                    } else {
                        // Planned before fragments were recorded (older SQLite ledgers).
                        holdings.legacy.push((start, end));
                    }
                }
                Ok(holdings)
            }

            async fn fragments_of(&self, chunk: i64) -> Result<Vec<Fragment>> {
                let op = "read fragments";
                let mut conn = self.pool.acquire().await.map_err(Error::ledger(op))?;
                This::fragments_in(&mut conn, op, chunk).await
            }

            async fn claimable(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
                now: EpochMs,
            ) -> Result<Vec<Chunk>> {
                let due = "(state = 'planned'
                    OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $5))";
                let op = "list claimable chunks";
                self.chunks_in(op, due, (stream, source), (from, to), Some(now)).await
            }

            async fn range_summary(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
            ) -> Result<RangeSummary> {
                let op = "summarize range";
                let sql = format!(
                    "SELECT state, COUNT(*) AS n,
                         CAST(COALESCE(SUM(archived_bytes), 0) AS BIGINT) AS bytes
                     FROM chunks WHERE {IN_RANGE} GROUP BY state"
                );
                let rows = sqlx::query(&sql)
                    .bind(stream).bind(source.as_str()).bind(from).bind(to)
                    .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let mut summary = RangeSummary::default();
                for row in &rows {
                    let read = || -> Result<_, sqlx::Error> {
                        let state = row.named("state", ChunkState::parse)?;
                        Ok((state, row.unsigned("n")? as usize, row.unsigned("bytes")?))
                    };
                    let named = sql::undecodable("chunks of stream", stream);
                    let (state, n, bytes) = read().map_err(named).map_err(Error::ledger(op))?;
                    summary.chunks += n;
                    match state {
                        ChunkState::Done => (summary.done, summary.archived_bytes) = (n, bytes),
                        ChunkState::Planned => summary.pending += n,
                        ChunkState::Fetching | ChunkState::Uploading => summary.in_flight += n,
                        // Listed one by one below.
                        ChunkState::Failed | ChunkState::Expired => {}
                    }
                }
                let unfinished = "state IN ('failed', 'expired')";
                let at = (stream, source);
                for chunk in self.chunks_in(op, unfinished, at, (from, to), None).await? {
                    match chunk.state {
                        ChunkState::Failed => summary.failed.push(chunk),
                        _ => summary.expired.push(chunk),
                    }
                }
                Ok(summary)
            }

            async fn claim(&self, id: i64, now: EpochMs, lease_ms: i64) -> Result<Option<Lease>> {
                let generation: Option<i64> = sqlx::query_scalar(
                    "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = $1,
                         generation = generation + 1, lease_until_ms = $2, updated_ms = $3
                     WHERE id = $4 AND (state = 'planned'
                         OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $3))
                     RETURNING generation",
                )
                .bind(&self.identity.owner).bind(now + lease_ms).bind(now).bind(id)
                .fetch_optional(&self.pool).await.map_err(Error::ledger("claim chunk"))?;
                Ok(generation.map(|generation| Lease { chunk: id, generation }))
            }

            async fn abandoned(&self, now: EpochMs, active: &[i64]) -> Result<Vec<Chunk>> {
                let op = "find abandoned chunks";
                let sql = format!(
                    "SELECT {CHUNK_COLUMNS} FROM chunks WHERE state IN ('fetching', 'uploading')
                     ORDER BY start_ms, id"
                );
                let rows = sqlx::query(&sql)
                    .fetch_all(&self.pool).await.map_err(Error::ledger(op))?;
                let in_flight = rows.iter().map(sql::chunk_from).collect::<Result<Vec<_>, _>>();
                let me = &self.identity;
                let dead = |c: &Chunk| {
                    let lapsed = c.lease_until_ms.is_none_or(|l| l < now);
                    match c.owner.as_deref() {
                        Some(o) if o == me.owner => lapsed || !active.contains(&c.id),
                        Some(o) => lapsed || This::owner_is_gone(o, &me.host),
                        None => true,
                    }
                };
                Ok(in_flight.map_err(Error::ledger(op))?.into_iter().filter(dead).collect())
            }

            async fn take_over(
                &self, chunk: &Chunk, now: EpochMs, lease_ms: i64,
            ) -> Result<Option<Lease>> {
                let generation: Option<i64> = sqlx::query_scalar(
                    "UPDATE chunks SET owner = $1, generation = generation + 1,
                         lease_until_ms = $2, updated_ms = $3
                     WHERE id = $4 AND generation = $5 AND lease_until_ms IS NOT DISTINCT FROM $6
                       AND state IN ('fetching', 'uploading')
                     RETURNING generation",
                )
                .bind(&self.identity.owner).bind(now + lease_ms).bind(now).bind(chunk.id)
                .bind(chunk.generation)
                // A holder that renewed since it was seen as dead keeps its chunk.
                .bind(chunk.lease_until_ms)
                .fetch_optional(&self.pool).await.map_err(Error::ledger("take over chunk"))?;
                Ok(generation.map(|generation| Lease { chunk: chunk.id, generation }))
            }

            async fn mark_uploading(&self, lease: &Lease, upload_id: Option<&str>) -> Result<()> {
                let upload_id = upload_id.map(str::to_string);
                let set = "state = 'uploading', upload_id = COALESCE($5, upload_id)";
                self.transition("mark uploading", set, lease, |q| q.bind(upload_id)).await
            }

            async fn renew(&self, lease: &Lease, until: EpochMs) -> Result<()> {
                let set = format!(
                    "lease_until_ms = {greatest}(COALESCE(lease_until_ms, 0), $5)",
                    greatest = This::GREATEST
                );
                self.transition("renew claim", &set, lease, |q| q.bind(until)).await
            }

            async fn attach_fragments(
                &self, lease: &Lease, fragments: &[Fragment],
            ) -> Result<Vec<Fragment>> {
                let op = "attach fragments";
                let mut tx = self.pool.begin().await.map_err(Error::ledger(op))?;
                let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
                let at = (stream.as_str(), source.as_str());
                let added = This::insert_fragments(&mut tx, at, lease.chunk, fragments, true)
                    .await.map_err(Error::ledger(op))?;
                let held = This::fragments_in(&mut tx, op, lease.chunk).await?;
                if added > 0 {
                    let plan = ChunkPlan::of(ChunkKind::Clip, held.clone());
                    sqlx::query(
                        "UPDATE chunks SET fragment_count = $1, planned_bytes = $2,
                             planned_duration_ms = $3, first_fragment = $4, last_fragment = $5,
                             fragments_known = 1
                         WHERE id = $6",
                    )
                    .bind(i64::from(plan.fragment_count)).bind(plan.bytes as i64)
                    .bind(plan.duration_ms as i64).bind(&plan.first_fragment)
                    .bind(&plan.last_fragment).bind(lease.chunk)
                    .execute(&mut *tx).await.map_err(Error::ledger(op))?;
                }
                tx.commit().await.map_err(Error::ledger(op))?;
                Ok(held)
            }

            async fn mark_done(&self, lease: &Lease, archived: &Archived) -> Result<()> {
                let (bytes, crc) = (archived.bytes as i64, archived.crc32c.clone());
                let set = "state = 'done', archived_bytes = $5, archived_crc32c = $6,
                    upload_id = NULL, archived_by = owner, owner = NULL, lease_until_ms = NULL,
                    last_error = NULL, error_kind = NULL, next_attempt_ms = NULL";
                self.transition("mark done", set, lease, |q| q.bind(bytes).bind(crc)).await
            }

            async fn mark_failed(&self, lease: &Lease, failure: &Failure) -> Result<()> {
                let f = failure.clone();
                // A chunk `verify --repair` planned again stays marked until it is done: its
                // rewrite may replace the damaged object, whichever process tries next.
                let set = "state = 'failed', last_error = $5,
                    error_kind = CASE WHEN error_kind = 'repair' THEN 'repair' ELSE $6 END,
                    next_attempt_ms = $7, owner = NULL, lease_until_ms = NULL";
                self.transition("mark failed", set, lease, |q| {
                    q.bind(f.message).bind(f.kind).bind(f.next_attempt_ms)
                })
                .await
            }

            async fn mark_expired(&self, lease: &Lease, reason: &str) -> Result<()> {
                let reason = reason.to_string();
                let set = "state = 'expired', last_error = $5, error_kind = 'expired',
                    next_attempt_ms = NULL, upload_id = NULL, owner = NULL, lease_until_ms = NULL";
                self.transition("mark expired", set, lease, |q| q.bind(reason)).await
            }

            async fn release(&self, lease: &Lease) -> Result<()> {
                let set = "state = 'planned', owner = NULL, lease_until_ms = NULL";
                self.transition("release chunk", set, lease, |q| q).await
            }

            async fn split(
                &self, lease: &Lease, parts: &[(ChunkPlan, String)],
                expired: Option<(&ChunkPlan, &str)>,
            ) -> Result<()> {
                let op = "split chunk";
                let mut tx = self.pool.begin().await.map_err(Error::ledger(op))?;
                let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
                sqlx::query("DELETE FROM chunks WHERE id = $1")
                    .bind(lease.chunk).execute(&mut *tx).await.map_err(Error::ledger(op))?;
                let parts = parts.iter().map(|(plan, key)| (plan, key.as_str(), None));
                let records = expired.map(|(plan, reason)| (plan, "", Some(reason))).into_iter();
                for (plan, key, reason) in records.chain(parts) {
                    let at = (stream.as_str(), source.as_str());
                    let inserted = This::insert_chunk(&mut tx, at, plan, key, reason).await;
                    if inserted.map_err(Error::ledger(op))?.is_none() {
                        // All or nothing: a record overlapping another chunk would lose or
                        // double media. The chunk stays as it was, held under this lease.
                        tx.rollback().await.map_err(Error::ledger(op))?;
                        return Err(Error::LedgerInvariant(format!(
                            "ledger split chunk {}: a part overlaps another chunk; left as it was",
                            lease.chunk
                        )));
                    }
                }
                tx.commit().await.map_err(Error::ledger(op))
            }

            async fn convert(&self, lease: &Lease, kind: ChunkKind, key: &str) -> Result<()> {
                if kind == ChunkKind::Clip {
                    // A new clip range would be added outside the stream's queue.
                    return Err(Error::LedgerInvariant(format!(
                        "ledger convert chunk {}: a chunk cannot become a clip", lease.chunk
                    )));
                }
                let key = key.to_string();
                let set = "kind = $5, object_key = $6, state = 'planned', upload_id = NULL,
                    owner = NULL, lease_until_ms = NULL";
                let op = "convert chunk";
                self.transition(op, set, lease, |q| q.bind(kind.as_str()).bind(key)).await
            }

            async fn requeue_failed(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
            ) -> Result<u64> {
                let sql = format!(
                    "UPDATE chunks SET next_attempt_ms = NULL, updated_ms = $5
                     WHERE {IN_RANGE} AND state = 'failed'"
                );
                let done = sqlx::query(&sql)
                    .bind(stream).bind(source.as_str()).bind(from).bind(to).bind(sql::now_ms())
                    .execute(&self.pool).await.map_err(Error::ledger("requeue failed chunks"))?;
                Ok(done.rows_affected())
            }

            async fn requeue_chunk(&self, id: i64) -> Result<bool> {
                let done = sqlx::query(
                    "UPDATE chunks SET state = 'planned', next_attempt_ms = NULL,
                         archived_bytes = NULL, archived_crc32c = NULL, updated_ms = $2,
                         error_kind = 'repair',
                         last_error = 'planned again by verify --repair: its object was missing or damaged'
                     WHERE id = $1 AND state IN ('done', 'failed')",
                )
                .bind(id).bind(sql::now_ms())
                .execute(&self.pool).await.map_err(Error::ledger("requeue chunk"))?;
                Ok(done.rows_affected() == 1)
            }

            async fn live_upload_ids(&self) -> Result<Vec<String>> {
                sqlx::query_scalar(
                    "SELECT upload_id FROM chunks WHERE state IN ('fetching', 'uploading')
                       AND upload_id IS NOT NULL",
                )
                .fetch_all(&self.pool).await.map_err(Error::ledger("list live uploads"))
            }

            async fn done_in(
                &self, stream: &str, source: TimestampSource, from: EpochMs, to: EpochMs,
            ) -> Result<Vec<Chunk>> {
                let (op, done) = ("list done chunks", "state = 'done'");
                self.chunks_in(op, done, (stream, source), (from, to), None).await
            }

            async fn object_keys(&self, stream: &str) -> Result<Vec<String>> {
                let sql = "SELECT object_key FROM chunks WHERE stream = $1 AND object_key <> ''";
                sqlx::query_scalar(sql)
                    .bind(stream)
                    .fetch_all(&self.pool).await.map_err(Error::ledger("list object keys"))
            }

            async fn chunk(&self, id: i64) -> Result<Option<Chunk>> {
                let op = "read chunk";
                let row = sqlx::query(&format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = $1"))
                    .bind(id).fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                row.as_ref().map(sql::chunk_from).transpose().map_err(Error::ledger(op))
            }

            async fn status(&self) -> Result<Vec<StreamStatus>> {
                let op = "status";
                let mut out = self.counts_by_stream(op).await?;
                let holders = self.stream_holders(sql::now_ms()).await?;
                for s in &mut out {
                    self.stream_details(op, s).await?;
                    s.held_by = holders.iter().find(|h| h.stream == s.stream).cloned();
                }
                Ok(out)
            }

            async fn oldest_unarchived(
                &self, stream: &str, source: TimestampSource,
            ) -> Result<Option<EpochMs>> {
                sqlx::query_scalar(
                    "SELECT MIN(start_ms) FROM chunks WHERE stream = $1 AND timestamp_source = $2
                       AND state NOT IN ('done', 'expired')",
                )
                .bind(stream).bind(source.as_str())
                .fetch_one(&self.pool).await.map_err(Error::ledger("oldest unarchived"))
            }

            async fn archived_through(&self, stream: &str) -> Result<Option<EpochMs>> {
                let sql = "SELECT MAX(end_ms) FROM chunks WHERE stream = $1 AND state = 'done'";
                sqlx::query_scalar(sql)
                    .bind(stream)
                    .fetch_one(&self.pool).await.map_err(Error::ledger("archived through"))
            }

            async fn counts(&self, stream: &str) -> Result<Vec<(ChunkState, i64)>> {
                let sql = "SELECT state, COUNT(*) AS n FROM chunks WHERE stream = $1 GROUP BY state";
                let rows = sqlx::query(sql).bind(stream).fetch_all(&self.pool).await;
                let state = sql::undecodable("chunks", format!("of stream {stream}"));
                rows.and_then(|rows| rows.iter().map(|row| {
                    Ok((row.named("state", ChunkState::parse)?, row.int("n")?))
                }).collect::<Result<_, sqlx::Error>>().map_err(state)).map_err(Error::ledger("count chunks"))
            }

            async fn progress(&self, stream: &str, source: TimestampSource)
                -> Result<StreamProgress> {
                let op = "read progress";
                let row = sqlx::query(
                    "SELECT * FROM stream_progress WHERE stream = $1 AND timestamp_source = $2",
                )
                .bind(stream).bind(source.as_str())
                .fetch_optional(&self.pool).await.map_err(Error::ledger(op))?;
                let progress = row.as_ref().map(|r| sql::progress_from(r, stream)).transpose();
                Ok(progress.map_err(Error::ledger(op))?.unwrap_or_default())
            }

            async fn update_progress(
                &self, stream: &str, source: TimestampSource, update: &StreamProgress,
            ) -> Result<()> {
                // planned_through_ms only moves forward: two instances that planned a stream
                // one after the other never move it back.
                let sql = format!(
                    "INSERT INTO stream_progress AS p (stream, timestamp_source, planned_through_ms,
                         retention_ms, next_run_ms, last_run_ms, last_run_error)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                         planned_through_ms = {greatest}(COALESCE($3, p.planned_through_ms),
                                                         COALESCE(p.planned_through_ms, $3)),
                         retention_ms = COALESCE($4, p.retention_ms),
                         next_run_ms = COALESCE($5, p.next_run_ms),
                         last_run_ms = COALESCE($6, p.last_run_ms),
                         last_run_error = CASE WHEN CAST($6 AS BIGINT) IS NOT NULL THEN $7
                             ELSE p.last_run_error END",
                    greatest = This::GREATEST
                );
                sqlx::query(&sql)
                    .bind(stream).bind(source.as_str()).bind(update.planned_through_ms)
                    .bind(update.retention_ms).bind(update.next_run_ms).bind(update.last_run_ms)
                    .bind(&update.last_run_error)
                    .execute(&self.pool).await.map_err(Error::ledger("update progress"))?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
            }
        }

        impl Ledger for This {
            fn identity(&self) -> &Identity {
                &self.identity
            }

            fn register(&self, now: EpochMs, lease_ms: i64) -> Pending<'_, Registration> {
                Box::pin(This::register(self, now, lease_ms))
            }

            fn heartbeat<'a>(
                &'a self,
                now: EpochMs,
                lease_ms: i64,
                active: &'a [i64],
            ) -> Pending<'a, ()> {
                Box::pin(This::heartbeat(self, now, lease_ms, active))
            }

            fn unregister(&self) -> Pending<'_, ()> {
                Box::pin(This::unregister(self))
            }

            fn instances(&self) -> Pending<'_, Vec<InstanceView>> {
                Box::pin(This::instances(self))
            }

            fn acquire_stream<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                now: EpochMs,
                lease_ms: i64,
            ) -> Pending<'a, StreamClaim> {
                Box::pin(This::acquire_stream(self, stream, source, now, lease_ms))
            }

            fn release_stream<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
            ) -> Pending<'a, ()> {
                Box::pin(This::release_stream(self, stream, source))
            }

            fn stream_holders(&self, now: EpochMs) -> Pending<'_, Vec<StreamHolder>> {
                Box::pin(This::stream_holders(self, now))
            }

            #[allow(clippy::too_many_arguments)]
            fn claim_next<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
                now: EpochMs,
                lease_ms: i64,
                skip: &'a [i64],
            ) -> Pending<'a, Option<(Chunk, Lease)>> {
                Box::pin(This::claim_next(self, stream, source, from, to, now, lease_ms, skip))
            }

            fn insert_planned<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                plan: &'a ChunkPlan,
                object_key: &'a str,
            ) -> Pending<'a, bool> {
                Box::pin(This::insert_planned(self, stream, source, plan, object_key))
            }

            fn insert_archived<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                plan: &'a ChunkPlan,
                object_key: &'a str,
                bytes: u64,
            ) -> Pending<'a, bool> {
                Box::pin(This::insert_archived(self, stream, source, plan, object_key, bytes))
            }

            fn holdings<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
            ) -> Pending<'a, Holdings> {
                Box::pin(This::holdings(self, stream, source, from, to))
            }

            fn fragments_of(&self, chunk: i64) -> Pending<'_, Vec<Fragment>> {
                Box::pin(This::fragments_of(self, chunk))
            }

            fn claimable<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
                now: EpochMs,
            ) -> Pending<'a, Vec<Chunk>> {
                Box::pin(This::claimable(self, stream, source, from, to, now))
            }

            fn range_summary<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
            ) -> Pending<'a, RangeSummary> {
                Box::pin(This::range_summary(self, stream, source, from, to))
            }

            fn claim(&self, id: i64, now: EpochMs, lease_ms: i64) -> Pending<'_, Option<Lease>> {
                Box::pin(This::claim(self, id, now, lease_ms))
            }

            fn abandoned<'a>(&'a self, now: EpochMs, active: &'a [i64]) -> Pending<'a, Vec<Chunk>> {
                Box::pin(This::abandoned(self, now, active))
            }

            fn take_over<'a>(
                &'a self,
                chunk: &'a Chunk,
                now: EpochMs,
                lease_ms: i64,
            ) -> Pending<'a, Option<Lease>> {
                Box::pin(This::take_over(self, chunk, now, lease_ms))
            }

            fn mark_uploading<'a>(
                &'a self,
                lease: &'a Lease,
                upload_id: Option<&'a str>,
            ) -> Pending<'a, ()> {
                Box::pin(This::mark_uploading(self, lease, upload_id))
            }

            fn renew<'a>(&'a self, lease: &'a Lease, until: EpochMs) -> Pending<'a, ()> {
                Box::pin(This::renew(self, lease, until))
            }

            fn attach_fragments<'a>(
                &'a self,
                lease: &'a Lease,
                fragments: &'a [Fragment],
            ) -> Pending<'a, Vec<Fragment>> {
                Box::pin(This::attach_fragments(self, lease, fragments))
            }

            fn mark_done<'a>(
                &'a self,
                lease: &'a Lease,
                archived: &'a Archived,
            ) -> Pending<'a, ()> {
                Box::pin(This::mark_done(self, lease, archived))
            }

            fn mark_failed<'a>(
                &'a self,
                lease: &'a Lease,
                failure: &'a Failure,
            ) -> Pending<'a, ()> {
                Box::pin(This::mark_failed(self, lease, failure))
            }

            fn mark_expired<'a>(&'a self, lease: &'a Lease, reason: &'a str) -> Pending<'a, ()> {
                Box::pin(This::mark_expired(self, lease, reason))
            }

            fn release<'a>(&'a self, lease: &'a Lease) -> Pending<'a, ()> {
                Box::pin(This::release(self, lease))
            }

            fn split<'a>(
                &'a self,
                lease: &'a Lease,
                parts: &'a [(ChunkPlan, String)],
                expired: Option<(&'a ChunkPlan, &'a str)>,
            ) -> Pending<'a, ()> {
                Box::pin(This::split(self, lease, parts, expired))
            }

            fn convert<'a>(
                &'a self,
                lease: &'a Lease,
                kind: ChunkKind,
                object_key: &'a str,
            ) -> Pending<'a, ()> {
                Box::pin(This::convert(self, lease, kind, object_key))
            }

            fn requeue_failed<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
            ) -> Pending<'a, u64> {
                Box::pin(This::requeue_failed(self, stream, source, from, to))
            }

            fn requeue_chunk(&self, id: i64) -> Pending<'_, bool> {
                Box::pin(This::requeue_chunk(self, id))
            }

            fn live_upload_ids(&self) -> Pending<'_, Vec<String>> {
                Box::pin(This::live_upload_ids(self))
            }

            fn done_in<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                from: EpochMs,
                to: EpochMs,
            ) -> Pending<'a, Vec<Chunk>> {
                Box::pin(This::done_in(self, stream, source, from, to))
            }

            fn object_keys<'a>(&'a self, stream: &'a str) -> Pending<'a, Vec<String>> {
                Box::pin(This::object_keys(self, stream))
            }

            fn chunk(&self, id: i64) -> Pending<'_, Option<Chunk>> {
                Box::pin(This::chunk(self, id))
            }

            fn status(&self) -> Pending<'_, Vec<StreamStatus>> {
                Box::pin(This::status(self))
            }

            fn oldest_unarchived<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
            ) -> Pending<'a, Option<EpochMs>> {
                Box::pin(This::oldest_unarchived(self, stream, source))
            }

            fn archived_through<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<EpochMs>> {
                Box::pin(This::archived_through(self, stream))
            }

            fn counts<'a>(&'a self, stream: &'a str) -> Pending<'a, Vec<(ChunkState, i64)>> {
                Box::pin(This::counts(self, stream))
            }

            fn progress<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
            ) -> Pending<'a, StreamProgress> {
                Box::pin(This::progress(self, stream, source))
            }

            fn update_progress<'a>(
                &'a self,
                stream: &'a str,
                source: TimestampSource,
                update: &'a StreamProgress,
            ) -> Pending<'a, ()> {
                Box::pin(This::update_progress(self, stream, source, update))
            }

            fn close(&self) -> futures_util::future::BoxFuture<'_, ()> {
                Box::pin(This::close(self))
            }
        }
    };
}
pub(super) use sql_ledger_methods;

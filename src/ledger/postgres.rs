//! The ledger in PostgreSQL: several instances on several hosts share one fleet. Its
//! queries are the shared core's ([`super::sql`]); this module connects and answers how
//! PostgreSQL differs ([`Dialect`]).
//!
//! Correctness rests on the database alone, never on a host: claims are conditional
//! updates (`FOR UPDATE SKIP LOCKED` for the next chunk) that increment the fencing
//! generation; clip ranges are kept apart by an exclusion constraint and fragments by a
//! primary key; the transactions adding a stream's chunks queue on an advisory lock,
//! so overlapping plans are refused instead of deadlocking; a process that dies loses
//! its leases when they lapse.

use super::sql::{self, Dialect};
use super::Identity;
use crate::domain::EpochMs;
use crate::error::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::str::FromStr;
use std::time::Duration;

/// A request waits this long for a connection: a database that is away fails the
/// request (and the pass) quickly with a clear error instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ledger in a PostgreSQL database, shared by a fleet.
pub struct PgLedger {
    /// Connections to the database.
    pool: PgPool,
    /// This process, as its claims name it.
    identity: Identity,
}

super::sql::sql_ledger!(PgLedger, sqlx::Postgres);

impl Dialect for PgLedger {
    const GREATEST: &'static str = "GREATEST";
    const CLAIM_LOCK: &'static str = "FOR UPDATE SKIP LOCKED";
    /// A transaction-scoped advisory lock on a hash of the stream, in the two-key space
    /// (apart from sqlx's one-key migration lock): two streams that share a hash only
    /// queue behind each other.
    const STREAM_LOCK: Option<&'static str> = Some(
        "SELECT pg_advisory_xact_lock(hashtext('kvs-archiver stream'), hashtext($1 || ' ' || $2))",
    );
    type Ids = Vec<i64>;

    fn ids(ids: &[i64]) -> Vec<i64> {
        ids.to_vec()
    }

    fn id_in(param: &str) -> String {
        format!("id = ANY({param})")
    }

    /// Leases alone: a holder on another host cannot be looked at, only outlived.
    fn owner_is_gone(_owner: &str, _this_host: &str) -> bool {
        false
    }
}

impl PgLedger {
    /// Connects and applies the migrations (sqlx serializes concurrent migrators with an
    /// advisory lock, so instances may start together).
    pub async fn open(database_url: &str, identity: Identity) -> Result<PgLedger> {
        let unreachable = |source| Error::LedgerUnreachable {
            url: crate::config::redact_url(database_url),
            source,
        };
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| {
                Error::Usage(format!(
                    "ledger.database_url {}: not a PostgreSQL URL ({e}); write it like postgres://archiver:PASSWORD@db.example:5432/kvs_archiver",
                    crate::config::redact_url(database_url)
                ))
            })?
            .application_name("kvs-archiver");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unreachable)?;
        super::migrations::postgres().await?.run(&pool).await?;
        Ok(PgLedger { pool, identity })
    }

    /// The pool, for benchmarks that load rows in bulk.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `EXPLAIN ANALYZE` of the hot queries (the next claim, the planner's two reads)
    /// for one stream and range, rolled back: what the benchmark records.
    pub async fn explain_hot_queries(
        &self,
        stream: &str,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<(&'static str, String)>> {
        let op = "explain";
        let explain = |sql: &str| format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}");
        let plan = |rows: Vec<sqlx::postgres::PgRow>| -> Result<String> {
            let lines: Result<Vec<String>, _> = rows.iter().map(|r| r.try_get(0)).collect();
            Ok(lines.map_err(Error::ledger(op))?.join("\n"))
        };
        let mut tx = self.pool.begin().await.map_err(Error::ledger(op))?;
        let rows = sqlx::query(&explain(&sql::claim_next_sql::<Self>()))
            .bind(&self.identity.owner)
            .bind(sql::now_ms() + 60_000)
            .bind(sql::now_ms())
            .bind(stream)
            .bind("server")
            .bind(from)
            .bind(to)
            .bind(Vec::<i64>::new())
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::ledger(op))?;
        let mut out = vec![("claim next", plan(rows)?)];
        let (held, ranges) = (
            sql::HELD_FRAGMENTS_SQL.into(),
            sql::clip_ranges_sql::<Self>(),
        );
        for (name, sql) in [
            ("planning: held fragments", held),
            ("planning: clip ranges", ranges),
        ] {
            let rows = sqlx::query(&explain(&sql))
                .bind(stream)
                .bind("server")
                .bind(from)
                .bind(to)
                .fetch_all(&mut *tx)
                .await
                .map_err(Error::ledger(op))?;
            out.push((name, plan(rows)?));
        }
        tx.rollback().await.map_err(Error::ledger(op))?;
        Ok(out)
    }
}

//! The ledger: every chunk, its state and the fragments it holds, behind one narrow
//! trait ([`Ledger`]) so that the worker's policy never depends on a database. SQLite
//! ([`sqlite::SqliteLedger`]) is the embedded default; PostgreSQL
//! ([`postgres::PgLedger`]) lets several instances on several hosts share one fleet.
//! Both run the same queries, written once in `sql.rs`; each backend only opens its
//! database and says where the two truly differ (how a claim locks, id lists, whether a
//! holder is known to be dead). `tests/ledger_conformance.rs` is the contract every
//! implementation passes.
//!
//! Processes sharing a ledger know each other through it alone: each registers as an
//! [`Identity`] and heartbeats ([`Ledger::heartbeat`]); one process works a stream at a
//! time under a stream lease ([`Ledger::acquire_stream`]), and a process that dies loses
//! its stream and chunk leases when they lapse.
//!
//! A chunk moves `planned → fetching → uploading → done`, or to `failed` (tried again
//! from `next_attempt_ms`) or `expired` (KVS confirmed its media is gone). A claim takes a
//! lease and increments the chunk's generation, the fencing token: every later transition
//! names the [`Lease`] it holds and succeeds only if the chunk is still held under exactly
//! that generation, else it fails with [`Error::LeaseLost`] and changes nothing.

mod migrations;
pub mod postgres;
mod sql;
pub mod sqlite;

use crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use crate::plan::Holdings;
use futures_util::future::BoxFuture;
use serde::Serialize;
use std::fmt;

/// What a process does with the ledger; daemons share the streams among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `run`: the service.
    Daemon,
    /// `run --once`.
    Once,
    /// `backfill`: archives a range given on the command line, then exits.
    Backfill,
    /// `verify`: checks the archive, and with `--repair` plans damaged chunks again.
    Verify,
    /// Reads only (`status`, `plan`): never registers nor claims.
    Reader,
}

impl Role {
    /// The name stored in the ledger's `role` column and shown by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => "daemon",
            Role::Once => "once",
            Role::Backfill => "backfill",
            Role::Verify => "verify",
            Role::Reader => "reader",
        }
    }
}

/// Who this process is in the ledger.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The instance's stable id (`ledger.instance_id`, or generated once and kept).
    pub instance: String,
    /// What this process does, so `status` can tell a daemon from a one-off command.
    pub role: Role,
    /// This process: `instance@host:pid:nonce`. Claims and leases name it; the random
    /// part tells apart two processes that share an instance id, a host name and a pid
    /// (two containers, each its own pid 1).
    pub owner: String,
    /// The machine's host name, as `status` shows it (`localhost` when unknown).
    pub host: String,
    /// The operating system's process id, as `status` shows it.
    pub pid: u32,
}

impl Identity {
    /// An identity for this process under `instance`, with a fresh random part in its
    /// owner.
    pub fn new(instance: &str, role: Role) -> Identity {
        let host = crate::config::host_name().unwrap_or_else(|| "localhost".to_string());
        let pid = std::process::id();
        Identity {
            instance: instance.to_string(),
            role,
            owner: format!("{instance}@{host}:{pid}:{:08x}", fastrand::u32(..)),
            host,
            pid,
        }
    }

    /// The instance id an owner name carries.
    pub fn instance_of(owner: &str) -> &str {
        owner
            .rsplit_once('@')
            .map_or(owner, |(instance, _)| instance)
    }
}

/// A process registered with the ledger, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    /// The process's owner name (`instance@host:pid:nonce`).
    pub owner: String,
    /// The instance id it registered under.
    pub instance: String,
    /// Its [`Role`], as stored.
    pub role: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: i64,
    /// When it registered.
    pub started_ms: EpochMs,
    /// Its last heartbeat: a process not seen for a lease is taken for dead.
    pub last_seen_ms: EpochMs,
}

/// Who works a stream now.
#[derive(Debug, Clone, Serialize)]
pub struct StreamHolder {
    /// The stream's label.
    pub stream: String,
    /// Which timestamp selects the stream's fragments: a lease is per stream and source.
    pub timestamp_source: TimestampSource,
    /// The owner name of the process holding the lease.
    pub owner: String,
    /// The instance id of that process.
    pub instance: String,
    /// Its role, as stored.
    pub role: String,
    /// When it took the lease.
    pub acquired_ms: EpochMs,
    /// When the lease lapses unless it is renewed.
    pub lease_until_ms: EpochMs,
}

impl StreamHolder {
    /// A lease released between a refused acquisition and the look at its holder: the
    /// caller tries again later.
    pub fn released(stream: &str, source: TimestampSource, now: EpochMs) -> StreamHolder {
        StreamHolder {
            stream: stream.to_string(),
            timestamp_source: source,
            owner: String::new(),
            instance: String::new(),
            role: String::new(),
            acquired_ms: now,
            lease_until_ms: now,
        }
    }
}

/// The outcome of [`Ledger::acquire_stream`].
#[derive(Debug, Clone)]
pub enum StreamClaim {
    /// This process works the stream until it releases it or its lease lapses.
    Acquired,
    /// Another live process works it.
    HeldBy(StreamHolder),
}

/// The outcome of [`Ledger::register`].
#[derive(Debug, Clone)]
pub enum Registration {
    /// This process is recorded as alive and may claim.
    Registered,
    /// Another live daemon runs under the same instance id.
    InstanceInUse(InstanceView),
}

/// An in-flight chunk and who holds it, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct HeldChunk {
    /// The chunk's object key.
    pub object_key: String,
    /// Fetching or uploading.
    pub state: ChunkState,
    /// The instance id of the holder.
    pub instance: String,
    /// The owner name of the holding process.
    pub owner: String,
    /// When the holder's lease lapses unless renewed.
    pub lease_until_ms: Option<EpochMs>,
}

/// Where a chunk is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkState {
    /// Recorded, waiting for a worker.
    Planned,
    /// Claimed; GetClip (or GetMediaForFragmentList) under way.
    Fetching,
    /// Bytes are going to the destination (the multipart upload id is recorded).
    Uploading,
    /// The object exists, whole.
    Done,
    /// The last attempt failed; tried again from `next_attempt_ms`.
    Failed,
    /// KVS confirmed that the media was deleted before it was archived.
    Expired,
}

impl ChunkState {
    /// Every state, in a chunk's life order.
    pub const ALL: [ChunkState; 6] = [
        ChunkState::Planned,
        ChunkState::Fetching,
        ChunkState::Uploading,
        ChunkState::Done,
        ChunkState::Failed,
        ChunkState::Expired,
    ];

    /// The name stored in the ledger's `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkState::Planned => "planned",
            ChunkState::Fetching => "fetching",
            ChunkState::Uploading => "uploading",
            ChunkState::Done => "done",
            ChunkState::Failed => "failed",
            ChunkState::Expired => "expired",
        }
    }

    /// The state a `state` column holds; `None` for a name this build does not know.
    pub fn parse(text: &str) -> Option<ChunkState> {
        Some(match text {
            "planned" => ChunkState::Planned,
            "fetching" => ChunkState::Fetching,
            "uploading" => ChunkState::Uploading,
            "done" => ChunkState::Done,
            "failed" => ChunkState::Failed,
            "expired" => ChunkState::Expired,
            _ => return None,
        })
    }

    /// Held by a worker under a lease.
    pub fn in_flight(self) -> bool {
        matches!(self, ChunkState::Fetching | ChunkState::Uploading)
    }
}

impl fmt::Display for ChunkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A chunk row.
#[derive(Debug, Clone, Serialize)]
pub struct Chunk {
    /// The chunk's id: its row, and the `chunk` of every [`Lease`] on it.
    pub id: i64,
    /// The stream's label.
    pub stream: String,
    /// Which timestamp the chunk's range is in.
    pub timestamp_source: TimestampSource,
    /// Range, counts and kind; `plan.fragments` is empty here (see
    /// [`Ledger::fragments_of`]).
    pub plan: ChunkPlan,
    /// Where the object goes (or went), derived from the chunk's range, so a re-upload
    /// lands on the same key.
    pub object_key: String,
    /// Where the chunk is in its life.
    pub state: ChunkState,
    /// Claims so far.
    pub attempts: u32,
    /// Why the last attempt failed (the error's message).
    pub last_error: Option<String>,
    /// [`Error::kind`] of the last failure.
    pub error_kind: Option<String>,
    /// A failed chunk is claimable from this time on (`None`: at once).
    pub next_attempt_ms: Option<EpochMs>,
    /// Size of the object written, once done.
    pub archived_bytes: Option<u64>,
    /// CRC32C of the whole object (hex), as written.
    pub archived_crc32c: Option<String>,
    /// The multipart upload of the current claim, once created.
    pub upload_id: Option<String>,
    /// The process holding the chunk while it is in flight.
    pub owner: Option<String>,
    /// The fencing token of the current (or last) claim.
    pub generation: i64,
    /// When the current claim lapses unless renewed (`None` when not in flight).
    pub lease_until_ms: Option<EpochMs>,
}

/// A claim on a chunk: the fencing token every transition must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The chunk's id.
    pub chunk: i64,
    /// The chunk's generation at the claim: the fencing token.
    pub generation: i64,
}

/// What a finished upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Size of the object written, in bytes.
    pub bytes: u64,
    /// CRC32C of the whole object, hex.
    pub crc32c: String,
}

/// A failed attempt, as the worker's policy decided to record it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// [`Error::kind`].
    pub kind: &'static str,
    /// Why the attempt failed: the error's message, as the operator reads it.
    pub message: String,
    /// When a later pass may claim the chunk again.
    pub next_attempt_ms: EpochMs,
}

impl Failure {
    /// The failure as `error` classified it, retried from `next_attempt_ms`.
    pub fn of(error: &Error, next_attempt_ms: EpochMs) -> Failure {
        Failure {
            kind: error.kind(),
            message: error.to_string(),
            next_attempt_ms,
        }
    }
}

/// A row the ledger cannot read (an unknown state, a NULL where a value must be): which
/// table and row, and what in it. It reaches callers as the source of
/// [`Error::Ledger`], never as a panic nor as a value guessed in its place.
#[derive(Debug, thiserror::Error)]
#[error("{table} row {key}: {problem}")]
pub struct UndecodableRow {
    /// The table the row is in (`chunks`, `stream_leases`, ...).
    pub table: &'static str,
    /// The row's key: a chunk's id, a stream's name, an owner.
    pub key: String,
    /// The column that cannot be read and why.
    pub problem: sqlx::Error,
}

/// Chunks of a range by state, for a run's summary.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RangeSummary {
    /// Chunks reaching into the range, in any state.
    pub chunks: usize,
    /// Archived.
    pub done: usize,
    /// Planned, waiting for a worker.
    pub pending: usize,
    /// Held under a live lease, by this process or another.
    pub in_flight: usize,
    /// Failed chunks (whole rows, for the report).
    pub failed: Vec<Chunk>,
    /// Chunks whose media KVS deleted before they were archived.
    pub expired: Vec<Chunk>,
    /// Bytes of the range's archived objects.
    pub archived_bytes: u64,
}

/// Per-stream totals for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StreamStatus {
    /// The stream's label.
    pub stream: String,
    /// Chunks archived.
    pub done: u64,
    /// Chunks planned, waiting for a worker.
    pub pending: u64,
    /// Chunks fetching or uploading now.
    pub in_flight: u64,
    /// Chunks whose last attempt failed.
    pub failed: u64,
    /// Chunks whose media KVS deleted first.
    pub expired: u64,
    /// Bytes of the archived objects.
    pub archived_bytes: u64,
    /// Fragments the archived chunks hold.
    pub archived_fragments: u64,
    /// Fragments archived alone because they were listed after their range was archived
    /// (late chunks; a late fragment GetClip cannot select alone counts as Matroska).
    pub late_fragments: u64,
    /// Fragments archived as Matroska (GetMediaForFragmentList).
    pub mkv_fragments: u64,
    /// Start of the last fragment of the newest archived chunk.
    pub archived_through_ms: Option<EpochMs>,
    /// Start of the first fragment of the oldest archived chunk.
    pub archived_from_ms: Option<EpochMs>,
    /// Why the stream's most recent failed chunk failed.
    pub last_error: Option<String>,
    /// Failed chunks: kind, reason and next retry of each (newest first, at most 20).
    pub failures: Vec<FailureView>,
    /// Start of the oldest chunk not archived (nor expired) yet.
    pub oldest_unarchived_ms: Option<EpochMs>,
    /// The daemon's view (`run`), when it has run.
    pub retention_ms: Option<i64>,
    /// When the daemon's schedule fires next for the stream.
    pub next_run_ms: Option<EpochMs>,
    /// When the daemon's last pass over the stream ran.
    pub last_run_ms: Option<EpochMs>,
    /// Why that pass failed, if it did.
    pub last_run_error: Option<String>,
    /// The process working the stream now, if any.
    pub held_by: Option<StreamHolder>,
    /// Archived chunks by the instance that archived them (chunks archived before
    /// instances were recorded are not counted).
    pub archived_by_instance: std::collections::BTreeMap<String, u64>,
    /// In-flight chunks and their holders (at most 50).
    pub in_flight_chunks: Vec<HeldChunk>,
}

/// One failed chunk as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FailureView {
    /// The chunk's object key.
    pub object_key: String,
    /// Start of the chunk's first fragment.
    pub start_ms: EpochMs,
    /// [`Error::kind`] of the failure.
    pub kind: String,
    /// The failure's message.
    pub reason: String,
    /// Claims so far.
    pub attempts: u32,
    /// When a later pass may claim it again.
    pub next_attempt_ms: Option<EpochMs>,
}

/// The daemon's per-stream memory (`stream_progress`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamProgress {
    /// How far planning has recorded chunks: the next pass lists from here, less the settle
    /// time.
    pub planned_through_ms: Option<EpochMs>,
    /// The stream's retention, in ms, as DescribeStream last said.
    pub retention_ms: Option<i64>,
    /// When the schedule fires next.
    pub next_run_ms: Option<EpochMs>,
    /// When the last pass ran.
    pub last_run_ms: Option<EpochMs>,
    /// Why the last pass failed, if it did (`None`: it succeeded).
    pub last_run_error: Option<String>,
}

/// A [`Ledger`] call's transaction, to await: boxed, because a process holds its ledger
/// as `dyn Ledger`, SQLite or PostgreSQL as configured.
pub type Pending<'a, T> = BoxFuture<'a, Result<T>>;

/// The ledger of chunk state. Every method is one transaction; every transition that names
/// a [`Lease`] changes exactly one row or fails with [`Error::LeaseLost`] and changes
/// nothing.
pub trait Ledger: Send + Sync {
    /// This process's name in claims.
    fn owner(&self) -> &str {
        &self.identity().owner
    }

    /// Who this process is: its owner name fences every claim it makes.
    fn identity(&self) -> &Identity;

    /// Records this process as alive. A daemon is refused while another live daemon
    /// runs under the same instance id.
    fn register(&self, now: EpochMs, lease_ms: i64) -> Pending<'_, Registration>;

    /// This process is alive: renews its registration, its stream leases and the leases
    /// of its chunks in `active` (chunks whose worker still runs) until `now + lease_ms`.
    fn heartbeat<'a>(&'a self, now: EpochMs, lease_ms: i64, active: &'a [i64]) -> Pending<'a, ()>;

    /// A clean stop: the registration and every stream lease of this process end now.
    fn unregister(&self) -> Pending<'_, ()>;

    /// Registered processes, most recently seen first.
    fn instances(&self) -> Pending<'_, Vec<InstanceView>>;

    /// Takes the stream's lease unless another live process holds it.
    fn acquire_stream<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        now: EpochMs,
        lease_ms: i64,
    ) -> Pending<'a, StreamClaim>;

    /// Gives the stream's lease back (if this process holds it).
    fn release_stream<'a>(&'a self, stream: &'a str, source: TimestampSource) -> Pending<'a, ()>;

    /// Live stream leases (unexpired at `now`).
    fn stream_holders(&self, now: EpochMs) -> Pending<'_, Vec<StreamHolder>>;

    /// Claims the next chunk reaching into `[from, to]` that is claimable at `now` (as
    /// [`Ledger::claimable`] lists them, minus `skip`), by start; concurrent claimers
    /// never block on each other's rows nor get the same chunk.
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
    ) -> Pending<'a, Option<(Chunk, Lease)>>;

    /// Records a planned chunk and the fragments it holds. Returns false, recording
    /// nothing, when any of its fragments is held already or when (for a clip chunk) its
    /// GetClip range overlaps another clip chunk's: whoever plans, no fragment is ever in
    /// two chunks.
    fn insert_planned<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        plan: &'a ChunkPlan,
        object_key: &'a str,
    ) -> Pending<'a, bool>;

    /// Records a chunk whose object the destination already holds (`rebuild-ledger`):
    /// done, with `bytes` as its size and its checksum unknown. `false` if a chunk of the
    /// ledger already holds its range or one of its fragments.
    fn insert_archived<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        plan: &'a ChunkPlan,
        object_key: &'a str,
        bytes: u64,
    ) -> Pending<'a, bool>;

    /// What the ledger holds in `[from, to]`: fragment numbers and clip ranges (with
    /// whether each is archived) reaching into it.
    fn holdings<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Pending<'a, Holdings>;

    /// The fragments a chunk holds, sorted; empty for a chunk planned before fragments
    /// were recorded.
    fn fragments_of(&self, chunk: i64) -> Pending<'_, Vec<Fragment>>;

    /// Chunks reaching into `[from, to]` that may be claimed at `now`: planned, or failed
    /// with their next attempt due; by start.
    fn claimable<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
        now: EpochMs,
    ) -> Pending<'a, Vec<Chunk>>;

    /// Chunks reaching into `[from, to]` by state.
    fn range_summary<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Pending<'a, RangeSummary>;

    /// Claims a planned chunk, or a failed one whose next attempt is due at `now`, for
    /// `lease_ms`. `None` if it is held, finished or not due.
    fn claim(&self, id: i64, now: EpochMs, lease_ms: i64) -> Pending<'_, Option<Lease>>;

    /// In-flight chunks whose claim is dead at `now`: the lease ran out (whoever holds
    /// it), the owner is a process known to be gone, or the owner is this process and the
    /// chunk is not in `active` (its worker returned without recording an outcome).
    fn abandoned<'a>(&'a self, now: EpochMs, active: &'a [i64]) -> Pending<'a, Vec<Chunk>>;

    /// Takes over an abandoned chunk as [`Ledger::abandoned`] returned it (same
    /// generation, still in flight). The caller aborts its recorded upload, then releases.
    fn take_over<'a>(
        &'a self,
        chunk: &'a Chunk,
        now: EpochMs,
        lease_ms: i64,
    ) -> Pending<'a, Option<Lease>>;

    /// Bytes go to the destination now, under this multipart upload (once there is one).
    fn mark_uploading<'a>(
        &'a self,
        lease: &'a Lease,
        upload_id: Option<&'a str>,
    ) -> Pending<'a, ()>;

    /// Extends the lease to at least `until`; a lease that already runs longer (a
    /// heartbeat extended it) is kept, so renewing never shortens a claim. Fenced like
    /// every transition: it also tells the caller its lease still holds.
    fn renew<'a>(&'a self, lease: &'a Lease, until: EpochMs) -> Pending<'a, ()>;

    /// Adds fragments listed in the chunk's range after it was planned (GetClip will
    /// return them); fragments held by any chunk are skipped. Returns the chunk's
    /// fragments now.
    fn attach_fragments<'a>(
        &'a self,
        lease: &'a Lease,
        fragments: &'a [Fragment],
    ) -> Pending<'a, Vec<Fragment>>;

    /// The object is stored, whole: the chunk is done and the lease ends.
    fn mark_done<'a>(&'a self, lease: &'a Lease, archived: &'a Archived) -> Pending<'a, ()>;

    /// The attempt failed: the chunk waits until `failure.next_attempt_ms`. The upload id
    /// stays recorded, so the next claim aborts that upload if it is still open.
    fn mark_failed<'a>(&'a self, lease: &'a Lease, failure: &'a Failure) -> Pending<'a, ()>;

    /// KVS confirmed the chunk's media is gone.
    fn mark_expired<'a>(&'a self, lease: &'a Lease, reason: &'a str) -> Pending<'a, ()>;

    /// Gives the chunk back (shutdown, a restarted upload): planned again. The upload id
    /// stays recorded, so the next claim aborts that upload if it is still open.
    fn release<'a>(&'a self, lease: &'a Lease) -> Pending<'a, ()>;

    /// Replaces the chunk by `parts` (with their fragments) and, when some of its
    /// fragments are confirmed gone, an `expired` record of them (recorded first, with no
    /// object key). All or nothing: if any of them would overlap another chunk (a held
    /// fragment, or a clip range), nothing changes, the chunk stays held under `lease`,
    /// and the call fails with [`Error::LedgerInvariant`].
    fn split<'a>(
        &'a self,
        lease: &'a Lease,
        parts: &'a [(ChunkPlan, String)],
        expired: Option<(&'a ChunkPlan, &'a str)>,
    ) -> Pending<'a, ()>;

    /// Turns the chunk into another kind (GetClip cannot package it: Matroska), planned.
    /// Never into a clip ([`Error::LedgerInvariant`]): clip ranges are added by inserts
    /// alone, which queue on their stream.
    fn convert<'a>(
        &'a self,
        lease: &'a Lease,
        kind: ChunkKind,
        object_key: &'a str,
    ) -> Pending<'a, ()>;

    /// Makes the failed chunks reaching into `[from, to]` claimable at once; returns how
    /// many.
    fn requeue_failed<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Pending<'a, u64>;

    /// Plans a done or failed chunk again (verify found its object missing or wrong).
    fn requeue_chunk(&self, id: i64) -> Pending<'_, bool>;

    /// Upload ids recorded by in-flight chunks: the sweep never touches them.
    fn live_upload_ids(&self) -> Pending<'_, Vec<String>>;

    /// Done chunks reaching into `[from, to]`, by start.
    fn done_in<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Pending<'a, Vec<Chunk>>;

    /// Every object key the ledger knows under a stream (any state), for verify.
    fn object_keys<'a>(&'a self, stream: &'a str) -> Pending<'a, Vec<String>>;

    /// One chunk by id; `None` if there is no such row.
    fn chunk(&self, id: i64) -> Pending<'_, Option<Chunk>>;

    /// Per-stream totals for `status`, every stream the ledger knows.
    fn status(&self) -> Pending<'_, Vec<StreamStatus>>;

    /// Start of the oldest chunk of the stream not archived yet (nor expired).
    fn oldest_unarchived<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
    ) -> Pending<'a, Option<EpochMs>>;

    /// End of the newest archived chunk of the stream (the daemon's lag metric).
    fn archived_through<'a>(&'a self, stream: &'a str) -> Pending<'a, Option<EpochMs>>;

    /// Chunk counts by state for one stream, for the metrics.
    fn counts<'a>(&'a self, stream: &'a str) -> Pending<'a, Vec<(ChunkState, i64)>>;

    /// What the daemon recorded for the stream (`stream_progress`); defaults if nothing
    /// yet.
    fn progress<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
    ) -> Pending<'a, StreamProgress>;

    /// Stores what the daemon learned in a pass; `None` keeps the stored value.
    fn update_progress<'a>(
        &'a self,
        stream: &'a str,
        source: TimestampSource,
        update: &'a StreamProgress,
    ) -> Pending<'a, ()>;

    /// Closes the database's connections; the ledger is not used after.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens the ledger `database_url` names: `sqlite:` or `postgres:`/`postgresql:`.
pub async fn open(database_url: &str, identity: Identity) -> Result<std::sync::Arc<dyn Ledger>> {
    if crate::config::is_postgres(database_url) {
        Ok(std::sync::Arc::new(
            postgres::PgLedger::open(database_url, identity).await?,
        ))
    } else {
        Ok(std::sync::Arc::new(
            sqlite::SqliteLedger::open(database_url, identity).await?,
        ))
    }
}

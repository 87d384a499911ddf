//! kvs-archiver: keeps every second of Kinesis Video Streams media as playable MP4 files
//! in S3 (or a directory), exactly once, surviving crashes.
//!
//! # Layout and data flow
//! - [`config`]: typed configuration (defaults → TOML → `KVS_ARCHIVER_*` environment),
//!   validated before anything starts.
//! - [`domain`]: fragments, planned chunks, object keys; pure.
//! - [`plan`]: the planner; sorted fragments in, chunks within GetClip's caps out; pure.
//! - [`source::kvs`]: the KVS adapter (DescribeStream, GetDataEndpoint, ListFragments,
//!   GetClip); the only module that knows the KVS SDK.
//! - [`sink`]: S3 ([`sink::s3`], multipart, checksummed) or a directory ([`sink::dir`]).
//! - [`ledger`]: the ledger of chunks, their states and fragments behind one trait;
//!   [`ledger::sqlite`] is the only module with SQL.
//! - [`mp4`]: reads a clip's header to tell whether GetClip cut it short; reads and
//!   writes video tracks sample by sample for [`export`], which joins archived objects
//!   into one MP4 of any range.
//! - [`worker`]: the policy: [`worker::planning`] plans a range into the ledger (late
//!   fragments included), [`worker::transfer`] moves one claimed chunk to the sink.
//! - [`error`]: the error type, which classifies itself ([`error::Retryability`]);
//!   [`retry`]: the backoff policy. Imports run retry → metrics → error, one way.
//! - [`quota`]: token buckets that pace each stream under KVS's quotas.
//! - [`daemon`]: `run`; [`schedule`] turns cron firings into queued passes; [`shutdown`]:
//!   the two-stage stop; [`metrics`]: Prometheus metrics and their listener.
//! - [`find`], [`export`], [`rebuild`]: reading the archive back: the object at an
//!   instant, one MP4 of a range, the ledger again from the destination's metadata.
//! - [`web`]: `serve`, the read-only page of the archive and its timeline.
//! - [`app`]: the composition root behind each command; [`demo`]: the bundled example;
//!   [`telemetry`]: logs and progress; [`crashpoint`]: named kill points for crash tests.
//!
//! `backfill`: ListFragments (window by window) → [`plan::Packer`] → ledger rows
//! (`planned`) → per chunk: claim → GetClip → header check → sink upload → `done`.
//! `run`: cron firing → queue → one pass per stream (plan the newly closed clip windows,
//! then the same per-chunk path) → at-risk check → metrics.

pub mod app;
pub mod archive;
pub mod config;
pub mod crashpoint;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod domain;
pub mod error;
pub mod export;
pub mod find;
pub mod iam;
pub mod ledger;
pub mod metrics;
pub mod mp4;
pub mod plan;
pub mod quota;
pub mod rebuild;
pub mod retry;
pub mod schedule;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod verify;
pub mod web;
pub mod worker;

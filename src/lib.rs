//! kvs-archiver: keeps every second of Kinesis Video Streams media as playable MP4 files
//! in S3 (or a directory), exactly once, surviving crashes.
//!
//! # Layout and data flow
//! The archiving core:
//! - [`config`]: typed configuration (defaults → TOML → `KVS_ARCHIVER_*` environment),
//!   validated before anything starts; secrets in URLs redacted wherever printed.
//! - [`domain`]: fragments, planned chunks, object keys and what may be one; pure.
//! - [`plan`]: the planner; sorted fragments in, chunks within GetClip's caps out; pure.
//! - [`source::kvs`]: the KVS adapter (DescribeStream, GetDataEndpoint, ListFragments,
//!   GetClip, GetMediaForFragmentList), which checks every answer; the only module that
//!   knows the KVS SDK.
//! - [`destination`]: where objects go, S3 ([`destination::s3`], multipart, checksummed)
//!   or a directory ([`destination::dir`]: only under its root, never through a link);
//!   [`storage`]: what S3 keeps with each object (storage class, encryption, tags,
//!   Object Lock), as the configuration sets it per destination and per stream.
//! - [`ledger`]: the record of chunks, their states and fragments behind one trait; its
//!   SQL is written once in `ledger::sql` for SQLite and PostgreSQL, with a small seam
//!   per database (`ledger::sqlite`, `ledger::postgres`) and the migrations runner.
//! - [`worker`]: the policy: [`worker::planning`] plans a range into the ledger (late
//!   fragments included), [`worker::transfer`] moves one claimed chunk to the destination.
//! - [`mp4`]: reads a clip's header to tell whether GetClip cut it short; reads and
//!   writes video tracks sample by sample, within limits taken from the ledger.
//! - [`error`]: the error type, which classifies itself ([`error::Retryability`]);
//!   [`retry`]: the backoff policy; [`quota`]: token buckets that pace each stream.
//! - [`daemon`]: `run`, its schedules, passes and next firings; [`schedule`] turns cron
//!   firings into queued passes; [`shutdown`]: the two-stage stop; [`metrics`]:
//!   Prometheus metrics and their listener.
//!
//! The readers of the archive, through one read-only [`archive::ArchiveView`] (the
//! ledger, the destination, the settings), never the worker:
//! - [`find`]: the object at an instant; [`export`]: one MP4 of a range;
//!   [`verify`]: the archive proven three ways (its `repair` step archives);
//!   [`rebuild`]: the ledger again from the destination's metadata; [`web`]: `serve`,
//!   the read-only page ([`web::timeline`]), its media and its access rules;
//!   [`status`]: `status` drawn for a terminal; [`restore`]: objects in archive
//!   storage classes, which of them need a restore, and `restore` itself.
//!
//! The commands that compose them: [`cli`], the command line's grammar; [`app`], the
//! composition root, builds the pieces
//! each command needs and hands them over, with the one HTTPS client [`https`] builds
//! for every SDK client (and the CAs it trusts); [`iam`]: the policy the configuration
//! needs;
//! [`demo`]: the bundled example; [`telemetry`]: logs and progress; [`crashpoint`]:
//! named kill points for crash tests.
//!
//! `backfill`: ListFragments (window by window) → [`plan::Packer`] → ledger rows
//! (`planned`) → per chunk: claim → GetClip → header check → destination upload → `done`.
//! `run`: cron firing → queue → one pass per stream (plan the newly closed clip windows,
//! then the same per-chunk path) → at-risk check → metrics. Imports point one way
//! (`tests/architecture.rs` checks it).

// Every public item says what it is for; CI's `-D warnings` keeps it so.
#![warn(missing_docs)]

pub mod app;
pub mod archive;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod destination;
pub mod domain;
pub mod error;
pub mod export;
pub mod find;
pub mod https;
pub mod iam;
pub mod ledger;
pub mod metrics;
pub mod mp4;
pub mod plan;
pub mod playback;
pub mod quota;
pub mod rebuild;
pub mod restore;
pub mod retry;
pub mod schedule;
pub mod shutdown;
pub mod source;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod verify;
pub mod web;
pub mod worker;

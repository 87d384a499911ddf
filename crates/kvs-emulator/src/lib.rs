//! A Kinesis Video Streams emulator on loopback, for testing KVS consumers.
//!
//! # Layout
//! - [`server`]: the HTTP server and the [`Emulator`] handle; checks SigV4 ([`sigv4`]) on
//!   every API request, dispatches to [`api`], and records each request in the log ([`log`]).
//! - [`state`]: what every request shares (streams, request log, clock, fault dice); the
//!   server builds it and the API reads it, so imports run server → api → state.
//! - [`api`]: DescribeStream, GetDataEndpoint, ListStreams, CreateStream (control plane) and
//!   ListFragments, GetClip (archived media), with the semantics of the AWS references.
//! - [`stream`]: a stream's fragments, materialized as the clock passes them, retention,
//!   and the quota buckets; [`config`] says what streams and faults exist.
//! - [`media`] and [`mp4`]: real H.264 media (a committed GOP plus a per-fragment SEI marker
//!   and filler) packaged as a progressive MP4; [`body`] streams it, with body faults.
//! - [`error`]: errors in AWS's wire form, which the official SDKs map to typed variants.
//!
//! Data flow of a GetClip: request → SigV4 check → stream lookup → range checks →
//! selection of fragments by timestamp → caps (200 fragments, 10^8 bytes) → `moov` built
//! from the fragments' layouts → `mdat` streamed from shared byte slices.

// Every public item says what it is for (house rule); the tools keep it so.
#![warn(missing_docs)]

pub mod api;
pub mod body;
pub mod config;
pub mod error;
pub mod log;
pub mod media;
pub mod mkv;
pub mod mp4;
pub mod server;
pub mod sigv4;
pub mod state;
pub mod stream;

pub use config::{EmulatorConfig, Faults, GapSpec, Mode, StreamSpec};
pub use error::ApiError;
pub use log::RequestRecord;
pub use media::scan_markers;
pub use server::{Emulator, FragmentInfo};

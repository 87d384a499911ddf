//! kvs-archiver as a user runs it: the binary, against the project's KVS emulator and a
//! real S3 server (s3s-fs in-process; moto when .ci/run starts it), on 127.0.0.1 only.
//! One module per feature; the helpers they share are in tests/support/.

#[path = "../support/mod.rs"]
mod support;

mod backfill;
mod buckets;
mod command_line;
mod crashes;
mod daemon;
mod faults;
mod fleet;
mod footage;
mod iam;
mod late_media;
mod playback;
mod tls;
mod verify_rebuild;

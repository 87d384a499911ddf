//! The helpers of the integration tests in tests/archiver/. command.rs, local_s3.rs and
//! postgres.rs are also included by path from the other test binaries and the benches.

pub mod checks;
pub mod command;
pub mod local_s3;
pub mod postgres;
pub mod process;
pub mod serve;
pub mod sts;
pub mod tls;
pub mod world;

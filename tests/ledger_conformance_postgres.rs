//! The ledger conformance suite (tests/ledger_conformance.rs) on PostgreSQL: a fresh
//! database per test on the server `.ci/postgres` starts (`KVS_TEST_POSTGRES_URL`).
//! nextest's default filter skips this binary unless asked for (.config/nextest.toml);
//! run without the server, each test fails naming the command that starts it.

#[path = "ledger_conformance.rs"]
mod on_postgresql;

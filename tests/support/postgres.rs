//! A fresh PostgreSQL database per test, on the server `.ci/postgres` starts on
//! 127.0.0.1 (`KVS_TEST_POSTGRES_URL`). A test that needs it fails without it, naming the
//! command that starts it; nextest's default filter skips such tests unless asked for
//! (.config/nextest.toml). The benches measure SQLite alone without it.

use sqlx::Connection;

/// The admin URL, or `None` (with a note) when no server was given outside CI: for the
/// benches, which measure SQLite alone then.
#[allow(dead_code)]
pub fn server_url() -> Option<String> {
    match std::env::var("KVS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "KVS_TEST_POSTGRES_URL is not set: CI must start PostgreSQL (eval \"$(.ci/postgres)\")"
        ),
        _ => {
            eprintln!(
                "note: PostgreSQL is not configured (KVS_TEST_POSTGRES_URL); only SQLite is tested. Run: eval \"$(.ci/postgres)\""
            );
            None
        }
    }
}

/// Creates an empty database on the server at `admin_url`; returns its URL.
pub async fn fresh_database_on(admin_url: &str) -> String {
    let name = format!("kvs_test_{}_{:08x}", std::process::id(), fastrand::u32(..));
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {admin_url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let _ = admin.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    format!("{base}/{name}")
}

/// What a test that needs PostgreSQL says when it has none: the command that starts it.
pub const NEEDED: &str = "needs PostgreSQL, started by: eval \"$(.ci/postgres)\"";

/// A fresh database on the test server; fails the test, naming the command that starts
/// one, when no server was given.
#[allow(dead_code)]
pub async fn fresh_database() -> String {
    match std::env::var("KVS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => fresh_database_on(&url).await,
        _ => panic!("{NEEDED} (KVS_TEST_POSTGRES_URL is not set)"),
    }
}

/// Waits until `count` sessions on the database at `url` wait for a lock: the concurrent
/// statements a test started have reached the point where they block.
#[allow(dead_code)]
pub async fn wait_for_lock_waits(url: &str, count: i64) {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
        if waiting >= count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{count} sessions never waited for a lock on {url}");
}

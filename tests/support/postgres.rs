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

/// Waits until a session on the database at `url` waits for a lock of type `lock`
/// (`pg_locks.locktype`: `transactionid`, `advisory`, ...): a statement a test started
/// concurrently has reached the point where it blocks.
#[allow(dead_code)]
pub async fn wait_for_lock_wait(url: &str, lock: &str) {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE NOT l.granted AND l.locktype = $1 AND a.datname = current_database()",
        )
        .bind(lock)
        .fetch_one(&mut conn)
        .await
        .expect("pg_locks");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no session waited for a {lock} lock on {url} within 30 s");
}

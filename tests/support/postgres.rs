//! A fresh PostgreSQL database per test, on the server `.ci/postgres` starts on
//! 127.0.0.1 (`KVS_TEST_POSTGRES_URL`). Without it, tests say so and run on SQLite alone;
//! under CI=true a missing server fails the test instead.

use sqlx::Connection;

/// The admin URL, or `None` (with a note) when no server was given outside CI.
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

/// A fresh database on the test server, or `None` outside CI without one.
#[allow(dead_code)]
pub async fn fresh_database() -> Option<String> {
    match server_url() {
        Some(url) => Some(fresh_database_on(&url).await),
        None => None,
    }
}

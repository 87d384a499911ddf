//! The ledgers' schema migrations, compiled into the binary.
//!
//! `sqlx::migrate!` would do the same, but it is a proc macro: it needs sqlx's `macros`
//! feature, which builds sqlx and SQLite's C library a second time for the build host.
//! The files are embedded with `include_str!` instead and handed to sqlx's own
//! `Migrator`, which checksums them exactly as the macro does, so ledgers migrated by
//! earlier builds keep matching.

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;

/// One migration file: `<version>_<description>.sql` and its text.
type File = (&'static str, &'static str);

/// `migrations/<dir>/<name>` as a [`File`].
macro_rules! embed {
    ($dir:literal, $name:literal) => {
        (
            $name,
            include_str!(concat!("../../migrations/", $dir, "/", $name)),
        )
    };
}

const SQLITE: &[File] = &[
    embed!("sqlite", "0001_ledger.sql"),
    embed!("sqlite", "0002_stream_progress.sql"),
    embed!("sqlite", "0003_fenced_ledger.sql"),
    embed!("sqlite", "0004_instances_and_stream_leases.sql"),
    embed!("sqlite", "0005_claimable_index.sql"),
];

const POSTGRES: &[File] = &[embed!("postgres", "0001_ledger.sql")];

/// The files of one backend, resolved the way sqlx resolves a migrations directory.
#[derive(Debug)]
struct Embedded(&'static [File]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            let mut migrations = self
                .0
                .iter()
                .map(|(name, sql)| migration(name, sql))
                .collect::<Result<Vec<_>, BoxDynError>>()?;
            migrations.sort_by_key(|m| m.version);
            Ok(migrations)
        })
    }
}

fn migration(name: &str, sql: &'static str) -> Result<Migration, BoxDynError> {
    let stem = name.trim_end_matches(".sql");
    let (version, description) = stem
        .split_once('_')
        .ok_or_else(|| format!("migration {name} is not named <version>_<description>.sql"))?;
    let version: i64 = version.parse()?;
    Ok(Migration::new(
        version,
        Cow::Owned(description.replace('_', " ")),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        sql.trim_start().starts_with("-- no-transaction"),
    ))
}

pub async fn sqlite() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Embedded(SQLITE)).await
}

pub async fn postgres() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Embedded(POSTGRES)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in migrations/ is embedded, so a new one cannot be forgotten here.
    #[test]
    fn every_migration_file_is_embedded() {
        for (dir, files) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let mut on_disk: Vec<String> = std::fs::read_dir(&path)
                .expect("migrations directory")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            on_disk.sort();
            let embedded: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
            assert_eq!(on_disk, embedded, "migrations/{dir}");
            for (name, sql) in files.iter() {
                let text = std::fs::read_to_string(path.join(name)).expect("read migration");
                assert_eq!(&text, sql, "{name} differs from the embedded copy");
            }
        }
    }

    /// The same versions, descriptions and checksums as sqlx's directory resolver gives,
    /// so databases migrated by builds that used `migrate!` still validate.
    #[tokio::test]
    async fn embedded_migrations_match_the_directory_resolver() {
        for (dir, ours) in [
            ("sqlite", sqlite().await.expect("sqlite")),
            ("postgres", postgres().await.expect("postgres")),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let theirs = Migrator::new(path).await.expect("directory migrator");
            let a: Vec<_> = ours
                .iter()
                .map(|m| (m.version, m.description.clone(), m.checksum.clone()))
                .collect();
            let b: Vec<_> = theirs
                .iter()
                .map(|m| (m.version, m.description.clone(), m.checksum.clone()))
                .collect();
            assert_eq!(a, b, "{dir}");
        }
    }
}

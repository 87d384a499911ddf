//! The library's error type. Each variant knows whether a retry can help
//! ([`Error::retryability`]); messages read "operation target: cause" and say what the
//! operator can do.

use crate::config::ConfigError;
use crate::retry::Retryability;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kvs {op} {stream}: {message}")]
    Kvs {
        op: &'static str,
        stream: String,
        /// The AWS error code, when the service answered.
        code: Option<String>,
        message: String,
        retry: Retryability,
    },
    #[error("{op} {target}: {message}")]
    Sink {
        op: &'static str,
        target: String,
        message: String,
        retry: Retryability,
    },
    /// GetClip returned fewer fragments than planned (a cap bound): split and refetch.
    #[error("clip {key}: truncated: plays {got_ms} ms of the {planned_ms} ms planned")]
    Truncated {
        key: String,
        got_ms: u64,
        planned_ms: u64,
    },
    #[error("clip {key}: {message}")]
    Clip {
        key: String,
        message: String,
        retry: Retryability,
    },
    /// The fragments were deleted by KVS (retention) before they were archived.
    #[error("clip {key}: expired: {message}")]
    Expired { key: String, message: String },
    #[error("ledger {op}: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("interrupted: stopping at a signal")]
    Interrupted,
}

impl Error {
    pub fn retryability(&self) -> Retryability {
        match self {
            Error::Kvs { retry, .. } | Error::Sink { retry, .. } | Error::Clip { retry, .. } => {
                *retry
            }
            Error::Truncated { .. } => Retryability::Transient,
            Error::Store { source, .. } => match source {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => Retryability::Transient,
                sqlx::Error::Database(db) if db.message().contains("locked") => {
                    Retryability::Transient
                }
                _ => Retryability::Permanent,
            },
            Error::Expired { .. }
            | Error::Migrate(_)
            | Error::Config(_)
            | Error::Usage(_)
            | Error::Interrupted => Retryability::Permanent,
        }
    }

    pub fn store(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Store { op, source }
    }

    /// A short label stored with a failed chunk.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kvs { .. } => "kvs",
            Error::Sink { .. } => "sink",
            Error::Truncated { .. } => "truncated",
            Error::Clip { .. } => "clip",
            Error::Expired { .. } => "expired",
            Error::Store { .. } | Error::Migrate(_) => "ledger",
            Error::Config(_) | Error::Usage(_) => "config",
            Error::Interrupted => "interrupted",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The library's error type. Each variant knows whether a retry can help
//! ([`Error::retryability`]), decided from its type, status and error code, never from
//! message text; messages read "operation target: cause" and say what the operator can do.

/// Whether repeating an operation can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retryability {
    /// Repeating at once cannot help: bad input, a missing permission, media KVS cannot
    /// package. A chunk that fails so is still tried again on a later pass (the operator
    /// may fix the cause), after a longer pause.
    Permanent,
    /// Network failure, 5xx, a body cut off, a timeout, expired credentials, clock skew:
    /// try again after a pause.
    Transient,
    /// A quota was hit (KVS `ClientLimitExceededException`, S3 `SlowDown`): back off
    /// longer. The AWS SDK does not retry KVS throttling by itself.
    Throttled,
    /// No answer at all: the connection was refused, the name did not resolve, the
    /// request could not be sent. Retried like [`Retryability::Transient`] mid-run (a
    /// network blip), but at a command's first request it almost always means a wrong
    /// endpoint or no network, so [`crate::retry::RetryPolicy::first_contact`] gives up
    /// after one more try.
    Unreachable,
}

impl Retryability {
    /// Whether trying again can ever help; how soon is the retry policy's business.
    pub fn can_retry(self) -> bool {
        !matches!(self, Retryability::Permanent)
    }
}

/// Everything that can go wrong in the library; [`Error::retryability`] tells the retry
/// loop what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVS call failed (control plane or media).
    #[error("kvs {op} {stream}: {message}")]
    Kvs {
        /// The API called (`GetClip`, `ListFragments`, ...).
        op: &'static str,
        /// The stream it was called for.
        stream: String,
        /// The AWS error code, when the service answered.
        code: Option<String>,
        /// The HTTP status, when the service answered.
        status: Option<u16>,
        /// What went wrong, in words the operator can act on.
        message: String,
        /// Decided from the error's type, status and code, never its message.
        retry: Retryability,
    },
    /// The destination (an S3 bucket or a directory) refused or failed an operation.
    #[error("{op} {target}: {message}")]
    Destination {
        /// The operation (`PutObject`, `UploadPart`, `rename`, ...).
        op: &'static str,
        /// The bucket and key, or the path.
        target: String,
        /// What went wrong, in words the operator can act on.
        message: String,
        /// Decided from the error's type, status and code, never its message.
        retry: Retryability,
    },
    /// The destination forgot a multipart upload (S3 `NoSuchUpload`): it was aborted by someone
    /// else or expired. The chunk's upload starts over; this is not a failure of the chunk.
    #[error(
        "{op} {target}: the multipart upload is gone (NoSuchUpload); starting the upload again"
    )]
    UploadLost {
        /// The operation that found the upload gone (`UploadPart`,
        /// `CompleteMultipartUpload`).
        op: &'static str,
        /// The bucket and key.
        target: String,
    },
    /// An object is already at the key with other bytes than this chunk's: writes are
    /// create-only, so it was not replaced. Someone else wrote there, or the key was
    /// reused; the operator decides (`verify` lists it).
    #[error("{target}: another object is already at this key ({found}); it was not replaced: move it away if it is not this archive's footage, then run again")]
    Occupied {
        /// The bucket and key, or the path.
        target: String,
        /// What is there, against what this chunk wrote.
        found: String,
    },
    /// Objects in an archive storage class (GLACIER, DEEP_ARCHIVE, or Intelligent-Tiering's
    /// archive tiers) must be restored before they can be read: nothing was read.
    #[error("{0}")]
    NeedsRestore(String),
    /// GetClip returned fewer fragments than planned (a cap bound): split and refetch.
    #[error("clip {key}: truncated: plays {got_ms} ms of the {planned_ms} ms planned")]
    Truncated {
        /// The chunk's object key.
        key: String,
        /// How long the returned clip plays.
        got_ms: u64,
        /// How long the chunk's fragments should play.
        planned_ms: u64,
    },
    /// A clip that cannot be read or archived as it came (a bad MP4, media KVS cannot
    /// package).
    #[error("clip {key}: {message}")]
    Clip {
        /// The chunk's object key.
        key: String,
        /// What is wrong with the clip.
        message: String,
        /// Whether another fetch may fare better.
        retry: Retryability,
    },
    /// The fragments were deleted by KVS (retention) before they were archived; recorded
    /// only when KVS itself confirms it.
    #[error("clip {key}: expired: {message}")]
    Expired {
        /// The chunk's object key.
        key: String,
        /// What KVS said.
        message: String,
    },
    /// This process no longer holds the chunk (its lease was taken over): it must stop
    /// working on it and never record an outcome.
    #[error("chunk {chunk}: lease lost (generation {generation} is no longer current): another process took the chunk over")]
    LeaseLost {
        /// The chunk's id.
        chunk: i64,
        /// The generation this process held, now superseded.
        generation: i64,
    },
    /// A ledger query failed.
    #[error("ledger {op}: {source}{}", unreachable_hint(source))]
    Ledger {
        /// The ledger operation (the trait method) that failed.
        op: &'static str,
        /// The database driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The ledger's database could not be opened at all.
    #[error("cannot reach the ledger at {url}: {source}; check ledger.database_url and that the database server is running and accepts this user")]
    LedgerUnreachable {
        /// The `ledger.database_url`, with its password redacted.
        url: String,
        /// The database driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The ledger's schema could not be brought up to date.
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The configuration is refused; see [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A ledger change that would break one of its rules (a split overlapping another
    /// chunk): refused, nothing changed.
    #[error("{0}")]
    LedgerInvariant(String),
    /// A daemon pass ran past `daemon.pass_timeout` and was stopped; the next pass
    /// continues where it stopped.
    #[error("pass over {stream} took longer than daemon.pass_timeout ({limit}): stopped; the next pass continues")]
    PassTimeout {
        /// The stream's label.
        stream: String,
        /// `daemon.pass_timeout`, written for a person (`5m`).
        limit: String,
    },
    /// Bad input or configuration found while running: the message says what to fix.
    #[error("{0}")]
    Usage(String),
    /// No AWS credentials could be loaded: bad configuration, found before any request.
    #[error("{0}")]
    Credentials(String),
    /// The credential source did not answer (a timeout, STS or the SSO portal down).
    #[error("{0}")]
    CredentialsUnavailable(String),
    /// A signal asked the process to stop before the work was done.
    #[error("interrupted: stopping at a signal")]
    Interrupted,
}

/// An error and its causes on one line, each said once ("dispatch failure: io error:
/// Connection refused (os error 111)"), never a debug dump: what reaches a person.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// Why the TLS verifier refused a server's certificate, when that is why a connection
/// failed: found by type anywhere in the causes, through the `io::Error`s that carry it.
pub fn rejected_certificate(
    error: &(dyn std::error::Error + 'static),
) -> Option<rustls::CertificateError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(rustls::Error::InvalidCertificate(why)) = e.downcast_ref::<rustls::Error>() {
            return Some(why.clone());
        }
        // An io::Error's `source` skips the error it wraps (hyper-rustls nests the rustls
        // error two io::Errors deep): step into the payload instead.
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(payload) => Some(payload as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// What to tell the operator about `endpoint`'s refused certificate, and whether waiting
/// can help: a certificate not yet valid, or expired, is often this machine's clock
/// (unsynchronised at boot), which heals; an unknown CA or another name does not.
pub fn certificate_advice(
    endpoint: &str,
    why: &rustls::CertificateError,
) -> (String, Retryability) {
    use rustls::CertificateError as E;
    match why {
        E::UnknownIssuer | E::BadSignature => (
            format!(
                "{endpoint} presented a TLS certificate from a CA this machine does not trust ({why:?}): name a PEM file holding that CA in aws.ca_bundle (or AWS_CA_BUNDLE)"
            ),
            Retryability::Permanent,
        ),
        E::Expired | E::ExpiredContext { .. } | E::NotValidYet | E::NotValidYetContext { .. } => (
            format!(
                "{endpoint} presented a TLS certificate that is not valid now ({why}): check this machine's clock (NTP); retried"
            ),
            Retryability::Transient,
        ),
        E::NotValidForName | E::NotValidForNameContext { .. } => (
            format!(
                "{endpoint} presented a TLS certificate for another name ({why}): check the endpoint URL; for a bucket name with dots, set aws.s3_force_path_style = true"
            ),
            Retryability::Permanent,
        ),
        other => (
            format!("{endpoint} presented a TLS certificate this machine refuses ({other})"),
            Retryability::Permanent,
        ),
    }
}

/// What to do when the ledger's database does not answer.
fn unreachable_hint(source: &sqlx::Error) -> &'static str {
    match source {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => {
            " (the ledger's database does not answer: check that it is running and reachable at ledger.database_url; work resumes by itself when it is back)"
        }
        _ => "",
    }
}

impl Error {
    /// What a retry can do about this error: the one question the retry loop asks.
    pub fn retryability(&self) -> Retryability {
        match self {
            Error::Kvs { retry, .. }
            | Error::Destination { retry, .. }
            | Error::Clip { retry, .. } => *retry,
            Error::Truncated { .. }
            | Error::UploadLost { .. }
            | Error::LedgerUnreachable { .. }
            | Error::PassTimeout { .. }
            | Error::CredentialsUnavailable(_) => Retryability::Transient,
            Error::Ledger { source, .. } => match source {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                    Retryability::Transient
                }
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes: another
                // process holds the file for longer than the busy timeout.
                sqlx::Error::Database(db) => {
                    let code = db.code().unwrap_or_default();
                    if db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .is_some()
                    {
                        // PostgreSQL: connection exceptions (08), a server shutting down or
                        // starting (57P), serialization failures and deadlocks (40), out
                        // of resources (53).
                        if ["08", "57P", "40", "53"]
                            .iter()
                            .any(|p| code.starts_with(p))
                        {
                            Retryability::Transient
                        } else {
                            Retryability::Permanent
                        }
                    } else {
                        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended
                        // codes: another process holds the file for longer than the busy
                        // timeout.
                        match code.parse::<i32>() {
                            Ok(code) if matches!(code & 0xff, 5 | 6) => Retryability::Transient,
                            _ => Retryability::Permanent,
                        }
                    }
                }
                _ => Retryability::Permanent,
            },
            Error::Expired { .. }
            | Error::Occupied { .. }
            | Error::NeedsRestore(_)
            | Error::LeaseLost { .. }
            | Error::Migrate(_)
            | Error::Config(_)
            | Error::Usage(_)
            | Error::LedgerInvariant(_)
            | Error::Credentials(_)
            | Error::Interrupted => Retryability::Permanent,
        }
    }

    /// Wraps a ledger query's failure, naming the operation.
    pub fn ledger(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Ledger { op, source }
    }

    /// A short, stable label of the failure's kind, stored with a failed chunk and used as
    /// a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kvs {
                retry: Retryability::Throttled,
                ..
            } => "kvs-throttled",
            Error::Kvs {
                status: Some(401 | 403),
                ..
            } => "kvs-denied",
            Error::Kvs { .. } => "kvs",
            Error::Destination {
                retry: Retryability::Throttled,
                ..
            } => "destination-throttled",
            Error::Destination { .. } => "destination",
            Error::UploadLost { .. } => "upload-lost",
            Error::Occupied { .. } => "occupied",
            Error::NeedsRestore(_) => "needs-restore",
            Error::Truncated { .. } => "truncated",
            Error::Clip { .. } => "clip",
            Error::Expired { .. } => "expired",
            Error::LeaseLost { .. } => "lease-lost",
            Error::Ledger { .. }
            | Error::Migrate(_)
            | Error::LedgerUnreachable { .. }
            | Error::LedgerInvariant(_) => "ledger",
            Error::PassTimeout { .. } => "pass-timeout",
            Error::Config(_) | Error::Usage(_) => "config",
            Error::Credentials(_) | Error::CredentialsUnavailable(_) => "credentials",
            Error::Interrupted => "interrupted",
        }
    }

    /// The service refused the caller: a missing permission or credentials it does not
    /// accept. The operator must fix the IAM policy or the credentials.
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            Error::Kvs { code: Some(code), .. } if matches!(
                code.as_str(),
                "NotAuthorizedException"
                    | "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException"
                    | "MissingAuthenticationTokenException"
            )
        )
    }

    /// GetClip found no media in a range we listed fragments for: KVS answers 404
    /// (`ResourceNotFoundException`), or 400 `InvalidArgumentException` for a range that
    /// is valid by construction (under 24 h, ending after it starts, in the past) and so
    /// can only be outside retention. Whether the media is gone is then confirmed by
    /// listing the range again.
    pub fn means_no_media(&self) -> bool {
        matches!(
            self,
            Error::Kvs { op: "GetClip" | "GetMediaForFragmentList", code: Some(code), .. }
                if code == "ResourceNotFoundException" || code == "InvalidArgumentException"
        )
    }

    /// GetClip refusals that concern the media of some fragments in the range, not the
    /// request: the codec private data changes inside it (a camera switched resolution), a
    /// fragment lacks it, a frame is bad, or the media type is not one GetClip packages.
    /// Splitting the range isolates the cause; a single fragment goes to Matroska.
    pub fn means_unpackageable(&self) -> bool {
        matches!(
            self,
            Error::Kvs { op: "GetClip", code: Some(code), .. } if matches!(
                code.as_str(),
                "InvalidCodecPrivateDataException"
                    | "MissingCodecPrivateDataException"
                    | "InvalidMediaFrameException"
                    | "UnsupportedStreamMediaTypeException"
            )
        )
    }
}

/// The library's result, with [`Error`] unless said otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration that cannot be used: what to fix, before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment could not be read as a configuration.
    #[error("config {path}: {message}")]
    Load {
        /// The file, or where the environment was read.
        path: String,
        /// What could not be read.
        message: String,
    },
    /// A value is refused: the field, and what to change.
    #[error("config: {field}: {message}")]
    Invalid {
        /// The key, as the file spells it (`streams[2].max_clip_duration`).
        field: String,
        /// What is wrong with the value, and what to change.
        message: String,
    },
    /// Neither a file nor the environment names a destination.
    #[error("no configuration: give --config FILE or set KVS_ARCHIVER_CONFIG (every key is in config/kvs-archiver.example.toml, or /usr/share/doc/kvs-archiver/ from the package){}", DEMO_HINT)]
    Missing,
}

/// The end of [`ConfigError::Missing`]: the demo, where this build has it (the Debian
/// package's has not).
const DEMO_HINT: &str = if cfg!(feature = "demo") {
    "; `kvs-archiver demo` runs without one"
} else {
    ""
};

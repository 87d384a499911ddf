//! The composition root: builds the clients, the ledger and the archiver from the
//! configuration, and runs each command. The only module that knows every concrete type.

use crate::config::{AwsConfig, Config, StreamConfig};
use crate::destination::s3::{S3Destination, S3Options};
use crate::destination::{dir::DirDestination, Destination};
use crate::domain::{rfc3339, EpochMs};
use crate::error::{Error, Result};
use crate::https::CaBundle;
use crate::ledger::{Identity, RangeSummary, Role};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::source::kvs::{KvsSource, Pacing};
use crate::telemetry::Progress;
use crate::worker::{Archiver, PlanSummary};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use std::sync::Arc;

/// The AWS configuration from the default credential chain (environment, profile,
/// instance role…). Retries are ours ([`crate::retry`]), so the SDK's are off.
pub async fn sdk_config(aws: &AwsConfig) -> Result<SdkConfig> {
    Ok(sdk_loader(aws)?.load().await)
}

/// The loader behind [`sdk_config`]. Fails only on an unusable CA bundle
/// ([`crate::https`]).
fn sdk_loader(aws: &AwsConfig) -> Result<aws_config::ConfigLoader> {
    let loader = aws_config::defaults(BehaviorVersion::latest());
    // The bundled emulator is a sandbox with its own keys: the user's stay unused.
    #[cfg(feature = "demo")]
    let loader = match aws.bundled_emulator {
        Some(_) => loader.credentials_provider(aws_credential_types::Credentials::new(
            kvs_emulator::config::DEFAULT_ACCESS_KEY_ID,
            kvs_emulator::config::DEFAULT_SECRET_ACCESS_KEY,
            None,
            None,
            "kvs-archiver-bundled-emulator",
        )),
        None => loader,
    };
    let anchors = match CaBundle::chosen(aws.ca_bundle.as_deref()) {
        Some(bundle) => Some(bundle.read()?),
        None => None,
    };
    let loader = loader.http_client(crate::https::client(anchors)?);
    Ok(loader
        .region(Region::new(aws.region.clone()))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(aws.connect_timeout)
                .read_timeout(aws.read_timeout)
                .build(),
        ))
}

/// With `aws.bundled_emulator`: starts the bundled KVS emulator from that file, with its
/// default keys, and points the configuration at it. The emulator serves until the
/// returned handle is dropped.
#[cfg(feature = "demo")]
pub async fn start_bundled_emulator(config: &mut Config) -> Result<Option<kvs_emulator::Emulator>> {
    let Some(path) = config.aws.bundled_emulator.clone() else {
        return Ok(None);
    };
    let mut emulator = kvs_emulator::EmulatorConfig::from_toml_file(&path).map_err(|e| {
        Error::Usage(format!(
            "aws.bundled_emulator: {e}; run `kvs-archiver demo` again to write it"
        ))
    })?;
    emulator.access_key_id = kvs_emulator::config::DEFAULT_ACCESS_KEY_ID.to_string();
    emulator.secret_access_key = kvs_emulator::config::DEFAULT_SECRET_ACCESS_KEY.to_string();
    let emulator = kvs_emulator::Emulator::start(emulator).await.map_err(|e| {
        Error::Usage(format!(
            "aws.bundled_emulator {}: cannot start the bundled KVS emulator: {e}",
            path.display()
        ))
    })?;
    config.aws.kinesis_video_endpoint_url = Some(emulator.base_url().to_string());
    Ok(Some(emulator))
}

/// Without the `demo` feature there is no emulator to start.
#[cfg(not(feature = "demo"))]
pub async fn start_bundled_emulator(config: &mut Config) -> Result<Option<()>> {
    match &config.aws.bundled_emulator {
        Some(path) => Err(Error::Usage(format!(
            "aws.bundled_emulator = {:?}: this build has no bundled KVS emulator; build with `--features demo` (on by default) or remove the key",
            path.display()
        ))),
        None => Ok(None),
    }
}

/// The retry policy `[archive]` sets.
pub fn retry_policy(config: &Config) -> RetryPolicy {
    RetryPolicy {
        max_attempts: config.archive.max_attempts,
        base_delay: config.archive.retry_base_delay,
        max_delay: config.archive.retry_max_delay,
    }
}

/// This process's identity in the ledger.
pub fn identity(config: &Config, role: Role) -> Result<Identity> {
    // A reader never claims: it needs no id of its own, nor write access to the state
    // directory.
    let instance = match (role, &config.ledger.instance_id) {
        (Role::Reader, Some(id)) => id.clone(),
        (Role::Reader, None) => "reader".to_string(),
        _ => config.ledger.resolve_instance_id()?,
    };
    Ok(Identity::new(&instance, role))
}

/// Loads the AWS credentials once, before any request: with none, every call would fail
/// after its retries with an error about the request, not the cause.
///
/// Returns the configuration to build the clients from: it hands them the credentials
/// just loaded, so a `credential_process` (an MFA prompt, say) or an SSO portal is asked
/// once, not once here and again by the clients.
pub async fn check_credentials(sdk: &SdkConfig) -> Result<SdkConfig> {
    use aws_credential_types::provider::{error::CredentialsError, ProvideCredentials};
    let Some(provider) = sdk.credentials_provider() else {
        return Err(Error::Credentials(
            "no AWS credential provider is configured".into(),
        ));
    };
    let profile = match std::env::var("AWS_PROFILE") {
        Ok(name) => format!("the profile {name:?}"),
        Err(_) => "the default profile".to_string(),
    };
    let loaded = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        provider.provide_credentials(),
    )
    .await;
    match loaded {
        Ok(Ok(credentials)) => Ok(preloaded(sdk, credentials, provider.clone())),
        Ok(Err(CredentialsError::CredentialsNotLoaded(_))) => Err(Error::Credentials(format!(
            "no AWS credentials: none in the environment (AWS_ACCESS_KEY_ID), {profile} (~/.aws/credentials, ~/.aws/config: keys, sso_session, credential_process, role_arn), web identity (AWS_WEB_IDENTITY_TOKEN_FILE), the ECS container or EC2 instance metadata; set one (for SSO: aws sso login --profile NAME, then AWS_PROFILE=NAME)"
        ))),
        // A source that answered no (a failing credential_process, an expired SSO
        // session): the operator must fix it.
        Ok(Err(e @ (CredentialsError::InvalidConfiguration(_) | CredentialsError::ProviderError(_)))) => {
            Err(Error::Credentials(format!(
                "the AWS credentials could not be loaded: {}; fix the source named there (an expired SSO session: aws sso login)",
                crate::error::chain(&e)
            )))
        }
        // A source that did not answer (STS, the SSO portal, instance metadata): it may
        // next time.
        Ok(Err(e)) => Err(Error::CredentialsUnavailable(format!(
            "loading the AWS credentials failed: {}; run again when the credential source answers",
            crate::error::chain(&e)
        ))),
        Err(_) => Err(Error::CredentialsUnavailable(
            "loading the AWS credentials took over 20 s (a credential_process, SSO portal or instance metadata endpoint that does not answer); check the credential source and run again".into(),
        )),
    }
}

/// `sdk` signing with `credentials` first, then with what `source` provides.
fn preloaded(
    sdk: &SdkConfig,
    credentials: aws_credential_types::Credentials,
    source: aws_credential_types::provider::SharedCredentialsProvider,
) -> SdkConfig {
    sdk.to_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(Preloaded {
                first: std::sync::Mutex::new(Some(credentials)),
                source,
            }),
        )
        .build()
}

/// The credentials [`check_credentials`] loaded, given out once; later (a refresh when
/// they expire) the source is asked again.
#[derive(Debug)]
struct Preloaded {
    first: std::sync::Mutex<Option<aws_credential_types::Credentials>>,
    source: aws_credential_types::provider::SharedCredentialsProvider,
}

impl aws_credential_types::provider::ProvideCredentials for Preloaded {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let first = self.first.lock().ok().and_then(|mut first| first.take());
        match first {
            Some(credentials) => {
                aws_credential_types::provider::future::ProvideCredentials::ready(Ok(credentials))
            }
            None => self.source.provide_credentials(),
        }
    }
}

/// Builds the archiver: opens (and migrates) the ledger, creates the clients, and
/// (unless `role` only reads) registers this process and starts its heartbeat.
pub async fn build(config: Config, sdk: &SdkConfig, role: Role) -> Result<Archiver> {
    // A reader of a directory destination calls no AWS API.
    let needs_aws = role != Role::Reader || config.destination.bucket.is_some();
    build_with(config, sdk, role, needs_aws).await
}

/// [`build`] for a reader that calls KVS (`plan`, `verify`, `rebuild-ledger`), whatever
/// the destination.
pub async fn build_reading_kvs(config: Config, sdk: &SdkConfig) -> Result<Archiver> {
    build_with(config, sdk, Role::Reader, true).await
}

async fn build_with(
    config: Config,
    sdk: &SdkConfig,
    role: Role,
    needs_aws: bool,
) -> Result<Archiver> {
    let checked;
    let sdk = if needs_aws {
        checked = check_credentials(sdk).await?;
        &checked
    } else {
        sdk
    };
    let policy = retry_policy(&config);
    // A pass of `run` has up to `max_clips_in_flight` clips in flight over all its
    // streams; a backfill or verify `concurrency`.
    let clips_in_flight = match role {
        Role::Daemon | Role::Once => config.daemon.max_clips_in_flight,
        Role::Backfill | Role::Verify | Role::Reader => config.archive.concurrency,
    };
    let ledger = crate::ledger::open(&config.ledger.database_url, identity(&config, role)?).await?;
    let pacing = Pacing {
        media_points_per_second: config.archive.media_points_per_second,
        metadata_points_per_second: config.archive.metadata_points_per_second,
        control_calls_per_second_per_stream: config.daemon.control_calls_per_second_per_stream,
        control_calls_per_second: config.daemon.control_calls_per_second,
    };
    let source = KvsSource::new(
        sdk,
        config.aws.kinesis_video_endpoint_url.as_deref(),
        pacing,
        policy,
    );
    let destination = match (&config.destination.bucket, &config.destination.directory) {
        (Some(bucket), _) => {
            let s3_sdk = s3_credentials(&config, sdk, needs_aws).await?;
            let mut s3 = aws_sdk_s3::config::Builder::from(&s3_sdk)
                .force_path_style(config.aws.s3_force_path_style)
                // Checksums are asked for explicitly (CRC32C); this keeps S3-compatible
                // stores that lack the newer default checksums working.
                .request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                )
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                );
            if let Some(url) = &config.aws.s3_endpoint_url {
                s3 = s3.endpoint_url(url);
            }
            Destination::S3(S3Destination::new(
                aws_sdk_s3::Client::from_conf(s3.build()),
                S3Options {
                    bucket: bucket.clone(),
                    endpoint_url: config.aws.s3_endpoint_url.clone(),
                    part_size: config.destination.part_size as usize,
                    sign_payload: config
                        .destination
                        .payload_signing
                        .signs(config.aws.s3_endpoint_url.as_deref()),
                    create_only: config.destination.create_only,
                    policy,
                    // One upload in eight overlaps sending and filling (one for a backfill's
                    // 4 clips and the daemon's 8): the S3 server, not a clip's own pause,
                    // bounds throughput once a few clips are in flight, and each overlap
                    // is a part buffer more at the peak.
                    overlapping_uploads: clips_in_flight.div_ceil(8),
                },
            ))
        }
        (None, Some(dir)) => {
            Destination::Dir(DirDestination::new(dir.clone(), &config.destination.prefix))
        }
        (None, None) => {
            return Err(Error::Usage(
                "destination: set bucket (S3) or directory (local files)".into(),
            ))
        }
    };
    let archiver = Archiver::new(
        Arc::new(source),
        Arc::new(destination),
        ledger,
        Arc::new(config),
        policy,
    );
    if role != Role::Reader {
        archiver.register().await?;
    }
    Ok(archiver)
}

/// The SDK configuration S3 requests are signed with: `sdk`'s, or with
/// `destination.role_arn` the role's, assumed through STS (`aws.sts_endpoint_url`, else
/// AWS's) with `sdk`'s credentials. KVS keeps `sdk`'s. The role is assumed here once, so a
/// trust policy that refuses it stops the command before any request.
async fn s3_credentials(config: &Config, sdk: &SdkConfig, needs_aws: bool) -> Result<SdkConfig> {
    let Some(role_arn) = &config.destination.role_arn else {
        return Ok(sdk.clone());
    };
    let sts_sdk = match &config.aws.sts_endpoint_url {
        Some(url) => sdk.to_builder().endpoint_url(url).build(),
        None => sdk.clone(),
    };
    let mut role = aws_config::sts::AssumeRoleProvider::builder(role_arn)
        .session_name(
            config
                .destination
                .session_name
                .clone()
                .unwrap_or_else(|| "kvs-archiver".to_string()),
        )
        .configure(&sts_sdk);
    if let Some(id) = &config.destination.external_id {
        role = role.external_id(id);
    }
    let provider =
        aws_credential_types::provider::SharedCredentialsProvider::new(role.build().await);
    if !needs_aws {
        return Ok(sdk.to_builder().credentials_provider(provider).build());
    }
    use aws_credential_types::provider::ProvideCredentials;
    let loaded = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        provider.provide_credentials(),
    )
    .await;
    match loaded {
        Ok(Ok(credentials)) => Ok(preloaded(sdk, credentials, provider)),
        // STS answered no: the trust policy, the external id or the ARN is wrong.
        Ok(Err(e)) if sts_refused(&e) => Err(Error::Credentials(format!(
            "destination.role_arn: STS refused to let these credentials assume {role_arn} for S3: {}; check the role's trust policy (it must allow sts:AssumeRole{}) and the ARN",
            crate::error::chain(&e),
            if config.destination.external_id.is_some() { " with this external_id" } else { "" }
        ))),
        Ok(Err(e)) => Err(Error::CredentialsUnavailable(format!(
            "destination.role_arn: assuming {role_arn} for S3 failed: {}; STS did not answer (aws.sts_endpoint_url, the network): run again when it does",
            crate::error::chain(&e)
        ))),
        Err(_) => Err(Error::CredentialsUnavailable(format!(
            "destination.role_arn: STS did not answer within 20 s while assuming {role_arn}; run again when it does"
        ))),
    }
}

/// Whether assuming the role failed because STS refused it (an answer, not an outage).
fn sts_refused(e: &aws_credential_types::provider::error::CredentialsError) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    use std::error::Error as _;
    type AssumeRoleFailure = aws_sdk_sts::error::SdkError<
        aws_sdk_sts::operation::assume_role::AssumeRoleError,
        aws_sdk_sts::config::http::HttpResponse,
    >;
    match e {
        CredentialsError::InvalidConfiguration(_) => true,
        // A 4xx answer that is not throttling: STS looked at the request and said no.
        _ => e
            .source()
            .and_then(|s| s.downcast_ref::<AssumeRoleFailure>())
            .is_some_and(|s| match s {
                aws_sdk_sts::error::SdkError::ServiceError(ctx) => {
                    use aws_sdk_sts::error::ProvideErrorMetadata;
                    let status = ctx.raw().status().as_u16();
                    let throttled = matches!(
                        ctx.err().code(),
                        Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded")
                    );
                    (400..500).contains(&status) && status != 429 && !throttled
                }
                _ => false,
            }),
    }
}

/// `find`: what holds instant `t` of a stream, and a URL (or path) that plays the object
/// holding it, valid for an hour.
pub async fn find(
    config: Config,
    label: &str,
    t: EpochMs,
) -> Result<(
    crate::find::Finding,
    Option<String>,
    Option<crate::destination::Readiness>,
)> {
    let stream = configured_stream(&config, label)?;
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build(config, &sdk, Role::Reader).await?;
    let finding = crate::find::find(
        archiver.ledger.as_ref(),
        &stream.label(),
        stream.timestamp_source,
        t,
    )
    .await;
    // An object in an archive class is looked at (HEAD) before a URL is offered.
    let (url, readiness) = match &finding {
        Ok(crate::find::Finding::Archived { object_key, .. }) => {
            let destination = &archiver.view().destination;
            let readiness = destination
                .head(object_key)
                .await
                .map(|h| h.map(|h| h.readiness()));
            let url = destination
                .playable_url(object_key, std::time::Duration::from_secs(3600))
                .await;
            (url.map(Some), readiness)
        }
        _ => (Ok(None), Ok(None)),
    };
    archiver.close().await;
    Ok((finding?, url?, readiness?))
}

/// `restore`: starts the restores of `label`'s archived objects over `[start, end]` that
/// are in an archive class, and follows them (see [`crate::restore`]).
pub async fn restore(
    config: Config,
    label: &str,
    (start, end): (EpochMs, EpochMs),
    tier: crate::destination::RestoreTier,
    days: i32,
    wait: Option<std::time::Duration>,
) -> Result<crate::restore::RestoreReport> {
    check_range(start, end)?;
    if !(1..=36_500).contains(&days) {
        return Err(Error::Usage(format!(
            "--days {days}: a restored copy is kept 1 to 36500 days"
        )));
    }
    let stream = configured_stream(&config, label)?;
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build(config, &sdk, Role::Reader).await?;
    let progress = Progress::new(label);
    let report = crate::restore::restore(
        &archiver.view(),
        &stream,
        (start, end),
        tier,
        days,
        wait,
        &progress,
    )
    .await;
    progress.finish();
    archiver.close().await;
    report
}

/// What `export` wrote: one MP4, or a bundle folder.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Exported {
    /// One stream, one file.
    File(crate::export::ExportReport),
    /// A folder of several streams' files, a manifest and their checksums.
    Bundle(crate::export::BundleReport),
}

impl Exported {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        match self {
            Exported::File(report) => report.describe(),
            Exported::Bundle(report) => report.describe(),
        }
    }
}

/// `export`: `spec`'s range of `streams` (every configured one when empty) from the
/// archive: one MP4 at `output` for one stream, unless `bundle`; a bundle folder at
/// `output` otherwise.
pub async fn export(
    config: Config,
    streams: &[String],
    spec: crate::playback::clip::ClipSpec,
    output: &std::path::Path,
    bundle: bool,
) -> Result<Exported> {
    check_range(spec.start, spec.end)?;
    let chosen: Vec<StreamConfig> = if streams.is_empty() {
        config.streams.clone()
    } else {
        streams
            .iter()
            .map(|label| configured_stream(&config, label))
            .collect::<Result<_>>()?
    };
    let mut seen = std::collections::HashSet::new();
    let chosen: Vec<StreamConfig> = chosen
        .into_iter()
        .filter(|s| seen.insert(s.label()))
        .collect();
    let bundle = bundle || chosen.len() != 1;
    if !bundle && output.is_dir() {
        return Err(Error::Usage(format!(
            "-o {}: is a directory; name the MP4 file to write",
            output.display()
        )));
    }
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build(config, &sdk, Role::Reader).await?;
    let policy = retry_policy(&archiver.config);
    let view = archiver.view();
    // Objects in an archive class are named with the restore they need, before anything
    // is read or written.
    for stream in &chosen {
        if let Err(e) = crate::restore::ensure_readable(&view, stream, spec.start, spec.end).await {
            archiver.close().await;
            return Err(e);
        }
    }
    let report = if bundle {
        let streams: Vec<(String, crate::domain::TimestampSource)> = chosen
            .iter()
            .map(|s| (s.label(), s.timestamp_source))
            .collect();
        crate::export::export_bundle(&view, &streams, spec, output, &policy)
            .await
            .map(Exported::Bundle)
    } else {
        let stream = &chosen[0];
        crate::export::export(
            &view,
            &stream.label(),
            stream.timestamp_source,
            spec,
            output,
            &policy,
        )
        .await
        .map(Exported::File)
    };
    archiver.close().await;
    report
}

/// `rebuild-ledger`: the ledger's chunks from the destination's objects (all configured
/// streams, or `only`).
pub async fn rebuild_ledger(
    config: Config,
    only: Option<&str>,
    merge: bool,
) -> Result<crate::rebuild::RebuildReport> {
    let streams = match only {
        Some(label) => vec![configured_stream(&config, label)?],
        None => config.streams.clone(),
    };
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build_reading_kvs(config, &sdk).await?;
    let report = crate::rebuild::rebuild(&archiver.view(), &archiver.source, &streams, merge).await;
    archiver.close().await;
    report
}

/// `serve`: the archive's web page on `listen` until a signal.
pub async fn serve(
    config: Config,
    listen: std::net::SocketAddr,
    token: Option<String>,
    shutdown: Shutdown,
) -> Result<()> {
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build(config, &sdk, Role::Reader).await?;
    let retry = retry_policy(&archiver.config);
    crate::web::serve(archiver.view(), listen, token, retry, shutdown).await
}

/// Parses a command-line timestamp (RFC 3339) for `flag`.
pub fn parse_time(text: &str, flag: &str) -> Result<EpochMs> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            Error::Usage(format!(
                "{flag} {text:?}: not an RFC 3339 timestamp ({e}); write it like 2026-11-20T00:00:00Z"
            ))
        })
}

/// The configured stream named `label`, or an error listing the configured ones.
pub fn configured_stream(config: &Config, label: &str) -> Result<StreamConfig> {
    config.stream(label).cloned().ok_or_else(|| {
        let known: Vec<String> = config.streams.iter().map(StreamConfig::label).collect();
        Error::Usage(format!(
            "stream {label:?} is not in the configuration (configured: {}); add it under [[streams]]",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        ))
    })
}

fn check_range(start: EpochMs, end: EpochMs) -> Result<()> {
    if end <= start {
        return Err(Error::Usage(format!(
            "--end {} is not after --start {}: give a range that ends after it starts",
            rfc3339(end),
            rfc3339(start)
        )));
    }
    let now = chrono::Utc::now().timestamp_millis();
    if start > now {
        return Err(Error::Usage(format!(
            "--start {} is in the future: nothing can be archived yet",
            rfc3339(start)
        )));
    }
    Ok(())
}

/// `backfill`: archives `[start, end]` of one stream.
pub async fn backfill(
    config: Config,
    label: &str,
    start: EpochMs,
    end: EpochMs,
    shutdown: &Shutdown,
) -> Result<RangeSummary> {
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build(config, &sdk, Role::Backfill).await?;
    let summary = backfill_with(&archiver, label, start, end, shutdown).await;
    archiver.close().await;
    summary
}

/// [`backfill`] on a built archiver (the demo's too).
pub async fn backfill_with(
    archiver: &Archiver,
    label: &str,
    start: EpochMs,
    end: EpochMs,
    shutdown: &Shutdown,
) -> Result<RangeSummary> {
    check_range(start, end)?;
    let stream = configured_stream(&archiver.config, label)?;
    let described = archiver.source.describe_first(&stream).await?;
    if described.retention_hours == 0 {
        return Err(Error::Usage(format!(
            "stream {label} keeps no media (DataRetentionInHours is 0): nothing to archive"
        )));
    }
    archiver
        .destination
        .check(
            &archiver.config.destination.prefix,
            true,
            &archiver.config.required_of_bucket(),
        )
        .await?;
    // SERVER_TIMESTAMP ranges may not end in the future.
    let end = end.min(chrono::Utc::now().timestamp_millis() - 1);
    // One process works a stream at a time: KVS's per-stream quota is shared.
    archiver.hold_stream(&stream, true, shutdown).await?;
    let progress = Progress::new(label);
    let result = archiver
        .archive_range(&stream, start, end, &progress, shutdown)
        .await;
    progress.finish();
    archiver.release_stream(&stream).await;
    result
}

/// `plan`: what `backfill` would fetch, without fetching.
pub async fn plan(
    config: Config,
    label: &str,
    start: EpochMs,
    end: EpochMs,
) -> Result<PlanSummary> {
    check_range(start, end)?;
    let stream = configured_stream(&config, label)?;
    let sdk = sdk_config(&config.aws).await?;
    let archiver = build_reading_kvs(config, &sdk).await?;
    let planned = async {
        archiver.source.describe_first(&stream).await?;
        let end = end.min(chrono::Utc::now().timestamp_millis() - 1);
        archiver
            .plan_range(&stream, start, end, true, &Progress::hidden())
            .await
    }
    .await;
    archiver.close().await;
    planned
}

/// `status`: what the ledger says of every stream, and the processes working on it.
pub async fn status(
    config: &Config,
) -> Result<(
    Vec<crate::ledger::StreamStatus>,
    Vec<crate::ledger::InstanceView>,
)> {
    let ledger =
        crate::ledger::open(&config.ledger.database_url, identity(config, Role::Reader)?).await?;
    let streams = ledger.status().await;
    let instances = ledger.instances().await;
    ledger.close().await;
    Ok((streams?, instances?))
}

/// `verify`: the stream's archive over `[start, end]` (default: KVS's retention window);
/// `repair` archives again what is missing or damaged.
pub async fn verify(
    config: Config,
    label: &str,
    (start, end): (Option<&str>, Option<&str>),
    repair: bool,
    shutdown: &Shutdown,
) -> Result<crate::verify::VerifyReport> {
    let sdk = sdk_config(&config.aws).await?;
    let archiver = if repair {
        build(config, &sdk, Role::Verify).await?
    } else {
        build_reading_kvs(config, &sdk).await?
    };
    let report = verify_with(&archiver, label, start, end, repair, shutdown).await;
    archiver.close().await;
    report
}

async fn verify_with(
    archiver: &Archiver,
    label: &str,
    start: Option<&str>,
    end: Option<&str>,
    repair: bool,
    shutdown: &Shutdown,
) -> Result<crate::verify::VerifyReport> {
    let stream = configured_stream(&archiver.config, label)?;
    let described = archiver.source.describe_first(&stream).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let start = match start {
        Some(t) => parse_time(t, "--start")?,
        None => now - i64::from(described.retention_hours) * 3_600_000,
    };
    let end = match end {
        Some(t) => parse_time(t, "--end")?,
        None => now - 1,
    }
    .min(now - 1);
    check_range(start, end)?;
    // A plain verify writes nothing: the settings' writes are not tried.
    let required = if repair {
        archiver.config.required_of_bucket()
    } else {
        crate::storage::Required::default()
    };
    archiver
        .destination
        .check(&archiver.config.destination.prefix, true, &required)
        .await?;
    let view = archiver.view();
    if !repair {
        return crate::verify::verify(&view, &archiver.source, &stream, start, end).await;
    }
    // A repair archives: it takes the stream like a backfill.
    archiver.hold_stream(&stream, true, shutdown).await?;
    let report = async {
        let mut report =
            crate::verify::verify(&view, &archiver.source, &stream, start, end).await?;
        crate::verify::repair(archiver, &stream, (start, end), &mut report, shutdown).await?;
        Ok(report)
    }
    .await;
    archiver.release_stream(&stream).await;
    report
}

/// Human summary of a run, for the terminal.
pub fn describe_run(summary: &RangeSummary) -> String {
    let mut text = format!(
        "{} chunks: {} archived, {} failed, {} expired, {} pending",
        summary.chunks,
        summary.done,
        summary.failed.len(),
        summary.expired.len(),
        summary.pending
    );
    if summary.in_flight > 0 {
        text.push_str(&format!(", {} in flight", summary.in_flight));
    }
    for chunk in summary.failed.iter().chain(&summary.expired).take(20) {
        text.push_str(&format!(
            "\n  {} [{} .. {}] {}: {}",
            chunk.state,
            rfc3339(chunk.plan.start_ms),
            rfc3339(chunk.plan.end_ms),
            chunk.object_key,
            chunk.last_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    text
}

/// `run`: the daemon (`once`: one pass over every stream, then exit), built and handed
/// to [`crate::daemon::run`]. Returns whether every pass archived everything it had to.
pub async fn run_daemon(
    config: Config,
    sdk: &SdkConfig,
    once: bool,
    shutdown: Shutdown,
) -> Result<bool> {
    if config.streams.is_empty() {
        return Err(Error::Usage(
            "run: no [[streams]] configured: nothing to archive".into(),
        ));
    }
    let role = if once { Role::Once } else { Role::Daemon };
    if let Some(addr) = config.daemon.metrics_listen {
        crate::metrics::serve(addr, &identity(&config, role)?.instance).await?;
    }
    let zone = config.daemon.zone()?;
    let max_in_flight = config.daemon.max_clips_in_flight;
    let mut archiver = build(config, sdk, role).await?;
    archiver.in_flight = Some(Arc::new(tokio::sync::Semaphore::new(max_in_flight)));
    crate::daemon::run(Arc::new(archiver), once, zone, shutdown).await
}

//! The composition root: builds the clients, the ledger and the archiver from the
//! configuration, and runs each command. The only module that knows every concrete type.

use crate::config::{AwsConfig, Config, StreamConfig};
use crate::domain::{rfc3339, EpochMs};
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;
use crate::sink::{dir::DirSink, s3::S3Sink, Sink};
use crate::source::kvs::{KvsSource, Pacing};
use crate::store::Ledger;
use crate::telemetry::Progress;
use crate::worker::{Archiver, PlanSummary, RunSummary};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use std::sync::Arc;
use crate::shutdown::Shutdown;

/// The AWS configuration from the default credential chain (environment, profile,
/// instance role…). Retries are ours ([`crate::retry`]), so the SDK's are off.
pub async fn sdk_config(aws: &AwsConfig) -> SdkConfig {
    sdk_loader(aws).load().await
}

/// The loader behind [`sdk_config`], for callers that supply their own credentials.
pub fn sdk_loader(aws: &AwsConfig) -> aws_config::ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(aws.region.clone()))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(aws.connect_timeout)
                .read_timeout(aws.read_timeout)
                .build(),
        )
}

pub fn retry_policy(config: &Config) -> RetryPolicy {
    RetryPolicy {
        max_attempts: config.archive.max_attempts,
        base_delay: config.archive.retry_base_delay,
        max_delay: config.archive.retry_max_delay,
    }
}

/// Builds the archiver: opens (and migrates) the ledger, creates the clients.
pub async fn build(config: Config, sdk: &SdkConfig) -> Result<Archiver> {
    let policy = retry_policy(&config);
    let ledger = Ledger::open(&config.state.database_url).await?;
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
    let sink = match (&config.destination.bucket, &config.destination.directory) {
        (Some(bucket), _) => {
            let mut s3 = aws_sdk_s3::config::Builder::from(sdk)
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
            Sink::S3(S3Sink::new(
                aws_sdk_s3::Client::from_conf(s3.build()),
                bucket.clone(),
                config.destination.part_size as usize,
                policy,
            ))
        }
        (None, Some(dir)) => Sink::Dir(DirSink::new(dir.clone())),
        (None, None) => {
            return Err(Error::Usage(
                "destination: set bucket (S3) or directory (local files)".into(),
            ))
        }
    };
    Ok(Archiver {
        source: Arc::new(source),
        sink: Arc::new(sink),
        ledger,
        config: Arc::new(config),
        policy,
        in_flight: None,
    })
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
    archiver: &Archiver,
    label: &str,
    start: EpochMs,
    end: EpochMs,
    shutdown: &Shutdown,
) -> Result<RunSummary> {
    check_range(start, end)?;
    let stream = configured_stream(&archiver.config, label)?;
    let described = archiver.source.describe(&stream).await?;
    if described.retention_hours == 0 {
        return Err(Error::Usage(format!(
            "stream {label} keeps no media (DataRetentionInHours is 0): nothing to archive"
        )));
    }
    archiver.sink.check().await?;
    // SERVER_TIMESTAMP ranges may not end in the future.
    let end = end.min(chrono::Utc::now().timestamp_millis() - 1);
    let progress = Progress::new(label);
    let result = archiver
        .archive_range(&stream, start, end, &progress, shutdown)
        .await;
    progress.finish();
    result
}

/// `plan`: what `backfill` would fetch, without fetching.
pub async fn plan(
    archiver: &Archiver,
    label: &str,
    start: EpochMs,
    end: EpochMs,
) -> Result<PlanSummary> {
    check_range(start, end)?;
    let stream = configured_stream(&archiver.config, label)?;
    archiver.source.describe(&stream).await?;
    let end = end.min(chrono::Utc::now().timestamp_millis() - 1);
    archiver
        .plan_range(&stream, start, end, true, &Progress::hidden())
        .await
}

/// Human summary of a run, for the terminal.
pub fn describe_run(summary: &RunSummary) -> String {
    let mut text = format!(
        "{} chunks: {} archived, {} failed, {} expired, {} pending",
        summary.chunks,
        summary.done,
        summary.failed.len(),
        summary.expired.len(),
        summary.pending
    );
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

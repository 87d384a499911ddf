//! GetClip serving speed on loopback, through the official SDK client.
//!
//! `cargo bench -p kvs-emulator --bench get_clip_serving`
//! Prints GiB/s for 100 MB clips (50 fragments of 2 MB), pulled one after another.

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesisvideoarchivedmedia as am;
use aws_sdk_kinesisvideoarchivedmedia::primitives::DateTime;
use aws_sdk_kinesisvideoarchivedmedia::types::{
    ClipFragmentSelector, ClipFragmentSelectorType, ClipTimestampRange,
};
use chrono::{Duration, Utc};
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::time::Instant;

const CLIPS: usize = 20;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let end = Utc::now() - Duration::seconds(60);
    let mut spec = StreamSpec::historical("bench", end - Duration::seconds(200), end);
    spec.fragment_durations_ms = vec![4000];
    spec.fragment_size = 2_000_000;
    spec.faults.throttling = false;
    let emu = Emulator::start(EmulatorConfig {
        streams: vec![spec],
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts");
    let frags = emu.fragments("bench");
    let conf = am::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            DEFAULT_ACCESS_KEY_ID,
            DEFAULT_SECRET_ACCESS_KEY,
            None,
            None,
            "bench",
        ))
        .endpoint_url(emu.base_url())
        .build();
    let client = am::Client::from_conf(conf);
    let selector = ClipFragmentSelector::builder()
        .fragment_selector_type(ClipFragmentSelectorType::ServerTimestamp)
        .timestamp_range(
            ClipTimestampRange::builder()
                .start_timestamp(DateTime::from_millis(frags[0].server_ms))
                .end_timestamp(DateTime::from_millis(frags[frags.len() - 1].server_ms))
                .build()
                .expect("range"),
        )
        .build()
        .expect("selector");
    let started = Instant::now();
    let mut bytes = 0u64;
    for _ in 0..CLIPS {
        let mut out = client
            .get_clip()
            .stream_name("bench")
            .clip_fragment_selector(selector.clone())
            .send()
            .await
            .expect("GetClip");
        while let Some(chunk) = out.payload.try_next().await.expect("body") {
            bytes += chunk.len() as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "get_clip_serving: {CLIPS} clips, {:.1} MB each, {:.2} GiB in {secs:.2} s = {:.2} GiB/s (server and client on one runtime thread)",
        bytes as f64 / CLIPS as f64 / 1e6,
        bytes as f64 / (1u64 << 30) as f64,
        bytes as f64 / (1u64 << 30) as f64 / secs
    );
}

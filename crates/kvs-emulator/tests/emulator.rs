//! The emulator driven by the official AWS SDK clients, as the daemon drives it.

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia as am;
use aws_sdk_kinesisvideoarchivedmedia::error::ProvideErrorMetadata;
use aws_sdk_kinesisvideoarchivedmedia::primitives::DateTime;
use aws_sdk_kinesisvideoarchivedmedia::types::{
    ClipFragmentSelector, ClipFragmentSelectorType, ClipTimestampRange, FragmentSelector,
    FragmentSelectorType, TimestampRange,
};
use chrono::{Duration as ChronoDuration, Utc};
use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use kvs_emulator::{scan_markers, Emulator, EmulatorConfig, StreamSpec};
use std::collections::HashSet;
use std::process::Command;

fn credentials(secret: &str, key: &str) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(key, secret, None, None, "kvs-emulator-tests")
}

fn control_client(emu: &Emulator) -> aws_sdk_kinesisvideo::Client {
    let conf = aws_sdk_kinesisvideo::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials(
            DEFAULT_SECRET_ACCESS_KEY,
            DEFAULT_ACCESS_KEY_ID,
        ))
        .endpoint_url(emu.base_url())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_kinesisvideo::Client::from_conf(conf)
}

fn media_client_with(emu: &Emulator, key: &str, secret: &str) -> am::Client {
    let conf = am::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials(secret, key))
        .endpoint_url(emu.base_url())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    am::Client::from_conf(conf)
}

fn media_client(emu: &Emulator) -> am::Client {
    media_client_with(emu, DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY)
}

async fn emulator(streams: Vec<StreamSpec>) -> Emulator {
    let config = EmulatorConfig {
        streams,
        ..EmulatorConfig::default()
    };
    Emulator::start(config)
        .await
        .expect("emulator starts on loopback")
}

/// A historical stream of `count` fragments of `duration_ms`, ending a minute ago.
fn historical(name: &str, count: i64, duration_ms: u32) -> StreamSpec {
    let end = Utc::now() - ChronoDuration::seconds(60);
    let start = end - ChronoDuration::milliseconds(count * i64::from(duration_ms));
    let mut spec = StreamSpec::historical(name, start, end);
    spec.fragment_durations_ms = vec![duration_ms];
    spec
}

/// Epoch seconds arrive as JSON numbers, so 0.567 s parses as 0.566999...: round, as any
/// KVS client must.
fn epoch_ms(t: &DateTime) -> i64 {
    t.secs() * 1000 + (i64::from(t.subsec_nanos()) + 500_000) / 1_000_000
}

fn ms(t: i64) -> DateTime {
    DateTime::from_millis(t)
}

fn server_range(start_ms: i64, end_ms: i64) -> FragmentSelector {
    FragmentSelector::builder()
        .fragment_selector_type(FragmentSelectorType::ServerTimestamp)
        .timestamp_range(
            TimestampRange::builder()
                .start_timestamp(ms(start_ms))
                .end_timestamp(ms(end_ms))
                .build()
                .expect("both timestamps set"),
        )
        .build()
        .expect("selector complete")
}

fn clip_range(kind: ClipFragmentSelectorType, start_ms: i64, end_ms: i64) -> ClipFragmentSelector {
    ClipFragmentSelector::builder()
        .fragment_selector_type(kind)
        .timestamp_range(
            ClipTimestampRange::builder()
                .start_timestamp(ms(start_ms))
                .end_timestamp(ms(end_ms))
                .build()
                .expect("both timestamps set"),
        )
        .build()
        .expect("selector complete")
}

async fn list_all(
    client: &am::Client,
    stream: &str,
    start: i64,
    end: i64,
    page: i32,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut request = client
            .list_fragments()
            .stream_name(stream)
            .max_results(page as i64);
        request = match &token {
            Some(t) => request.next_token(t),
            None => request.fragment_selector(server_range(start, end)),
        };
        let out = request.send().await.expect("ListFragments succeeds");
        pages.push(
            out.fragments()
                .iter()
                .filter_map(|f| f.fragment_number().map(str::to_string))
                .collect(),
        );
        match out.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => return pages,
        }
    }
}

async fn get_clip_bytes(client: &am::Client, stream: &str, start: i64, end: i64) -> Vec<u8> {
    let out = client
        .get_clip()
        .stream_name(stream)
        .clip_fragment_selector(clip_range(
            ClipFragmentSelectorType::ServerTimestamp,
            start,
            end,
        ))
        .send()
        .await
        .expect("GetClip succeeds");
    assert_eq!(out.content_type(), Some("video/mp4"));
    out.payload
        .collect()
        .await
        .expect("body arrives whole")
        .into_bytes()
        .to_vec()
}

/// GetClip's refusal of a range, as the SDK reports it.
async fn clip_error(
    client: &am::Client,
    stream: &str,
    kind: ClipFragmentSelectorType,
    start: i64,
    end: i64,
) -> am::operation::get_clip::GetClipError {
    client
        .get_clip()
        .stream_name(stream)
        .clip_fragment_selector(clip_range(kind, start, end))
        .send()
        .await
        .map(|_| ())
        .expect_err("GetClip refuses the range")
        .into_service_error()
}

/// ffmpeg/ffprobe are needed for playback checks: missing tools fail in CI, skip locally.
fn ffmpeg_available() -> bool {
    let found = Command::new("ffprobe").arg("-version").output().is_ok()
        && Command::new("ffmpeg").arg("-version").output().is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "ffmpeg/ffprobe not found: CI must install them (.ci/run does: apt-get install -y ffmpeg)"
        );
        eprintln!("SKIPPED: ffmpeg/ffprobe not installed (apt-get install -y ffmpeg)");
    }
    found
}

fn ffprobe(path: &std::path::Path, entries: &str, extra: &[&str]) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error"])
        .args(extra)
        .args([
            "-select_streams",
            "v:0",
            "-show_entries",
            entries,
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_end_matches(',')
        .to_string()
}

#[tokio::test]
async fn control_plane_describes_streams_and_returns_its_own_endpoint() {
    let emu = emulator(vec![historical("cam-a", 10, 2000)]).await;
    let cp = control_client(&emu);
    let info = cp
        .describe_stream()
        .stream_name("cam-a")
        .send()
        .await
        .expect("described");
    let info = info.stream_info().expect("stream info");
    assert_eq!(info.data_retention_in_hours(), Some(24));
    assert_eq!(info.media_type(), Some("video/h264"));
    let arn = info.stream_arn().expect("arn").to_string();
    assert!(arn.starts_with("arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam-a/"));
    let by_arn = cp
        .describe_stream()
        .stream_arn(&arn)
        .send()
        .await
        .expect("described by arn");
    assert_eq!(
        by_arn.stream_info().and_then(|i| i.stream_name()),
        Some("cam-a")
    );

    for api in [ApiName::GetClip, ApiName::ListFragments] {
        let ep = cp
            .get_data_endpoint()
            .stream_name("cam-a")
            .api_name(api)
            .send()
            .await
            .expect("endpoint");
        assert_eq!(ep.data_endpoint(), Some(emu.base_url()));
    }

    let missing = cp
        .describe_stream()
        .stream_name("nope")
        .send()
        .await
        .unwrap_err();
    assert!(missing
        .into_service_error()
        .is_resource_not_found_exception());
    let missing = cp
        .get_data_endpoint()
        .stream_name("nope")
        .api_name(ApiName::GetClip)
        .send()
        .await
        .unwrap_err();
    assert!(missing
        .into_service_error()
        .is_resource_not_found_exception());
    let bad_api = cp
        .get_data_endpoint()
        .stream_name("cam-a")
        .api_name(ApiName::from("GET_EVERYTHING"))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(bad_api.is_invalid_argument_exception(), "{bad_api:?}");
    let neither = cp
        .describe_stream()
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(neither.is_invalid_argument_exception(), "{neither:?}");

    let created = cp
        .create_stream()
        .stream_name("cam-new")
        .data_retention_in_hours(2)
        .media_type("video/h264")
        .send()
        .await
        .expect("created");
    assert!(created.stream_arn().is_some());
    let dup = cp
        .create_stream()
        .stream_name("cam-new")
        .send()
        .await
        .unwrap_err();
    assert!(dup.into_service_error().is_resource_in_use_exception());
    let listed = cp.list_streams().send().await.expect("listed");
    let names: Vec<_> = listed
        .stream_info_list()
        .iter()
        .filter_map(|s| s.stream_name())
        .collect();
    assert_eq!(names, ["cam-a", "cam-new"]);
}

#[tokio::test]
async fn control_plane_calls_are_throttled_at_5_tps_per_stream() {
    let emu = emulator(vec![
        historical("described", 10, 2000),
        historical("dialled", 10, 2000),
    ])
    .await;
    let cp = control_client(&emu);
    let mut throttled = 0;
    for _ in 0..8 {
        if let Err(e) = cp.describe_stream().stream_name("described").send().await {
            assert!(e.into_service_error().is_client_limit_exceeded_exception());
            throttled += 1;
        }
    }
    assert!(
        throttled >= 2,
        "8 calls at once exceed 5 TPS, throttled {throttled}"
    );

    // GetDataEndpoint shares the control-plane quota of 5 TPS per stream.
    let mut throttled = 0;
    for _ in 0..8 {
        if let Err(e) = cp
            .get_data_endpoint()
            .stream_name("dialled")
            .api_name(ApiName::ListFragments)
            .send()
            .await
        {
            assert!(e.into_service_error().is_client_limit_exceeded_exception());
            throttled += 1;
        }
    }
    assert!(throttled >= 2, "throttled {throttled} of 8");
}

#[tokio::test]
async fn selection_includes_fragments_starting_inside_the_range_inclusive() {
    // Fragments start at 0, 2, 4 and 6 s; a range of 1-4 s selects those at 2 and 4 s.
    let emu = emulator(vec![historical("cam", 4, 2000)]).await;
    let t0 = emu.fragments("cam")[0].server_ms;
    let client = media_client(&emu);
    let out = client
        .list_fragments()
        .stream_name("cam")
        .fragment_selector(server_range(t0 + 1000, t0 + 4000))
        .send()
        .await
        .expect("listed");
    let mut starts: Vec<i64> = out
        .fragments()
        .iter()
        .filter_map(|f| f.server_timestamp().map(|t| epoch_ms(t) - t0))
        .collect();
    starts.sort();
    assert_eq!(starts, [2000, 4000]);
    let f = &out.fragments()[0];
    assert_eq!(f.fragment_number().map(str::len), Some(47));
    assert_eq!(f.fragment_length_in_milliseconds(), 2000);
    assert!(f.fragment_size_in_bytes() > 0);

    let clip = get_clip_bytes(&client, "cam", t0 + 1000, t0 + 4000).await;
    let all = emu.fragments("cam");
    assert_eq!(
        scan_markers(&clip),
        [all[1].number.clone(), all[2].number.clone()]
    );
}

#[tokio::test]
async fn list_fragments_pages_2500_fragments_unordered_without_loss() {
    let emu = emulator(vec![historical("cam", 2500, 1000)]).await;
    let truth: Vec<String> = emu.fragments("cam").into_iter().map(|f| f.number).collect();
    assert_eq!(truth.len(), 2500);
    let client = media_client(&emu);
    let pages = list_all(&client, "cam", 0, Utc::now().timestamp_millis(), 1000).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [1000, 1000, 500]
    );
    let all: Vec<&String> = pages.iter().flatten().collect();
    let unique: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(unique.len(), 2500, "no fragment listed twice");
    assert_eq!(unique, truth.iter().collect::<HashSet<_>>());
    let mut sorted = pages[0].clone();
    sorted.sort();
    assert_ne!(pages[0], sorted, "pages are in no specific order");
}

#[tokio::test]
async fn pages_of_a_growing_live_stream_list_each_fragment_once_and_miss_none() {
    let emu = emulator(Vec::new()).await;
    // The clock stops before the stream exists, so the test alone decides when fragments
    // arrive: 30 s of 1 s fragments now, one more for every second the clock moves.
    let first_page_at = emu.freeze_clock();
    let mut spec = StreamSpec::live("growing");
    spec.backlog = std::time::Duration::from_secs(30);
    spec.fragment_durations_ms = vec![1000];
    emu.add_stream(spec).expect("stream added");
    let client = media_client(&emu);
    // An end an hour ahead keeps every fragment that arrives during the listing in range,
    // as the archiver's window does when it reaches the live edge.
    let (start, end) = (0, first_page_at + 3_600_000);

    let single = list_all(&client, "growing", start, end, 1000).await;
    assert_eq!(single.len(), 1, "one page holds the whole listing");
    let expected: HashSet<String> = single.into_iter().flatten().collect();
    assert_eq!(expected.len(), 30);

    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let request = client
            .list_fragments()
            .stream_name("growing")
            .max_results(4);
        let request = match &token {
            Some(t) => request.next_token(t),
            None => request.fragment_selector(server_range(start, end)),
        };
        let out = request.send().await.expect("ListFragments succeeds");
        pages.push(
            out.fragments()
                .iter()
                .filter_map(|f| f.fragment_number().map(str::to_string))
                .collect(),
        );
        let Some(next) = out.next_token() else { break };
        token = Some(next.to_string());
        // Three fragments arrive, all inside the listing's range, before the next page.
        emu.advance_clock(std::time::Duration::from_secs(3));
    }

    let listed: Vec<String> = pages.iter().flatten().cloned().collect();
    let unique: HashSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "no fragment listed twice");
    assert_eq!(
        unique, expected,
        "exactly the set of the first page's moment"
    );
    assert_eq!(pages.len(), 8, "30 fragments, 4 a page");
    let mut sorted = listed.clone();
    sorted.sort();
    assert_ne!(listed, sorted, "pages are in no specific order");
    let grown = emu.fragments("growing").len();
    assert_eq!(grown, 30 + 7 * 3, "the stream grew between the pages");
    let later = list_all(&client, "growing", start, end, 1000).await;
    assert_eq!(
        later.concat().len(),
        grown,
        "a new listing sees what arrived"
    );
}

#[tokio::test]
async fn list_fragments_refuses_bad_arguments_like_aws() {
    let mut short = historical("short", 10, 2000);
    short.data_retention_hours = 1;
    let emu = emulator(vec![historical("cam", 10, 2000), short]).await;
    let client = media_client(&emu);
    let now = Utc::now().timestamp_millis();

    let err = client
        .list_fragments()
        .stream_name("nope")
        .fragment_selector(server_range(0, now))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_resource_not_found_exception(), "{err:?}");

    for max in [0, 1001] {
        let err = client
            .list_fragments()
            .stream_name("cam")
            .max_results(max)
            .fragment_selector(server_range(0, now))
            .send()
            .await
            .unwrap_err()
            .into_service_error();
        assert!(
            err.is_invalid_argument_exception(),
            "MaxResults {max}: {err:?}"
        );
    }

    let old_end = now - 2 * 3_600_000;
    let err = client
        .list_fragments()
        .stream_name("short")
        .fragment_selector(server_range(old_end - 1000, old_end))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_invalid_argument_exception(), "{err:?}");
    assert_eq!(
        err.message(),
        Some(
            format!("End timestamp {old_end} is outside of the stream retention period.").as_str()
        )
    );

    let err = client
        .list_fragments()
        .stream_name("cam")
        .next_token("bm90LWEtdG9rZW4=")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_invalid_argument_exception(), "{err:?}");

    // Metadata points: MaxResults is the cost; at 1 point/s a second listing is throttled.
    emu.update_faults("cam", |f| f.quota_scale = 0.0001);
    let first = client
        .list_fragments()
        .stream_name("cam")
        .max_results(1000)
        .fragment_selector(server_range(0, now))
        .send()
        .await;
    assert!(first.is_ok(), "a full bucket admits one request");
    let err = client
        .list_fragments()
        .stream_name("cam")
        .max_results(1000)
        .fragment_selector(server_range(0, now))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_client_limit_exceeded_exception(), "{err:?}");
}

#[tokio::test]
async fn get_clip_refuses_bad_ranges_and_unservable_streams_like_aws() {
    let mut no_retention = historical("no-retention", 10, 2000);
    no_retention.data_retention_hours = 0;
    let mut mkv_audio = historical("audio-only", 10, 2000);
    mkv_audio.media_type = "audio/aac".to_string();
    let mut codec_change = historical("codec-change", 10, 2000);
    codec_change.codec_changes_at = vec![5];
    let emu = emulator(vec![
        historical("cam", 10, 2000),
        no_retention,
        mkv_audio,
        codec_change,
    ])
    .await;
    let client = media_client(&emu);
    let frags = emu.fragments("cam");
    let t0 = frags[0].server_ms;
    let now = Utc::now().timestamp_millis();
    let get = |stream, kind, start, end| clip_error(&client, stream, kind, start, end);
    let server = ClipFragmentSelectorType::ServerTimestamp;
    let producer = ClipFragmentSelectorType::ProducerTimestamp;

    assert!(get("cam", server.clone(), t0 + 4000, t0 + 4000)
        .await
        .is_invalid_argument_exception());
    assert!(get("cam", server.clone(), t0 + 4000, t0)
        .await
        .is_invalid_argument_exception());
    assert!(get("cam", producer.clone(), t0, t0 + 24 * 3_600_000 + 1)
        .await
        .is_invalid_argument_exception());
    assert!(get("cam", server.clone(), t0, now + 60_000)
        .await
        .is_invalid_argument_exception());
    let empty = get("cam", server.clone(), t0 - 60_000, t0 - 1).await;
    assert!(empty.is_resource_not_found_exception());
    assert_eq!(
        empty.message(),
        Some("No fragments found in the stream for the clip request.")
    );
    let missing = get("nope", server.clone(), t0, t0 + 1000).await;
    assert!(missing.is_resource_not_found_exception());
    // Past retention: server timestamps get an argument error, producer timestamps a 404.
    let old = now - 30 * 3_600_000;
    assert!(get("cam", server.clone(), old - 1000, old)
        .await
        .is_invalid_argument_exception());
    assert!(get("cam", producer.clone(), old - 1000, old)
        .await
        .is_resource_not_found_exception());
    assert!(get("no-retention", server.clone(), t0, t0 + 4000)
        .await
        .is_no_data_retention_exception());
    assert!(get("audio-only", server.clone(), t0, t0 + 4000)
        .await
        .is_unsupported_stream_media_type_exception());
    let change = emu.fragments("codec-change");
    let err = get(
        "codec-change",
        server.clone(),
        change[3].server_ms,
        change[7].server_ms,
    )
    .await;
    assert!(err.is_invalid_codec_private_data_exception(), "{err:?}");
    // Either side of the change on its own is fine.
    let before = get_clip_bytes(
        &client,
        "codec-change",
        change[0].server_ms,
        change[4].server_ms,
    )
    .await;
    assert_eq!(scan_markers(&before).len(), 5);

    emu.update_faults("cam", |f| f.internal_failures_next = 1);
    let err = get("cam", server.clone(), t0, t0 + 4000).await;
    assert_eq!(err.code(), Some("InternalFailure"));
    assert!(
        !get_clip_bytes(&client, "cam", t0, t0 + 4000)
            .await
            .is_empty(),
        "served after the failure"
    );

    // Fragment-media points: 500/s; at 5/s a 10-fragment clip passes once, then throttles.
    emu.update_faults("cam", |f| f.quota_scale = 0.01);
    let _ = get_clip_bytes(&client, "cam", t0, now - 1).await;
    let err = get("cam", server.clone(), t0, now - 1).await;
    assert!(err.is_client_limit_exceeded_exception(), "{err:?}");

    let refused: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "GetClip" && r.status != 200)
        .collect();
    assert!(refused.iter().all(|r| r.error.is_some()));
}

#[tokio::test]
async fn get_clip_silently_stops_at_200_fragments() {
    let emu = emulator(vec![historical("cam", 250, 1000)]).await;
    let frags = emu.fragments("cam");
    let client = media_client(&emu);
    let clip = get_clip_bytes(&client, "cam", frags[0].server_ms, frags[249].server_ms).await;
    let markers = scan_markers(&clip);
    let expected: Vec<String> = frags[..200].iter().map(|f| f.number.clone()).collect();
    assert_eq!(markers, expected, "the first 200 fragments, in order");
    let log = emu.requests();
    let last = log.last().expect("logged");
    assert_eq!(
        (last.fragments, last.fragments_selected, last.truncated),
        (200, 250, true)
    );
}

#[tokio::test]
async fn get_clip_silently_stops_at_100_mb() {
    let mut spec = historical("hd", 60, 4000);
    spec.fragment_size = 2_000_000;
    let emu = emulator(vec![spec]).await;
    let frags = emu.fragments("hd");
    let client = media_client(&emu);
    let clip = get_clip_bytes(&client, "hd", frags[0].server_ms, frags[59].server_ms).await;
    assert!(
        clip.len() <= 100_000_000 + 64 * 1024,
        "clip is {} bytes",
        clip.len()
    );
    let markers = scan_markers(&clip);
    assert_eq!(markers.len(), 50, "50 x 2 MB fit in 10^8 bytes");
    assert_eq!(markers[49], frags[49].number);
    let last = emu.requests().pop().expect("logged");
    assert!(last.truncated);
}

#[tokio::test]
async fn lowered_caps_truncate_sooner() {
    let emu = emulator(vec![historical("cam", 30, 2000)]).await;
    emu.update_faults("cam", |f| f.max_clip_fragments = 7);
    let frags = emu.fragments("cam");
    let client = media_client(&emu);
    let clip = get_clip_bytes(&client, "cam", frags[0].server_ms, frags[29].server_ms).await;
    assert_eq!(scan_markers(&clip).len(), 7);
    emu.update_faults("cam", |f| {
        f.max_clip_fragments = 200;
        f.max_clip_bytes = frags[0].media_bytes * 3;
    });
    let clip = get_clip_bytes(&client, "cam", frags[0].server_ms, frags[29].server_ms).await;
    assert_eq!(scan_markers(&clip).len(), 3);
}

#[tokio::test]
async fn body_faults_cut_or_slow_the_clip() {
    let emu = emulator(vec![historical("cam", 20, 2000)]).await;
    let frags = emu.fragments("cam");
    let client = media_client(&emu);
    emu.update_faults("cam", |f| {
        f.resets_next = 1;
        f.reset_after_bytes = 10_000;
    });
    let out = client
        .get_clip()
        .stream_name("cam")
        .clip_fragment_selector(clip_range(
            ClipFragmentSelectorType::ServerTimestamp,
            frags[0].server_ms,
            frags[19].server_ms,
        ))
        .send()
        .await
        .expect("headers arrive");
    assert!(
        out.payload.collect().await.is_err(),
        "a reset body is an error, not a short clip"
    );
    assert!(emu.requests().last().expect("logged").reset);

    emu.update_faults("cam", |f| {
        f.first_byte_delay_ms = 300;
        f.bandwidth_bytes_per_sec = Some(200_000);
    });
    let started = std::time::Instant::now();
    let clip = get_clip_bytes(&client, "cam", frags[0].server_ms, frags[4].server_ms).await;
    let floor = 0.3 + clip.len() as f64 / 200_000.0 * 0.8;
    assert!(
        started.elapsed().as_secs_f64() >= floor,
        "delay and bandwidth cap apply"
    );
}

#[tokio::test]
async fn requests_without_a_valid_signature_are_refused() {
    let emu = emulator(vec![historical("cam", 10, 2000)]).await;
    let now = Utc::now().timestamp_millis();
    let wrong_secret = media_client_with(&emu, DEFAULT_ACCESS_KEY_ID, "not-the-secret");
    let err = wrong_secret
        .list_fragments()
        .stream_name("cam")
        .fragment_selector(server_range(0, now))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(403));
    assert_eq!(
        err.into_service_error().code(),
        Some("InvalidSignatureException")
    );

    let unknown_key = media_client_with(&emu, "AKIDSOMEONEELSE", DEFAULT_SECRET_ACCESS_KEY);
    let err = unknown_key
        .get_clip()
        .stream_name("cam")
        .clip_fragment_selector(clip_range(
            ClipFragmentSelectorType::ServerTimestamp,
            0,
            now - 1,
        ))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(err.code(), Some("UnrecognizedClientException"));

    // Unsigned: a plain HTTP request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(emu.addr())
        .await
        .expect("connects");
    let body = r#"{"StreamName":"cam"}"#;
    let request = format!(
        "POST /describeStream HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        emu.addr(),
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
    assert!(response
        .to_lowercase()
        .contains("x-amzn-errortype: missingauthenticationtokenexception"));
    assert!(emu
        .requests()
        .iter()
        .all(|r| r.status == 403 || r.status == 400));
}

#[tokio::test]
async fn clips_play_in_ffmpeg_with_the_served_frames_duration_and_markers() {
    if !ffmpeg_available() {
        return;
    }
    let mut spec = historical("mixed", 12, 2000);
    spec.fragment_durations_ms = vec![2000, 1500, 4000, 1000];
    spec.fragment_size = 30_000;
    let emu = emulator(vec![spec]).await;
    let frags = emu.fragments("mixed");
    let client = media_client(&emu);
    let last = frags.len() - 2;
    assert!(last >= 5, "enough fragments for a mixed clip");
    let clip = get_clip_bytes(&client, "mixed", frags[1].server_ms, frags[last].server_ms).await;
    let served = &frags[1..=last];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("clip.mp4");
    std::fs::write(&path, &clip).expect("written");

    let expected_frames: u32 = served.iter().map(|f| f.duration_ms.div_ceil(100)).sum();
    let expected_ms: u32 = served.iter().map(|f| f.duration_ms).sum();
    let packets = ffprobe(&path, "stream=nb_read_packets", &["-count_packets"]);
    assert_eq!(packets, expected_frames.to_string());
    let frames = ffprobe(&path, "stream=nb_read_frames", &["-count_frames"]);
    assert_eq!(frames, expected_frames.to_string(), "every frame decodes");
    let duration: f64 = ffprobe(&path, "stream=duration", &[])
        .parse()
        .expect("a number");
    assert!(
        (duration - f64::from(expected_ms) / 1000.0).abs() < 0.002,
        "duration {duration}"
    );
    let decode = Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(&path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        decode.status.success(),
        "{}",
        String::from_utf8_lossy(&decode.stderr)
    );
    assert!(
        decode.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&decode.stderr)
    );
    let numbers: Vec<String> = served.iter().map(|f| f.number.clone()).collect();
    assert_eq!(scan_markers(&clip), numbers);
}

#[tokio::test]
async fn live_streams_grow_with_the_clock() {
    let mut spec = StreamSpec::live("live");
    spec.backlog = std::time::Duration::from_secs(10);
    spec.fragment_durations_ms = vec![1000];
    let emu = emulator(vec![spec]).await;
    let before = emu.fragments("live").len();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let after = emu.fragments("live").len();
    assert!(after >= before + 2, "{before} -> {after}");
}

#[tokio::test]
async fn iam_denial_and_media_defects_map_to_their_modeled_exceptions() {
    let mut locked = historical("locked", 10, 2000);
    locked.faults.deny_access = true;
    let mut defects = historical("defects", 10, 2000);
    defects.missing_codec_private_data_at = vec![3];
    defects.invalid_frames_at = vec![7];
    let emu = emulator(vec![locked, defects]).await;
    let cp = control_client(&emu);
    let media = media_client(&emu);
    let now = Utc::now().timestamp_millis();

    let describe = cp
        .describe_stream()
        .stream_name("locked")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        describe.raw_response().map(|r| r.status().as_u16()),
        Some(401)
    );
    assert!(describe.into_service_error().is_not_authorized_exception());
    let endpoint = cp
        .get_data_endpoint()
        .stream_name("locked")
        .api_name(ApiName::GetClip)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(endpoint.is_not_authorized_exception(), "{endpoint:?}");
    let listed = media
        .list_fragments()
        .stream_name("locked")
        .fragment_selector(server_range(0, now))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(listed.is_not_authorized_exception(), "{listed:?}");
    let clip = media
        .get_clip()
        .stream_name("locked")
        .clip_fragment_selector(clip_range(
            ClipFragmentSelectorType::ServerTimestamp,
            0,
            now - 1,
        ))
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(clip.is_not_authorized_exception(), "{clip:?}");

    let frags = emu.fragments("defects");
    let get = |a: usize, b: usize| {
        let media = media.clone();
        let (start, end) = (frags[a].server_ms, frags[b].server_ms);
        async move {
            media
                .get_clip()
                .stream_name("defects")
                .clip_fragment_selector(clip_range(
                    ClipFragmentSelectorType::ServerTimestamp,
                    start,
                    end,
                ))
                .send()
                .await
        }
    };
    let missing = get(2, 4)
        .await
        .map(|_| ())
        .unwrap_err()
        .into_service_error();
    assert!(
        missing.is_missing_codec_private_data_exception(),
        "{missing:?}"
    );
    let bad_frame = get(6, 8)
        .await
        .map(|_| ())
        .unwrap_err()
        .into_service_error();
    assert!(
        bad_frame.is_invalid_media_frame_exception(),
        "{bad_frame:?}"
    );
    assert!(get(0, 2).await.is_ok(), "clean fragments still package");
}

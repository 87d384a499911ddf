//! `backfill` over historical media: gaps, the size cap, long ranges, truncated clips,
//! codec changes, and moto as a second S3 implementation.

use crate::support::checks::{assert_exactly_once, assert_playable};
use crate::support::local_s3::s3_client;
use crate::support::process::{streams_json, text};
use crate::support::world::{historical, recent, World, BUCKET};
use kvs_emulator::{Emulator, GapSpec};
use std::time::Duration;

fn no_clip_was_truncated(emu: &Emulator) {
    let truncated: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "GetClip" && r.status == 200 && r.truncated)
        .collect();
    assert!(truncated.is_empty(), "GetClip truncated: {truncated:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hour_backfill_with_a_gap_archives_every_fragment_exactly_once() {
    let (start, end) = recent(6.0);
    let mut spec = historical("front-door", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(2 * 3600),
        length: Duration::from_secs(20 * 60),
    }];
    // One-hour objects, so the fragment cap (not the clock) cuts chunks.
    let world = World::new(vec![spec], "clip_duration = \"1h\"").await;
    let expected = world.fragment_numbers("front-door", start, end);
    assert_eq!(expected.len(), (6 * 3600 - 20 * 60) / 2);

    let out = world.backfill("front-door", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    no_clip_was_truncated(&world.emu);
    assert!(
        objects.len() >= expected.len() / 200,
        "the 200-fragment cap split the clips"
    );
    let clips: Vec<_> = world
        .emu
        .requests()
        .into_iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .collect();
    assert!(
        clips.iter().all(|r| r.fragments <= 200),
        "chunks stay under the fragment cap"
    );
    assert_playable(&objects);

    // A second run finds everything archived and fetches nothing.
    world.emu.clear_requests();
    let again = world.backfill("front-door", start, end).await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        world.emu.requests().iter().all(|r| r.op != "GetClip"),
        "nothing re-fetched"
    );
    assert_eq!(world.objects().await.len(), objects.len());

    let status = world.run(&["status", "--json"]).await;
    assert!(status.status.success(), "{}", text(&status));
    let json = streams_json(&status);
    assert_eq!(json[0]["stream"], "front-door");
    assert_eq!(json[0]["archived_fragments"], expected.len() as u64);
    assert_eq!(json[0]["failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hd_backfill_is_cut_by_the_100_mb_cap_and_uploaded_in_parts() {
    let (start, end) = recent(0.25);
    let spec = historical("loading-dock", start, end, 4000, 1_500_000);
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("loading-dock", start, end);
    assert_eq!(expected.len(), 225);
    let out = world.backfill("loading-dock", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    no_clip_was_truncated(&world.emu);
    let biggest = objects.values().map(Vec::len).max().unwrap_or(0);
    assert!(
        biggest > 50_000_000 && biggest <= 100_000_000,
        "byte cap binds: biggest {biggest}"
    );
    assert!(world.open_multipart_uploads().is_empty());
    assert_playable(&objects);

    let client = s3_client(&world.s3_url);
    let key = objects.keys().next().expect("an object");
    let head = client
        .head_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .expect("head");
    let meta = head.metadata().expect("metadata");
    assert_eq!(
        meta.get("kvs-stream").map(String::as_str),
        Some("loading-dock")
    );
    assert_eq!(
        meta.get("kvs-timestamp-source").map(String::as_str),
        Some("server")
    );
    assert_eq!(meta.get("kvs-first-fragment"), Some(&expected[0]));
    assert!(meta.contains_key("kvs-fragment-count") && meta.contains_key("kvs-start"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_hour_range_is_fetched_in_clips_under_24_hours() {
    // A camera that records 10 minutes, is off for 29 hours, then records 10 minutes.
    let (start, end) = recent(30.0);
    let mut spec = historical("sparse", start, end, 10_000, 0);
    spec.data_retention_hours = 48;
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(600),
        length: Duration::from_secs(30 * 3600 - 1200),
    }];
    let world = World::new(vec![spec], "clip_duration = \"23h 59m\"").await;
    let expected = world.fragment_numbers("sparse", start, end);
    assert!(expected.len() >= 100, "{} fragments", expected.len());
    let out = world.backfill("sparse", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_exactly_once(&world.objects().await, &expected);
    for r in world.emu.requests().iter().filter(|r| r.op == "GetClip") {
        let span = r.end_ms.unwrap_or(0) - r.start_ms.unwrap_or(0);
        assert!(span < 24 * 3_600_000, "GetClip range of {span} ms");
        assert_eq!(r.status, 200, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_clips_are_split_and_fetched_again_never_recorded_as_done() {
    let (start, end) = recent(0.5);
    let spec = historical("cam", start, end, 2000, 20_000);
    let world = World::new(vec![spec], "").await;
    // The store-side cap is lower than the planner's: every full chunk comes back cut.
    world
        .emu
        .update_faults("cam", |f| f.max_clip_fragments = 70);
    let expected = world.fragment_numbers("cam", start, end);
    let out = world.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let cut = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.truncated)
        .count();
    assert!(cut > 0, "the emulator did truncate");
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_codec_change_inside_a_chunk_is_split_around_and_everything_is_archived() {
    let (start, end) = recent(0.25);
    let mut spec = historical("cam", start, end, 2000, 20_000);
    // The camera switches resolution twice; KVS refuses clips that span a switch.
    spec.codec_changes_at = vec![77, 301];
    let world = World::new(vec![spec], "").await;
    let expected = world.fragment_numbers("cam", start, end);
    let out = world.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let refused = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.error.as_deref() == Some("InvalidCodecPrivateDataException"))
        .count();
    assert!(
        refused >= 2,
        "GetClip refused the spanning clips ({refused})"
    );
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_as_a_second_s3_implementation_gets_the_same_archive() {
    let Ok(url) = std::env::var("KVS_TEST_MOTO_URL") else {
        panic!("needs moto, started by: eval \"$(.ci/moto)\" (KVS_TEST_MOTO_URL is not set)");
    };
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "moto must listen on loopback"
    );
    let (start, end) = recent(0.1);
    let bucket = format!("moto-{}", std::process::id());
    let world = World::with_s3(
        vec![
            historical("hd", start, end, 4000, 1_500_000),
            historical("sd", start, end, 2000, 20_000),
        ],
        "",
        None,
        url,
        &bucket,
    )
    .await;
    for stream in ["hd", "sd"] {
        let out = world.backfill(stream, start, end).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    // An upload a killed process created but never recorded: the start-up sweep finds it
    // by listing multipart uploads, which moto (like AWS) supports.
    let orphan = s3_client(&world.s3_url)
        .create_multipart_upload()
        .bucket(&bucket)
        .key("kvs/hd/orphan.mp4")
        .send()
        .await
        .expect("orphan upload created");
    assert!(orphan.upload_id().is_some());
    let swept = world.backfill("hd", start, end).await;
    assert!(swept.status.success(), "{}", text(&swept));
    let mut expected = world.fragment_numbers("hd", start, end);
    expected.extend(world.fragment_numbers("sd", start, end));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
    let uploads = s3_client(&world.s3_url)
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .expect("moto lists uploads");
    assert!(
        uploads.uploads().is_empty(),
        "no multipart upload left behind"
    );
    let _ = &world.work;
}

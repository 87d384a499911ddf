//! SIGKILL at named and random moments, alone and with several processes on one ledger:
//! the next run completes, exactly once.

use crate::support::checks::{aborts_of_live_uploads, assert_exactly_once, assert_playable};
use crate::support::process::{count_env, text};
use crate::support::world::{
    hd_stream, historical, recent, rfc3339, wait_for_a_streaming_clip, World,
};
use kvs_emulator::StreamSpec;
use std::time::Duration;

/// Kills the archiver at a crash point, then runs it again to completion.
///
/// One clip at a time: with several, a kill can fall between another clip's
/// CreateMultipartUpload and the ledger row that records it. Only a store that lists
/// multipart uploads (AWS, moto) lets the next start find such an upload; s3s-fs cannot,
/// so these tests pin the moments they name (see the moto test for the sweep).
async fn crash_and_resume(point: &str, spec: StreamSpec, start: i64, end: i64) {
    let name = spec.name.clone();
    let world = World::new(vec![spec], "concurrency = 1").await;
    let expected = world.fragment_numbers(&name, start, end);
    let (a, b) = (rfc3339(start), rfc3339(end));
    let crashed = world
        .command(&["backfill", "--stream", &name, "--start", &a, "--end", &b])
        .env(kvs_archiver::crashpoint::ENV, point)
        .output()
        .await
        .expect("runs");
    assert!(
        !crashed.status.success(),
        "the crash point {point} was reached: {}",
        text(&crashed)
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        crashed.status.signal(),
        Some(9),
        "killed by SIGKILL: {}",
        text(&crashed)
    );
    let resumed = world.backfill(&name, start, end).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    assert!(
        world.open_multipart_uploads().is_empty(),
        "left behind: {:?}",
        world.open_multipart_uploads()
    );
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_planning_then_rerun_completes() {
    let (start, end) = recent(3.0);
    crash_and_resume(
        "planning",
        historical("cam", start, end, 2000, 20_000),
        start,
        end,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_getclip_body_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("mid-body", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_multipart_upload_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("mid-upload", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_upload_and_ledger_commit_then_rerun_completes() {
    let (spec, start, end) = hd_stream("cam");
    crash_and_resume("after-upload", spec, start, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_from_outside_at_a_random_moment_then_rerun_completes() {
    let (mut spec, start, end) = hd_stream("cam");
    spec.faults.bandwidth_bytes_per_sec = Some(20_000_000);
    let world = World::new(vec![spec], "concurrency = 1").await;
    let expected = world.fragment_numbers("cam", start, end);
    let mut child = world.spawn_backfill("cam", start, end);
    // Once a clip is streaming, kill -9.
    wait_for_a_streaming_clip(&world).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.start_kill().expect("killed");
    let _ = child.wait().await;
    let resumed = world.backfill("cam", start, end).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_exactly_once(&world.objects().await, &expected);
    assert!(world.open_multipart_uploads().is_empty());
}

/// SIGKILL at seeded random moments (planning, fetching, uploading, committing), with one,
/// two or three processes on one ledger; `KVS_TEST_TORTURE_KILLS` rounds (20 by default,
/// more for a soak), `KVS_TEST_TORTURE_SEED` to replay a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_torture_with_several_processes_loses_doubles_and_leaves_nothing() {
    let rounds = count_env("KVS_TEST_TORTURE_KILLS", 20);
    let seed = count_env("KVS_TEST_TORTURE_SEED", 20_261_126);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (start, end) = recent(0.4);
    let mut spec = historical("cam", start, end, 4000, 1_500_000);
    spec.faults.bandwidth_bytes_per_sec = Some(10_000_000);
    let world = World::new(vec![spec], "concurrency = 2").await;
    let expected = world.fragment_numbers("cam", start, end);
    let (a, b) = (rfc3339(start), rfc3339(end));
    let spawn = || world.spawn_backfill("cam", start, end);
    for round in 0..rounds {
        let processes = match round % 5 {
            2 => 2,
            4 => 3,
            _ => 1,
        };
        let mut children: Vec<_> = (0..processes).map(|_| spawn()).collect();
        for child in &mut children {
            tokio::time::sleep(Duration::from_millis(rng.u64(50..1500))).await;
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    let resumed = world.backfill("cam", start, end).await;
    assert!(resumed.status.success(), "seed {seed}: {}", text(&resumed));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &expected);
    let s3 = world.s3.as_ref().expect("s3s");
    let live_aborts = aborts_of_live_uploads(&s3.requests());
    assert!(
        live_aborts.is_empty(),
        "seed {seed}: aborted uploads still in use: {live_aborts:?}"
    );
    assert!(
        world.open_multipart_uploads().is_empty(),
        "seed {seed}: left open: {:?}",
        world.open_multipart_uploads()
    );
    let check = world
        .run(&["verify", "--stream", "cam", "--start", &a, "--end", &b])
        .await;
    assert!(check.status.success(), "seed {seed}: {}", text(&check));
    assert_playable(&objects);
}

/// Two backfills of one range on one ledger, with multipart-sized clips, both running to
/// the end: every fragment once, and neither ever aborts the other's live upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_multipart_clips_never_abort_each_others_uploads() {
    let (start, end) = recent(0.15);
    let mut spec = historical("cam", start, end, 4000, 1_500_000);
    spec.faults.bandwidth_bytes_per_sec = Some(30_000_000);
    let world = World::new(vec![spec], "concurrency = 2").await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let args = ["backfill", "--stream", "cam", "--start", &a, "--end", &b];
    let (first, second) = tokio::join!(world.run(&args), world.run(&args));
    assert!(first.status.success(), "{}", text(&first));
    assert!(second.status.success(), "{}", text(&second));
    assert_exactly_once(
        &world.objects().await,
        &world.fragment_numbers("cam", start, end),
    );
    let log = world.s3.as_ref().expect("s3s").requests();
    assert!(
        log.iter().any(|l| l.contains("partNumber=")),
        "clips went up in parts"
    );
    assert_eq!(aborts_of_live_uploads(&log), Vec::<String>::new());
    assert!(
        !log.iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("uploadId=")),
        "no upload aborted at all: nothing failed"
    );
    assert!(world.open_multipart_uploads().is_empty());
}

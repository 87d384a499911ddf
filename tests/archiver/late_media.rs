//! Late media: producer timestamps delivered late, fragments listed after their window,
//! and what GetClip cannot select or package (archived as Matroska).

use crate::support::checks::{assert_exactly_once, assert_playable};
use crate::support::process::{streams_json, text};
use crate::support::world::{historical, recent, rfc3339, World};
use chrono::Utc;
use kvs_emulator::{scan_markers, StreamSpec};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Fragment numbers of every object, with the keys holding each.
fn holders(objects: &BTreeMap<String, Vec<u8>>) -> HashMap<String, Vec<String>> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for (key, bytes) in objects {
        for number in scan_markers(bytes) {
            seen.entry(number).or_default().push(key.clone());
        }
    }
    seen
}

/// Every fragment whose producer timestamp lies between the first and the last archived
/// one is archived, exactly once: no hole where late media was skipped.
fn assert_contiguous_by_producer_time(
    world: &World,
    stream: &str,
    objects: &BTreeMap<String, Vec<u8>>,
) -> (i64, i64) {
    let seen = holders(objects);
    let doubled: Vec<_> = seen.iter().filter(|(_, k)| k.len() > 1).take(5).collect();
    assert!(doubled.is_empty(), "fragments stored twice: {doubled:?}");
    let mut all = world.emu.fragments(stream);
    all.sort_by_key(|f| (f.producer_ms, f.number.clone()));
    let archived: Vec<_> = all
        .iter()
        .filter(|f| seen.contains_key(&f.number))
        .collect();
    let (first, last) = (
        archived.first().expect("something archived").producer_ms,
        archived.last().expect("something archived").producer_ms,
    );
    let holes: Vec<_> = all
        .iter()
        .filter(|f| {
            f.producer_ms >= first && f.producer_ms <= last && !seen.contains_key(&f.number)
        })
        .map(|f| (rfc3339(f.producer_ms), f.number.clone()))
        .collect();
    assert!(
        holes.is_empty(),
        "{} fragments never archived, e.g. {:?}",
        holes.len(),
        &holes[..holes.len().min(5)]
    );
    (first, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_stream_delivered_late_is_archived_exactly_once_by_later_passes() {
    let mut spec = StreamSpec::live("late-cam");
    spec.backlog = Duration::from_secs(420);
    // Media reaches KVS two and a half minutes after the camera recorded it (batch
    // uploads), as in the report that opened this work.
    spec.producer_offset_ms = 150_000;
    let world = World::with_sections(
        vec![spec],
        "clip_duration = \"20s\"",
        "[daemon]\nlag = \"5s\"\n",
        &|_| "timestamp_source = \"producer\"\nretention_window = \"6m\"\nsettle = \"5m\"".into(),
    )
    .await;
    let first = world.run(&["run", "--once"]).await;
    assert!(first.status.success(), "{}", text(&first));
    let planned_through = (Utc::now().timestamp_millis() - 5_000).div_euclid(20_000) * 20_000 - 1;
    let (_, first_last) =
        assert_contiguous_by_producer_time(&world, "late-cam", &world.objects().await);
    assert!(
        first_last < planned_through - 4_000,
        "the first pass could not see the last {} s it planned",
        (planned_through - first_last) / 1000
    );
    tokio::time::sleep(Duration::from_secs(160)).await;
    let second = world.run(&["run", "--once"]).await;
    assert!(second.status.success(), "{}", text(&second));
    let objects = world.objects().await;
    let (_, last) = assert_contiguous_by_producer_time(&world, "late-cam", &objects);
    assert!(
        last > planned_through,
        "the second pass archived what reached KVS after the first planned it (through {}, archived through {})",
        rfc3339(planned_through),
        rfc3339(last)
    );
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(status[0]["failed"], 0, "{status}");
    assert_eq!(status[0]["pending"], 0, "{status}");
    assert_playable(&objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_listed_after_its_window_was_archived_is_archived_alone() {
    let mut spec = StreamSpec::live("cell-cam");
    spec.backlog = Duration::from_secs(120);
    // Ingested about 10 s from now, but recorded 61 s before that: inside a window the
    // first pass archives.
    spec.late_fragments_at = vec![65];
    spec.late_by = Duration::from_secs(61);
    let world = World::with_sections(
        vec![spec],
        "clip_duration = \"20s\"",
        "[daemon]\nlag = \"5s\"\n",
        &|_| "timestamp_source = \"producer\"\nretention_window = \"3m\"".into(),
    )
    .await;
    let first = world.run(&["run", "--once"]).await;
    assert!(first.status.success(), "{}", text(&first));
    let before = world.objects().await;
    let late = loop {
        let late = world
            .emu
            .fragments("cell-cam")
            .into_iter()
            .find(|f| f.server_ms - f.producer_ms > 60_000);
        if let Some(late) = late {
            break late;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = world.run(&["run", "--once"]).await;
    assert!(second.status.success(), "{}", text(&second));
    let after = world.objects().await;
    for (key, bytes) in &before {
        assert_eq!(
            after.get(key),
            Some(bytes),
            "{key} was rewritten: its neighbours stay as they were"
        );
    }
    let seen = holders(&after);
    let keys = seen
        .get(&late.number)
        .expect("the late fragment is archived");
    assert_eq!(keys.len(), 1, "archived once: {keys:?}");
    // Late inside an archived clip's GetClip range (start of its first fragment to start
    // of its last): a late object. Between two clips' ranges (it fell in the 2 s between
    // one window's last fragment and the next one's first, about one run in ten): a new
    // clip of its own, which selects it alone just as well.
    let inside_a_clip = before.keys().any(|key| {
        clip_range_of(key).is_some_and(|(a, b)| a <= late.producer_ms && late.producer_ms <= b)
    });
    let late_kind = keys[0].contains("_f");
    assert_eq!(
        late_kind,
        inside_a_clip,
        "a late object exactly when an archived clip's range holds it: {} at {}",
        keys[0],
        rfc3339(late.producer_ms)
    );
    assert_eq!(
        scan_markers(&after[&keys[0]]),
        vec![late.number.clone()],
        "alone in its object"
    );
    assert_contiguous_by_producer_time(&world, "cell-cam", &after);
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(
        status[0]["late_fragments"],
        u64::from(late_kind),
        "{status}"
    );
    assert_playable(&after);
}

/// The GetClip range a clip object's key names (`…_{start}_{end}.mp4`), epoch ms.
fn clip_range_of(key: &str) -> Option<(i64, i64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".mp4")?;
    let mut parts = name.rsplitn(3, '_');
    let (end, start) = (parts.next()?, parts.next()?);
    let at = |t: &str| {
        chrono::NaiveDateTime::parse_from_str(t, "%Y%m%dT%H%M%S%.3fZ")
            .ok()
            .map(|t| t.and_utc().timestamp_millis())
    };
    Some((at(start)?, at(end)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_getclip_cannot_select_or_package_are_archived_as_matroska() {
    let (start, end) = recent(0.05);
    let mut spec = historical("dup-cam", start, end, 2000, 0);
    // Fragment 10 repeats fragment 9's producer timestamp (GetClip keeps only 9);
    // fragment 30 has no codec private data (GetClip refuses any range holding it), and
    // fragment 31 repeats its timestamp: a same-timestamp group GetClip refuses.
    spec.duplicate_producer_timestamp_at = vec![10, 31];
    spec.missing_codec_private_data_at = vec![30];
    let world = World::with_sections(vec![spec], "", "", &|_| {
        "timestamp_source = \"producer\"".into()
    })
    .await;
    let out = world.backfill("dup-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    assert_exactly_once(&objects, &world.fragment_numbers("dup-cam", start, end));
    let all = world.emu.fragments("dup-cam");
    let mkv: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.ends_with(".mkv"))
        .collect();
    let mut in_mkv: Vec<String> = mkv
        .iter()
        .flat_map(|(_, bytes)| scan_markers(bytes))
        .collect();
    in_mkv.sort();
    let mut wanted: Vec<String> = [10, 30, 31]
        .iter()
        .map(|i| all[*i].number.clone())
        .collect();
    wanted.sort();
    assert_eq!(in_mkv, wanted, "{:?}", objects.keys().collect::<Vec<_>>());
    let status = world.run(&["status", "--json"]).await;
    let status = streams_json(&status);
    assert_eq!(status[0]["mkv_fragments"], 3, "{status}");
    assert_playable(&objects);
}

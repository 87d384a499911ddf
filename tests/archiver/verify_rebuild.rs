//! Reading the archive back: `verify` (and `--repair`) against deleted, corrupted and
//! extra objects, and `rebuild-ledger` from the objects' metadata.

use crate::support::checks::{assert_exactly_once, assert_playable};
use crate::support::local_s3::s3_client;
use crate::support::process::{assert_fails_with, streams_json, text};
use crate::support::world::{historical, new_ledger_url, recent, rfc3339, World, BUCKET};
use kvs_emulator::{scan_markers, Emulator, GapSpec};
use std::collections::BTreeMap;
use std::time::Duration;

/// What [`damage`] did to the archive behind the archiver's back.
struct Damage {
    /// The object deleted.
    deleted: String,
    /// The object overwritten with other bytes of the same size.
    corrupted: String,
    /// The object the ledger does not know.
    extra: &'static str,
    /// The fragments of the chunk the ledger forgot, with its object.
    forgotten_fragments: usize,
}

/// Deletes one object, corrupts another, adds one the ledger does not know, and makes the
/// ledger forget a third chunk with its object.
async fn damage(world: &World, objects: &BTreeMap<String, Vec<u8>>) -> Damage {
    let keys: Vec<&String> = objects.keys().collect();
    assert!(keys.len() >= 6, "{keys:?}");
    let client = s3_client(&world.s3_url);
    // Deleted behind the archiver's back.
    client
        .delete_object()
        .bucket(BUCKET)
        .key(keys[0])
        .send()
        .await
        .expect("deleted");
    // Corrupted: same size, other bytes.
    let mut damaged = objects[keys[1]].clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    client
        .put_object()
        .bucket(BUCKET)
        .key(keys[1])
        .body(damaged.into())
        .send()
        .await
        .expect("overwritten");
    // An object the ledger does not know.
    let extra = "kvs/vcam/2026/01/01/stray.mp4";
    client
        .put_object()
        .bucket(BUCKET)
        .key(extra)
        .body(b"stray".to_vec().into())
        .send()
        .await
        .expect("put");
    // A chunk the ledger forgot, with its object: KVS still holds fragments no object has.
    let forgotten = keys[2].clone();
    let forgotten_fragments = scan_markers(&objects[&forgotten]).len();
    client
        .delete_object()
        .bucket(BUCKET)
        .key(&forgotten)
        .send()
        .await
        .expect("deleted");
    world
        .ledger_sql("DELETE FROM chunks WHERE object_key = ?", &forgotten)
        .await;
    Damage {
        deleted: keys[0].clone(),
        corrupted: keys[1].clone(),
        extra,
        forgotten_fragments,
    }
}

/// `verify --json` and `verify` over `range` report exactly what [`damage`] did.
async fn assert_verify_reports(world: &World, range: &[&str], done: &Damage) {
    let check = world
        .run(&[&["verify", "--json"][..], range].concat())
        .await;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("json report");
    let damaged: Vec<(String, String)> = report["damaged"]
        .as_array()
        .expect("damaged")
        .iter()
        .map(|d| {
            (
                d["object_key"].as_str().unwrap_or("").to_string(),
                d["problem"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(damaged.len(), 2, "{report}");
    assert!(
        damaged
            .iter()
            .any(|(k, p)| *k == done.deleted && p == "missing"),
        "{report}"
    );
    assert!(
        damaged
            .iter()
            .any(|(k, p)| *k == done.corrupted && p.starts_with("checksum")),
        "{report}"
    );
    assert_eq!(
        report["unarchived"].as_array().map(Vec::len),
        Some(done.forgotten_fragments),
        "{report}"
    );
    assert_eq!(
        report["extra_objects"],
        serde_json::json!([done.extra]),
        "{report}"
    );
    let human = world.run(&[&["verify"][..], range].concat()).await;
    let said = String::from_utf8_lossy(&human.stdout);
    assert!(
        said.contains("missing: ")
            && said.contains("extra object: ")
            && said.contains("not archived: "),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_deleted_corrupted_and_extra_objects_and_unarchived_fragments_and_repair_fixes_them(
) {
    let (start, end) = recent(0.25);
    let world = World::new(
        vec![historical("vcam", start, end, 2000, 20_000)],
        "clip_duration = \"2m\"",
    )
    .await;
    let out = world.backfill("vcam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let done = damage(&world, &world.objects().await).await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let range = ["--stream", "vcam", "--start", &a, "--end", &b];
    assert_verify_reports(&world, &range, &done).await;

    let repair = world
        .run(&[&["verify", "--repair"][..], &range[..]].concat())
        .await;
    assert_eq!(
        repair.status.code(),
        Some(1),
        "the extra object is only reported: {}",
        text(&repair)
    );
    let mut after = world.objects().await;
    assert!(
        after.remove(done.extra).is_some(),
        "extra objects are never deleted"
    );
    assert_exactly_once(&after, &world.fragment_numbers("vcam", start, end));
    assert_playable(&after);
    s3_client(&world.s3_url)
        .delete_object()
        .bucket(BUCKET)
        .key(done.extra)
        .send()
        .await
        .expect("deleted");
    let clean = world.run(&[&["verify"][..], &range[..]].concat()).await;
    assert!(clean.status.success(), "{}", text(&clean));
}

fn media_requests(emu: &Emulator) -> usize {
    emu.requests()
        .iter()
        .filter(|r| r.op == "GetClip" || r.op == "GetMediaForFragmentList")
        .count()
}

/// The fields of `status` that describe the archive (not the processes that made it).
fn archive_view(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| {
            serde_json::json!({
                "stream": s["stream"], "done": s["done"], "pending": s["pending"],
                "in_flight": s["in_flight"], "failed": s["failed"], "expired": s["expired"],
                "archived_bytes": s["archived_bytes"], "archived_fragments": s["archived_fragments"],
                "late_fragments": s["late_fragments"], "mkv_fragments": s["mkv_fragments"],
                "archived_through_ms": s["archived_through_ms"],
                "oldest_unarchived_ms": s["oldest_unarchived_ms"],
            })
        })
        .collect()
}

/// Losing the ledger costs one listing: `rebuild-ledger` restores it from the objects'
/// metadata and one ListFragments, the same backfill then fetches nothing (no GetClip),
/// `status` shows what it showed before, and `verify` finds the archive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_ledger_restores_the_archive_so_a_backfill_fetches_nothing_again() {
    let (start, end) = recent(0.75);
    let mut spec = historical("yard-cam", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(15 * 60),
        length: Duration::from_secs(5 * 60),
    }];
    let mut world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("yard-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let before = archive_view(&streams_json(&world.run(&["status", "--json"]).await));
    assert!(before[0]["done"].as_u64().unwrap_or(0) >= 5, "{before:?}");

    // The ledger is lost: a new, empty one in its place.
    let lost = world.ledger_url.clone();
    if let Some(path) = lost.strip_prefix("sqlite://") {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
    let fresh = new_ledger_url(world.work.path(), "rebuilt.db").await;
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, config.replace(&lost, &fresh)).expect("config");
    world.ledger_url = fresh;

    let fetched = media_requests(&world.emu);
    let out = world.run(&["rebuild-ledger", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["chunks_restored"], before[0]["done"], "{report}");
    assert_eq!(
        report["from_metadata_only"].as_array().map(Vec::len),
        Some(0)
    );
    // A ledger that holds chunks is not rebuilt over.
    let again = world.run(&["rebuild-ledger"]).await;
    assert_fails_with(&again, 2, "already holds chunks");

    let out = world.backfill("yard-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        media_requests(&world.emu),
        fetched,
        "nothing was fetched from KVS again"
    );
    let after = archive_view(&streams_json(&world.run(&["status", "--json"]).await));
    assert_eq!(after, before);
    let out = world.run(&["verify", "--stream", "yard-cam"]).await;
    assert!(
        out.status.success(),
        "verify after a rebuild: {}",
        text(&out)
    );
}

//! The ledger contract, run against every implementation of [`Ledger`]: claims, lease
//! expiry, fencing, overlap, split, late chunks and retries across passes. A new ledger
//! (PostgreSQL) gets the same suite by adding its constructor to `ledgers()`.

use kvs_archiver::domain::{ChunkKind, ChunkPlan, Fragment, TimestampSource};
use kvs_archiver::error::Error;
use kvs_archiver::ledger::{Archived, ChunkState, Failure, Ledger};
use std::sync::Arc;

const STREAM: &str = "cam";
const SOURCE: TimestampSource = TimestampSource::Server;
const LEASE_MS: i64 = 60_000;
const T0: i64 = 1_795_564_800_000;

/// Fresh, empty ledgers of every kind, each in its own temporary place.
async fn ledgers() -> Vec<(String, Arc<dyn Ledger>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    let sqlite = kvs_archiver::ledger::open(&url)
        .await
        .expect("sqlite ledger");
    vec![("sqlite".into(), sqlite, dir)]
}

fn fragment(i: i64) -> Fragment {
    Fragment {
        number: format!("9{i:046}"),
        start_ms: T0 + i * 2000,
        server_ms: T0 + i * 2000,
        duration_ms: 2000,
        size_bytes: 1000,
    }
}

fn clip(range: std::ops::Range<i64>) -> ChunkPlan {
    ChunkPlan::of(ChunkKind::Clip, range.map(fragment).collect())
}

fn archived() -> Archived {
    Archived {
        bytes: 10,
        crc32c: "00000000".into(),
    }
}

async fn insert(ledger: &dyn Ledger, plan: &ChunkPlan) -> bool {
    let key = format!("k/{}_{}", plan.kind.as_str(), plan.first_fragment);
    ledger
        .insert_planned(STREAM, SOURCE, plan, &key)
        .await
        .expect("insert")
}

async fn only_chunk_id(ledger: &dyn Ledger) -> i64 {
    let chunks = ledger
        .claimable(STREAM, SOURCE, i64::MIN, i64::MAX, i64::MAX)
        .await
        .expect("claimable");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    chunks[0].id
}

#[tokio::test]
async fn a_chunk_is_claimed_once_and_done_only_by_its_holder() {
    for (kind, ledger, _dir) in ledgers().await {
        assert!(insert(&*ledger, &clip(0..10)).await, "{kind}");
        let id = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        assert!(
            ledger
                .claim(id, T0, LEASE_MS)
                .await
                .expect("claim")
                .is_none(),
            "{kind}: held"
        );
        let stale = kvs_archiver::ledger::Lease {
            generation: lease.generation - 1,
            ..lease
        };
        assert!(
            matches!(
                ledger.mark_done(&stale, &archived()).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}: an old generation cannot finish the chunk"
        );
        ledger.mark_done(&lease, &archived()).await.expect("done");
        let chunk = ledger.chunk(id).await.expect("read").expect("exists");
        assert_eq!(chunk.state, ChunkState::Done, "{kind}");
        assert!(
            matches!(
                ledger
                    .mark_failed(
                        &lease,
                        &Failure {
                            kind: "kvs",
                            message: "x".into(),
                            next_attempt_ms: T0
                        }
                    )
                    .await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}: a finished chunk takes no further transition"
        );
    }
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_fences_off_the_old_holder() {
    for (kind, ledger, _dir) in ledgers().await {
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        let old = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        ledger
            .mark_uploading(&old, Some("upload-1"))
            .await
            .expect("uploading");
        assert_eq!(
            ledger.live_upload_ids().await.expect("ids"),
            vec!["upload-1".to_string()]
        );
        // Before the lease runs out, the chunk is nobody else's.
        let alive = ledger.abandoned(T0 + 1000, &[id]).await.expect("abandoned");
        assert!(alive.is_empty(), "{kind}: {alive:?}");
        let dead = ledger
            .abandoned(T0 + LEASE_MS + 1, &[id])
            .await
            .expect("abandoned");
        assert_eq!(dead.len(), 1, "{kind}");
        assert_eq!(dead[0].upload_id.as_deref(), Some("upload-1"));
        let new = ledger
            .take_over(&dead[0], T0 + LEASE_MS + 1, LEASE_MS)
            .await
            .expect("take over")
            .expect("taken");
        assert!(new.generation > old.generation, "{kind}");
        assert!(
            matches!(
                ledger.renew(&old, T0 + 2 * LEASE_MS).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}"
        );
        assert!(
            matches!(
                ledger.mark_done(&old, &archived()).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}"
        );
        // A second taker of the same abandoned view loses the race.
        assert!(
            ledger
                .take_over(&dead[0], T0 + LEASE_MS + 2, LEASE_MS)
                .await
                .expect("take over")
                .is_none(),
            "{kind}"
        );
        ledger.release(&new).await.expect("released");
        assert_eq!(
            ledger.chunk(id).await.expect("read").expect("exists").state,
            ChunkState::Planned
        );
    }
}

#[tokio::test]
async fn this_process_takes_back_its_own_chunk_a_worker_left_behind() {
    for (kind, ledger, _dir) in ledgers().await {
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        assert!(
            ledger
                .abandoned(T0, &[id])
                .await
                .expect("abandoned")
                .is_empty(),
            "{kind}: still worked on"
        );
        assert_eq!(
            ledger.abandoned(T0, &[]).await.expect("abandoned").len(),
            1,
            "{kind}: its worker is gone"
        );
    }
}

#[tokio::test]
async fn no_fragment_is_ever_in_two_chunks_and_clip_ranges_never_overlap() {
    for (kind, ledger, _dir) in ledgers().await {
        assert!(insert(&*ledger, &clip(0..10)).await);
        assert!(
            !insert(&*ledger, &clip(5..15)).await,
            "{kind}: overlapping range"
        );
        assert!(
            !insert(&*ledger, &ChunkPlan::of(ChunkKind::Mkv, vec![fragment(3)])).await,
            "{kind}: held fragment"
        );
        assert!(
            insert(&*ledger, &clip(10..20)).await,
            "{kind}: the next range"
        );
        // A late fragment inside an archived range is a chunk of its own.
        let mut late = fragment(4);
        late.number = format!("9{:046}", 1_000_000);
        late.start_ms += 1000;
        assert!(
            insert(
                &*ledger,
                &ChunkPlan::of(ChunkKind::Late, vec![late.clone()])
            )
            .await,
            "{kind}"
        );
        assert!(
            !insert(&*ledger, &ChunkPlan::of(ChunkKind::Mkv, vec![late])).await,
            "{kind}: once"
        );
        let holdings = ledger
            .holdings(STREAM, SOURCE, T0, T0 + 40_000)
            .await
            .expect("holdings");
        assert_eq!(holdings.held.len(), 21, "{kind}");
        assert_eq!(
            holdings.ranges.len(),
            2,
            "{kind}: late chunks are no ranges"
        );
    }
}

#[tokio::test]
async fn a_split_replaces_a_chunk_by_its_parts_and_records_what_expired() {
    for (kind, ledger, _dir) in ledgers().await {
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        let parts = vec![
            (clip(2..6), "k/a".to_string()),
            (clip(6..10), "k/b".to_string()),
        ];
        let gone = clip(0..2);
        ledger
            .split(&lease, &parts, Some((&gone, "deleted by retention")))
            .await
            .expect("split");
        assert!(ledger.chunk(id).await.expect("read").is_none(), "{kind}");
        let summary = ledger
            .range_summary(STREAM, SOURCE, i64::MIN, i64::MAX)
            .await
            .expect("summary");
        assert_eq!((summary.pending, summary.expired.len()), (2, 1), "{kind}");
        assert!(
            matches!(
                ledger.split(&lease, &parts, None).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}"
        );
        let mine = ledger
            .fragments_of(summary.expired[0].id)
            .await
            .expect("fragments");
        assert_eq!(mine.len(), 2, "{kind}");
    }
}

#[tokio::test]
async fn a_failed_chunk_waits_for_its_next_attempt_and_a_backfill_requeues_it() {
    for (kind, ledger, _dir) in ledgers().await {
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        let failure = Failure {
            kind: "destination",
            message: "AccessDenied".into(),
            next_attempt_ms: T0 + 600_000,
        };
        ledger.mark_failed(&lease, &failure).await.expect("failed");
        assert!(
            ledger
                .claim(id, T0 + 1000, LEASE_MS)
                .await
                .expect("claim")
                .is_none(),
            "{kind}: not due"
        );
        let status = ledger.status().await.expect("status");
        assert_eq!(status[0].failures[0].kind, "destination", "{kind}");
        assert_eq!(status[0].failures[0].next_attempt_ms, Some(T0 + 600_000));
        // A range that only reaches into the chunk's end requeues it too.
        let requeued = ledger
            .requeue_failed(STREAM, SOURCE, T0 + 18_000, T0 + 99_000)
            .await
            .expect("requeue");
        assert_eq!(requeued, 1, "{kind}");
        assert!(
            ledger
                .claim(id, T0 + 1000, LEASE_MS)
                .await
                .expect("claim")
                .is_some(),
            "{kind}: due now"
        );
    }
}

#[tokio::test]
async fn fragments_listed_late_join_a_chunk_not_fetched_yet() {
    for (kind, ledger, _dir) in ledgers().await {
        insert(&*ledger, &clip(0..5)).await;
        let id = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        let mut late = fragment(2);
        late.number = format!("9{:046}", 1_000_000);
        late.start_ms += 500;
        let held = ledger
            .attach_fragments(&lease, &[late.clone(), fragment(1)])
            .await
            .expect("attached");
        assert_eq!(
            held.len(),
            6,
            "{kind}: the late one joined, the held one did not repeat"
        );
        let chunk = ledger.chunk(id).await.expect("read").expect("exists");
        assert_eq!(chunk.plan.fragment_count, 6, "{kind}");
        assert_eq!(chunk.plan.duration_ms, 12_000, "{kind}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_sqlite_ledger_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let ledger = kvs_archiver::ledger::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("opens");
    ledger.close().await;
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

/// A second process on the same ledger: its own owner name, the same rows.
async fn second_instance(dir: &tempfile::TempDir) -> Arc<dyn Ledger> {
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    kvs_archiver::ledger::open(&url)
        .await
        .expect("second instance")
}

#[tokio::test]
async fn another_process_neither_claims_nor_takes_over_a_live_lease() {
    for (kind, a, dir) in ledgers().await {
        let b = second_instance(&dir).await;
        assert_ne!(a.owner(), b.owner(), "{kind}: owners differ");
        insert(&*a, &clip(0..10)).await;
        let id = only_chunk_id(&*a).await;
        let held = a
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        assert!(
            b.claim(id, T0, LEASE_MS).await.expect("claim").is_none(),
            "{kind}"
        );
        assert!(
            b.abandoned(T0 + 1000, &[])
                .await
                .expect("abandoned")
                .is_empty(),
            "{kind}: live"
        );
        // B sees the lease run out; A renews before B acts: B must not take it.
        let seen = b
            .abandoned(T0 + LEASE_MS + 1, &[])
            .await
            .expect("abandoned");
        assert_eq!(seen.len(), 1, "{kind}");
        a.renew(&held, T0 + 3 * LEASE_MS).await.expect("renewed");
        assert!(
            b.take_over(&seen[0], T0 + LEASE_MS + 1, LEASE_MS)
                .await
                .expect("take over")
                .is_none(),
            "{kind}: a renewed lease is not taken over"
        );
        // B's view of A's lease is fenced too: B cannot finish what A holds.
        assert!(
            matches!(
                b.mark_done(&held, &archived()).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}"
        );
        a.mark_done(&held, &archived()).await.expect("A finishes");
    }
}

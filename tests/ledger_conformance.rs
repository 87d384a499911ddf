//! The ledger contract, run against every implementation of [`Ledger`]: claims, lease
//! expiry, fencing, overlap, split, late chunks, retries across passes, and several
//! processes on one ledger (stream leases, registration, concurrent claims and plans),
//! renewal, all-or-nothing splits, the reports, and rows the ledger cannot read. Every
//! method of the trait is called here (`every_ledger_method_is_exercised_by_this_suite`).
//! SQLite here; PostgreSQL (a fresh database per test, on the server `.ci/postgres` starts)
//! in tests/ledger_conformance_postgres.rs, which compiles this file again.

use kvs_archiver::domain::{ChunkKind, ChunkPlan, Fragment, TimestampSource};
use kvs_archiver::error::Error;
use kvs_archiver::ledger::{
    Archived, ChunkState, Failure, Identity, Ledger, Registration, Role, StreamClaim,
    UndecodableRow,
};
use std::sync::Arc;

#[path = "support/postgres.rs"]
mod postgres;

const STREAM: &str = "cam";
const SOURCE: TimestampSource = TimestampSource::Server;
const LEASE_MS: i64 = 60_000;
const T0: i64 = 1_795_564_800_000;

/// One ledger under test: its kind, a process on it, and what a second process needs.
struct Under {
    kind: &'static str,
    ledger: Arc<dyn Ledger>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Under {
    /// Another process on the same ledger.
    async fn another(&self, instance: &str, role: Role) -> Arc<dyn Ledger> {
        kvs_archiver::ledger::open(&self.url, Identity::new(instance, role))
            .await
            .expect("second process")
    }
}

async fn open(url: &str) -> Arc<dyn Ledger> {
    kvs_archiver::ledger::open(url, Identity::new("test-a", Role::Backfill))
        .await
        .expect("ledger opens")
}

/// A fresh, empty ledger of the kind this binary tests: each backend is a test binary of
/// its own, so a summary counts the PostgreSQL half as skipped where it cannot run.
async fn ledgers() -> Vec<Under> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kind, url) = if env!("CARGO_CRATE_NAME") == "ledger_conformance_postgres" {
        ("postgres", postgres::fresh_database().await)
    } else {
        (
            "sqlite",
            format!("sqlite://{}/ledger.db", dir.path().display()),
        )
    };
    vec![Under {
        kind,
        ledger: open(&url).await,
        url,
        _dir: dir,
    }]
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
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
    let ledger = open(&format!("sqlite://{}", path.display())).await;
    ledger.close().await;
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

#[tokio::test]
async fn another_process_neither_claims_nor_takes_over_a_live_lease() {
    for under in ledgers().await {
        let (kind, a) = (under.kind, under.ledger.clone());
        let b = under.another("test-b", Role::Backfill).await;
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

#[tokio::test]
async fn one_process_works_a_stream_at_a_time_and_a_dead_ones_stream_moves_after_its_lease() {
    for under in ledgers().await {
        let (kind, a) = (under.kind, under.ledger.clone());
        let b = under.another("test-b", Role::Daemon).await;
        assert!(
            matches!(
                a.acquire_stream(STREAM, SOURCE, T0, LEASE_MS)
                    .await
                    .expect("acquire"),
                StreamClaim::Acquired
            ),
            "{kind}"
        );
        match b
            .acquire_stream(STREAM, SOURCE, T0 + 1, LEASE_MS)
            .await
            .expect("acquire")
        {
            StreamClaim::HeldBy(holder) => {
                assert_eq!(holder.owner, a.owner(), "{kind}");
                assert_eq!(holder.instance, "test-a", "{kind}");
            }
            StreamClaim::Acquired => panic!("{kind}: two processes hold one stream"),
        }
        // A heartbeat keeps it; its holder takes it again at will.
        a.heartbeat(T0 + LEASE_MS / 2, LEASE_MS, &[])
            .await
            .expect("heartbeat");
        assert!(
            matches!(
                b.acquire_stream(STREAM, SOURCE, T0 + LEASE_MS + 1, LEASE_MS)
                    .await
                    .expect("acquire"),
                StreamClaim::HeldBy(_)
            ),
            "{kind}: renewed by the heartbeat"
        );
        assert!(
            matches!(
                a.acquire_stream(STREAM, SOURCE, T0 + LEASE_MS + 2, LEASE_MS)
                    .await
                    .expect("acquire"),
                StreamClaim::Acquired
            ),
            "{kind}"
        );
        // A stops heartbeating: after its lease, B takes the stream.
        let lapsed = T0 + 3 * LEASE_MS;
        assert!(
            matches!(
                b.acquire_stream(STREAM, SOURCE, lapsed, LEASE_MS)
                    .await
                    .expect("acquire"),
                StreamClaim::Acquired
            ),
            "{kind}: a lapsed lease moves"
        );
        let holders = a.stream_holders(lapsed).await.expect("holders");
        assert_eq!(holders.len(), 1, "{kind}");
        assert_eq!(holders[0].owner, b.owner(), "{kind}");
        // A release hands it on at once.
        b.release_stream(STREAM, SOURCE).await.expect("release");
        assert!(
            matches!(
                a.acquire_stream(STREAM, SOURCE, lapsed + 1, LEASE_MS)
                    .await
                    .expect("acquire"),
                StreamClaim::Acquired
            ),
            "{kind}: released"
        );
    }
}

#[tokio::test]
async fn a_daemon_is_refused_while_another_live_daemon_has_its_instance_id() {
    for under in ledgers().await {
        let kind = under.kind;
        let first = under.another("gate-1", Role::Daemon).await;
        let twin = under.another("gate-1", Role::Daemon).await;
        let backfill = under.another("gate-1", Role::Backfill).await;
        let other = under.another("gate-2", Role::Daemon).await;
        let now = chrono::Utc::now().timestamp_millis();
        assert!(
            matches!(
                first.register(now, LEASE_MS).await.expect("register"),
                Registration::Registered
            ),
            "{kind}"
        );
        assert!(
            matches!(twin.register(now, LEASE_MS).await.expect("register"), Registration::InstanceInUse(ref i) if i.owner == first.owner()),
            "{kind}: same id, both alive"
        );
        assert!(
            matches!(
                backfill.register(now, LEASE_MS).await.expect("register"),
                Registration::Registered
            ),
            "{kind}: a backfill may share the id"
        );
        assert!(
            matches!(
                other.register(now, LEASE_MS).await.expect("register"),
                Registration::Registered
            ),
            "{kind}"
        );
        // The first one stops cleanly: its twin may start.
        first.unregister().await.expect("unregister");
        assert!(
            matches!(
                twin.register(now, LEASE_MS).await.expect("register"),
                Registration::Registered
            ),
            "{kind}"
        );
        let instances = other.instances().await.expect("instances");
        let ids: Vec<&str> = instances.iter().map(|i| i.instance.as_str()).collect();
        assert!(
            ids.contains(&"gate-2") && ids.contains(&"gate-1"),
            "{kind}: {ids:?}"
        );
        assert!(
            !instances.iter().any(|i| i.owner == first.owner()),
            "{kind}: unregistered"
        );
    }
}

#[tokio::test]
async fn the_heartbeat_renews_only_the_chunks_whose_worker_still_runs() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        insert(&*ledger, &clip(0..10)).await;
        insert(&*ledger, &clip(10..20)).await;
        let (kept, _) = ledger
            .claim_next(STREAM, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
            .await
            .expect("claim")
            .expect("one");
        let (left, _) = ledger
            .claim_next(STREAM, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
            .await
            .expect("claim")
            .expect("two");
        assert_ne!(kept.id, left.id, "{kind}");
        ledger
            .heartbeat(T0 + LEASE_MS - 1, LEASE_MS, &[kept.id])
            .await
            .expect("heartbeat");
        let kept = ledger.chunk(kept.id).await.expect("read").expect("exists");
        let left = ledger.chunk(left.id).await.expect("read").expect("exists");
        assert_eq!(kept.lease_until_ms, Some(T0 + 2 * LEASE_MS - 1), "{kind}");
        assert_eq!(left.lease_until_ms, Some(T0 + LEASE_MS), "{kind}");
    }
}

/// Many claimers on one ledger at once, each a process of its own: every chunk is
/// claimed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_chunk() {
    for under in ledgers().await {
        let kind = under.kind;
        for i in 0..40 {
            assert!(
                insert(&*under.ledger, &clip(i * 10..i * 10 + 10)).await,
                "{kind}"
            );
        }
        let mut claimers = Vec::new();
        for c in 0..4 {
            let ledger = under.another(&format!("claimer-{c}"), Role::Daemon).await;
            claimers.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some((chunk, _)) = ledger
                    .claim_next(STREAM, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
                    .await
                    .expect("claim")
                {
                    mine.push(chunk.id);
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for claimer in claimers {
            all.extend(claimer.await.expect("claimer"));
        }
        let claimed = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(claimed, 40, "{kind}: every chunk claimed");
        assert_eq!(all.len(), 40, "{kind}: none twice");
    }
}

/// Planners racing over one window: the database itself keeps clip ranges apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_planners_never_record_overlapping_chunks() {
    for under in ledgers().await {
        let kind = under.kind;
        let mut planners = Vec::new();
        for p in 0..4i64 {
            let ledger = under.another(&format!("planner-{p}"), Role::Daemon).await;
            planners.push(tokio::spawn(async move {
                let mut won = 0;
                // Each planner cuts the same fragments differently: offsets 0..3.
                for i in 0..20i64 {
                    let from = i * 10 + p;
                    let plan = clip(from..from + 10);
                    let key = format!("k/{p}/{i}");
                    if ledger
                        .insert_planned(STREAM, SOURCE, &plan, &key)
                        .await
                        .expect("insert")
                    {
                        won += 1;
                    }
                }
                won
            }));
        }
        let mut won = 0;
        for planner in planners {
            won += planner.await.expect("planner");
        }
        let chunks = under
            .ledger
            .claimable(STREAM, SOURCE, i64::MIN, i64::MAX, i64::MAX)
            .await
            .expect("chunks");
        assert_eq!(chunks.len(), won, "{kind}");
        let mut ranges: Vec<(i64, i64)> = chunks.iter().map(|c| c.plan.clip_range()).collect();
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 < pair[1].0, "{kind}: {pair:?} overlap");
        }
        let mut fragments = 0;
        for chunk in &chunks {
            fragments += under
                .ledger
                .fragments_of(chunk.id)
                .await
                .expect("fragments")
                .len();
        }
        assert_eq!(
            fragments,
            chunks
                .iter()
                .map(|c| c.plan.fragment_count as usize)
                .sum::<usize>(),
            "{kind}"
        );
    }
}

/// Two planners wait on a third's uncommitted plan over their range, which it then drops.
/// PostgreSQL checks an insert against the exclusion constraint by waiting for the
/// transactions of overlapping ones: unqueued, the two would wait for each other and one
/// would end as a deadlock (as `concurrent_planners_never_record_overlapping_chunks` once
/// did in CI). Queued on their stream's lock, exactly one plan is recorded and neither
/// caller sees an error. SQLite's one writer at a time queues all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_planners_queue_instead_of_deadlocking() {
    use sqlx::Connection;
    // The third planner's row, written by hand inside a transaction left open.
    let insert = "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms,
         fragment_count, planned_bytes, planned_duration_ms, first_fragment, last_fragment,
         object_key, created_ms, updated_ms) VALUES ($1, $2, $3, $4, 10, 10000, 20000,
         'first', 'last', 'k/third', 0, 0)";
    let (start, end) = clip(0..10).clip_range();
    for under in ledgers().await {
        let kind = under.kind;
        let mut ledgers = Vec::new();
        for name in ["first", "second"] {
            ledgers.push((name, under.another(name, Role::Daemon).await));
        }
        let mut ledgers = ledgers.into_iter();
        let mut planner = |plan: ChunkPlan| {
            let (name, ledger) = ledgers.next().expect("a planner");
            tokio::spawn(async move {
                let key = format!("k/{name}");
                ledger.insert_planned(STREAM, SOURCE, &plan, &key).await
            })
        };
        let (first, second) = if kind == "sqlite" {
            let mut third = sqlx::SqliteConnection::connect(&under.url)
                .await
                .expect("connect");
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut third)
                .await
                .expect("begin");
            let bind = sqlx::query(insert).bind(STREAM).bind(SOURCE.as_str());
            let bind = bind.bind(start).bind(end);
            bind.execute(&mut third).await.expect("third plan");
            let first = planner(clip(5..15));
            let second = planner(clip(8..12));
            // Time for both to meet the held write lock (a 30 s busy timeout waits it
            // out); were they later, the outcome asserted below would be the same.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query("ROLLBACK")
                .execute(&mut third)
                .await
                .expect("rollback");
            (first, second)
        } else {
            let mut third = sqlx::PgConnection::connect(&under.url)
                .await
                .expect("connect");
            let mut tx = third.begin().await.expect("begin");
            let bind = sqlx::query(insert).bind(STREAM).bind(SOURCE.as_str());
            let bind = bind.bind(start).bind(end);
            bind.execute(&mut *tx).await.expect("third plan");
            // The first waits for the third's transaction (its constraint check), the
            // second for the stream's lock the first holds.
            let first = planner(clip(5..15));
            postgres::wait_for_lock_wait(&under.url, "transactionid").await;
            let second = planner(clip(8..12));
            postgres::wait_for_lock_wait(&under.url, "advisory").await;
            tx.rollback().await.expect("rollback");
            (first, second)
        };
        let first = first.await.expect("first planner");
        let second = second.await.expect("second planner");
        let (first, second) = (
            first.unwrap_or_else(|e| panic!("{kind}: first planner: {e}")),
            second.unwrap_or_else(|e| panic!("{kind}: second planner: {e}")),
        );
        assert!(
            first ^ second,
            "{kind}: one plan recorded, not {first} and {second}"
        );
        if kind == "postgres" {
            assert!(first, "{kind}: the first in the queue records its plan");
        }
        let chunks = under
            .ledger
            .claimable(STREAM, SOURCE, i64::MIN, i64::MAX, i64::MAX)
            .await
            .expect("chunks");
        assert_eq!(chunks.len(), 1, "{kind}: {chunks:?}");
        let expected = if first { clip(5..15) } else { clip(8..12) };
        assert_eq!(chunks[0].plan.clip_range(), expected.clip_range(), "{kind}");
    }
}

/// `rebuild-ledger`'s insert: a chunk the destination holds is recorded done with its
/// size and fragments; one over a held range or fragment is refused and changes nothing.
#[tokio::test]
async fn an_archived_chunk_is_restored_done_and_refused_over_what_is_held() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        let restore = |plan: ChunkPlan, key: &'static str| {
            let ledger = ledger.clone();
            async move {
                ledger
                    .insert_archived(STREAM, SOURCE, &plan, key, 4242)
                    .await
                    .expect("insert archived")
            }
        };
        assert!(restore(clip(0..10), "k0").await, "{kind}");
        assert!(
            !restore(clip(5..15), "k5").await,
            "{kind}: overlapping range"
        );
        assert!(
            !restore(ChunkPlan::of(ChunkKind::Late, vec![fragment(3)]), "k3").await,
            "{kind}: held fragment"
        );
        let done = ledger
            .done_in(STREAM, SOURCE, T0 - 1, T0 + 40_000)
            .await
            .expect("done");
        assert_eq!(done.len(), 1, "{kind}");
        assert_eq!(done[0].object_key, "k0", "{kind}");
        assert_eq!(done[0].state, ChunkState::Done, "{kind}");
        assert_eq!(done[0].archived_bytes, Some(4242), "{kind}");
        assert_eq!(done[0].archived_crc32c, None, "{kind}: not known again");
        assert_eq!(
            ledger
                .fragments_of(done[0].id)
                .await
                .expect("fragments")
                .len(),
            10,
            "{kind}"
        );
        let holdings = ledger
            .holdings(STREAM, SOURCE, T0, T0 + 40_000)
            .await
            .expect("holdings");
        assert_eq!(
            holdings.held.len(),
            10,
            "{kind}: the refused ones left nothing"
        );
    }
}

/// `renew` extends a claim and never shortens it: a heartbeat may have extended it further
/// than the worker's own renewal asks.
#[tokio::test]
async fn renewing_extends_a_lease_and_never_shortens_it() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(id, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        let lease_until = |ledger: Arc<dyn Ledger>| async move {
            let chunk = ledger.chunk(id).await.expect("read").expect("exists");
            chunk.lease_until_ms
        };
        ledger
            .renew(&lease, T0 + 3 * LEASE_MS)
            .await
            .expect("renew");
        assert_eq!(
            lease_until(ledger.clone()).await,
            Some(T0 + 3 * LEASE_MS),
            "{kind}: extended"
        );
        ledger
            .renew(&lease, T0 + 2 * LEASE_MS)
            .await
            .expect("renew");
        assert_eq!(
            lease_until(ledger.clone()).await,
            Some(T0 + 3 * LEASE_MS),
            "{kind}: never shortened"
        );
        let stale = kvs_archiver::ledger::Lease {
            generation: lease.generation + 1,
            ..lease
        };
        assert!(
            matches!(
                ledger.renew(&stale, T0 + 4 * LEASE_MS).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}: only the holder renews"
        );
    }
}

/// A split is all or nothing: a part or an expired record over another chunk leaves the
/// chunk as it was, still held, and a good split then succeeds under the same lease.
#[tokio::test]
async fn a_split_that_would_overlap_another_chunk_changes_nothing() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        assert!(insert(&*ledger, &clip(0..10)).await, "{kind}");
        assert!(insert(&*ledger, &clip(20..30)).await, "{kind}");
        let (chunk, lease) = ledger
            .claim_next(STREAM, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
            .await
            .expect("claim")
            .expect("claimed");
        assert_eq!(chunk.plan.start_ms, T0, "{kind}: the first chunk");
        let over_the_next = vec![
            (clip(0..5), "k/a".to_string()),
            (clip(18..25), "k/b".to_string()),
        ];
        let gone_over_the_next = clip(22..24);
        let attempts = [
            ledger.split(&lease, &over_the_next, None).await,
            ledger
                .split(
                    &lease,
                    &[(clip(0..5), "k/a".to_string())],
                    Some((&gone_over_the_next, "deleted by retention")),
                )
                .await,
        ];
        for attempt in attempts {
            assert!(
                matches!(attempt, Err(Error::LedgerInvariant(_))),
                "{kind}: {attempt:?}"
            );
            let kept = ledger.chunk(chunk.id).await.expect("read").expect("kept");
            assert_eq!(kept.state, ChunkState::Fetching, "{kind}: still held");
            assert_eq!(
                ledger
                    .fragments_of(chunk.id)
                    .await
                    .expect("fragments")
                    .len(),
                10,
                "{kind}"
            );
            let summary = ledger
                .range_summary(STREAM, SOURCE, i64::MIN, i64::MAX)
                .await
                .expect("summary");
            assert_eq!(
                (summary.chunks, summary.in_flight),
                (2, 1),
                "{kind}: nothing recorded"
            );
        }
        let halves = vec![
            (clip(0..5), "k/a".to_string()),
            (clip(5..10), "k/b".to_string()),
        ];
        ledger
            .split(&lease, &halves, None)
            .await
            .expect("the lease still holds");
        assert!(
            ledger.chunk(chunk.id).await.expect("read").is_none(),
            "{kind}"
        );
    }
}

/// An expired chunk is final; a converted one is planned again under its new kind and
/// key, and the lease it was held under ends.
#[tokio::test]
async fn an_expired_chunk_is_final_and_a_converted_one_is_planned_again() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        insert(&*ledger, &clip(0..10)).await;
        insert(&*ledger, &clip(10..20)).await;
        let mut leases = Vec::new();
        for _ in 0..2 {
            let (chunk, lease) = ledger
                .claim_next(STREAM, SOURCE, i64::MIN, i64::MAX, T0, LEASE_MS, &[])
                .await
                .expect("claim")
                .expect("claimed");
            leases.push((chunk.id, lease));
        }
        let ((gone, gone_lease), (other, other_lease)) = (leases[0], leases[1]);
        ledger
            .mark_expired(&gone_lease, "KVS deleted the fragments")
            .await
            .expect("expired");
        let chunk = ledger.chunk(gone).await.expect("read").expect("exists");
        assert_eq!(chunk.state, ChunkState::Expired, "{kind}");
        assert_eq!(chunk.error_kind.as_deref(), Some("expired"), "{kind}");
        assert_eq!(
            chunk.last_error.as_deref(),
            Some("KVS deleted the fragments")
        );
        assert!(
            ledger
                .claim(gone, T0 + 10 * LEASE_MS, LEASE_MS)
                .await
                .expect("claim")
                .is_none(),
            "{kind}: final"
        );
        let refused = ledger
            .convert(&other_lease, ChunkKind::Clip, "k/other.mp4")
            .await;
        assert!(
            matches!(&refused, Err(Error::LedgerInvariant(m)) if m.contains("cannot become a clip")),
            "{kind}: a clip range is added by an insert alone: {refused:?}"
        );
        ledger
            .convert(&other_lease, ChunkKind::Mkv, "k/other.mkv")
            .await
            .expect("converted");
        let chunk = ledger.chunk(other).await.expect("read").expect("exists");
        assert_eq!(
            (chunk.state, chunk.plan.kind, chunk.object_key.as_str()),
            (ChunkState::Planned, ChunkKind::Mkv, "k/other.mkv"),
            "{kind}"
        );
        assert_eq!(chunk.owner, None, "{kind}");
        assert!(
            matches!(
                ledger.mark_done(&other_lease, &archived()).await,
                Err(Error::LeaseLost { .. })
            ),
            "{kind}: the claim ended with the conversion"
        );
        let summary = ledger
            .range_summary(STREAM, SOURCE, i64::MIN, i64::MAX)
            .await
            .expect("summary");
        assert_eq!((summary.pending, summary.expired.len()), (1, 1), "{kind}");
    }
}

/// What verify and the metrics read (object keys, archived through, oldest unarchived,
/// counts, status), before and after a done chunk is planned again.
#[tokio::test]
async fn a_done_chunk_planned_again_leaves_the_reports_in_step() {
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        assert_eq!(ledger.identity().instance, "test-a", "{kind}");
        insert(&*ledger, &clip(0..10)).await;
        let done = only_chunk_id(&*ledger).await;
        let lease = ledger
            .claim(done, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        ledger.mark_done(&lease, &archived()).await.expect("done");
        insert(&*ledger, &clip(10..20)).await;
        let mut keys = ledger.object_keys(STREAM).await.expect("keys");
        keys.sort();
        assert_eq!(keys.len(), 2, "{kind}: {keys:?}");
        assert!(ledger
            .object_keys("elsewhere")
            .await
            .expect("keys")
            .is_empty());
        let through = ledger.archived_through(STREAM).await.expect("through");
        assert_eq!(through, Some(T0 + 18_000), "{kind}");
        let oldest = ledger
            .oldest_unarchived(STREAM, SOURCE)
            .await
            .expect("oldest");
        assert_eq!(oldest, Some(T0 + 20_000), "{kind}");
        let mut counts = ledger.counts(STREAM).await.expect("counts");
        counts.sort_by_key(|(state, _)| state.as_str());
        assert_eq!(
            counts,
            vec![(ChunkState::Done, 1), (ChunkState::Planned, 1)],
            "{kind}"
        );
        let status = ledger.status().await.expect("status");
        assert_eq!(status.len(), 1, "{kind}");
        assert_eq!(
            (status[0].done, status[0].pending, status[0].archived_bytes),
            (1, 1, 10),
            "{kind}"
        );
        assert!(ledger.requeue_chunk(done).await.expect("requeue"), "{kind}");
        let chunk = ledger.chunk(done).await.expect("read").expect("exists");
        assert_eq!(
            (chunk.state, chunk.archived_bytes),
            (ChunkState::Planned, None)
        );
        assert!(
            !ledger.requeue_chunk(done).await.expect("requeue"),
            "{kind}: a planned chunk is not requeued"
        );
        // Planned again by `verify --repair`: marked so, through a failed attempt, until
        // it is done, so whichever process tries next may replace the damaged object.
        assert_eq!(chunk.error_kind.as_deref(), Some("repair"), "{kind}");
        let lease = ledger
            .claim(done, T0, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        let failure = Failure {
            kind: "destination",
            message: "SlowDown".into(),
            next_attempt_ms: T0,
        };
        ledger.mark_failed(&lease, &failure).await.expect("failed");
        let failed = ledger.chunk(done).await.expect("read").expect("exists");
        assert_eq!(failed.error_kind.as_deref(), Some("repair"), "{kind}");
        assert_eq!(failed.last_error.as_deref(), Some("SlowDown"), "{kind}");
        let lease = ledger
            .claim(done, T0 + 1, LEASE_MS)
            .await
            .expect("claim")
            .expect("claimed");
        ledger.mark_done(&lease, &archived()).await.expect("done");
        let redone = ledger.chunk(done).await.expect("read").expect("exists");
        assert_eq!(redone.error_kind, None, "{kind}");
        assert!(ledger.requeue_chunk(done).await.expect("requeue"), "{kind}");
        assert_eq!(
            ledger.archived_through(STREAM).await.expect("through"),
            None
        );
        let oldest = ledger
            .oldest_unarchived(STREAM, SOURCE)
            .await
            .expect("oldest");
        assert_eq!(oldest, Some(T0), "{kind}");
        ledger.close().await;
    }
}

/// The daemon's per-stream memory: an update keeps what it leaves out, planning never
/// moves back, and a run recorded without an error clears the last one.
#[tokio::test]
async fn stream_progress_keeps_what_an_update_leaves_out_and_never_moves_planning_back() {
    use kvs_archiver::ledger::StreamProgress;
    for Under {
        kind,
        ledger,
        _dir: _keep,
        ..
    } in ledgers().await
    {
        let empty = ledger.progress(STREAM, SOURCE).await.expect("progress");
        assert_eq!(empty.planned_through_ms, None, "{kind}");
        let first = StreamProgress {
            planned_through_ms: Some(T0 + 100),
            retention_ms: Some(86_400_000),
            next_run_ms: Some(T0 + 5),
            last_run_ms: Some(T0),
            last_run_error: Some("boom".into()),
        };
        ledger
            .update_progress(STREAM, SOURCE, &first)
            .await
            .expect("update");
        let older = StreamProgress {
            planned_through_ms: Some(T0 + 50),
            ..StreamProgress::default()
        };
        ledger
            .update_progress(STREAM, SOURCE, &older)
            .await
            .expect("update");
        let kept = ledger.progress(STREAM, SOURCE).await.expect("progress");
        assert_eq!(
            (
                kept.planned_through_ms,
                kept.retention_ms,
                kept.next_run_ms,
                kept.last_run_ms,
                kept.last_run_error.as_deref()
            ),
            (
                Some(T0 + 100),
                Some(86_400_000),
                Some(T0 + 5),
                Some(T0),
                Some("boom")
            ),
            "{kind}"
        );
        let clean_run = StreamProgress {
            last_run_ms: Some(T0 + 10),
            ..StreamProgress::default()
        };
        ledger
            .update_progress(STREAM, SOURCE, &clean_run)
            .await
            .expect("update");
        let cleared = ledger.progress(STREAM, SOURCE).await.expect("progress");
        assert_eq!(
            (cleared.last_run_ms, cleared.last_run_error),
            (Some(T0 + 10), None),
            "{kind}"
        );
    }
}

/// Writes an unknown state into chunk `id`, past the schema's CHECK constraint, as a
/// damaged or newer ledger might hold.
async fn corrupt_state(under: &Under, id: i64) {
    use sqlx::Connection;
    let update = "UPDATE chunks SET state = 'bogus' WHERE id = $1";
    if under.kind == "sqlite" {
        let mut conn = sqlx::SqliteConnection::connect(&under.url)
            .await
            .expect("connect");
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut conn)
            .await
            .expect("pragma");
        sqlx::query(update)
            .bind(id)
            .execute(&mut conn)
            .await
            .expect("corrupt");
    } else {
        let mut conn = sqlx::PgConnection::connect(&under.url)
            .await
            .expect("connect");
        sqlx::query("ALTER TABLE chunks DROP CONSTRAINT chunks_state_check")
            .execute(&mut conn)
            .await
            .expect("drop check");
        sqlx::query(update)
            .bind(id)
            .execute(&mut conn)
            .await
            .expect("corrupt");
    }
}

/// A row the ledger cannot read is an error that names its table and key: not a panic,
/// and not a state guessed in its place.
#[tokio::test]
async fn a_row_the_ledger_cannot_read_is_an_error_that_names_it() {
    for under in ledgers().await {
        let (kind, ledger) = (under.kind, under.ledger.clone());
        insert(&*ledger, &clip(0..10)).await;
        let id = only_chunk_id(&*ledger).await;
        corrupt_state(&under, id).await;
        let error = ledger.chunk(id).await.expect_err("undecodable");
        let message = error.to_string();
        assert!(
            message.contains(&format!("chunks row {id}")) && message.contains("bogus"),
            "{kind}: {message}"
        );
        let Error::Ledger {
            source: sqlx::Error::Decode(source),
            ..
        } = &error
        else {
            panic!("{kind}: {error:?}");
        };
        let row = source
            .downcast_ref::<UndecodableRow>()
            .unwrap_or_else(|| panic!("{kind}: {source:?}"));
        assert_eq!((row.table, row.key.clone()), ("chunks", id.to_string()));
        for report in [
            ledger.status().await.map(|_| ()),
            ledger
                .range_summary(STREAM, SOURCE, i64::MIN, i64::MAX)
                .await
                .map(|_| ()),
        ] {
            let message = report.expect_err("undecodable").to_string();
            assert!(message.contains("bogus"), "{kind}: {message}");
        }
    }
}

/// Every method of the trait is called somewhere in this suite, so a new one cannot go
/// untested on either database.
#[test]
fn every_ledger_method_is_exercised_by_this_suite() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).expect("read");
    let (contract, suite) = (
        read("src/ledger/mod.rs"),
        read("tests/ledger_conformance.rs"),
    );
    let start = contract.find("pub trait Ledger").expect("the trait");
    let end = start + contract[start..].find("\n}\n").expect("its end");
    let methods: Vec<&str> = contract[start..end]
        .split("fn ")
        .skip(1)
        .filter_map(|rest| rest.split(['(', '<']).next())
        .collect();
    assert!(methods.len() > 30, "{methods:?}");
    let missing: Vec<&&str> = methods
        .iter()
        .filter(|m| !suite.contains(&format!(".{m}(")))
        .collect();
    assert!(missing.is_empty(), "never called here: {missing:?}");
}

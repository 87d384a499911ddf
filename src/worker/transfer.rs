//! One claimed chunk from KVS to the destination: list its range again (late fragments
//! join it, expired ones are confirmed), GetClip (or GetMediaForFragmentList for
//! Matroska), check the clip's header against the ledger's fragments, stream it into the
//! destination under the lease. The upload finishes before the ledger says done, so a crash in
//! between re-uploads the same bytes to the same key.

use super::{now_ms, Archiver};
use crate::config::StreamConfig;
use crate::destination::{ObjectMeta, Upload};
use crate::domain::{rfc3339, ChunkKind, ChunkPlan, Fragment, TimestampSource};
use crate::error::{Error, Result, Retryability};
use crate::ledger::{Archived, Chunk, Lease};
use crate::mp4;
use crate::plan::{plan_all, sort_and_dedup, ChunkLimits};
use crate::source::kvs::ClipBody;
use std::collections::HashSet;

/// A clip may play this much shorter or longer than its fragments' summed durations
/// before it counts as cut or as holding media the ledger does not know: less than KVS's
/// minimum fragment duration (1 s), so one fragment more or less is always noticed, yet
/// above per-fragment rounding.
const DURATION_TOLERANCE_MS: u64 = 500;
/// The most header bytes read while looking for `moov` before giving up.
const MAX_HEADER_BYTES: usize = 16 * 1024 * 1024;
/// A fragment missing from a listing counts as deleted by retention when its server
/// timestamp lies behind KVS's retention edge by our clock, give or take this much skew
/// between our clock and KVS's. Old fragments do not vanish from listings for any other
/// reason; a missing fragment well inside retention is a transient failure, tried again.
const EXPIRY_MARGIN_MS: i64 = 60_000;
/// Matroska's EBML magic: every GetMediaForFragmentList body starts with it.
const EBML_MAGIC: [u8; 4] = [0x1a, 0x45, 0xdf, 0xa3];

/// What a transfer did besides failing.
pub(crate) enum Transferred {
    /// The object is stored, whole.
    Archived(Archived),
    /// The chunk was split, converted to Matroska, or recorded expired: nothing to mark.
    Changed,
}

impl Archiver {
    /// One attempt for a claimed chunk.
    pub(crate) async fn transfer(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        hard: &tokio_util::sync::CancellationToken,
    ) -> Result<Transferred> {
        // `verify --repair` found this chunk's object damaged: its rewrite replaces it.
        if chunk.error_kind.as_deref() == Some("repair") {
            self.allow_replacing(&chunk.object_key);
        }
        // An earlier claim may have written the object and died before the ledger
        // recorded it: found, it is recorded as it is, with no GetClip and no upload.
        if lease.generation > 1 && !self.may_replace(&chunk.object_key) {
            if let Some(archived) = self.already_archived(chunk).await? {
                return Ok(Transferred::Archived(archived));
            }
        }
        let mine = self.ledger.fragments_of(chunk.id).await?;
        if chunk.plan.kind == ChunkKind::Mkv {
            return self.transfer_mkv(stream, chunk, lease, &mine, hard).await;
        }
        let (start, end) = chunk.plan.clip_range();
        // A page a little larger than the chunk: ListFragments costs its page size.
        let page = i64::from(chunk.plan.fragment_count) * 5 / 4 + 20;
        let mut listed = self.source.list_paged(stream, start, end, page).await?;
        sort_and_dedup(&mut listed);
        // A chunk planned before fragments were recorded takes what its range lists now.
        let mine = match self.reconcile(stream, chunk, lease, mine, &listed).await? {
            Reconciled::Fragments(mine) => mine,
            Reconciled::Changed => return Ok(Transferred::Changed),
        };
        let expected = mine.iter().map(|f| f.duration_ms).sum();
        let body = match self
            .source
            .get_clip(stream, start, end, chunk.plan.fragment_count)
            .await
        {
            Ok(body) => body,
            Err(e) if e.means_unpackageable() => {
                return self.isolate_unpackageable(stream, chunk, lease, &e).await;
            }
            // KVS de-duplicates producer timestamps by "the oldest ingested collection":
            // a late fragment GetClip will not return is fetched by number.
            Err(e) if e.means_no_media() && chunk.plan.kind == ChunkKind::Late => {
                return self.to_matroska(stream, chunk, lease).await;
            }
            // We just listed the fragments: KVS's listing and GetClip disagree for a moment
            // (eventual consistency). Retried; expiry is decided by listing, above.
            Err(e) if e.means_no_media() => {
                return Err(Error::Clip {
                    key: chunk.object_key.clone(),
                    message: format!(
                        "GetClip found no media although ListFragments lists it ({e})"
                    ),
                    retry: Retryability::Transient,
                })
            }
            Err(e) => return Err(e),
        };
        self.upload_clip(stream, chunk, lease, body, expected, hard)
            .await
    }

    /// The object an earlier claim of `chunk` wrote, if it is at the chunk's key: its
    /// metadata names the chunk's fragments and kind. Its size and CRC32C come from the
    /// store (HEAD, or a read where the store keeps no whole-object CRC32C). Another
    /// object there is [`Error::Occupied`] when writes are create-only (it would refuse
    /// the upload anyway, after a GetClip KVS bills), and `None` otherwise.
    async fn already_archived(&self, chunk: &Chunk) -> Result<Option<Archived>> {
        let key = &chunk.object_key;
        let Some(head) = self.destination.head(key).await? else {
            return Ok(None);
        };
        let plan = &chunk.plan;
        let says = |name: &str, value: &str| head.meta.get(name).is_some_and(|v| v == value);
        let this_chunk = says("kvs-stream", &chunk.stream)
            && says("kvs-first-fragment", &plan.first_fragment)
            && says("kvs-chunk-kind", plan.kind.as_str());
        let whole = says("kvs-last-fragment", &plan.last_fragment)
            && says("kvs-fragment-count", &plan.fragment_count.to_string());
        // An earlier copy of this chunk holds fewer of its fragments, ending no later.
        let earlier_copy =
            head.meta
                .get("kvs-fragment-count")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n < plan.fragment_count)
                && head.meta.get("kvs-last-fragment").is_some_and(|last| {
                    fragment_order(last) <= fragment_order(&plan.last_fragment)
                });
        // A directory's rename replaces: only S3 writes are create-only.
        let create_only = self.config.destination.create_only
            && matches!(*self.destination, crate::destination::Destination::S3(_));
        if this_chunk && !whole && earlier_copy {
            // An earlier claim's copy, before fragments listed late joined the chunk: the
            // new clip replaces it.
            tracing::info!(key = %key, "an earlier copy of this chunk, with fewer fragments, is replaced");
            self.allow_replacing(key);
            return Ok(None);
        }
        if !(this_chunk && whole) {
            if !create_only {
                return Ok(None);
            }
            return Err(Error::Occupied {
                target: format!("{} {key}", self.destination.describe()),
                found: "its metadata names other fragments than this chunk's".into(),
            });
        }
        let crc32c = match head.crc32c {
            Some(crc) => crc,
            None => match self.destination.inspect(key).await? {
                Some(stored) if stored.size == head.size => stored.crc32c,
                _ => return Ok(None),
            },
        };
        tracing::info!(key = %key, "an earlier attempt stored the object before it was recorded: recorded now, nothing fetched again");
        Ok(Some(Archived {
            bytes: head.size,
            crc32c,
        }))
    }

    /// Brings the chunk's fragments in line with a fresh listing of its range: attaches
    /// fragments listed late that its GetClip will return, and confirms any that KVS no
    /// longer lists as expired (splitting them off), or fails for a later pass when they
    /// are not past retention yet.
    async fn reconcile(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        mine: Vec<Fragment>,
        listed: &[Fragment],
    ) -> Result<Reconciled> {
        let mine_numbers: HashSet<String> = mine.iter().map(|f| f.number.clone()).collect();
        if chunk.plan.kind == ChunkKind::Late
            && listed.iter().any(|f| !mine_numbers.contains(&f.number))
        {
            // Another fragment shares the late fragment's millisecond now: GetClip cannot
            // select it alone.
            self.to_matroska(stream, chunk, lease).await?;
            return Ok(Reconciled::Changed);
        }
        let mut mine = mine;
        if chunk.plan.kind == ChunkKind::Clip {
            let holdings = self
                .ledger
                .holdings(
                    &chunk.stream,
                    chunk.timestamp_source,
                    chunk.plan.start_ms,
                    chunk.plan.end_ms.max(chunk.plan.start_ms + 1),
                )
                .await?;
            let producer = chunk.timestamp_source == TimestampSource::Producer;
            // Fragments of other chunks inside the range (late ones, archived alone while
            // this chunk waited, or before `verify --repair` queued it again) would be in
            // its clip too: split it around them.
            let foreign = listed.iter().enumerate().any(|(i, f)| {
                getclip_returns(listed, i, producer)
                    && holdings.held.contains(&f.number)
                    && !mine_numbers.contains(&f.number)
            });
            if foreign && !mine.is_empty() {
                return self.split_around(stream, chunk, lease, &mine, listed).await;
            }
            let newcomers: Vec<Fragment> = listed
                .iter()
                .enumerate()
                .filter(|(i, f)| {
                    getclip_returns(listed, *i, producer) && !holdings.held.contains(&f.number)
                })
                .map(|(_, f)| f.clone())
                .collect();
            if !newcomers.is_empty() {
                tracing::info!(key = %chunk.object_key, fragments = newcomers.len(), "fragments listed late inside the chunk's range join it");
                crate::metrics::late_fragments(&chunk.stream, newcomers.len() as u64);
                mine = self.ledger.attach_fragments(lease, &newcomers).await?;
            }
        }
        let listed_numbers: HashSet<&str> = listed.iter().map(|f| f.number.as_str()).collect();
        let (present, missing): (Vec<Fragment>, Vec<Fragment>) = mine
            .into_iter()
            .partition(|f| listed_numbers.contains(f.number.as_str()));
        if missing.is_empty() {
            return Ok(Reconciled::Fragments(present));
        }
        let retention_ms = self.source.retention_ms(stream).await?;
        let edge = now_ms() - retention_ms + EXPIRY_MARGIN_MS;
        if missing.iter().any(|f| f.server_ms >= edge) {
            return Err(Error::Kvs {
                op: "ListFragments",
                stream: chunk.stream.clone(),
                code: None,
                status: None,
                message: format!(
                    "{} of the chunk's fragments are not listed although KVS should still hold them (oldest received {}); trying again later",
                    missing.len(),
                    rfc3339(missing.iter().map(|f| f.server_ms).min().unwrap_or_default())
                ),
                retry: Retryability::Transient,
            });
        }
        tracing::error!(key = %chunk.object_key, fragments = missing.len(), "fragments expired in KVS before they were archived");
        crate::metrics::fragments_expired(&chunk.stream, missing.len() as u64);
        let reason = "deleted by KVS retention before it was archived (confirmed by ListFragments)";
        if present.is_empty() {
            self.ledger.mark_expired(lease, reason).await?;
            return Ok(Reconciled::Changed);
        }
        // The record of what is gone holds its fragments but claims no GetClip range (a
        // Matroska-kind row): with producer timestamps, gone and present fragments may
        // interleave, and a range would overlap the parts.
        let gone = ChunkPlan::of(ChunkKind::Mkv, missing);
        let parts = self.replan(stream, &present, self.config.archive.limits());
        self.ledger
            .split(lease, &parts, Some((&gone, reason)))
            .await?;
        Ok(Reconciled::Changed)
    }

    /// Replaces the chunk by parts of its own fragments whose ranges reach over no
    /// fragment of another chunk.
    async fn split_around(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        mine: &[Fragment],
        listed: &[Fragment],
    ) -> Result<Reconciled> {
        let producer = stream.timestamp_source == TimestampSource::Producer;
        let numbers: HashSet<&str> = mine.iter().map(|f| f.number.as_str()).collect();
        let mut packer = crate::plan::Packer::new(self.config.archive.limits())
            .separating_equal_timestamps(producer);
        let mut plans = Vec::new();
        for (i, f) in listed.iter().enumerate() {
            if numbers.contains(f.number.as_str()) {
                packer.push(f.clone(), &mut plans);
            } else if getclip_returns(listed, i, producer) {
                packer.cut(&mut plans);
            }
        }
        packer.finish(&mut plans);
        let parts = self.with_keys(stream, plans);
        tracing::info!(key = %chunk.object_key, parts = parts.len(), "other chunks hold fragments inside this range: split around them");
        self.ledger.split(lease, &parts, None).await?;
        Ok(Reconciled::Changed)
    }

    /// Chunks for `fragments` within `limits`, with their keys.
    fn replan(
        &self,
        stream: &StreamConfig,
        fragments: &[Fragment],
        limits: ChunkLimits,
    ) -> Vec<(ChunkPlan, String)> {
        let producer = stream.timestamp_source == TimestampSource::Producer;
        let mut packer = crate::plan::Packer::new(limits).separating_equal_timestamps(producer);
        let mut plans = Vec::new();
        for f in fragments {
            packer.push(f.clone(), &mut plans);
        }
        packer.finish(&mut plans);
        self.with_keys(stream, plans)
    }

    /// Each plan with its object key.
    fn with_keys(&self, stream: &StreamConfig, plans: Vec<ChunkPlan>) -> Vec<(ChunkPlan, String)> {
        plans
            .into_iter()
            .map(|p| {
                let key = self.key(stream, &p);
                (p, key)
            })
            .collect()
    }

    /// Splits a chunk in halves (GetClip cut it short, or refused part of its media).
    async fn split_in_halves(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
    ) -> Result<Transferred> {
        let fragments = self.ledger.fragments_of(chunk.id).await?;
        let fragments = if fragments.is_empty() {
            let (start, end) = chunk.plan.clip_range();
            let mut listed = self.source.list(stream, start, end).await?;
            sort_and_dedup(&mut listed);
            listed
        } else {
            fragments
        };
        let halved = ChunkLimits {
            max_fragments: (chunk.plan.fragment_count / 2).max(1),
            max_bytes: (chunk.plan.bytes / 2).max(1),
            ..self.config.archive.limits()
        };
        let parts = if fragments.len() > 1 {
            plan_all(&fragments, halved)
        } else {
            Vec::new()
        };
        if parts.len() < 2 {
            // One fragment, or one group sharing a timestamp: GetClip cannot take it apart.
            return self.to_matroska(stream, chunk, lease).await;
        }
        let parts = self.with_keys(stream, parts);
        self.ledger.split(lease, &parts, None).await?;
        Ok(Transferred::Changed)
    }

    async fn to_matroska(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
    ) -> Result<Transferred> {
        let mut plan = chunk.plan.clone();
        plan.kind = ChunkKind::Mkv;
        let key = self.key(stream, &plan);
        tracing::warn!(key = %chunk.object_key, mkv = %key, "GetClip cannot package these fragments: fetching them by number as Matroska");
        self.ledger.convert(lease, ChunkKind::Mkv, &key).await?;
        Ok(Transferred::Changed)
    }

    async fn isolate_unpackageable(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        error: &Error,
    ) -> Result<Transferred> {
        tracing::warn!(key = %chunk.object_key, %error, "KVS cannot package this range as one MP4: splitting the chunk");
        self.split_in_halves(stream, chunk, lease).await
    }

    /// GetClip's body: header check, then the upload.
    async fn upload_clip(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        mut body: ClipBody,
        expected_ms: u64,
        hard: &tokio_util::sync::CancellationToken,
    ) -> Result<Transferred> {
        let key = chunk.object_key.clone();
        let (head, header) = read_header(&mut body, &key).await?;
        if header.duration_ms + DURATION_TOLERANCE_MS < expected_ms {
            tracing::warn!(%key, got_ms = header.duration_ms, planned_ms = expected_ms, "GetClip cut the clip short: splitting the chunk");
            return self.split_in_halves(stream, chunk, lease).await;
        }
        if header.duration_ms > expected_ms + DURATION_TOLERANCE_MS {
            // Either the clip's timeline keeps gaps between fragments, or a fragment arrived
            // between our listing and GetClip. Refusing would stall the chunk for good in
            // the first case; in the second, the fragment is archived again later as a late
            // one: twice at worst, never lost.
            tracing::info!(%key, got_ms = header.duration_ms, planned_ms = expected_ms, "clip plays longer than its listed fragments");
        }
        let meta = object_meta(stream, chunk, Some(header.duration_ms));
        let archived = self
            .stream_body(chunk, lease, body, head, meta, Some(header.total_len), hard)
            .await?;
        Ok(Transferred::Archived(archived))
    }

    async fn transfer_mkv(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        mine: &[Fragment],
        hard: &tokio_util::sync::CancellationToken,
    ) -> Result<Transferred> {
        let numbers: Vec<String> = mine.iter().map(|f| f.number.clone()).collect();
        if numbers.is_empty() {
            return Err(Error::Clip {
                key: chunk.object_key.clone(),
                message: "a Matroska chunk without recorded fragments cannot be fetched".into(),
                retry: Retryability::Permanent,
            });
        }
        let mut body = match self
            .source
            .get_media_for_fragment_list(stream, &numbers)
            .await
        {
            Ok(body) => body,
            Err(e) if e.means_no_media() => {
                // Gone for good only if the listing agrees (reconcile confirms expiry).
                let (start, end) = (mine[0].start_ms, mine[mine.len() - 1].start_ms + 1);
                let mut listed = self.source.list(stream, start, end).await?;
                sort_and_dedup(&mut listed);
                return match self
                    .reconcile(stream, chunk, lease, mine.to_vec(), &listed)
                    .await?
                {
                    Reconciled::Changed => Ok(Transferred::Changed),
                    Reconciled::Fragments(_) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let mut head = Vec::new();
        while head.len() < EBML_MAGIC.len() {
            match body.next().await? {
                Some(bytes) => head.extend_from_slice(&bytes),
                None => break,
            }
        }
        if !head.starts_with(&EBML_MAGIC) {
            return Err(Error::Clip {
                key: chunk.object_key.clone(),
                message: format!(
                    "GetMediaForFragmentList returned no Matroska ({} bytes)",
                    head.len()
                ),
                retry: Retryability::Transient,
            });
        }
        let meta = object_meta(stream, chunk, None);
        let archived = self
            .stream_body(chunk, lease, body, head, meta, None, hard)
            .await?;
        Ok(Transferred::Archived(archived))
    }

    /// Streams `head` and the rest of `body` into the destination, renewing the lease; checks the
    /// length against `expected_len` when the container says it.
    #[allow(clippy::too_many_arguments)]
    async fn stream_body(
        &self,
        chunk: &Chunk,
        lease: &Lease,
        mut body: ClipBody,
        head: Vec<u8>,
        meta: ObjectMeta,
        expected_len: Option<u64>,
        hard: &tokio_util::sync::CancellationToken,
    ) -> Result<Archived> {
        let key = chunk.object_key.clone();
        let mut upload = self.begin_upload(chunk, meta).await?;
        if let Err(e) = self.ledger.mark_uploading(lease, None).await {
            upload.abort().await;
            return Err(e);
        }
        let most = BodyLimit::of(chunk, expected_len);
        let mut received = head.len() as u64;
        let mut recorded_upload = false;
        let mut renewed = std::time::Instant::now();
        let mut next = Some(bytes::Bytes::from(head));
        loop {
            if let Some(bytes) = next.take() {
                if let Err(e) = upload.write(bytes).await {
                    upload.abort().await;
                    return Err(e);
                }
                crate::crashpoint::hit("mid-body");
                if renewed.elapsed() > self.renewal_interval() {
                    match self.renew(lease).await {
                        Ok(()) => renewed = std::time::Instant::now(),
                        // The ledger is away for a moment: keep streaming; the check
                        // before the object becomes visible decides.
                        Err(e @ Error::Ledger { .. }) => {
                            renewed = std::time::Instant::now();
                            tracing::warn!(error = %e, "lease not renewed: the ledger does not answer");
                        }
                        Err(e) => {
                            upload.abort().await;
                            return Err(e);
                        }
                    }
                }
                if !recorded_upload {
                    if let Some(id) = upload.upload_id() {
                        if let Err(e) = self.ledger.mark_uploading(lease, Some(id)).await {
                            upload.abort().await;
                            return Err(e);
                        }
                        recorded_upload = true;
                        crate::crashpoint::hit("mid-upload");
                    }
                }
            }
            let piece = tokio::select! {
                piece = body.next() => piece,
                _ = hard.cancelled() => {
                    upload.abort().await;
                    return Err(Error::Interrupted);
                }
            };
            match piece {
                Ok(Some(bytes)) => {
                    received += bytes.len() as u64;
                    if let Some(error) = most.overrun(&key, received) {
                        upload.abort().await;
                        return Err(error);
                    }
                    next = Some(bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            }
        }
        if let Some(expected) = expected_len {
            if received != expected {
                upload.abort().await;
                return Err(Error::Clip {
                    key,
                    message: format!("body has {received} bytes, the MP4 header says {expected}"),
                    retry: Retryability::Transient,
                });
            }
        }
        // The last lease check before the object becomes visible: a worker that lost its
        // lease never completes an upload the new holder may be writing too.
        if let Err(e) = self.ledger_write("renew", || self.renew(lease)).await {
            upload.abort().await;
            return Err(e);
        }
        let finishing = std::time::Instant::now();
        let archived = upload.finish().await?;
        crate::metrics::upload_latency(&chunk.stream, finishing.elapsed());
        crate::crashpoint::hit("after-upload");
        Ok(archived)
    }
}

impl Archiver {
    /// Starts the upload of `chunk`'s object, with its stream's storage settings.
    async fn begin_upload(&self, chunk: &Chunk, meta: ObjectMeta) -> Result<Upload> {
        let (_, content_type) = chunk.plan.kind.container();
        let mut settings = self
            .object_settings(&chunk.stream)
            .for_object(chunk.plan.end_ms, now_ms());
        settings.replace_existing = self.may_replace(&chunk.object_key);
        self.destination
            .begin(&chunk.object_key, meta, content_type, settings)
            .await
    }
}

/// Fragment numbers in order: longer is later, then by digits.
fn fragment_order(number: &str) -> (usize, &str) {
    (number.len(), number)
}

/// Whether GetClip returns the `i`th of `listed` (sorted): KVS keeps only the oldest
/// ingested of fragments sharing a producer timestamp.
fn getclip_returns(listed: &[Fragment], i: usize, producer: bool) -> bool {
    !(producer && i > 0 && listed[i - 1].start_ms == listed[i].start_ms)
}

enum Reconciled {
    Fragments(Vec<Fragment>),
    Changed,
}

/// Reads the body until the MP4 header (`moov`) is complete.
async fn read_header(body: &mut ClipBody, key: &str) -> Result<(Vec<u8>, mp4::ClipHeader)> {
    let mut head = Vec::new();
    let header = loop {
        match body.next().await? {
            Some(bytes) => head.extend_from_slice(&bytes),
            None => break mp4::parse_header(&head).ok().flatten(),
        }
        match mp4::parse_header(&head) {
            Ok(Some(header)) => break Some(header),
            Ok(None) if head.len() < MAX_HEADER_BYTES => continue,
            Ok(None) => break None,
            Err(e) => {
                return Err(Error::Clip {
                    key: key.to_string(),
                    message: format!("GetClip returned no playable MP4: {e}"),
                    retry: Retryability::Transient,
                })
            }
        }
    };
    match header {
        Some(header) => Ok((head, header)),
        None => Err(Error::Clip {
            key: key.to_string(),
            message: format!(
                "GetClip body ended after {} bytes without an MP4 header",
                head.len()
            ),
            retry: Retryability::Transient,
        }),
    }
}

fn object_meta(stream: &StreamConfig, chunk: &Chunk, duration_ms: Option<u64>) -> ObjectMeta {
    let mut pairs = vec![
        ("kvs-stream", stream.label()),
        ("kvs-timestamp-source", stream.timestamp_source.to_string()),
        ("kvs-start", rfc3339(chunk.plan.start_ms)),
        ("kvs-end", rfc3339(chunk.plan.end_ms)),
        ("kvs-fragment-count", chunk.plan.fragment_count.to_string()),
        ("kvs-first-fragment", chunk.plan.first_fragment.clone()),
        ("kvs-last-fragment", chunk.plan.last_fragment.clone()),
        ("kvs-chunk-kind", chunk.plan.kind.as_str().to_string()),
    ];
    if let Some(ms) = duration_ms {
        pairs.push(("kvs-duration-ms", ms.to_string()));
    }
    ObjectMeta { pairs }
}

/// The most bytes a body may have: the MP4 header's length, or for Matroska twice the
/// listed fragment sizes and 16 MiB. A body without end would otherwise fill the
/// destination.
struct BodyLimit {
    /// Bytes allowed.
    bytes: u64,
    /// Whether the MP4 header gave them (else the listing's sizes).
    from_header: bool,
}

impl BodyLimit {
    fn of(chunk: &Chunk, expected_len: Option<u64>) -> BodyLimit {
        BodyLimit {
            bytes: expected_len
                .unwrap_or_else(|| chunk.plan.bytes.saturating_mul(2).saturating_add(16 << 20)),
            from_header: expected_len.is_some(),
        }
    }

    /// The error for `received` bytes, once they run past the limit.
    fn overrun(&self, key: &str, received: u64) -> Option<Error> {
        let given_by = if self.from_header {
            "the MP4 header says"
        } else {
            "its fragments' listed sizes allow"
        };
        (received > self.bytes).then(|| Error::Clip {
            key: key.to_string(),
            message: format!(
                "body runs past {} bytes, more than {given_by}: stopped, nothing kept",
                self.bytes
            ),
            retry: Retryability::Transient,
        })
    }
}

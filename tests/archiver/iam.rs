//! `iam-policy` against the calls the program really makes.

use crate::support::process::text;
use crate::support::world::{historical, recent, rfc3339, World};
use std::collections::BTreeSet;

/// The S3 operation of a logged request ("METHOD /bucket/key?query"), as AWS names it.
fn s3_operation(line: &str) -> String {
    let (method, target) = line.split_once(' ').unwrap_or((line, ""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has = |name: &str| {
        query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    };
    let object = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty());
    let op = match (method, object) {
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        ("PUT", true) if has("uploadId") => "UploadPart",
        ("PUT", true) => "PutObject",
        ("DELETE", true) if has("uploadId") => "AbortMultipartUpload",
        ("DELETE", true) => "DeleteObject",
        ("GET", true) if has("uploadId") => "ListParts",
        ("GET", true) => "GetObject",
        ("HEAD", true) => "HeadObject",
        ("GET", false) if has("uploads") => "ListMultipartUploads",
        ("GET", false) if has("object-lock") => "GetObjectLockConfiguration",
        ("GET", false) if has("list-type") => "ListObjectsV2",
        ("GET", false) => "ListObjects",
        ("HEAD", false) => "HeadBucket",
        ("PUT", false) => "CreateBucket",
        _ => "unknown",
    };
    op.to_string()
}

/// The IAM action each API operation needs (AWS's service authorization reference).
fn iam_action(op: &str) -> &'static str {
    match op {
        "DescribeStream" => "kinesisvideo:DescribeStream",
        "GetDataEndpoint" => "kinesisvideo:GetDataEndpoint",
        "ListFragments" => "kinesisvideo:ListFragments",
        "GetClip" => "kinesisvideo:GetClip",
        "GetMediaForFragmentList" => "kinesisvideo:GetMediaForFragmentList",
        "GetMedia" => "kinesisvideo:GetMedia",
        "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload" | "PutObject" => {
            "s3:PutObject"
        }
        "AbortMultipartUpload" => "s3:AbortMultipartUpload",
        "GetObject" | "HeadObject" => "s3:GetObject",
        "DeleteObject" => "s3:DeleteObject",
        "ListParts" => "s3:ListMultipartUploadParts",
        "ListMultipartUploads" => "s3:ListBucketMultipartUploads",
        "ListObjectsV2" | "ListObjects" | "HeadBucket" => "s3:ListBucket",
        "CreateBucket" => "s3:CreateBucket",
        "GetObjectLockConfiguration" => "s3:GetBucketObjectLockConfiguration",
        "RestoreObject" => "s3:RestoreObject",
        _ => "unknown",
    }
}

/// `serve`'s playback API is asked for a clip, a playlist and its first segments, a
/// preview and spans.
async fn the_playback_api_is_asked_for_everything(world: &World, start: i64, a: &str, b: &str) {
    let served = crate::support::serve::Served::start(world).await;
    let range = format!("start={a}&end={b}");
    for path in [
        format!("/api/v1/streams/dock-cam/clip.mp4?{range}&ts=1"),
        format!("/api/v1/streams/dock-cam/spans?{range}"),
        format!(
            "/api/v1/streams/dock-cam/preview.mp4?at={}",
            rfc3339(start + 30_000)
        ),
    ] {
        let answer = served.get(&path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    }
    let playlist = served
        .get(&format!("/api/v1/streams/dock-cam/index.m3u8?{range}"))
        .await;
    assert_eq!(playlist.status, 200, "{}", playlist.text());
    let uris: Vec<String> = playlist
        .text()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("#EXT-X-MAP:URI=\"")
                .map(|u| u.trim_end_matches('"').to_string())
                .or_else(|| l.starts_with("hls/").then(|| l.to_string()))
        })
        .take(3)
        .collect();
    assert_eq!(uris.len(), 3, "{}", playlist.text());
    for uri in uris {
        let answer = served
            .get_signed(&format!("/api/v1/streams/dock-cam/{uri}"))
            .await;
        assert_eq!(answer.status, 200, "{uri}: {}", answer.text());
    }
    drop(served);
}

/// `iam-policy` allows exactly the actions the program calls: every request the emulator
/// and the S3 server saw from a backfill killed mid-upload and resumed (multipart, abort
/// of the dead upload, the orphan sweep, Matroska fragments), `verify`, a daemon pass,
/// `export`, `rebuild-ledger` and `serve`'s playback API (clip, playlist and segments,
/// preview, spans), and no action those runs did not need. Keys and listings stay under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_policy_allows_exactly_the_calls_the_program_makes() {
    let (start, end) = recent(0.05);
    let mut spec = historical("dock-cam", start, end, 4000, 1_500_000);
    spec.duplicate_producer_timestamp_at = vec![10, 31];
    spec.missing_codec_private_data_at = vec![30];
    let world = World::with_sections(vec![spec], "concurrency = 1", "", &|_| {
        "timestamp_source = \"producer\"".into()
    })
    .await;
    let s3_before = world.s3.as_ref().expect("s3s").requests().len();
    let kvs_before = world.emu.requests().len();
    let (a, b) = (rfc3339(start), rfc3339(end));
    let exported = world.work.path().join("range.mp4").display().to_string();
    let crashed = world
        .command(&[
            "backfill", "--stream", "dock-cam", "--start", &a, "--end", &b,
        ])
        .env(kvs_archiver::crashpoint::ENV, "mid-upload")
        .output()
        .await
        .expect("runs");
    assert!(!crashed.status.success(), "{}", text(&crashed));
    for args in [
        vec![
            "backfill", "--stream", "dock-cam", "--start", &a, "--end", &b,
        ],
        vec!["verify", "--stream", "dock-cam", "--start", &a, "--end", &b],
        vec!["run", "--once"],
        vec![
            "export", "--stream", "dock-cam", "--start", &a, "--end", &b, "-o", &exported,
        ],
        vec!["rebuild-ledger", "--merge"],
    ] {
        let out = world.run(&args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    the_playback_api_is_asked_for_everything(&world, start, &a, &b).await;
    let s3_log = world.s3.as_ref().expect("s3s").requests()[s3_before..].to_vec();
    let kvs_log = world.emu.requests()[kvs_before..].to_vec();
    let ops: BTreeSet<String> = kvs_log
        .iter()
        .map(|r| r.op.clone())
        .chain(s3_log.iter().map(|l| s3_operation(l)))
        .collect();
    for op in [
        "AbortMultipartUpload",
        "UploadPart",
        "GetMediaForFragmentList",
    ] {
        assert!(ops.contains(op), "the runs called {op}: {ops:?}");
    }
    let called: BTreeSet<&str> = ops.iter().map(|op| iam_action(op)).collect();

    let out = world.run(&["iam-policy"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let policy: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON policy");
    let allowed: BTreeSet<String> = kvs_archiver::iam::actions(&policy).into_iter().collect();
    let allowed: BTreeSet<&str> = allowed.iter().map(String::as_str).collect();
    assert_eq!(allowed, called, "policy against calls; S3 log: {s3_log:?}");

    // Every object request stays under the prefix the policy names.
    let object_resource = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find_map(|s| s["Resource"].as_str().filter(|r| r.ends_with('*')))
        .expect("an object resource")
        .to_string();
    assert_eq!(
        object_resource,
        format!("arn:aws:s3:::{}/kvs/*", world.bucket)
    );
    for line in &s3_log {
        let path = line
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("");
        let key = path.trim_start_matches('/').split_once('/').map(|(_, k)| k);
        if let Some(key) = key.filter(|k| !k.is_empty()) {
            assert!(key.starts_with("kvs/"), "outside the prefix: {line}");
        } else {
            assert!(
                line.contains("prefix=kvs%2F") || line.contains("prefix=kvs/"),
                "a listing outside the prefix: {line}"
            );
        }
    }
    let stream_arn = policy["Statement"][0]["Resource"][0].as_str().unwrap_or("");
    assert!(stream_arn.ends_with(":stream/dock-cam/*"), "{stream_arn}");
}

/// The actions a logged S3 request needs beyond its operation's, from its headers (AWS's
/// service authorization reference): a tagged write `s3:PutObjectTagging`, a locked one
/// `s3:PutObjectRetention`, a legal hold `s3:PutObjectLegalHold`; SSE-KMS
/// `kms:GenerateDataKey` on a write and `kms:Decrypt` on a multipart upload or a read.
fn header_actions(e: &crate::support::local_s3::Exchange) -> Vec<&'static str> {
    let op = s3_operation(&e.line);
    let h = |name: &str| e.headers.get(name).map(String::as_str);
    let mut needs = Vec::new();
    if matches!(op.as_str(), "PutObject" | "CreateMultipartUpload") {
        if h("x-amz-tagging").is_some() {
            needs.push("s3:PutObjectTagging");
        }
        if h("x-amz-object-lock-mode").is_some() {
            needs.push("s3:PutObjectRetention");
        }
        if h("x-amz-object-lock-legal-hold") == Some("ON") {
            needs.push("s3:PutObjectLegalHold");
        }
        if h("x-amz-server-side-encryption") == Some("aws:kms") {
            needs.push("kms:GenerateDataKey");
            if op == "CreateMultipartUpload" {
                needs.push("kms:Decrypt");
            }
        }
    }
    needs
}

/// What the bucket settings add to `iam-policy` is exactly what they call: tags, Object
/// Lock with a legal hold, SSE-KMS with a key id, and a role assumed through the STS
/// stand-in, over a backfill, a verify and an export. s3s-fs keeps none of these settings
/// (this server only claims Object Lock), so the calls are read from the request headers
/// in its log; a GetObject of an object encrypted with the key needs `kms:Decrypt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_policy_adds_exactly_what_the_bucket_settings_call() {
    use std::sync::atomic::Ordering;
    let (start, end) = recent(0.05);
    let sts = crate::support::sts::Sts::start().await;
    let world = World::new(
        vec![historical("dock-cam", start, end, 4000, 400_000)],
        "concurrency = 1",
    )
    .await;
    let base_out = world.run(&["iam-policy"]).await;
    let base: serde_json::Value = serde_json::from_slice(&base_out.stdout).expect("JSON");
    let base: BTreeSet<String> = kvs_archiver::iam::actions(&base).into_iter().collect();
    let s3 = world.s3.as_ref().expect("s3s");
    s3.faults.object_lock.store(true, Ordering::SeqCst);
    let config = std::fs::read_to_string(&world.config).expect("config");
    let config = config
        .replacen(
            "prefix = \"kvs/\"\n",
            "prefix = \"kvs/\"\ntags = { camera = \"{stream}\" }\nsse = \"aws:kms\"\nkms_key_id = \"1234abcd-12ab-34cd-56ef-1234567890ab\"\nrole_arn = \"arn:aws:iam::210987654321:role/archiver\"\n",
            1,
        )
        .replacen(
            "s3_force_path_style = true\n",
            &format!("s3_force_path_style = true\nsts_endpoint_url = \"{}\"\n", sts.url),
            1,
        );
    std::fs::write(
        &world.config,
        format!("{config}\n[destination.object_lock]\nmode = \"GOVERNANCE\"\nretain_for = \"1d\"\nlegal_hold = true\n"),
    )
    .expect("config");
    let before = s3.exchanges().len();
    let (a, b) = (rfc3339(start), rfc3339(end));
    let exported = world.work.path().join("range.mp4").display().to_string();
    for args in [
        vec![
            "backfill", "--stream", "dock-cam", "--start", &a, "--end", &b,
        ],
        vec!["verify", "--stream", "dock-cam", "--start", &a, "--end", &b],
        vec![
            "export", "--stream", "dock-cam", "--start", &a, "--end", &b, "-o", &exported,
        ],
    ] {
        let out = world.run(&args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let exchanges = s3.exchanges().split_off(before);
    let mut called: BTreeSet<String> = BTreeSet::new();
    for e in &exchanges {
        let op = s3_operation(&e.line);
        called.insert(iam_action(&op).to_string());
        called.extend(header_actions(e).into_iter().map(str::to_string));
        if op == "GetObject" {
            called.insert("kms:Decrypt".into());
        }
    }
    assert!(!sts.requests().is_empty(), "the role was assumed");
    called.insert("sts:AssumeRole".into());
    let out = world.run(&["iam-policy"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let split: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let allowed: BTreeSet<String> = kvs_archiver::iam::actions(&split["credentials"])
        .into_iter()
        .chain(kvs_archiver::iam::actions(&split["role"]))
        .collect();
    let called_s3: BTreeSet<String> = called
        .iter()
        .filter(|a| a.starts_with("s3:"))
        .cloned()
        .collect();
    let missing: Vec<&String> = called_s3.difference(&allowed).collect();
    assert!(missing.is_empty(), "called but not allowed: {missing:?}");
    let added_allowed: BTreeSet<&String> = allowed.difference(&base).collect();
    let added_called: BTreeSet<&String> = called.difference(&base).collect();
    assert_eq!(
        added_allowed, added_called,
        "what the settings add, against what they call"
    );
    for action in [
        "s3:PutObjectTagging",
        "s3:PutObjectRetention",
        "s3:PutObjectLegalHold",
        "s3:GetBucketObjectLockConfiguration",
        "kms:GenerateDataKey",
        "kms:Decrypt",
        "sts:AssumeRole",
    ] {
        assert!(
            added_called.iter().any(|a| *a == action),
            "{action}: {added_called:?}"
        );
    }
}

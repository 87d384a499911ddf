//! Buckets as production runs them: storage class, KMS, tags and Object Lock as S3 stores
//! them; create-only writes that never replace an object; checksums S3 keeps, checked by
//! HEAD; a role in another account; start-up checks that stop before any GetClip.

use crate::support::checks::{assert_exactly_once, assert_playable};
use crate::support::local_s3::{s3_client, Exchange, ASSUMED_ACCESS_KEY_ID};
use crate::support::process::text;
use crate::support::sts::Sts;
use crate::support::world::{hd_stream, historical, new_ledger_url, recent, World, BUCKET};
use kvs_emulator::config::DEFAULT_ACCESS_KEY_ID;

/// Whether `e` wrote an object (PutObject, CreateMultipartUpload or
/// CompleteMultipartUpload) at `key`.
fn writes(e: &Exchange, key: &str) -> bool {
    let (method, target) = e.line.split_once(' ').unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let on_key = path == format!("/{BUCKET}/{key}");
    let part = query.contains("partNumber=");
    on_key && ((method == "PUT" && !part) || (method == "POST"))
}

/// Adds `lines` to `[destination]`.
fn set_destination(world: &World, lines: &str) {
    let text = std::fs::read_to_string(&world.config).expect("config");
    let text = text.replacen(
        "prefix = \"kvs/\"\n",
        &format!("prefix = \"kvs/\"\n{lines}\n"),
        1,
    );
    std::fs::write(&world.config, text).expect("config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_with_other_bytes_at_a_chunk_key_is_never_replaced() {
    let (start, end) = recent(0.1);
    // 15 fragments of 400 kB a minute: each object is a two-part multipart upload.
    let world = World::new(
        vec![historical("cam", start, end, 4000, 400_000)],
        "clip_duration = \"60s\"",
    )
    .await;
    let expected = world.fragment_numbers("cam", start, end);
    let first = world.backfill("cam", start, end).await;
    assert!(first.status.success(), "{}", text(&first));
    let archived = world.objects().await;
    assert!(archived.len() >= 4, "{:?}", archived.keys());
    // Another writer's object under one chunk's key, and a ledger that knows nothing:
    // a second archiver on the same prefix, or a ledger lost.
    let taken = archived.keys().nth(2).expect("a key").clone();
    let client = s3_client(&world.s3_url);
    client
        .put_object()
        .bucket(BUCKET)
        .key(&taken)
        .body(b"someone else's bytes".to_vec().into())
        .send()
        .await
        .expect("planted");
    let fresh = new_ledger_url(world.work.path(), "second.db").await;
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, config.replace(&world.ledger_url, &fresh)).expect("config");
    let s3 = world.s3.as_ref().expect("s3s");
    let before = s3.exchanges().len();
    let second = world.backfill("cam", start, end).await;
    assert!(!second.status.success(), "the taken key fails the run");
    let out = text(&second);
    assert!(
        out.contains(&taken) && out.contains("not replaced"),
        "{out}"
    );
    let exchanges = s3.exchanges().split_off(before);
    let on_taken: Vec<&Exchange> = exchanges.iter().filter(|e| writes(e, &taken)).collect();
    assert!(!on_taken.is_empty(), "a write was tried on {taken}");
    for e in on_taken.iter().filter(|e| !e.line.ends_with("?uploads")) {
        // CompleteMultipartUpload (or PutObject) is the write that would replace.
        assert_eq!(
            e.headers.get("if-none-match").map(String::as_str),
            Some("*"),
            "{e:?}"
        );
        assert_eq!(e.status, 412, "no write succeeded on the taken key: {e:?}");
    }
    let created = on_taken
        .iter()
        .filter(|e| e.line.ends_with("?uploads"))
        .count();
    assert!(created > 0, "the clip went up as a multipart upload");
    let aborted = exchanges
        .iter()
        .filter(|e| {
            e.line.starts_with("DELETE") && e.line.contains(&taken) && e.line.contains("uploadId=")
        })
        .count();
    assert!(
        aborted >= created,
        "the refused upload was aborted: {aborted} of {created}"
    );
    // The others were there already, byte for byte: counted as archived, not replaced.
    let objects = world.objects().await;
    assert_eq!(objects[&taken], b"someone else's bytes");
    for (key, bytes) in &archived {
        if *key != taken {
            assert_eq!(objects[key], *bytes, "{key} unchanged");
        }
    }
    let mut rest = objects.clone();
    rest.remove(&taken);
    let held: Vec<String> = kvs_emulator::scan_markers(&archived[&taken]);
    let others: Vec<String> = expected.into_iter().filter(|n| !held.contains(n)).collect();
    assert_exactly_once(&rest, &others);
    let (a, b) = (
        crate::support::world::rfc3339(start),
        crate::support::world::rfc3339(end),
    );
    let verified = world
        .run(&["verify", "--stream", "cam", "--start", &a, "--end", &b])
        .await;
    assert!(!verified.status.success());
    let report = text(&verified);
    assert!(
        report.contains(&format!("occupied: {taken}")),
        "verify names the taken key: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_a_crash_between_completion_and_record_uploads_nothing_again() {
    let (spec, start, end) = hd_stream("cam");
    let world = World::new(vec![spec], "concurrency = 1").await;
    let expected = world.fragment_numbers("cam", start, end);
    let crashed = world
        .command(&[
            "backfill",
            "--stream",
            "cam",
            "--start",
            &crate::support::world::rfc3339(start),
            "--end",
            &crate::support::world::rfc3339(end),
        ])
        .env(kvs_archiver::crashpoint::ENV, "after-upload")
        .output()
        .await
        .expect("runs");
    assert!(!crashed.status.success(), "{}", text(&crashed));
    let s3 = world.s3.as_ref().expect("s3s");
    let before = s3.exchanges();
    let completed: Vec<String> = before
        .iter()
        .filter(|e| e.status == 200 && e.line.starts_with("POST") && e.line.contains("uploadId="))
        .map(|e| {
            e.line
                .split(['?', ' '])
                .nth(1)
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(completed.len(), 1, "one object completed before the crash");
    let key = completed[0]
        .trim_start_matches(&format!("/{BUCKET}/"))
        .to_string();
    let clips_before = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip")
        .count();
    let resumed = world.backfill("cam", start, end).await;
    assert!(resumed.status.success(), "{}", text(&resumed));
    let after = s3.exchanges().split_off(before.len());
    assert!(
        after
            .iter()
            .any(|e| e.line.starts_with("HEAD") && e.line.contains(&key)),
        "the rerun looked the object up"
    );
    let rewrites: Vec<&Exchange> = after.iter().filter(|e| writes(e, &key)).collect();
    assert!(rewrites.is_empty(), "nothing uploaded again: {rewrites:?}");
    let objects = world.objects().await;
    let clips = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip")
        .count();
    assert_eq!(
        clips - clips_before,
        objects.len() - 1,
        "the rerun fetched only the chunks not stored yet"
    );
    assert_exactly_once(&objects, &expected);
    assert_playable(&objects);
    let verified = world
        .run(&[
            "verify",
            "--stream",
            "cam",
            "--start",
            &crate::support::world::rfc3339(start),
            "--end",
            &crate::support::world::rfc3339(end),
        ])
        .await;
    assert!(verified.status.success(), "{}", text(&verified));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_a_thousand_objects_reads_none_of_them() {
    // 1,000 one-second fragments, one per object.
    let end = (chrono::Utc::now() - chrono::Duration::minutes(5)).timestamp() * 1000;
    let start = end - 1_000_000;
    let world = World::new(
        vec![historical("cam", start, end, 1000, 2_000)],
        "clip_duration = \"1s\"\nconcurrency = 8",
    )
    .await;
    let archived = world.backfill("cam", start, end).await;
    assert!(archived.status.success(), "{}", text(&archived));
    let s3 = world.s3.as_ref().expect("s3s");
    let before = s3.exchanges().len();
    let (a, b) = (
        crate::support::world::rfc3339(start),
        crate::support::world::rfc3339(end),
    );
    let verified = world
        .run(&["verify", "--stream", "cam", "--start", &a, "--end", &b])
        .await;
    assert!(verified.status.success(), "{}", text(&verified));
    let during = s3.exchanges().split_off(before);
    let heads = during.iter().filter(|e| e.line.starts_with("HEAD")).count();
    let gets: Vec<&Exchange> = during
        .iter()
        .filter(|e| {
            e.line.starts_with("GET")
                && e.line
                    .split('?')
                    .next()
                    .is_some_and(|p| p.matches('/').count() > 2)
        })
        .collect();
    assert!(heads >= 1000, "{heads} HEADs");
    assert!(
        gets.is_empty(),
        "no object read: {:?}",
        &gets[..gets.len().min(3)]
    );
    let report = text(&verified);
    assert!(
        report.contains(&format!("({heads} by HEAD")) && report.contains("0 read whole"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_bucket_without_object_lock_and_a_kms_key_not_allowed() {
    let (start, end) = recent(0.05);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let locked = format!(
        "{}\n[destination.object_lock]\nmode = \"GOVERNANCE\"\nretain_for = \"30d\"\n",
        std::fs::read_to_string(&world.config).expect("config")
    );
    let plain = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, &locked).expect("config");
    let refused = world.backfill("cam", start, end).await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let out = text(&refused);
    assert!(
        out.contains("destination.object_lock") && out.contains("Object Lock"),
        "{out}"
    );
    std::fs::write(&world.config, &plain).expect("config");
    let s3 = world.s3.as_ref().expect("s3s");
    *s3.faults.kms_keys.lock().expect("faults") = Some(vec!["alias/allowed".into()]);
    set_destination(
        &world,
        "sse = \"aws:kms\"\nkms_key_id = \"arn:aws:kms:us-east-1:123456789012:key/not-ours\"",
    );
    let refused = world.backfill("cam", start, end).await;
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let out = text(&refused);
    assert!(
        out.contains("destination.kms_key_id") && out.contains("kms:GenerateDataKey"),
        "{out}"
    );
    assert!(
        !world.emu.requests().iter().any(|r| r.op == "GetClip"),
        "nothing fetched before the check"
    );
    // The key it may use: archived, every write encrypted with it.
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        config.replace(
            "arn:aws:kms:us-east-1:123456789012:key/not-ours",
            "alias/allowed",
        ),
    )
    .expect("config");
    let archived = world.backfill("cam", start, end).await;
    assert!(archived.status.success(), "{}", text(&archived));
    let puts: Vec<Exchange> = s3
        .exchanges()
        .into_iter()
        .filter(|e| e.line.starts_with("PUT /archive/kvs/cam/"))
        .collect();
    assert!(!puts.is_empty());
    for e in puts {
        assert_eq!(
            e.headers
                .get("x-amz-server-side-encryption-aws-kms-key-id")
                .map(String::as_str),
            Some("alias/allowed"),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_role_every_s3_request_is_signed_by_it_and_no_kvs_request_is() {
    let (start, end) = recent(0.05);
    let sts = Sts::start().await;
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    set_destination(
        &world,
        "role_arn = \"arn:aws:iam::210987654321:role/archiver\"\nexternal_id = \"site-7\"",
    );
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        config.replacen(
            "s3_force_path_style = true\n",
            &format!(
                "s3_force_path_style = true\nsts_endpoint_url = \"{}\"\n",
                sts.url
            ),
            1,
        ),
    )
    .expect("config");
    let archived = world.backfill("cam", start, end).await;
    assert!(archived.status.success(), "{}", text(&archived));
    let asked = sts.requests();
    assert!(!asked.is_empty(), "the role was assumed");
    for form in &asked {
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Action"), Some("AssumeRole"));
        assert_eq!(
            get("RoleArn"),
            Some("arn:aws:iam::210987654321:role/archiver")
        );
        assert_eq!(get("ExternalId"), Some("site-7"));
        assert_eq!(get("RoleSessionName"), Some("kvs-archiver"));
        assert_eq!(
            get("credential"),
            Some(DEFAULT_ACCESS_KEY_ID),
            "STS is asked with the base keys"
        );
    }
    let s3 = world.s3.as_ref().expect("s3s");
    let program: Vec<Exchange> = s3
        .exchanges()
        .into_iter()
        // The test's own CreateBucket, signed with the test keys.
        .filter(|e| e.line.trim_end_matches('/') != format!("PUT /{BUCKET}"))
        .collect();
    assert!(program.len() > 2);
    for e in &program {
        assert_eq!(
            e.headers.get("credential").map(String::as_str),
            Some(ASSUMED_ACCESS_KEY_ID),
            "{e:?}"
        );
    }
    // The emulator accepts only its own keys: KVS was asked with the base credentials.
    assert!(world
        .emu
        .requests()
        .iter()
        .any(|r| r.op == "GetClip" && r.status == 200));
    assert!(!world.objects().await.is_empty());
}

/// moto keeps what production buckets keep: the storage class, SSE-KMS with the named
/// key and a Bucket Key, tags, Object Lock retention and a legal hold. moto does not
/// check that a KMS key exists (AWS does; the start-up test covers a refused key), and
/// drops the Bucket Key and Object Lock of a multipart upload: for those, the next test
/// reads the headers in s3s-fs's request log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_stores_the_class_encryption_tags_and_lock_as_configured() {
    let Ok(url) = std::env::var("KVS_TEST_MOTO_URL") else {
        panic!("needs moto, started by: eval \"$(.ci/moto)\" (KVS_TEST_MOTO_URL is not set)");
    };
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "moto must listen on loopback"
    );
    let (start, end) = recent(0.1);
    let bucket = format!("locked-{}", std::process::id());
    let world = World::with_s3(
        vec![
            historical("hd", start, end, 4000, 400_000),
            historical("sd", start, end, 2000, 10_000),
        ],
        "",
        None,
        url.clone(),
        &format!("plain-{}", std::process::id()),
    )
    .await;
    let client = s3_client(&url);
    client
        .create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("locked bucket");
    let key_arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    set_destination(
        &world,
        &format!(
            "storage_class = \"GLACIER_IR\"\nsse = \"aws:kms\"\nkms_key_id = \"{key_arn}\"\nbucket_key = true\ntags = {{ team = \"security\", camera = \"{{stream}}\" }}"
        ),
    );
    let config = std::fs::read_to_string(&world.config).expect("config");
    let config = config.replace(
        &format!("bucket = \"plain-{}\"", std::process::id()),
        &format!("bucket = \"{bucket}\""),
    );
    std::fs::write(
        &world.config,
        format!("{config}\n[destination.object_lock]\nmode = \"GOVERNANCE\"\nretain_for = \"2d\"\nlegal_hold = true\n"),
    )
    .expect("config");
    for stream in ["hd", "sd"] {
        let out = world.backfill(stream, start, end).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("kvs/")
        .send()
        .await
        .expect("listed");
    let keys: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    assert!(
        keys.iter().any(|k| k.starts_with("kvs/hd/"))
            && keys.iter().any(|k| k.starts_with("kvs/sd/"))
    );
    let (mut multipart, mut single) = (0, 0);
    for key in &keys {
        if assert_stored_as_configured(&client, &bucket, key, key_arn).await {
            multipart += 1;
        } else {
            single += 1;
        }
    }
    assert!(
        multipart > 0 && single > 0,
        "{multipart} multipart, {single} single"
    );
}

/// The lock, legal hold and Bucket Key headers of multipart uploads, which moto does not
/// keep, as s3s-fs's request log shows them: s3s-fs keeps neither, and this server only
/// claims Object Lock for the start-up check. The retention date is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_carry_the_lock_hold_bucket_key_and_tags_headers() {
    let (spec, start, end) = hd_stream("cam");
    let world = World::new(vec![spec], "").await;
    let s3 = world.s3.as_ref().expect("s3s");
    s3.faults
        .object_lock
        .store(true, std::sync::atomic::Ordering::SeqCst);
    set_destination(
        &world,
        "sse = \"aws:kms\"\nbucket_key = true\ntags = { camera = \"{stream}\", site = \"north gate\" }",
    );
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        format!("{config}\n[destination.object_lock]\nmode = \"COMPLIANCE\"\nretain_for = \"365d\"\nretain_from = \"recorded\"\nlegal_hold = true\n"),
    )
    .expect("config");
    let out = world.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let created: Vec<Exchange> = s3
        .exchanges()
        .into_iter()
        .filter(|e| e.line.starts_with("POST /archive/kvs/cam/") && e.line.ends_with("?uploads"))
        .collect();
    assert!(!created.is_empty(), "multipart uploads were made");
    let objects = world.objects().await;
    for e in &created {
        let h = |name: &str| e.headers.get(name).map(String::as_str);
        assert_eq!(h("x-amz-object-lock-mode"), Some("COMPLIANCE"), "{e:?}");
        assert_eq!(h("x-amz-object-lock-legal-hold"), Some("ON"), "{e:?}");
        assert_eq!(h("x-amz-server-side-encryption"), Some("aws:kms"), "{e:?}");
        assert_eq!(
            h("x-amz-server-side-encryption-bucket-key-enabled"),
            Some("true"),
            "{e:?}"
        );
        assert_eq!(
            h("x-amz-tagging"),
            Some("camera=cam&site=north%20gate"),
            "{e:?}"
        );
        assert_eq!(h("x-amz-checksum-type"), Some("FULL_OBJECT"), "{e:?}");
        // 365 days after the object's newest fragment, to the second.
        let key = e
            .line
            .trim_start_matches("POST /archive/")
            .trim_end_matches("?uploads");
        assert!(objects.contains_key(key), "{key}");
        let end_ms = key
            .rsplit('_')
            .next()
            .and_then(|t| t.strip_suffix(".mp4"))
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y%m%dT%H%M%S%.3fZ").ok())
            .expect("key ends in the chunk's end")
            .and_utc()
            .timestamp_millis();
        let until_ms = end_ms + 365 * 86_400_000;
        let until_s = until_ms.div_euclid(1000) + i64::from(until_ms.rem_euclid(1000) != 0);
        let expected = chrono::DateTime::from_timestamp(until_s, 0).expect("date");
        let sent = h("x-amz-object-lock-retain-until-date").expect("retain-until date");
        let sent = chrono::DateTime::parse_from_rfc3339(sent).expect("rfc3339");
        assert_eq!(sent, expected, "{e:?}");
    }
}

/// Asserts what moto keeps of `key`; returns whether it is a multipart object (whose
/// Bucket Key and lock moto drops).
async fn assert_stored_as_configured(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    key_arn: &str,
) -> bool {
    use aws_sdk_s3::types::{
        ObjectLockLegalHoldStatus, ObjectLockMode, ServerSideEncryption, StorageClass,
    };
    let head = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("head");
    let multipart = head.e_tag().is_some_and(|t| t.contains('-'));
    assert_eq!(
        head.storage_class(),
        Some(&StorageClass::GlacierIr),
        "{key}"
    );
    assert_eq!(
        head.server_side_encryption(),
        Some(&ServerSideEncryption::AwsKms),
        "{key}"
    );
    assert_eq!(head.ssekms_key_id(), Some(key_arn), "{key}");
    if !multipart {
        assert_eq!(head.bucket_key_enabled(), Some(true), "{key}");
    }
    let stream = key.split('/').nth(1).expect("stream");
    let tags = client
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("tags");
    let mut tags: Vec<(String, String)> = tags
        .tag_set()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            ("camera".into(), stream.to_string()),
            ("team".into(), "security".into())
        ]
    );
    if multipart {
        return true;
    }
    // moto 5.2.5 answers GetObjectRetention with the object itself: its HEAD shows the
    // retention and the hold it keeps.
    assert_eq!(
        head.object_lock_mode(),
        Some(&ObjectLockMode::Governance),
        "{key}"
    );
    // Two days from the end of the newest fragment in the object, to the second.
    let end = head
        .metadata()
        .and_then(|m| m.get("kvs-end"))
        .expect("kvs-end");
    let end_ms = chrono::DateTime::parse_from_rfc3339(end)
        .expect("rfc3339")
        .timestamp_millis();
    let until_ms = end_ms + 2 * 86_400_000;
    let expected = until_ms.div_euclid(1000) + i64::from(until_ms.rem_euclid(1000) != 0);
    let until = head.object_lock_retain_until_date().expect("date");
    assert_eq!(until.secs(), expected, "{key}: retained until {until:?}");
    assert_eq!(
        head.object_lock_legal_hold_status(),
        Some(&ObjectLockLegalHoldStatus::On),
        "{key}"
    );
    false
}

/// Objects written to DEEP_ARCHIVE are never read blindly: `find` and `export` name the
/// restore they need (class, tiers, command) and read nothing; `restore` starts it
/// (moto restores at once, as its restore state then shows), and `export` works after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_archive_objects_need_a_restore_then_export_once_restored() {
    let Ok(url) = std::env::var("KVS_TEST_MOTO_URL") else {
        panic!("needs moto, started by: eval \"$(.ci/moto)\" (KVS_TEST_MOTO_URL is not set)");
    };
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "moto must listen on loopback"
    );
    let (start, end) = recent(0.05);
    let bucket = format!("cold-{}", std::process::id());
    let world = World::with_s3(
        vec![historical("cam", start, end, 2000, 20_000)],
        "clip_duration = \"60s\"",
        None,
        url.clone(),
        &bucket,
    )
    .await;
    set_destination(&world, "storage_class = \"DEEP_ARCHIVE\"");
    let archived = world.backfill("cam", start, end).await;
    assert!(archived.status.success(), "{}", text(&archived));
    // The range starts at the last fragment of the first chunk (2 s fragments from
    // `start`, chunks cut at whole minutes): that chunk's range ends where the range
    // starts, yet its fragment plays into it, so export reads it and restore must too.
    let first_window_end = (start / 60_000 + 1) * 60_000;
    let a_ms = start + (first_window_end - 1 - start) / 2000 * 2000;
    let (a, b) = (
        crate::support::world::rfc3339(a_ms),
        crate::support::world::rfc3339(end),
    );
    let at = crate::support::world::rfc3339(start + 10_000);
    let found = world.run(&["find", "--stream", "cam", "--at", &at]).await;
    let said = text(&found);
    assert_eq!(found.status.code(), Some(1), "{said}");
    assert!(
        said.contains("DEEP_ARCHIVE")
            && said.contains("needs a restore")
            && said.contains("kvs-archiver restore --stream cam"),
        "{said}"
    );
    let out = world.work.path().join("cold.mp4");
    let out_arg = out.display().to_string();
    let export = [
        "export", "--stream", "cam", "--start", &a, "--end", &b, "-o", &out_arg,
    ];
    let refused = world.run(&export).await;
    let said = text(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("archive storage class")
            && said.contains("kvs-archiver restore --stream cam")
            && said.contains("Bulk within 48 h"),
        "{said}"
    );
    assert!(!out.exists(), "nothing written before the restore");
    let report = restore(&world, &a, &b, &["--tier", "bulk", "--days", "2"]).await;
    let objects = report["objects"].as_u64().expect("objects");
    assert!(objects >= 3, "{report}");
    assert_eq!(
        report["started"].as_array().map(Vec::len),
        Some(objects as usize),
        "{report}"
    );
    assert_eq!(
        report["restored"].as_array().map(Vec::len),
        Some(objects as usize),
        "{report}"
    );
    // The store's restore state, as S3 reports it.
    let client = s3_client(&url);
    let key = report["started"][0].as_str().expect("key");
    let head = client
        .head_object()
        .bucket(&bucket)
        .key(key)
        .send()
        .await
        .expect("head");
    assert!(
        head.restore()
            .is_some_and(|r| r.contains("ongoing-request=\"false\"")),
        "{:?}",
        head.restore()
    );
    let report = restore(&world, &a, &b, &[]).await;
    assert_eq!(
        report["started"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    let exported = world.run(&export).await;
    assert!(exported.status.success(), "{}", text(&exported));
    let bytes = std::fs::read(&out).expect("exported");
    let expected = world.fragment_numbers("cam", a_ms, end);
    let seen = kvs_emulator::scan_markers(&bytes);
    assert!(
        expected.iter().all(|n| seen.contains(n)),
        "every fragment in the export"
    );
}

/// `restore --json` of `cam` over `[a, b]`, which must succeed.
async fn restore(world: &World, a: &str, b: &str, more: &[&str]) -> serde_json::Value {
    let args = [
        &[
            "restore", "--stream", "cam", "--start", a, "--end", b, "--json",
        ][..],
        more,
    ]
    .concat();
    let restored = world.run(&args).await;
    assert!(restored.status.success(), "{}", text(&restored));
    serde_json::from_slice(&restored.stdout).expect("json")
}

/// A role STS refuses stops the run at start with one line naming `destination.role_arn`
/// (exit 2, a configuration to fix); an STS that does not answer is an outage (exit 1).
/// Neither fetches anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_role_is_a_configuration_error_and_a_silent_sts_an_outage() {
    let (start, end) = recent(0.05);
    let sts = Sts::start().await;
    sts.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    set_destination(
        &world,
        "role_arn = \"arn:aws:iam::210987654321:role/archiver\"",
    );
    let config = std::fs::read_to_string(&world.config).expect("config");
    let with_sts = |url: &str| {
        config.replacen(
            "s3_force_path_style = true\n",
            &format!("s3_force_path_style = true\nsts_endpoint_url = \"{url}\"\n"),
            1,
        )
    };
    std::fs::write(&world.config, with_sts(&sts.url)).expect("config");
    let refused = world.backfill("cam", start, end).await;
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains("destination.role_arn") && said.contains("trust policy"),
        "{said}"
    );
    // Nothing listens on a port just released.
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", socket.local_addr().expect("addr"))
    };
    std::fs::write(&world.config, with_sts(&closed)).expect("config");
    let silent = world.backfill("cam", start, end).await;
    let said = text(&silent);
    assert_eq!(silent.status.code(), Some(1), "{said}");
    assert!(said.contains("did not answer"), "{said}");
    assert!(
        !world.emu.requests().iter().any(|r| r.op == "GetClip"),
        "nothing fetched"
    );
}

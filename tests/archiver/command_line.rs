//! What the command line says about bad input, what `plan` and `check-config` print, and
//! that no credential reaches the output.

use crate::support::process::{assert_fails_with, free_port, streams_json, text};
use crate::support::world::{historical, recent, rfc3339, World};
use kvs_emulator::config::DEFAULT_SECRET_ACCESS_KEY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_the_ledger_intact() {
    let (start, end) = recent(0.2);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let ok = world.backfill("cam", start, end).await;
    assert!(ok.status.success(), "{}", text(&ok));
    let before = streams_json(&world.run(&["status", "--json"]).await);

    let reversed = world.backfill("cam", end, start).await;
    assert_fails_with(&reversed, 2, "is not after --start");

    let garbled = world
        .run(&[
            "backfill",
            "--stream",
            "cam",
            "--start",
            "yesterday",
            "--end",
            "now",
        ])
        .await;
    assert_fails_with(&garbled, 2, "not an RFC 3339 timestamp");

    let unknown = world.backfill("back-door", start, end).await;
    assert_fails_with(
        &unknown,
        2,
        "stream \"back-door\" is not in the configuration",
    );

    // Configured, but KVS has no such stream.
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        format!("{config}[[streams]]\nname = \"ghost\"\n"),
    )
    .expect("write");
    let ghost = world.backfill("ghost", start, end).await;
    assert_fails_with(&ghost, 1, "ResourceNotFoundException");

    let no_bucket = world
        .backfill_with(
            "cam",
            start,
            end,
            &[("KVS_ARCHIVER_DESTINATION__BUCKET", "no-such-bucket")],
        )
        .await;
    assert_fails_with(&no_bucket, 1, "bucket does not exist");
    let wrong_keys = world
        .backfill_with(
            "cam",
            start,
            end,
            &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
        )
        .await;
    // Keys KVS does not accept: the operator must fix them (exit 2), once retries (a
    // signature may fail from clock skew) are spent.
    assert_fails_with(&wrong_keys, 2, "the AWS credentials are not valid");
    // KVS unreachable: a closed port on loopback.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let dead = world
        .backfill_with(
            "cam",
            start,
            end,
            &[
                (
                    "KVS_ARCHIVER_AWS__KINESIS_VIDEO_ENDPOINT_URL",
                    closed.as_str(),
                ),
                ("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "2"),
            ],
        )
        .await;
    assert_fails_with(&dead, 1, &format!("cannot reach {closed}"));

    std::fs::write(
        &world.config,
        config.replace("max_attempts = 10", "max_attempts = \"ten\""),
    )
    .expect("write");
    let malformed = world.backfill("cam", start, end).await;
    assert_fails_with(&malformed, 2, "archive.max_attempts");
    std::fs::write(&world.config, &config).expect("restored");

    let after = streams_json(&world.run(&["status", "--json"]).await);
    assert_eq!(before, after, "the ledger is unchanged by failed commands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_lists_chunks_without_fetching_and_check_config_prints_the_config() {
    let (start, end) = recent(1.0);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let out = world
        .run(&[
            "plan",
            "--stream",
            "cam",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
            "--json",
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let chunks = plan["chunks"].as_array().expect("chunks");
    let fragments: u64 = chunks
        .iter()
        .map(|c| c["fragment_count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        fragments,
        world.fragment_numbers("cam", start, end).len() as u64
    );
    assert!(
        chunks.len() >= 12,
        "six 10-minute slots of 300 fragments, each split in two"
    );
    assert!(world.emu.requests().iter().all(|r| r.op != "GetClip"));
    assert!(world.objects().await.is_empty());

    // After a backfill of the first half, the plan shows only the second half.
    let half = start + (end - start) / 2;
    let first = world.backfill("cam", start, half).await;
    assert!(first.status.success(), "{}", text(&first));
    let out = world
        .run(&[
            "plan",
            "--stream",
            "cam",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
            "--json",
        ])
        .await;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let left: u64 = plan["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c["fragment_count"].as_u64().unwrap_or(0))
        .sum();
    let archived = world.fragment_numbers("cam", start, half).len() as u64;
    assert_eq!(
        left,
        fragments - archived,
        "archived fragments are not planned again"
    );
    assert_eq!(plan["already_covered"].as_u64(), Some(archived));

    let shown = world.run(&["check-config"]).await;
    assert!(shown.status.success(), "{}", text(&shown));
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        stdout.contains("bucket = \"archive\"") && stdout.contains("max_fragments_per_clip = 200")
    );
    assert!(
        !stdout.contains(DEFAULT_SECRET_ACCESS_KEY),
        "no secrets printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_the_output_even_at_trace_level() {
    const TOKEN: &str = "FwoGZXIvYXdzEXAMPLESESSIONTOKENkvsArchiverTest0123456789";
    let (start, end) = recent(0.05);
    let world = World::new(vec![historical("cam", start, end, 2000, 20_000)], "").await;
    let (a, b) = (rfc3339(start), rfc3339(end));
    let out = world
        .command(&["backfill", "--stream", "cam", "--start", &a, "--end", &b])
        .env("KVS_ARCHIVER_LOG", "trace")
        .env("AWS_SESSION_TOKEN", TOKEN)
        .output()
        .await
        .expect("runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.len() > 10_000,
        "trace logging is on: {} bytes",
        all.len()
    );
    for secret in [DEFAULT_SECRET_ACCESS_KEY, TOKEN, &TOKEN[..24]] {
        assert!(!all.contains(secret), "a secret is in the output: {secret}");
    }
}

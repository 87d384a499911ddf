//! Over TLS, as against AWS: the control plane, the data endpoint GetDataEndpoint names
//! and the bucket all on https, with a CA the archiver trusts only because the user's CA
//! bundle names it.

use crate::support::checks::assert_exactly_once;
use crate::support::process::text;
use crate::support::tls::{self, ThrowawayCa, TlsFront};
use crate::support::world::{historical, recent, rfc3339, World};

/// A world whose emulator (control plane and data endpoint) and S3 server are reached
/// only through TLS fronts signed by `ca`.
async fn world_over_tls(ca: &ThrowawayCa, start: i64, end: i64) -> (World, TlsFront, TlsFront) {
    let world = World::new(
        vec![historical("porch", start, end, 2000, 20_000)],
        "clip_duration = \"10m\"",
    )
    .await;
    let kvs = tls::serve(ca, world.emu.base_url()).await;
    let s3 = tls::serve(ca, &world.s3_url).await;
    world.emu.set_data_endpoint(&kvs.url);
    let config = std::fs::read_to_string(&world.config).expect("config");
    let config = config
        .replace(world.emu.base_url(), &kvs.url)
        .replace(&world.s3_url, &s3.url);
    std::fs::write(&world.config, config).expect("config");
    (world, kvs, s3)
}

/// `backfill` of the range with `bundle` as AWS_CA_BUNDLE (None: unset).
async fn backfill(
    world: &World,
    (start, end): (i64, i64),
    bundle: Option<&str>,
) -> std::process::Output {
    let (start, end) = (rfc3339(start), rfc3339(end));
    let mut command = world.command(&[
        "backfill", "--stream", "porch", "--start", &start, "--end", &end,
    ]);
    match bundle {
        Some(path) => command.env("AWS_CA_BUNDLE", path),
        None => command.env_remove("AWS_CA_BUNDLE"),
    };
    command.output().await.expect("kvs-archiver runs")
}

/// `config` with `aws.ca_bundle = path` added.
fn with_ca_bundle(config: &str, path: &std::path::Path) -> String {
    config.replacen(
        "[aws]\n",
        &format!("[aws]\nca_bundle = \"{}\"\n", path.display()),
        1,
    )
}

/// A file that holds no certificate is refused before any request, from the environment
/// by every command and from the configuration by check-config, naming the setting.
async fn a_bundle_without_certificates_is_named(world: &World, range: (i64, i64)) {
    let garbage = world.work.path().join("not-a-bundle.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    let bad = backfill(world, range, Some(&garbage.display().to_string())).await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        text(&bad).contains("AWS_CA_BUNDLE") && text(&bad).contains("not-a-bundle.pem"),
        "{}",
        text(&bad)
    );
    let good = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, with_ca_bundle(&good, &garbage)).expect("config");
    let mut check = world.command(&["check-config"]);
    check.env_remove("AWS_CA_BUNDLE");
    let checked = check.output().await.expect("runs");
    assert_eq!(checked.status.code(), Some(2), "{}", text(&checked));
    assert!(
        text(&checked).contains("aws.ca_bundle") && text(&checked).contains("not-a-bundle.pem"),
        "{}",
        text(&checked)
    );
    std::fs::write(&world.config, good).expect("config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_over_tls_trusts_the_ca_bundle_and_refuses_a_certificate_without_it() {
    let ca = tls::throwaway_ca().expect("a throwaway CA");
    let range = recent(0.5);
    let (world, kvs, s3) = world_over_tls(&ca, range.0, range.1).await;

    // Without the bundle the CA is unknown: a permanent error (no retries) that says so
    // and what to set, and nothing reached the bucket.
    let refused = backfill(&world, range, None).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("UnknownIssuer") && said.contains("aws.ca_bundle"),
        "the error names the certificate's problem and the setting: {said}"
    );
    assert!(
        world.emu.requests().is_empty(),
        "no request got past the handshake"
    );
    assert!(world.objects().await.is_empty(), "nothing archived");

    a_bundle_without_certificates_is_named(&world, range).await;

    // With the CA in AWS_CA_BUNDLE, the way the AWS CLI reads it, every fragment is
    // archived once, GetClip and all through TLS.
    let trusted = backfill(&world, range, Some(&ca.ca_pem.display().to_string())).await;
    assert!(trusted.status.success(), "{}", text(&trusted));
    let expected = world.fragment_numbers("porch", range.0, range.1);
    assert_exactly_once(&world.objects().await, &expected);
    assert!(
        world
            .emu
            .requests()
            .iter()
            .any(|r| r.op == "GetClip" && r.status == 200),
        "GetClip went to the https data endpoint"
    );
    for front in [&kvs, &s3] {
        let suite = front.cipher.lock().expect("lock").clone();
        assert!(
            suite.as_deref().is_some_and(|s| s.contains("AES")),
            "{} negotiated {suite:?}: an AES-GCM suite, which AES-NI accelerates",
            front.url
        );
    }

    // The same CA as `aws.ca_bundle` in the configuration: a second run finds it all
    // archived over TLS (it reads the bucket back), and fetches nothing again.
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(&world.config, with_ca_bundle(&config, &ca.ca_pem)).expect("config");
    world.emu.clear_requests();
    let again = backfill(&world, range, None).await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        world.emu.requests().iter().all(|r| r.op != "GetClip"),
        "nothing fetched twice"
    );
}

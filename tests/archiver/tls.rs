//! Over TLS, as against AWS: the control plane, the data endpoint GetDataEndpoint names
//! and the bucket all on https, with a CA the archiver trusts only because the user's CA
//! bundle names it.

use crate::support::checks::assert_exactly_once;
use crate::support::process::text;
use crate::support::tls;
use crate::support::world::{historical, recent, rfc3339, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_over_tls_trusts_the_ca_bundle_and_refuses_a_certificate_without_it() {
    let ca = tls::throwaway_ca().expect("a throwaway CA");
    let (start, end) = recent(0.5);
    let world = World::new(
        vec![historical("porch", start, end, 2000, 20_000)],
        "clip_duration = \"10m\"",
    )
    .await;
    let kvs = tls::serve(tls::bind().await, &ca, world.emu.base_url());
    let s3 = tls::serve(tls::bind().await, &ca, &world.s3_url);
    world.emu.set_data_endpoint(&kvs.url);
    let config = std::fs::read_to_string(&world.config).expect("config");
    let config = config
        .replace(world.emu.base_url(), &kvs.url)
        .replace(&world.s3_url, &s3.url);
    std::fs::write(&world.config, config).expect("config");
    let backfill = |envs: Vec<(&'static str, String)>, no_bundle: bool| {
        let mut command = world.command(&[
            "backfill",
            "--stream",
            "porch",
            "--start",
            &rfc3339(start),
            "--end",
            &rfc3339(end),
        ]);
        if no_bundle {
            command.env_remove("AWS_CA_BUNDLE");
        }
        command.envs(envs);
        command
    };

    // Without the bundle the certificate is unknown: the error says so and what to set,
    // and nothing reached the bucket.
    let refused = backfill(vec![], true).output().await.expect("runs");
    assert!(!refused.status.success(), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("certificate") && said.contains("aws.ca_bundle"),
        "the error names the certificate and the setting: {said}"
    );
    assert!(world.objects().await.is_empty(), "nothing archived");

    // A bundle that holds no certificate is a configuration error, named as such.
    let garbage = world.work.path().join("not-a-bundle.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    let bad = backfill(
        vec![("AWS_CA_BUNDLE", garbage.display().to_string())],
        false,
    )
    .output()
    .await
    .expect("runs");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        text(&bad).contains("AWS_CA_BUNDLE") && text(&bad).contains("not-a-bundle.pem"),
        "{}",
        text(&bad)
    );

    // With the CA in AWS_CA_BUNDLE, the way the AWS CLI reads it, every fragment is
    // archived once, GetClip and all through TLS.
    let trusted = backfill(
        vec![("AWS_CA_BUNDLE", ca.ca_pem.display().to_string())],
        false,
    )
    .output()
    .await
    .expect("runs");
    assert!(trusted.status.success(), "{}", text(&trusted));
    let expected = world.fragment_numbers("porch", start, end);
    assert_exactly_once(&world.objects().await, &expected);
    let clips = world
        .emu
        .requests()
        .iter()
        .filter(|r| r.op == "GetClip" && r.status == 200)
        .count();
    assert!(clips > 0, "GetClip went to the https data endpoint");
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
    let config = config.replacen(
        "[aws]\n",
        &format!("[aws]\nca_bundle = \"{}\"\n", ca.ca_pem.display()),
        1,
    );
    std::fs::write(&world.config, config).expect("config");
    world.emu.clear_requests();
    let again = backfill(vec![], true).output().await.expect("runs");
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        world.emu.requests().iter().all(|r| r.op != "GetClip"),
        "nothing fetched twice"
    );
}

//! kvs-archiver as a new user meets it: the demo, and the commands it says to run next.

use std::process::Command;

fn archiver() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvs-archiver"));
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("KVS_ARCHIVER_CONFIG");
    cmd
}

/// The demo archives into a directory, leaves a configuration beside it, and every
/// command it prints works as printed, `plan` and `verify` (which ask KVS) through the
/// bundled emulator the configuration names (`serve`, which runs until stopped, is left
/// out: the page has its own test).
#[test]
fn the_demo_leaves_a_configuration_and_its_printed_commands_work() {
    let work = tempfile::tempdir().expect("tempdir");
    let output = work.path().join("demo-output");
    let out = archiver()
        .arg("demo")
        .arg("--output")
        .arg(&output)
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(output.join("kvs-archiver.toml").is_file(), "{stdout}");
    let program = env!("CARGO_BIN_EXE_kvs-archiver");
    let commands: Vec<Vec<String>> = stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(program))
        .map(|rest| {
            rest.split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .collect();
    let names: Vec<&str> = commands
        .iter()
        .filter_map(|c| c.get(2).map(String::as_str))
        .collect();
    assert_eq!(
        names,
        ["status", "plan", "verify", "find", "export", "serve"],
        "{stdout}"
    );
    for command in commands.iter().filter(|c| c[2] != "serve") {
        let out = archiver().args(command).output().expect("runs");
        assert!(
            out.status.success(),
            "{command:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        output.join("one-minute.mp4").is_file(),
        "the printed export wrote its file"
    );
}

/// Completions and the manual page come from the command line's own definition.
#[test]
fn completions_and_the_manual_page_name_every_command() {
    let bash = archiver()
        .args(["completions", "bash"])
        .output()
        .expect("runs");
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    for command in ["backfill", "export", "rebuild-ledger", "serve", "find"] {
        assert!(script.contains(command), "bash completion knows {command}");
    }
    let man = archiver().arg("man").output().expect("runs");
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH kvs-archiver"),
        "roff: {page:.200}"
    );
    assert!(
        page.contains("Exit status"),
        "the page documents exit statuses"
    );
}

use kvs_emulator::config::{DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY};
use std::time::{Duration, Instant};

/// A configuration for stream `cam` against `kvs_url`, archiving into a directory, with
/// the default retry policy (as a new user has it).
fn config_file(dir: &std::path::Path, kvs_url: &str) -> std::path::PathBuf {
    let path = dir.join("kvs-archiver.toml");
    std::fs::write(
        &path,
        format!(
            "[aws]\nregion = \"us-east-1\"\nkinesis_video_endpoint_url = \"{kvs_url}\"\n\
             [ledger]\ndatabase_url = \"sqlite://{0}/state.db\"\n\
             [destination]\ndirectory = \"{0}/archive\"\n\
             [[streams]]\nname = \"cam\"\n",
            dir.display()
        ),
    )
    .expect("config written");
    path
}

/// The user's credentials: none from this machine's files or environment.
fn without_credentials(cmd: &mut Command, home: &std::path::Path) {
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        cmd.env_remove(name);
    }
    // Empty files: a user with no profiles (missing ones only add the SDK's warnings).
    let (config, credentials) = (home.join("aws-config"), home.join("aws-credentials"));
    std::fs::write(&config, "").expect("empty config");
    std::fs::write(&credentials, "").expect("empty credentials");
    cmd.env("HOME", home)
        .env("AWS_CONFIG_FILE", config)
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials);
}

fn with_credentials(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

fn range() -> [String; 6] {
    let end = chrono::Utc::now() - chrono::Duration::minutes(5);
    let start = end - chrono::Duration::minutes(10);
    [
        "--stream".into(),
        "cam".into(),
        "--start".into(),
        start.to_rfc3339(),
        "--end".into(),
        end.to_rfc3339(),
    ]
}

/// Runs `cmd` as a user would (assert_cmd); checks the exit status, the first line of
/// stderr, at most 3 lines, no debug dump, and that the answer came within 2 s: with the
/// default retry settings, none of these cases waits on a retry. Returns stderr.
fn assert_error(cmd: Command, code: i32, first_line: &str) -> String {
    let started = Instant::now();
    let assert = assert_cmd::Command::from_std(cmd).assert().code(code);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.first().copied().unwrap_or(""), first_line, "{stderr}");
    assert!(lines.len() <= 3, "at most 3 lines: {stderr}");
    assert!(!stderr.contains(" { "), "no debug dump: {stderr}");
    assert!(took < Duration::from_secs(2), "{took:?}: {stderr}");
    stderr
}

#[test]
fn without_a_configuration_it_says_how_to_give_one() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut cmd = archiver();
    cmd.arg("status").current_dir(work.path());
    assert_error(
        cmd,
        2,
        "kvs-archiver: no configuration: give --config FILE or set KVS_ARCHIVER_CONFIG (every key is in config/kvs-archiver.example.toml, or /usr/share/doc/kvs-archiver/ from the package); `kvs-archiver demo` runs without one",
    );
}

#[test]
fn an_unknown_stream_is_named_with_the_configured_ones() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), "http://127.0.0.1:9");
    let mut cmd = archiver();
    with_credentials(&mut cmd);
    let mut args = range();
    args[1] = "front-door".into();
    cmd.arg("--config").arg(&config).arg("backfill").args(&args);
    assert_error(
        cmd,
        2,
        "kvs-archiver: stream \"front-door\" is not in the configuration (configured: cam); add it under [[streams]]",
    );
}

#[test]
fn without_credentials_it_says_which_sources_were_tried_at_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), "http://127.0.0.1:9");
    let mut cmd = archiver();
    without_credentials(&mut cmd, work.path());
    cmd.arg("--config")
        .arg(&config)
        .arg("backfill")
        .args(range());
    assert_error(
        cmd,
        2,
        "kvs-archiver: no AWS credentials: none in the environment (AWS_ACCESS_KEY_ID), the default profile (~/.aws/credentials, ~/.aws/config: keys, sso_session, credential_process, role_arn), web identity (AWS_WEB_IDENTITY_TOKEN_FILE), the ECS container or EC2 instance metadata; set one (for SSO: aws sso login --profile NAME, then AWS_PROFILE=NAME)",
    );
}

/// A KVS endpoint that refuses connections is named, with the operating system's error,
/// within 2 s under the default retry settings (one retry at first contact).
#[test]
fn a_dead_endpoint_is_named_with_the_os_error() {
    let work = tempfile::tempdir().expect("tempdir");
    let url = dead_url();
    let config = config_file(work.path(), &url);
    assert_error(
        backfill(&config),
        1,
        &format!("kvs-archiver: kvs DescribeStream cam: cannot reach {url}: dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111) (check the endpoint and the network; retried)"),
    );
}

/// `backfill` of the last minutes of `cam` with `config`, as a user with credentials runs it.
fn backfill(config: &std::path::Path) -> Command {
    let mut cmd = archiver();
    with_credentials(&mut cmd);
    cmd.arg("--config")
        .arg(config)
        .arg("backfill")
        .args(range());
    cmd
}

/// A port nothing listens on.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_dead_s3_endpoint_is_named_with_the_os_error() {
    let (_runtime, emu) = emulator();
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), emu.base_url());
    let url = dead_url();
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text
        .replace(
            "[aws]\n",
            &format!("[aws]\ns3_endpoint_url = \"{url}\"\ns3_force_path_style = true\n"),
        )
        .replace(
            &format!("directory = \"{}/archive\"", work.path().display()),
            "bucket = \"footage\"",
        );
    std::fs::write(&config, text).expect("config rewritten");
    assert_error(
        backfill(&config),
        1,
        &format!("kvs-archiver: ListObjectsV2 s3://footage: cannot reach S3 at {url}: dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111) (check aws.s3_endpoint_url and the network; retried)"),
    );
}

/// `config` with its ledger at `database_url` (instead of its SQLite file).
fn with_ledger(config: &std::path::Path, database_url: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    let text: String = text
        .lines()
        .map(|line| {
            if line.starts_with("database_url = ") {
                format!("database_url = \"{database_url}\"\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(config, text).expect("config rewritten");
}

/// A PostgreSQL password given as `?password=` (or in the user-info) never reaches the
/// terminal: `check-config` prints the URL with both redacted.
#[test]
fn check_config_prints_no_ledger_password() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), "http://127.0.0.1:9");
    with_ledger(&config, "postgres://u:pw@db.example/kvs?password=hunter2");
    let out = archiver()
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .expect("check-config runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("postgres://u:REDACTED@db.example/kvs?password=REDACTED"),
        "{stdout}"
    );
    assert!(!format!("{stdout}{stderr}").contains("hunter2") && !stdout.contains(":pw@"));
}

/// The error of a ledger that does not answer names it without its password, and a
/// parameter the driver does not read (libpq's `sslpassword`, `connect_timeout`) is
/// neither refused (such a configuration worked before) nor handed to the driver, which
/// would log its value: a warning names it, without the value.
#[test]
fn an_unreachable_ledger_is_named_without_its_password() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), "http://127.0.0.1:9");
    let port = dead_url().rsplit(':').next().expect("a port").to_string();
    with_ledger(
        &config,
        &format!("postgres://archiver@127.0.0.1:{port}/kvs?password=hunter2"),
    );
    let out = archiver()
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("status runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("kvs-archiver: cannot reach the ledger at postgres://archiver@127.0.0.1:{port}/kvs?password=REDACTED: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    with_ledger(
        &config,
        &format!(
            "postgres://archiver@127.0.0.1:{port}/kvs?sslpassword=hunter2&connect_timeout=5&sslmode=disable"
        ),
    );
    let out = archiver()
        // The driver's warnings (it logs an unread parameter with its value) show.
        .env("KVS_ARCHIVER_LOG", "info")
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("status runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The driver was given the URL without them: the error names the URL it was given.
    assert!(
        stderr.contains(&format!(
            "kvs-archiver: cannot reach the ledger at postgres://archiver@127.0.0.1:{port}/kvs?sslmode=disable: "
        )),
        "{stderr}"
    );
    let warning = stderr
        .lines()
        .find(|line| line.contains("\"WARN\"") && line.contains("ledger.database_url"))
        .unwrap_or_else(|| panic!("a warning about ledger.database_url: {stderr}"));
    assert!(
        warning.contains("sslpassword, connect_timeout"),
        "{warning}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_denied_action_names_the_permission_and_the_policy_command() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut spec =
        kvs_emulator::StreamSpec::historical("cam", end - chrono::Duration::hours(1), end);
    spec.faults.deny_access = true;
    let emu = runtime
        .block_on(kvs_emulator::Emulator::start(
            kvs_emulator::EmulatorConfig {
                streams: vec![spec],
                ..Default::default()
            },
        ))
        .expect("emulator");
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), emu.base_url());
    assert_error(
        backfill(&config),
        2,
        "kvs-archiver: kvs DescribeStream cam: access denied: the credentials may not call kinesisvideo:DescribeStream on this stream; `kvs-archiver iam-policy` prints the policy this configuration needs",
    );
    drop(emu);
}

/// An emulator with ten minutes of stream `cam`, on a runtime kept alive by the caller.
fn emulator() -> (tokio::runtime::Runtime, kvs_emulator::Emulator) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let end = chrono::Utc::now() - chrono::Duration::minutes(1);
    let spec =
        kvs_emulator::StreamSpec::historical("cam", end - chrono::Duration::minutes(20), end);
    let emu = runtime
        .block_on(kvs_emulator::Emulator::start(
            kvs_emulator::EmulatorConfig {
                streams: vec![spec],
                ..Default::default()
            },
        ))
        .expect("emulator");
    (runtime, emu)
}

/// `credential_process` from a profile: the program runs the script and signs with what
/// it prints (the emulator checks every signature).
#[test]
fn credentials_from_a_credential_process_profile_are_used() {
    let (_runtime, emu) = emulator();
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), emu.base_url());
    let script = work.path().join("credentials.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho process-ran >> {0}/ran\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"{DEFAULT_ACCESS_KEY_ID}\", \"SecretAccessKey\": \"{DEFAULT_SECRET_ACCESS_KEY}\"}}'\n",
            work.path().display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("executable");
    let mut cmd = archiver();
    without_credentials(&mut cmd, work.path());
    std::fs::write(
        work.path().join("aws-config"),
        format!(
            "[profile archiver]\nregion = us-east-1\ncredential_process = {}\n",
            script.display()
        ),
    )
    .expect("profile");
    cmd.env("AWS_PROFILE", "archiver")
        .arg("--config")
        .arg(&config)
        .arg("backfill")
        .args(range());
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ran = std::fs::read_to_string(work.path().join("ran")).unwrap_or_default();
    assert_eq!(
        ran.lines().count(),
        1,
        "the credential process ran once: {ran}"
    );
    assert!(
        emu.requests()
            .iter()
            .any(|r| r.op == "GetClip" && r.status == 200),
        "signed requests were accepted"
    );
}

/// An IAM Identity Center (SSO) profile: the cached portal token is exchanged at a fake
/// SSO portal on 127.0.0.1 (AWS_ENDPOINT_URL_SSO) for role credentials, which sign the
/// requests.
#[test]
fn credentials_from_an_sso_profile_come_from_the_portal() {
    let (_runtime, emu) = emulator();
    let work = tempfile::tempdir().expect("tempdir");
    let config = config_file(work.path(), emu.base_url());
    const START_URL: &str = "https://kvs-archiver-test.awsapps.com/start";
    // ~/.aws/sso/cache/<sha1 of the start URL>.json, as `aws sso login` leaves it.
    let cache = work.path().join(".aws/sso/cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    std::fs::write(
        cache.join("28550724b39741c4546148a3ea1203baf1333326.json"),
        format!(
            r#"{{"startUrl": "{START_URL}", "region": "us-east-1", "accessToken": "portal-token-42", "expiresAt": "2099-01-01T00:00:00Z"}}"#
        ),
    )
    .expect("token");
    // The portal: answers GetRoleCredentials, keeps what it was asked.
    let portal = std::net::TcpListener::bind("127.0.0.1:0").expect("portal");
    let port = portal.local_addr().expect("addr").port();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in portal.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut request = vec![0u8; 8192];
            let n = stream.read(&mut request).unwrap_or(0);
            seen.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&request[..n]));
            let expiration = (chrono::Utc::now() + chrono::Duration::hours(1)).timestamp_millis();
            let body = format!(
                r#"{{"roleCredentials": {{"accessKeyId": "{DEFAULT_ACCESS_KEY_ID}", "secretAccessKey": "{DEFAULT_SECRET_ACCESS_KEY}", "sessionToken": "sso-session", "expiration": {expiration}}}}}"#
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let mut cmd = archiver();
    without_credentials(&mut cmd, work.path());
    std::fs::write(
        work.path().join("aws-config"),
        format!(
            "[profile archiver]\nregion = us-east-1\nsso_start_url = {START_URL}\nsso_region = us-east-1\nsso_account_id = 123456789012\nsso_role_name = Archiver\n"
        ),
    )
    .expect("profile");
    cmd.env("AWS_PROFILE", "archiver")
        .env("AWS_ENDPOINT_URL_SSO", format!("http://127.0.0.1:{port}"))
        .arg("--config")
        .arg(&config)
        .arg("backfill")
        .args(range());
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asked = asked.lock().expect("lock").clone();
    assert!(
        asked.contains("/federation/credentials?") && asked.contains("account_id=123456789012"),
        "{asked}"
    );
    assert!(asked.contains("role_name=Archiver"), "{asked}");
    assert!(
        asked
            .to_ascii_lowercase()
            .contains("x-amz-sso_bearer_token: portal-token-42"),
        "{asked}"
    );
    assert!(emu
        .requests()
        .iter()
        .any(|r| r.op == "GetClip" && r.status == 200));
}

//! kvs-archiver attacked through what it reads: forged KVS answers, crafted objects and
//! metadata in the destination, links planted in a directory destination. Each test
//! reproduces an attack from issue "Hostile inputs" against the binary, the project's
//! KVS emulator and a directory on this machine, and asserts what a user would notice:
//! nothing written outside the destination, no panic, bounded memory, an error that
//! names the cause.

use chrono::Utc;
use kvs_emulator::{Emulator, EmulatorConfig, StreamSpec};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

#[path = "support/command.rs"]
mod command;

/// The emulator, a work directory with a SQLite ledger and a directory destination, and
/// a directory beside it that nothing may ever write into.
struct Site {
    emu: Emulator,
    work: tempfile::TempDir,
    archive: PathBuf,
    outside: PathBuf,
    config: PathBuf,
}

impl Site {
    async fn new(spec: StreamSpec) -> Site {
        let name = spec.name.clone();
        let emu = Emulator::start(EmulatorConfig {
            streams: vec![spec],
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        let work = tempfile::tempdir().expect("tempdir");
        let archive = work.path().join("archive");
        let outside = work.path().join("outside");
        std::fs::create_dir_all(&archive).expect("archive");
        std::fs::create_dir_all(&outside).expect("outside");
        let config = work.path().join("kvs-archiver.toml");
        std::fs::write(
            &config,
            format!(
                "[aws]\nregion = \"us-east-1\"\nkinesis_video_endpoint_url = \"{}\"\n\
                 [ledger]\ndatabase_url = \"sqlite://{}/state.db\"\n\
                 [destination]\ndirectory = \"{}\"\nprefix = \"kvs/\"\n\
                 [archive]\nretry_base_delay = \"50ms\"\nretry_max_delay = \"1s\"\nmax_attempts = 3\nclip_duration = \"2m\"\n\
                 [[streams]]\nname = \"{name}\"\n",
                emu.base_url(),
                work.path().display(),
                archive.display(),
            ),
        )
        .expect("config written");
        Site {
            emu,
            work,
            archive,
            outside,
            config,
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        command::kvs_archiver(&self.config, args)
    }

    async fn run(&self, args: &[&str]) -> Output {
        // Generous: a hang is a failure of its own, reported as such.
        let output = self.command(args).output();
        tokio::time::timeout(Duration::from_secs(120), output)
            .await
            .unwrap_or_else(|_| panic!("kvs-archiver {args:?} did not finish in 120 s"))
            .expect("kvs-archiver runs")
    }

    /// A camera archived whole: its objects, by key.
    async fn archived(
        spec: StreamSpec,
        start_ms: i64,
        end_ms: i64,
    ) -> (Site, BTreeMap<String, PathBuf>) {
        let name = spec.name.clone();
        let site = Site::new(spec).await;
        let out = site.backfill(&name, start_ms, end_ms).await;
        assert!(out.status.success(), "{}", text(&out));
        let objects = site.objects();
        assert!(objects.len() >= 3, "{objects:?}");
        (site, objects)
    }

    /// `export` of `[start, end)` of `stream` into `output`.
    async fn export(&self, stream: &str, (start, end): (i64, i64), output: &Path) -> Output {
        let (start, end) = (rfc3339(start), rfc3339(end));
        let output = output.to_str().expect("a UTF-8 path");
        self.run(&[
            "export", "--stream", stream, "--start", &start, "--end", &end, "-o", output,
        ])
        .await
    }

    async fn backfill(&self, stream: &str, start_ms: i64, end_ms: i64) -> Output {
        let (start, end) = (rfc3339(start_ms), rfc3339(end_ms));
        self.run(&[
            "backfill", "--stream", stream, "--start", &start, "--end", &end,
        ])
        .await
    }

    /// The archived objects (`.mp4`, `.mkv`) under the destination, by key.
    fn objects(&self) -> BTreeMap<String, PathBuf> {
        files(&self.archive)
            .into_iter()
            .filter(|(key, _)| key.ends_with(".mp4") || key.ends_with(".mkv"))
            .collect()
    }

    fn assert_nothing_outside(&self) {
        let written = files(&self.outside);
        assert!(
            written.is_empty(),
            "written outside the destination: {:?}",
            written.keys()
        );
    }

    fn clip_requests(&self) -> usize {
        self.emu
            .requests()
            .iter()
            .filter(|r| r.op == "GetClip" || r.op == "GetMediaForFragmentList")
            .count()
    }
}

/// Every file under `dir` (not through links), by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                dirs.push(entry.path());
            } else {
                let key = entry
                    .path()
                    .strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string();
                out.insert(key, entry.path());
            }
        }
    }
    out
}

fn rfc3339(ms: i64) -> String {
    kvs_archiver::domain::rfc3339(ms)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_no_panic(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && output.status.code() != Some(101),
        "{}",
        text(output)
    );
}

/// Ten minutes of a camera, ending a few minutes ago, in 2 s fragments.
fn camera(name: &str) -> (StreamSpec, i64, i64) {
    let end = (Utc::now().timestamp() - 300) * 1000;
    let start = end - 10 * 60_000;
    let mut spec = StreamSpec::historical(
        name,
        chrono::DateTime::from_timestamp_millis(start).expect("start"),
        chrono::DateTime::from_timestamp_millis(end).expect("end"),
    );
    spec.fragment_durations_ms = vec![2000];
    (spec, start, end)
}

/// Peak resident memory of this test's children so far, in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes into the struct it is given, nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    // Linux reports kilobytes.
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

/// Finding 1: a ListFragments answer whose fragment number climbs out of the destination,
/// followed by GetClip refusing the range (so the fragment would be fetched as Matroska
/// under a key naming it), writes nothing anywhere and names the forged number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_fragment_number_never_becomes_a_path() {
    let (mut spec, start, end) = camera("cam");
    spec.missing_codec_private_data_at = vec![3];
    let site = Site::new(spec).await;
    let escape = format!(
        "1/../../../../../../../../../..{}/escaped",
        site.outside.display()
    );
    site.emu
        .update_faults("cam", |f| f.listed_fragment_number = Some(escape.clone()));
    let out = site.backfill("cam", start, end).await;
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ListFragments cam")
            && stderr.contains("fragment number \"1/../../")
            && stderr.contains("not 1-128 digits"),
        "the error names the forged number: {}",
        text(&out)
    );
    site.assert_nothing_outside();
    assert!(site.objects().is_empty(), "{:?}", site.objects());
    assert_eq!(
        site.clip_requests(),
        0,
        "nothing was planned from the listing"
    );
    // Once the answers are honest again, the same command archives everything.
    site.emu
        .update_faults("cam", |f| f.listed_fragment_number = None);
    let out = site.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    site.assert_nothing_outside();
    assert!(!site.objects().is_empty());
}

/// The `stsz` box of an MP4 object, found by its type inside `moov`.
fn stsz_at(bytes: &[u8]) -> usize {
    bytes
        .windows(4)
        .position(|w| w == b"stsz")
        .expect("an stsz box")
}

/// Finding 2: objects whose `stsz` claims one uniform size for 16 million samples make
/// `export` fail at once, naming the object and the table, with memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_sample_table_is_refused_before_it_is_allocated() {
    let (spec, start, end) = camera("cam");
    let (site, objects) = Site::archived(spec, start, end).await;
    for path in objects.values() {
        let mut bytes = std::fs::read(path).expect("object");
        let at = stsz_at(&bytes);
        // After the type: version and flags, then the uniform size and the count.
        bytes[at + 8..at + 12].copy_from_slice(&1u32.to_be_bytes());
        bytes[at + 12..at + 16].copy_from_slice(&16_000_000u32.to_be_bytes());
        std::fs::write(path, bytes).expect("crafted");
    }
    let output = site.work.path().join("range.mp4");
    let out = site.export("cam", (start, end), &output).await;
    assert_no_panic(&out);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stsz: 16000000 samples") && stderr.contains("kvs/cam/"),
        "the error names the object and its table: {}",
        text(&out)
    );
    assert!(!output.exists(), "no output from a refused object");
    let peak = children_peak_rss();
    assert!(
        peak < 200 << 20,
        "peak RSS of the commands {} MiB: a table was allocated",
        peak >> 20
    );
}

/// Finding 3: one sidecar edited to claim 2020-01-01 .. 9999-12-31 is not restored by
/// `rebuild-ledger` (which exits 1 and says why), and the real objects are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_ledger_refuses_metadata_that_cannot_be_its_own() {
    let (spec, start, end) = camera("cam");
    let (site, objects) = Site::archived(spec, start, end).await;
    let (edited_key, edited) = objects.iter().next().expect("an object");
    let sidecar = PathBuf::from(format!("{}.json", edited.display()));
    let mut meta: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&sidecar).expect("sidecar")).expect("json");
    meta.insert("kvs-start".into(), "2020-01-01T00:00:00.000Z".into());
    meta.insert("kvs-end".into(), "9999-12-31T00:00:00.000Z".into());
    std::fs::write(&sidecar, serde_json::to_vec(&meta).expect("json")).expect("edited");

    std::fs::remove_file(site.work.path().join("state.db")).expect("ledger lost");
    let out = site.run(&["rebuild-ledger"]).await;
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("not restored {edited_key}"))
            && stdout.contains("not a range under 24 h"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains(&format!("{} chunks restored", objects.len() - 1)),
        "{}",
        text(&out)
    );
    let status = site.run(&["status"]).await;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(!status.contains("9999"), "{status}");
    // The edited object's media is planned again and fetched; the others are not.
    let before = site.clip_requests();
    let out = site.backfill("cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(site.clip_requests() - before >= 1);
    assert!(
        site.clip_requests() - before < objects.len(),
        "only the refused object's media is fetched again"
    );
}

/// Finding 6: links planted at the sidecar's and the object's names are replaced, never
/// written through, and under `umask 077` the objects come out owner-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_are_replaced_not_written_through_and_the_umask_is_kept() {
    let (spec, start, end) = camera("cam");
    let (site, objects) = Site::archived(spec, start, end).await;
    // Start over, with a link at every name the archive will write.
    std::fs::remove_dir_all(site.archive.join("kvs")).expect("archive emptied");
    std::fs::remove_file(site.work.path().join("state.db")).expect("ledger emptied");
    let victim = site.outside.join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    for path in objects.values() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        std::os::unix::fs::symlink(&victim, path).expect("link at the object");
        std::os::unix::fs::symlink(&victim, format!("{}.json", path.display()))
            .expect("link at the sidecar");
    }
    // Under the operator's umask 077, set by a shell as systemd's UMask= would set it.
    let (start_at, end_at) = (rfc3339(start), rfc3339(end));
    let mut command = tokio::process::Command::new("sh");
    command::in_test_environment(&mut command, &site.config);
    command.args([
        "-c",
        "umask 077; exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_kvs-archiver"),
        "backfill",
        "--stream",
        "cam",
        "--start",
        &start_at,
        "--end",
        &end_at,
    ]);
    let out = command.output().await.expect("backfill runs");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    for path in objects.values() {
        let sidecar = PathBuf::from(format!("{}.json", path.display()));
        for file in [path, &sidecar] {
            let meta = std::fs::symlink_metadata(file).expect("written");
            assert!(meta.is_file(), "{} is a regular file now", file.display());
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{} under umask 077",
                file.display()
            );
        }
    }

    // export: a link at the output is replaced, not written through (its partial file
    // has a random name; the fixed name earlier versions used is left alone).
    let output = site.work.path().join("out.mp4");
    std::os::unix::fs::symlink(&victim, format!("{}.partial", output.display())).expect("link");
    std::os::unix::fs::symlink(&victim, &output).expect("link");
    let out = site.export("cam", (start, start + 60_000), &output).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    assert!(std::fs::symlink_metadata(&output)
        .expect("output")
        .is_file());
}

/// Finding 7: two `ln -s .` links in a stream folder and a link to a directory outside
/// holding an old `.partial` file: `verify`, `rebuild-ledger` and the daemon's start-up
/// finish, and the sweep removes nothing outside the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_loops_end_and_the_sweep_never_reaches_outside() {
    let (spec, start, end) = camera("cam");
    let (site, objects) = Site::archived(spec, start, end).await;
    let stream_dir = site.archive.join("kvs/cam");
    std::os::unix::fs::symlink(".", stream_dir.join("a")).expect("loop a");
    std::os::unix::fs::symlink(".", stream_dir.join("b")).expect("loop b");
    std::os::unix::fs::symlink(&site.outside, stream_dir.join("elsewhere")).expect("link out");
    let stale = site.outside.join("old.mp4.1-1.partial");
    std::fs::write(&stale, b"someone else's").expect("stale");
    let seven_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .and_then(|f| f.set_modified(seven_hours_ago))
        .expect("aged");

    let out = site.run(&["verify", "--stream", "cam"]).await;
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", text(&out));
    let out = site.run(&["run", "--once"]).await;
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stale.exists(),
        "the sweep followed a link out of the destination"
    );
    let peak = children_peak_rss();
    assert!(peak < 200 << 20, "a walk grew to {} MiB", peak >> 20);
    std::fs::remove_file(site.work.path().join("state.db")).expect("ledger lost");
    let out = site.run(&["rebuild-ledger"]).await;
    assert_no_panic(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("{} chunks restored", objects.len())),
        "{}",
        text(&out)
    );
}

/// Finding 7's neighbour: a FIFO planted where an object and a side file should be
/// would block a plain open forever; `verify` reports the object instead, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_place_of_an_object_is_reported_not_waited_on() {
    let (spec, start, end) = camera("cam");
    let (site, objects) = Site::archived(spec, start, end).await;
    let mut paths = objects.values();
    let object = paths.next().expect("an object");
    let sidecar_of = paths.next().expect("a second object");
    let sidecar = PathBuf::from(format!("{}.json", sidecar_of.display()));
    for path in [object, &sidecar] {
        std::fs::remove_file(path).expect("removed");
        let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
    }
    let out = site.run(&["verify", "--stream", "cam"]).await;
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("not a regular file"), "{}", text(&out));
}

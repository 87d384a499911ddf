//! Finding footage: `find`, `export`, and the archive's page in Chromium.

use crate::support::checks::{files_under, require_ffmpeg};
use crate::support::process::{free_port, streams_json, text};
use crate::support::world::{historical, recent, rfc3339, World};
use kvs_emulator::{scan_markers, GapSpec, StreamSpec};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// `find --json` for `stream` at `t`: the finding, the URL, and the exit status.
/// `dock-cam`: 2 s fragments of 20 kB over `[start, end]`, and 7 minutes without media
/// after the first 20.
pub(crate) fn dock_cam_with_a_gap(start: i64, end: i64) -> StreamSpec {
    let mut spec = historical("dock-cam", start, end, 2000, 20_000);
    spec.gaps = vec![GapSpec {
        after: Duration::from_secs(20 * 60),
        length: Duration::from_secs(7 * 60),
    }];
    spec
}

/// The fragments on either side of the first gap of more than a minute.
pub(crate) fn the_gap(fragments: &[kvs_emulator::FragmentInfo]) -> [kvs_emulator::FragmentInfo; 2] {
    fragments
        .windows(2)
        .find(|w| w[1].server_ms - w[0].server_ms > 60_000)
        .map(|w| [w[0].clone(), w[1].clone()])
        .expect("the gap")
}

async fn find_at(world: &World, stream: &str, t: i64) -> (serde_json::Value, bool) {
    let out = world
        .run(&["find", "--stream", stream, "--at", &rfc3339(t), "--json"])
        .await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("find prints JSON ({e}): {}", text(&out)));
    (shown, out.status.success())
}

/// `find` picks the object and the offset at object boundaries, explains a gap with the
/// media on either side, says what is not archived yet, and its URL plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_names_the_object_and_offset_at_boundaries_and_explains_gaps() {
    let (start, end) = recent(0.75);
    let spec = dock_cam_with_a_gap(start, end);
    let world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("dock-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let objects = world.objects().await;
    let fragments = world.emu.fragments("dock-cam");
    let by_number: HashMap<&str, &kvs_emulator::FragmentInfo> =
        fragments.iter().map(|f| (f.number.as_str(), f)).collect();
    // Each object's fragments, in time order, from the markers in its media.
    let mut spans: Vec<(String, Vec<&kvs_emulator::FragmentInfo>)> = objects
        .iter()
        .map(|(key, bytes)| {
            let mut held: Vec<_> = scan_markers(bytes)
                .iter()
                .map(|n| by_number[n.as_str()])
                .collect();
            held.sort_by_key(|f| f.server_ms);
            (key.clone(), held)
        })
        .collect();
    spans.sort_by_key(|(_, held)| held[0].server_ms);
    assert!(spans.len() >= 4, "several objects: {:?}", objects.keys());

    // A boundary: the first instant of the second object, and the last of the first.
    let (first_key, first) = &spans[0];
    let (second_key, second) = &spans[1];
    let boundary = second[0].server_ms;
    let (at, found) = find_at(&world, "dock-cam", boundary).await;
    assert!(found, "{at}");
    assert_eq!(at["finding"]["object_key"], second_key.as_str(), "{at}");
    assert_eq!(at["finding"]["offset_ms"], 0, "{at}");
    let (at, _) = find_at(&world, "dock-cam", boundary - 1).await;
    let first_duration: u64 = first.iter().map(|f| u64::from(f.duration_ms)).sum();
    assert_eq!(at["finding"]["object_key"], first_key.as_str(), "{at}");
    assert_eq!(at["finding"]["offset_ms"], first_duration - 1, "{at}");
    // Inside an object: 3.5 fragments in.
    let t = second[3].server_ms + 500;
    let (at, _) = find_at(&world, "dock-cam", t).await;
    assert_eq!(at["finding"]["offset_ms"], 6_500, "{at}");
    assert_eq!(at["finding"]["fragment"], second[3].number.as_str(), "{at}");

    // Inside the gap: no media, with where it ends and resumes.
    let gap = the_gap(&fragments);
    let gap_end_of_media = gap[0].server_ms + i64::from(gap[0].duration_ms);
    let (at, found) = find_at(&world, "dock-cam", gap_end_of_media + 60_000).await;
    assert!(!found, "nothing holds a gap: {at}");
    assert_eq!(at["finding"]["found"], "no_media", "{at}");
    assert_eq!(at["finding"]["before"][0], gap_end_of_media, "{at}");
    assert_eq!(at["finding"]["after"][0], gap[1].server_ms, "{at}");
    let out = world
        .run(&[
            "find",
            "--stream",
            "dock-cam",
            "--at",
            &rfc3339(gap_end_of_media + 60_000),
        ])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or(""),
        format!(
            "dock-cam at {}: KVS had no media then",
            rfc3339(gap_end_of_media + 60_000)
        )
    );

    // After what was archived: not planned yet.
    let (at, found) = find_at(&world, "dock-cam", end + 3_600_000).await;
    assert!(!found);
    assert_eq!(at["finding"]["found"], "not_planned_yet", "{at}");

    // The URL plays from S3 (a presigned GET).
    let (at, _) = find_at(&world, "dock-cam", t).await;
    let url = at["url"].as_str().expect("a URL").to_string();
    require_ffmpeg();
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(&url)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seconds: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a duration");
    let expected = second.iter().map(|f| f64::from(f.duration_ms)).sum::<f64>() / 1000.0;
    assert!((seconds - expected).abs() < 0.1, "{seconds} vs {expected}");
}

/// ffprobe's view of a file: (duration in seconds, decoded video frames), or its error.
pub(crate) fn probe_frames(path: &std::path::Path) -> Result<(f64, u64), String> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "format=duration:stream=nb_read_frames",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("ffprobe runs: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || !stderr.trim().is_empty() {
        return Err(format!("ffprobe: {stderr}"));
    }
    let shown: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ffprobe JSON: {e}"))?;
    let duration = shown["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or("no duration")?;
    let frames = shown["streams"][0]["nb_read_frames"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or("no frame count")?;
    Ok((duration, frames))
}

/// `export --json` of dock-cam over `[from, to)` with `--gaps gaps --cut cut`: the file
/// and the report.
async fn export(
    world: &World,
    from: i64,
    to: i64,
    gaps: &str,
    cut: &str,
) -> (std::path::PathBuf, serde_json::Value) {
    let path = world.work.path().join(format!("export-{gaps}-{cut}.mp4"));
    let (from, to, file) = (rfc3339(from), rfc3339(to), path.display().to_string());
    let args = [
        "export", "--stream", "dock-cam", "--start", &from, "--end", &to, "-o", &file, "--gaps",
        gaps, "--cut", cut, "--json",
    ];
    let out = world.run(&args).await;
    assert!(out.status.success(), "export --gaps {gaps}: {}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("export prints JSON ({e}): {}", text(&out)));
    (path, report)
}

/// `export` over a range spanning three objects and a gap: one MP4 that ffprobe reads
/// without error, cut at the keyframe before the start and at the frame before the end,
/// holding exactly the expected fragments; the gap is reported, held (the default) or
/// joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_spans_objects_and_a_gap_cut_at_keyframes() {
    let (start, end) = recent(0.75);
    let spec = dock_cam_with_a_gap(start, end);
    let world = World::new(vec![spec], "clip_duration = \"10m\"").await;
    let out = world.backfill("dock-cam", start, end).await;
    assert!(out.status.success(), "{}", text(&out));
    let fragments = world.emu.fragments("dock-cam");
    let gap = the_gap(&fragments);
    // From 0.7 s into a fragment ten minutes before the gap to 1.3 s into one five
    // minutes after it: not on keyframes, and at least three objects.
    let first = fragments
        .iter()
        .find(|f| f.server_ms >= gap[0].server_ms - 600_000)
        .expect("a first fragment");
    let last = fragments
        .iter()
        .find(|f| f.server_ms >= gap[1].server_ms + 300_000)
        .expect("a last fragment");
    let (from, to) = (first.server_ms + 700, last.server_ms + 1_300);
    let expected: Vec<String> = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < to)
        .map(|f| f.number.clone())
        .collect();
    // 100 ms frames: whole fragments, then the frames of the last that start before `to`.
    let expected_frames: u64 = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < to)
        .map(|f| {
            (0..u64::from(f.duration_ms) / 100)
                .filter(|k| f.server_ms + (*k as i64) * 100 < to)
                .count() as u64
        })
        .sum();
    let media_ms: i64 = fragments
        .iter()
        .filter(|f| f.server_ms >= first.server_ms && f.server_ms < last.server_ms)
        .map(|f| i64::from(f.duration_ms))
        .sum::<i64>()
        + 1_300;

    let (held, report) = export(&world, from, to, "hold", "keyframe").await;
    assert_eq!(report["first_frame_ms"], first.server_ms, "{report}");
    assert_eq!(report["last_frame_end_ms"], to, "{report}");
    assert!(
        report["objects"].as_array().map_or(0, Vec::len) >= 3,
        "three objects or more: {report}"
    );
    let gaps = report["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 1, "{report}");
    assert_eq!(
        gaps[0]["from_ms"],
        gap[0].server_ms + i64::from(gap[0].duration_ms),
        "{report}"
    );
    assert_eq!(gaps[0]["to_ms"], gap[1].server_ms, "{report}");
    assert_eq!(gaps[0]["why"], "KVS had no media then", "{report}");
    let bytes = std::fs::read(&held).expect("the export");
    assert_eq!(
        scan_markers(&bytes),
        expected,
        "exactly the fragments of the range"
    );
    assert_eq!(report["frames"], expected_frames, "{report}");
    assert!(
        std::fs::read_dir(world.work.path())
            .expect("work directory")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".partial")),
        "no partial file is left"
    );

    let (joined, report) = export(&world, from, to, "join", "keyframe").await;
    assert_eq!(report["duration_ms"], media_ms, "{report}");
    assert_eq!(
        scan_markers(&std::fs::read(&joined).expect("export")),
        expected
    );

    require_ffmpeg();
    let (seconds, frames) = probe_frames(&held).expect("ffprobe reads the held export");
    assert_eq!(frames, expected_frames);
    let wall = (to - first.server_ms) as f64 / 1000.0;
    assert!(
        (seconds - wall).abs() < 0.05,
        "held: {seconds} s, wall time {wall} s"
    );
    let (seconds, frames) = probe_frames(&joined).expect("ffprobe reads the joined export");
    assert_eq!(frames, expected_frames);
    let media = media_ms as f64 / 1000.0;
    assert!(
        (seconds - media).abs() < 0.05,
        "joined: {seconds} s, media {media} s"
    );

    the_exact_cut_hides_the_frames_before_the_start(
        &world,
        (from, to),
        first.server_ms,
        &expected,
        expected_frames,
    )
    .await;
}

/// `export --cut exact` (the default) of the same range: cut 0.7 s into the first
/// fragment, the frames before it decoded but not shown; the same fragments in the file.
async fn the_exact_cut_hides_the_frames_before_the_start(
    world: &World,
    (from, to): (i64, i64),
    keyframe_ms: i64,
    expected: &[String],
    expected_frames: u64,
) {
    let (exact, report) = export(world, from, to, "hold", "exact").await;
    assert_eq!(report["shown_from_ms"], from, "{report}");
    assert_eq!(report["first_frame_ms"], keyframe_ms, "{report}");
    assert_eq!(
        scan_markers(&std::fs::read(&exact).expect("export")),
        expected
    );
    let (seconds, frames) = probe_frames(&exact).expect("ffprobe reads the exact export");
    assert_eq!(
        frames,
        expected_frames - 7,
        "seven frames before the start are hidden"
    );
    assert_eq!(report["frames"], frames, "{report}");
    let asked = (to - from) as f64 / 1000.0;
    assert!(
        (seconds - asked).abs() <= 0.1,
        "exact: {seconds} s for a range of {asked} s"
    );
}

/// A raw HTTP/1.1 GET on loopback: (status code, whole response).
async fn http_request(port: u16, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("listener");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n");
    tcp.write_all(request.as_bytes()).await.expect("sent");
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// Waits until something answers HTTP on `port`.
async fn wait_for_http(port: u16, path: &str, child: &mut tokio::process::Child) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let (code, _) = http_request(port, path, "").await;
            if code != 0 {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server on port {port} exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answers on port {port}");
}

/// Fails the test, naming the command that installs them, without Chromium and its
/// WebDriver.
fn require_chromium() {
    let found = ["chromium", "chromedriver"].iter().all(|tool| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(
        found,
        "needs Chromium and chromedriver, installed by: apt-get install -y chromium chromium-driver"
    );
}

/// The archive's page in a real headless Chromium, for a ledger a real backfill with
/// injected faults built: the timeline shows every archived object, the failed chunks and
/// the gap where KVS had no media; a click plays from that instant and on across the
/// object's end; hovering shows a decoded preview; a selection downloads as one MP4 of
/// exactly its fragments; a screenshot is left in target/. With a token, the page takes
/// it once in the URL and plays on the session cookie it sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_page_plays_by_time_previews_and_downloads_a_selection_in_chromium() {
    require_chromium();
    let archive = faulted_directory_archive().await;
    let (mut server, listen) = serve_checked(&archive).await;
    let port: u16 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let downloads = tempfile::tempdir().expect("download directory");
    let (_driver, browser) = chromium_session(downloads.path()).await;
    let result = async {
        // The token once in the URL; the cookie carries it to the page and the video.
        browser
            .goto(&format!(
                "http://{listen}/streams/dock-cam?token={PAGE_TOKEN}"
            ))
            .await
            .expect("page opens");
        let archived = timeline_is_true_to_the_archive(&browser, &archive).await;
        a_click_plays_from_that_instant_across_objects(&browser, port, &archived).await;
        let mut spans = archived.clone();
        spans.sort();
        let (a, b) = spans
            .windows(2)
            .find(|w| (w[1].0 - w[0].1).abs() <= 3_000)
            .map(|w| (w[0].1 - 30_000, w[1].0 + 30_000))
            .expect("two archived objects back to back");
        playback_goes_on_across_the_gap(&browser, archive.gap.0).await;
        hovering_shows_a_decoded_preview(&browser, a + 10_000).await;
        a_selection_downloads_its_fragments(&browser, &archive.world, downloads.path(), a, b).await;
        zoom_in_narrows_the_window(&browser).await;
    };
    // A panic must not leave Chromium running.
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(result)).await;
    let _ = browser.close().await;
    let _ = server.kill().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The page test's token: long enough for `serve`.
const PAGE_TOKEN: &str = "s3cret-token-of-at-least-32-bytes";

/// A backfill into a directory with three GetClip bodies cut off (three failed chunks):
/// the world, its directory, the MP4 objects, the failed count and the gap in the media.
struct FaultedArchive {
    world: World,
    objects: BTreeSet<String>,
    failed: u64,
    gap: (i64, i64),
}

async fn faulted_directory_archive() -> FaultedArchive {
    let (start, end) = recent(1.0);
    let mut spec = dock_cam_with_a_gap(start, end);
    // Three GetClip bodies cut off, each chunk tried once: three failed chunks.
    spec.faults.resets_next = 3;
    let world = World::new(vec![spec], "clip_duration = \"10m\"\nconcurrency = 1").await;
    let archive = world.work.path().join("archive");
    std::fs::create_dir_all(&archive).expect("archive directory");
    let config = std::fs::read_to_string(&world.config).expect("config");
    std::fs::write(
        &world.config,
        config.replace(
            &format!("bucket = \"{}\"", world.bucket),
            &format!("directory = \"{}\"", archive.display()),
        ),
    )
    .expect("config");
    let out = world
        .backfill_with(
            "dock-cam",
            start,
            end,
            &[("KVS_ARCHIVER_ARCHIVE__MAX_ATTEMPTS", "1")],
        )
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "three chunks fail: {}",
        text(&out)
    );
    let status = streams_json(&world.run(&["status", "--json"]).await);
    let failed = status[0]["failed"].as_u64().expect("failed count");
    assert!(failed >= 1, "{status}");
    // `find` says why a failed chunk's time is not archived.
    let failed_at = status[0]["failures"][0]["object_key"]
        .as_str()
        .and_then(|key| {
            world
                .emu
                .fragments("dock-cam")
                .into_iter()
                .find(|f| key.contains(&kvs_archiver::domain::compact_time(f.server_ms)))
        })
        .expect("a failed chunk's first fragment")
        .server_ms;
    let (at, found) = find_at(&world, "dock-cam", failed_at + 500).await;
    assert!(!found, "{at}");
    assert_eq!(at["finding"]["found"], "not_archived", "{at}");
    assert_eq!(at["finding"]["state"], "failed", "{at}");
    let objects: BTreeSet<String> = files_under(&archive)
        .into_keys()
        .filter(|k| k.ends_with(".mp4"))
        .collect();
    assert!(objects.len() >= 4, "{objects:?}");
    let fragments = world.emu.fragments("dock-cam");
    let gap = the_gap(&fragments);
    let (gap_from, gap_to) = (
        gap[0].server_ms + i64::from(gap[0].duration_ms),
        gap[1].server_ms,
    );
    FaultedArchive {
        world,
        objects,
        failed,
        gap: (gap_from, gap_to),
    }
}

/// `serve` with a token on a free port of 127.0.0.1: no token, no page; a directory
/// object is served with range requests. The server and its address.
async fn serve_checked(archive: &FaultedArchive) -> (tokio::process::Child, String) {
    let (world, objects) = (&archive.world, &archive.objects);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = world
        .command(&["serve", "--listen", &listen])
        .env("KVS_ARCHIVER_SERVE_TOKEN", PAGE_TOKEN)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("serve starts");
    wait_for_http(port, "/", &mut server).await;
    let (code, _) = http_request(port, "/streams/dock-cam", "").await;
    assert_eq!(code, 401, "no token, no page");
    let (code, page) = http_request(
        port,
        "/streams/dock-cam",
        &format!("Authorization: Bearer {PAGE_TOKEN}\r\n"),
    )
    .await;
    assert_eq!(code, 200, "{page}");
    // A directory object is served with range requests, as video elements ask.
    let key = objects.iter().next().expect("an object");
    let (code, partial) = http_request(
        port,
        &format!("/media/{key}"),
        &format!("Authorization: Bearer {PAGE_TOKEN}\r\nRange: bytes=4-11\r\n"),
    )
    .await;
    assert_eq!(code, 206, "{partial}");
    assert!(
        partial.ends_with("ftypisom"),
        "bytes 4-11 of an MP4: {partial}"
    );
    (server, listen)
}

/// chromedriver on a free port and a headless Chromium session through it.
async fn chromium_session(
    downloads: &std::path::Path,
) -> (tokio::process::Child, fantoccini::Client) {
    let driver_port = free_port();
    let mut driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={driver_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    // chromedriver keeps connections open: a TCP connect is the readiness check.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", driver_port))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            driver.try_wait().ok().flatten().is_none(),
            "chromedriver exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,900", "--autoplay-policy=no-user-gesture-required",
            "--no-first-run", "--no-proxy-server", "--disable-background-networking",
        ],
        "prefs": {
            "download.default_directory": downloads.display().to_string(),
            "download.prompt_for_download": false,
            "download.directory_upgrade": true,
        }}),
    );
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a Chromium session");
    (driver, browser)
}

/// The spans the timeline draws for `class`: (start, end, object key).
async fn drawn(browser: &fantoccini::Client, class: &str) -> Vec<(i64, i64, String)> {
    use fantoccini::Locator;
    let mut spans = Vec::new();
    for rect in browser
        .find_all(Locator::Css(&format!(
            "#timeline rect[data-class='{class}']"
        )))
        .await
        .expect("rects")
    {
        let mut attr = Vec::new();
        for name in ["data-start", "data-end", "data-key"] {
            attr.push(
                rect.attr(name)
                    .await
                    .expect("attribute")
                    .unwrap_or_default(),
            );
        }
        let start: i64 = attr[0].parse().expect("start");
        let end: i64 = attr[1].parse().expect("end");
        spans.push((start, end, attr[2].clone()));
    }
    spans
}

/// Every archived object and failed chunk is drawn, nothing inside the gap, and the gap
/// lies in the no-media background. Returns the archived spans.
async fn timeline_is_true_to_the_archive(
    browser: &fantoccini::Client,
    archive: &FaultedArchive,
) -> Vec<(i64, i64, String)> {
    let (objects, failed) = (&archive.objects, archive.failed);
    let (gap_from, gap_to) = archive.gap;
    let shown = |class: &'static str| drawn(browser, class);
    let archived = shown("archived").await;
    let keys: BTreeSet<String> = archived.iter().map(|(_, _, k)| k.clone()).collect();
    assert_eq!(
        &keys, objects,
        "every archived object, and only those, is drawn"
    );
    let failures = shown("failed").await;
    assert_eq!(failures.len() as u64, failed, "every failed chunk is drawn");
    for (start, end, key) in archived.iter().chain(&failures) {
        assert!(
            *end <= gap_from || *start >= gap_to,
            "nothing is drawn inside the gap: {key} {start}..{end}, gap {gap_from}..{gap_to}"
        );
    }
    // The gap shows as "KVS had no media": the background under the spans covers it,
    // and (above) no span is drawn over it.
    let no_media = shown("no-media").await;
    assert_eq!(no_media.len(), 1, "one no-media background: {no_media:?}");
    let (covered_from, covered_to, _) = &no_media[0];
    assert!(
        *covered_from <= gap_from && *covered_to >= gap_to,
        "the gap {gap_from}..{gap_to} lies in the no-media background {covered_from}..{covered_to}"
    );
    archived
}

/// The x of instant `t` on the timeline, in the page's coordinates, and the instant the
/// page reads back at that x (what a click there asks for).
async fn x_of(browser: &fantoccini::Client, t: i64) -> (f64, f64) {
    let at = browser
        .execute(
            "var svg = document.getElementById('timeline'); var box = svg.getBoundingClientRect(); var from = Number(svg.dataset.from), to = Number(svg.dataset.to); var x = box.left + (arguments[0] - from) / (to - from) * box.width; return [x, from + (x - box.left) / box.width * (to - from), box.top + box.height * 0.6];",
            vec![serde_json::json!(t)],
        )
        .await
        .expect("script runs");
    (at[0].as_f64().expect("x"), at[2].as_f64().expect("y"))
}

/// Sends `kind` (click, mousedown, mousemove, mouseup) to the timeline at `x`.
async fn pointer(browser: &fantoccini::Client, kind: &str, x: f64, y: f64) {
    browser
        .execute(
            "var target = document.elementFromPoint(arguments[1], arguments[2]) || document.getElementById('timeline'); target.dispatchEvent(new MouseEvent(arguments[0], {clientX: arguments[1], clientY: arguments[2], bubbles: true, cancelable: true, view: window})); return null;",
            vec![serde_json::json!(kind), serde_json::json!(x), serde_json::json!(y)],
        )
        .await
        .expect("event sent");
}

/// The player's state: (currentTime, error, currentSrc, dataset.start, played from).
async fn player_state(browser: &fantoccini::Client) -> serde_json::Value {
    browser
        .execute(
            "var p = document.getElementById('player'); return [p.currentTime, p.error ? p.error.message || String(p.error.code) : null, p.currentSrc, p.dataset.start || null, p.played.length ? p.played.start(0) : null];",
            vec![],
        )
        .await
        .expect("script runs")
}

/// Playing by time: a click at an instant 4 s before an object's end plays from that
/// instant (the clip the player loaded is cut on the frame there, and plays from its
/// time 0), and plays on across the object's end by itself.
async fn a_click_plays_from_that_instant_across_objects(
    browser: &fantoccini::Client,
    port: u16,
    archived: &[(i64, i64, String)],
) {
    let mut spans = archived.to_vec();
    spans.sort();
    let (_, boundary) = spans
        .windows(2)
        .find(|w| (w[1].0 - w[0].1).abs() <= 3_000)
        .map(|w| (w[0].clone(), w[0].1))
        .expect("two archived objects back to back");
    let instant = boundary - 4_000;
    let (x, y) = x_of(browser, instant).await;
    pointer(browser, "click", x, y).await;
    let mut state = serde_json::Value::Null;
    for _ in 0..150 {
        state = player_state(browser).await;
        assert!(state[1].is_null(), "the video fails: {state}");
        if state[0].as_f64().unwrap_or(0.0) > 6.5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let played = state[0].as_f64().unwrap_or(0.0);
    assert!(played > 6.5, "plays past the object's end, 4 s in: {state}");
    let asked: i64 = state[3]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the instant asked");
    assert!(
        state[4].as_f64().is_some_and(|t| t < 0.1),
        "played from time 0: {state}"
    );
    // The clip the player loaded is cut on the frame showing at the instant: the same
    // URL, asked again, says where its first shown frame is.
    let src = state[2].as_str().expect("a source").to_string();
    let path = src
        .split_once(&format!("127.0.0.1:{port}"))
        .map(|(_, p)| p.to_string())
        .expect("this server's URL");
    let answer = crate::support::serve::get(
        port,
        &path,
        &[("Authorization", &format!("Bearer {PAGE_TOKEN}"))],
    )
    .await;
    assert_eq!(answer.status, 200);
    let shown = answer
        .header("x-clip-shown-from")
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .expect("where the clip starts");
    assert!(
        shown <= asked && asked - shown < 100,
        "the first frame shown ({shown}) is the one at the instant asked ({asked}), within one 100 ms frame"
    );
    assert!(
        (asked - instant).abs() < 3_000,
        "the page asks for the clicked instant: {asked} against {instant}"
    );
    let src_after = player_state(browser).await[2].clone();
    assert_eq!(src_after, state[2], "one clip, no new click or reload");
    let png = browser.screenshot().await.expect("screenshot");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    std::fs::write(dir.join("timeline.png"), png).expect("screenshot written");
}

/// A click 3 s before the gap plays on past it (the media after it follows at once)
/// without another click or an error.
async fn playback_goes_on_across_the_gap(browser: &fantoccini::Client, gap_from: i64) {
    let (x, y) = x_of(browser, gap_from - 3_000).await;
    pointer(browser, "click", x, y).await;
    let mut state = serde_json::Value::Null;
    let mut src = serde_json::Value::Null;
    for _ in 0..150 {
        state = player_state(browser).await;
        assert!(state[1].is_null(), "the video fails: {state}");
        if src.is_null() && state[0].as_f64().unwrap_or(0.0) > 0.5 {
            src = state[2].clone();
        }
        if state[0].as_f64().unwrap_or(0.0) > 5.5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        state[0].as_f64().unwrap_or(0.0) > 5.5,
        "plays 2.5 s past the gap: {state}"
    );
    assert_eq!(state[2], src, "one clip across the gap");
}

/// Hovering over archived media shows its keyframe: the preview's video decodes.
async fn hovering_shows_a_decoded_preview(browser: &fantoccini::Client, at: i64) {
    let (x, y) = x_of(browser, at).await;
    pointer(browser, "mousemove", x, y).await;
    let mut state = serde_json::Value::Null;
    for _ in 0..100 {
        state = browser
            .execute(
                "var v = document.getElementById('preview'); return [v.videoWidth, v.error ? String(v.error.code) : null, document.getElementById('hover').hidden];",
                vec![],
            )
            .await
            .expect("script runs");
        if state[0].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state[0], 320, "the preview decodes: {state}");
    assert_eq!(state[2], false, "the preview shows: {state}");
}

/// Dragging across the timeline selects a range; its link downloads one MP4 holding
/// exactly the range's fragments.
async fn a_selection_downloads_its_fragments(
    browser: &fantoccini::Client,
    world: &World,
    downloads: &std::path::Path,
    from: i64,
    to: i64,
) {
    use fantoccini::Locator;
    let (x0, y) = x_of(browser, from).await;
    let (x1, _) = x_of(browser, to).await;
    pointer(browser, "mousedown", x0, y).await;
    pointer(browser, "mousemove", (x0 + x1) / 2.0, y).await;
    pointer(browser, "mousemove", x1, y).await;
    pointer(browser, "mouseup", x1, y).await;
    let link = browser
        .find(Locator::Id("download"))
        .await
        .expect("the download link");
    let start: i64 = link
        .attr("data-start")
        .await
        .expect("attr")
        .and_then(|s| s.parse().ok())
        .expect("the selection's start");
    let end: i64 = link
        .attr("data-end")
        .await
        .expect("attr")
        .and_then(|s| s.parse().ok())
        .expect("the selection's end");
    link.click().await.expect("clicked");
    let mut file = None;
    for _ in 0..150 {
        file = std::fs::read_dir(downloads)
            .expect("downloads")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "mp4"));
        if file.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let file = file.expect("a downloaded MP4");
    let bytes = std::fs::read(&file).expect("the download");
    let expected: Vec<String> = world
        .emu
        .fragments("dock-cam")
        .iter()
        .filter(|f| f.server_ms < end && f.server_ms + i64::from(f.duration_ms) > start)
        .map(|f| f.number.clone())
        .collect();
    assert!(expected.len() >= 10, "{start}..{end}");
    assert_eq!(
        scan_markers(&bytes),
        expected,
        "exactly the selection's fragments"
    );
}

/// Zooming in narrows the window the SVG draws.
async fn zoom_in_narrows_the_window(browser: &fantoccini::Client) {
    use fantoccini::Locator;
    let before: i64 = browser
        .find(Locator::Id("timeline"))
        .await
        .expect("svg")
        .attr("data-to")
        .await
        .expect("attr")
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    browser
        .find(Locator::Id("zoom-in"))
        .await
        .expect("zoom link")
        .click()
        .await
        .expect("clicked");
    let svg = browser.find(Locator::Id("timeline")).await.expect("svg");
    let (from, to): (i64, i64) = (
        svg.attr("data-from")
            .await
            .expect("a")
            .unwrap_or_default()
            .parse()
            .unwrap_or(0),
        svg.attr("data-to")
            .await
            .expect("a")
            .unwrap_or_default()
            .parse()
            .unwrap_or(0),
    );
    assert!(to - from > 0 && to != before, "zoomed: {from}..{to}");
}

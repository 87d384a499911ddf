//! Footage by time over HTTP: `serve`'s playback API (clip, HLS, preview, spans, signed
//! links) from an archive in s3s-fs, checked with real clients (ffmpeg, ffprobe, curl),
//! and `export`'s incident bundles checked with `sha256sum -c`.

use crate::footage::{dock_cam_with_a_gap, probe_frames, the_gap};
use crate::support::checks::require_ffmpeg;
use crate::support::process::text;
use crate::support::serve::{Served, TOKEN};
use crate::support::world::{historical, recent, rfc3339, World};
use kvs_emulator::{scan_markers, FragmentInfo};

/// 100 ms frames: the emulator's.
const FRAME_MS: i64 = 100;

/// An archive of dock-cam (2 s fragments, a 7-minute gap) and `others` (2 s fragments,
/// no gap) over the last 45 minutes, in 10-minute objects in s3s-fs.
async fn archived(others: &[&str]) -> (World, i64, i64) {
    let (start, end) = recent(0.75);
    let mut specs = vec![dock_cam_with_a_gap(start, end)];
    for name in others {
        specs.push(historical(name, start, end, 2000, 20_000));
    }
    let world = World::new(specs, "clip_duration = \"10m\"").await;
    for name in ["dock-cam"].iter().chain(others) {
        let out = world.backfill(name, start, end).await;
        assert!(out.status.success(), "{}", text(&out));
    }
    (world, start, end)
}

/// From 0.7 s into a fragment ten minutes before the gap to 1.3 s into one five minutes
/// after it: off keyframes, across at least three objects and the gap.
fn across_the_gap(fragments: &[FragmentInfo]) -> (i64, i64) {
    let gap = the_gap(fragments);
    let first = fragments
        .iter()
        .find(|f| f.server_ms >= gap[0].server_ms - 600_000)
        .expect("a first fragment");
    let last = fragments
        .iter()
        .find(|f| f.server_ms >= gap[1].server_ms + 300_000)
        .expect("a last fragment");
    (first.server_ms + 700, last.server_ms + 1_300)
}

/// The fragments reaching into `[from, to)`.
fn reaching_into(fragments: &[FragmentInfo], from: i64, to: i64) -> Vec<&FragmentInfo> {
    fragments
        .iter()
        .filter(|f| f.server_ms < to && f.server_ms + i64::from(f.duration_ms) > from)
        .collect()
}

fn numbers(fragments: &[&FragmentInfo]) -> Vec<String> {
    fragments.iter().map(|f| f.number.clone()).collect()
}

fn query(from: i64, to: i64) -> String {
    format!("start={}&end={}", rfc3339(from), rfc3339(to))
}

/// ffmpeg, a real HLS client, reads the playlist from `serve` (backed by s3s-fs) for a
/// range across three objects and a gap, through the signed URL `share` gives (no
/// header): it gets exactly the range's fragments and every frame of them, and the
/// playlist marks the gap and dates every segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_plays_the_hls_of_a_range_across_objects_and_a_gap() {
    require_ffmpeg();
    let (world, _, _) = archived(&[]).await;
    let fragments = world.emu.fragments("dock-cam");
    let (from, to) = across_the_gap(&fragments);
    let served = Served::start(&world).await;
    let shared = served
        .get(&format!(
            "/api/v1/streams/dock-cam/share?{}",
            query(from, to)
        ))
        .await;
    assert_eq!(shared.status, 200, "{}", shared.text());
    let playlist_url = shared.json()["playlist"]
        .as_str()
        .expect("a playlist URL")
        .to_string();
    let path = playlist_url
        .split_once(&format!("127.0.0.1:{}", served.port))
        .map(|(_, p)| p.to_string())
        .expect("a URL of this server");
    let playlist = served.get_signed(&path).await;
    assert_eq!(playlist.status, 200, "{}", playlist.text());
    let text_of = playlist.text();
    let expected = reaching_into(&fragments, from, to);
    let segments = text_of
        .lines()
        .filter(|l| l.starts_with("hls/") && l.contains(".m4s"))
        .count();
    assert_eq!(segments, expected.len(), "{text_of}");
    assert_eq!(
        text_of.matches("#EXT-X-PROGRAM-DATE-TIME:").count(),
        segments,
        "every segment is dated"
    );
    assert!(text_of.contains("#EXT-X-INDEPENDENT-SEGMENTS"), "{text_of}");
    assert!(text_of.contains("#EXT-X-TARGETDURATION:2\n"), "{text_of}");
    assert!(text_of.trim_end().ends_with("#EXT-X-ENDLIST"), "{text_of}");
    assert!(
        text_of.matches("#EXT-X-MAP:").count() >= 3,
        "the range crosses three objects or more: {text_of}"
    );
    // The gap: one discontinuity, before the first segment after it, dated then.
    let gap = the_gap(&fragments);
    assert_eq!(
        text_of.matches("#EXT-X-DISCONTINUITY").count(),
        1,
        "{text_of}"
    );
    let after = text_of
        .split("#EXT-X-DISCONTINUITY\n")
        .nth(1)
        .expect("after the gap");
    assert!(
        after.contains(&format!(
            "#EXT-X-PROGRAM-DATE-TIME:{}\n",
            rfc3339(gap[1].server_ms)
        )) && after.find("#EXTINF") > after.find(&rfc3339(gap[1].server_ms)),
        "{after}"
    );
    let output = world.work.path().join("hls.mp4");
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i", &playlist_url, "-c", "copy", "-y"])
        .arg(&output)
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg reads the playlist: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&output).expect("ffmpeg's output");
    assert_eq!(
        scan_markers(&bytes),
        numbers(&expected),
        "exactly the range's fragments"
    );
    let (_, frames) = probe_frames(&output).expect("ffprobe reads it");
    let expected_frames: i64 = expected
        .iter()
        .map(|f| i64::from(f.duration_ms) / FRAME_MS)
        .sum();
    assert_eq!(frames as i64, expected_frames);
    // Segments are asked for by their signed URLs only: nothing was refused.
    let log = std::fs::read_to_string(&served.log).unwrap_or_default();
    assert!(!log.contains(TOKEN), "the token is never logged");
}

/// A clip of a range that starts and ends between keyframes: ffprobe gives it a
/// duration within one frame of the range and decodes exactly the frames of the range;
/// byte ranges (curl -r) are the same bytes as the whole body; Content-Length is the
/// body's length; the wall-clock subtitle track says when its first second was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clip_is_frame_exact_and_answers_byte_ranges() {
    require_ffmpeg();
    let (world, _, _) = archived(&[]).await;
    let fragments = world.emu.fragments("dock-cam");
    let gap = the_gap(&fragments);
    // 25 minutes before the gap's end .. 12 minutes before it: two objects, no gap.
    let first = fragments
        .iter()
        .find(|f| f.server_ms >= gap[0].server_ms - 900_000)
        .expect("a fragment");
    let (from, to) = (first.server_ms + 700, first.server_ms + 700 + 780_300);
    let served = Served::start(&world).await;
    let clip_path = format!("/api/v1/streams/dock-cam/clip.mp4?{}", query(from, to));
    let whole = served.get(&clip_path).await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(
        whole
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok()),
        Some(whole.body.len()),
        "Content-Length is the body's length"
    );
    let file = world.work.path().join("clip.mp4");
    std::fs::write(&file, &whole.body).expect("written");
    let (seconds, frames) = probe_frames(&file).expect("ffprobe reads the clip");
    let asked = (to - from) as f64 / 1000.0;
    assert!(
        (seconds - asked).abs() <= FRAME_MS as f64 / 1000.0,
        "{seconds} s for a range of {asked} s"
    );
    // Frames start every 100 ms from each fragment's start: those in [from, to).
    let shown: i64 = reaching_into(&fragments, from, to)
        .iter()
        .map(|f| {
            (0..i64::from(f.duration_ms) / FRAME_MS)
                .filter(|k| {
                    let t = f.server_ms + k * FRAME_MS;
                    t >= from && t < to
                })
                .count() as i64
        })
        .sum();
    assert_eq!(frames as i64, shown, "the range's frames, decoded");
    assert_eq!(
        scan_markers(&whole.body),
        numbers(&reaching_into(&fragments, from, to))
    );
    // Byte ranges, as a browser seeking asks: curl -r.
    let len = whole.body.len();
    for (a, b) in [
        (0, 99),
        (4_000, 300_000),
        (len - 5_000, len - 1),
        (len / 2, len / 2 + 1),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-f", "-r", &format!("{a}-{b}"), "-H"])
            .arg(format!("Authorization: Bearer {TOKEN}"))
            .arg(served.url(&clip_path))
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, whole.body[a..=b], "bytes {a}-{b}");
    }
    // The wall-clock subtitle track: its first cue is the first shown second.
    let with_text = served.get(&format!("{clip_path}&ts=1")).await;
    assert_eq!(with_text.status, 200);
    let file = world.work.path().join("clip-ts.mp4");
    std::fs::write(&file, &with_text.body).expect("written");
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&file)
        .args(["-map", "0:s:0", "-f", "srt", "-"])
        .output()
        .expect("ffmpeg runs");
    let srt = String::from_utf8_lossy(&out.stdout);
    let second = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("a time")
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string()
    };
    // The first cue starts the clip and says the first shown second; the tenth, ten
    // seconds later.
    let cues: Vec<&str> = srt.split("\n\n").filter(|c| c.contains(" --> ")).collect();
    assert!(
        cues[0].contains("00:00:00,000 --> 00:00:01,000") && cues[0].contains(&second(from)),
        "{srt}"
    );
    assert!(cues[10].contains(&second(from + 10_000)), "{}", cues[10]);
    assert!(srt.lines().filter(|l| l.contains(" --> ")).count() as f64 >= asked.floor());
}

/// Signed links open one stream's range until they expire: an expired one, one signed
/// for another stream, and one whose range was changed are refused with 403; the
/// token and the signatures appear in no log line at any level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_links_open_one_range_of_one_stream_until_they_expire() {
    let (world, start, end) = archived(&["yard-cam"]).await;
    let served = Served::start(&world).await;
    let (from, to) = (start + 600_000, start + 660_000);
    let share = |ttl: &'static str| {
        let served = &served;
        async move {
            let shared = served
                .get(&format!(
                    "/api/v1/streams/dock-cam/share?{}&ttl={ttl}",
                    query(from, to)
                ))
                .await;
            assert_eq!(shared.status, 200, "{}", shared.text());
            let url = shared.json()["playlist"].as_str().expect("url").to_string();
            url.split_once(&format!("127.0.0.1:{}", served.port))
                .map(|(_, p)| p.to_string())
                .expect("a path")
        }
    };
    let playlist = share("1h").await;
    let sig = playlist
        .split("sig=")
        .nth(1)
        .expect("a signature")
        .to_string();
    let opened = served.get_signed(&playlist).await;
    assert_eq!(opened.status, 200, "{}", opened.text());
    let segment = opened
        .text()
        .lines()
        .find(|l| l.starts_with("hls/") && l.contains(".m4s"))
        .expect("a segment")
        .to_string();
    let got = served
        .get_signed(&format!("/api/v1/streams/dock-cam/{segment}"))
        .await;
    assert_eq!(got.status, 200, "a segment opens with the playlist's grant");
    // Another stream, the same grant.
    let other = served
        .get_signed(&playlist.replace("/dock-cam/", "/yard-cam/"))
        .await;
    assert_eq!(other.status, 403, "{}", other.text());
    // Another range, the same signature.
    let widened = playlist.replacen(
        &format!("start={}", urlencode(&rfc3339(from))),
        &format!("start={}", urlencode(&rfc3339(from - 60_000))),
        1,
    );
    assert_ne!(widened, playlist);
    assert_eq!(served.get_signed(&widened).await.status, 403);
    // Without any credential, nothing.
    let bare = playlist.split('?').next().expect("path").to_string();
    assert_eq!(
        served
            .get_signed(&format!("{bare}?{}", query(from, to)))
            .await
            .status,
        401
    );
    let grant_query = playlist.split_once('?').expect("query").1.to_string();
    a_valid_grant_opens_nothing_outside_its_range(&served, &grant_query, (from, to), end).await;
    // Expired.
    let short = share("1s").await;
    tokio::time::sleep(std::time::Duration::from_millis(2_200)).await;
    let expired = served.get_signed(&short).await;
    assert_eq!(expired.status, 403, "{}", expired.text());
    assert!(expired.text().contains("expired"), "{}", expired.text());
    let log = std::fs::read_to_string(&served.log).expect("the log");
    assert!(log.lines().count() > 5, "trace logging is on: {log}");
    for secret in [TOKEN, sig.split('&').next().unwrap_or(&sig)] {
        assert!(!log.contains(secret), "{secret} is logged:\n{log}");
    }
}

/// A real segment outside the grant's range, with that valid grant: refused; the same
/// segment with the token: served. A preview inside the range opens; one outside not.
async fn a_valid_grant_opens_nothing_outside_its_range(
    served: &Served,
    grant_query: &str,
    (from, to): (i64, i64),
    end: i64,
) {
    let later = served
        .get(&format!(
            "/api/v1/streams/dock-cam/index.m3u8?{}",
            query(end - 120_000, end - 60_000)
        ))
        .await
        .text();
    let outside = later
        .lines()
        .find(|l| l.starts_with("hls/") && l.contains(".m4s"))
        .and_then(|l| l.split_once('&'))
        .map(|(segment, _)| format!("/api/v1/streams/dock-cam/{segment}"))
        .expect("a segment of a later range");
    assert_eq!(served.get(&outside).await.status, 200, "{outside}");
    let refused = served.get_signed(&format!("{outside}&{grant_query}")).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("another stream or range"),
        "{}",
        refused.text()
    );
    // A preview inside the range opens; one outside it does not.
    let inside = served
        .get_signed(&format!(
            "/api/v1/streams/dock-cam/preview.mp4?at={}&{grant_query}",
            urlencode(&rfc3339(from + 5_000))
        ))
        .await;
    assert_eq!(inside.status, 200, "{}", inside.text());
    let beyond = served
        .get_signed(&format!(
            "/api/v1/streams/dock-cam/preview.mp4?at={}&{grant_query}",
            urlencode(&rfc3339(to + 5_000))
        ))
        .await;
    assert_eq!(beyond.status, 403, "{}", beyond.text());
}

fn urlencode(text: &str) -> String {
    text.replace(':', "%3A").replace('+', "%2B")
}

/// The streams, their spans with the gap and its reason, and a preview frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spans_and_previews_say_what_is_archived() {
    require_ffmpeg();
    let (world, start, end) = archived(&[]).await;
    let served = Served::start(&world).await;
    let streams = served.get("/api/v1/streams").await.json();
    assert_eq!(streams["streams"][0]["stream"], "dock-cam", "{streams}");
    assert_eq!(
        streams["streams"][0]["archived_from"],
        rfc3339(
            world
                .emu
                .fragments("dock-cam")
                .iter()
                .find(|f| f.server_ms >= start)
                .expect("a fragment")
                .server_ms
        ),
        "{streams}"
    );
    let spans = served
        .get(&format!(
            "/api/v1/streams/dock-cam/spans?{}",
            query(start, end)
        ))
        .await
        .json();
    let gap = the_gap(&world.emu.fragments("dock-cam"));
    let gaps = spans["gaps"].as_array().expect("gaps");
    let inner: Vec<_> = gaps
        .iter()
        .filter(|g| g["start_ms"].as_i64() > Some(start + 1_000))
        .filter(|g| g["end_ms"].as_i64() < Some(end - 1_000))
        .collect();
    assert_eq!(inner.len(), 1, "{spans}");
    assert_eq!(inner[0]["start_ms"], gap[0].server_ms + 2_000, "{spans}");
    assert_eq!(inner[0]["end_ms"], gap[1].server_ms, "{spans}");
    assert_eq!(inner[0]["why"], "KVS had no media then", "{spans}");
    assert_eq!(spans["spans"].as_array().map(Vec::len), Some(2), "{spans}");
    let at = gap[1].server_ms + 5_550;
    let preview = served
        .get(&format!(
            "/api/v1/streams/dock-cam/preview.mp4?at={}",
            rfc3339(at)
        ))
        .await;
    assert_eq!(preview.status, 200, "{}", preview.text());
    // 2 s fragments, each from a keyframe: the one starting at 4 s holds 5.55 s.
    assert_eq!(
        preview.header("x-frame-time"),
        Some(rfc3339(gap[1].server_ms + 4_000).as_str())
    );
    let file = world.work.path().join("preview.mp4");
    std::fs::write(&file, &preview.body).expect("written");
    let (_, frames) = probe_frames(&file).expect("ffprobe decodes the preview");
    assert_eq!(frames, 1);
    let none = served
        .get(&format!(
            "/api/v1/streams/dock-cam/preview.mp4?at={}",
            rfc3339(gap[0].server_ms + 60_000)
        ))
        .await;
    assert_eq!(none.status, 404, "no preview inside the gap");
}

/// `export` of three streams over one range: a folder whose SHA256SUMS `sha256sum -c`
/// checks, one MP4 per stream with exactly the range's fragments, and a manifest with
/// each stream's fragments and gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_bundle_of_three_streams_checks_out() {
    let (world, _, _) = archived(&["yard-cam", "gate-cam"]).await;
    let fragments = world.emu.fragments("dock-cam");
    let (from, to) = across_the_gap(&fragments);
    let folder = world.work.path().join("incident-42");
    let (a, b, o) = (rfc3339(from), rfc3339(to), folder.display().to_string());
    let out = world
        .run(&[
            "export", "--stream", "dock-cam", "--stream", "yard-cam", "--stream", "gate-cam",
            "--start", &a, "--end", &b, "-o", &o, "--json",
        ])
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&folder)
        .output()
        .expect("sha256sum runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&check.stdout)
            .matches(": OK")
            .count(),
        4
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).expect("manifest"))
            .expect("JSON");
    for (i, stream) in ["dock-cam", "yard-cam", "gate-cam"].iter().enumerate() {
        let bytes = std::fs::read(folder.join(format!("{stream}.mp4"))).expect("an MP4");
        let expected = numbers(&reaching_into(&world.emu.fragments(stream), from, to));
        assert_eq!(scan_markers(&bytes), expected, "{stream}");
        let entry = &manifest["streams"][i];
        assert_eq!(entry["stream"], *stream);
        assert_eq!(
            entry["clip"]["fragments"],
            serde_json::json!(expected),
            "{stream}"
        );
        let gaps = entry["clip"]["gaps"].as_array().map_or(0, Vec::len);
        assert_eq!(gaps, usize::from(*stream == "dock-cam"), "{entry}");
    }
    assert_eq!(manifest["start"], a);
    // Tampering shows.
    std::fs::write(folder.join("yard-cam.mp4"), b"not the footage").expect("tampered");
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&folder)
        .output()
        .expect("sha256sum runs");
    assert!(!check.status.success());
}

//! What a test asserts over an archive: every fragment exactly once, every object
//! playable, no live upload aborted.

use kvs_emulator::scan_markers;
use std::collections::{BTreeMap, HashMap};

/// Every expected fragment appears in exactly one stored object, and nothing else does.
pub fn assert_exactly_once(objects: &BTreeMap<String, Vec<u8>>, expected: &[String]) {
    let mut seen: HashMap<String, Vec<&str>> = HashMap::new();
    for (key, bytes) in objects {
        for number in scan_markers(bytes) {
            seen.entry(number).or_default().push(key);
        }
    }
    let doubled: Vec<_> = seen
        .iter()
        .filter(|(_, keys)| keys.len() > 1)
        .take(5)
        .collect();
    assert!(doubled.is_empty(), "fragments stored twice: {doubled:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|n| !seen.contains_key(*n))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} fragments missing, e.g. {missing:?}",
        expected.iter().filter(|n| !seen.contains_key(*n)).count(),
        expected.len()
    );
    assert_eq!(
        seen.len(),
        expected.len(),
        "no fragment outside the range is stored"
    );
}

/// Fails the test, naming the command that installs it, without ffmpeg: every playback
/// check needs it, as the README says.
pub fn require_ffmpeg() {
    let found = std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok();
    assert!(
        found,
        "needs ffmpeg, installed by: apt-get install -y ffmpeg"
    );
}

/// Every object decodes without a single error.
pub fn assert_playable(objects: &BTreeMap<String, Vec<u8>>) {
    require_ffmpeg();
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, bytes) in objects {
        let extension = key.rsplit('.').next().unwrap_or("mp4");
        let path = dir.path().join(format!("clip.{extension}"));
        std::fs::write(&path, bytes).expect("written");
        let out = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-xerror", "-i"])
            .arg(&path)
            .args(["-f", "null", "-"])
            .output()
            .expect("ffmpeg runs");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{key} does not play cleanly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn upload_id_of(line: &str) -> Option<&str> {
    line.split(['?', '&'])
        .find_map(|p| p.strip_prefix("uploadId="))
}

/// AbortMultipartUpload requests for an upload that was written to again afterwards (a
/// part or a completion; the ListParts that confirms an abort is not a use): an abort that
/// hit an upload a live process owned.
pub fn aborts_of_live_uploads(log: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in log.iter().enumerate() {
        let Some(id) = line
            .starts_with("DELETE ")
            .then(|| upload_id_of(line))
            .flatten()
        else {
            continue;
        };
        if log[i + 1..].iter().any(|later| {
            (later.starts_with("PUT ") || later.starts_with("POST "))
                && upload_id_of(later) == Some(id)
        }) {
            found.push(line.clone());
        }
    }
    found
}

/// AbortMultipartUpload requests sent while a part of that upload was still being
/// stored (a `PUT …uploadId=X` without its `DONE PUT …` line before the `DELETE`): such a
/// part can outlive the abort on AWS. Needs the server's `part_delay_ms` fault.
pub fn aborts_during_a_part(log: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in log.iter().enumerate() {
        let Some(id) = line
            .starts_with("DELETE ")
            .then(|| upload_id_of(line))
            .flatten()
        else {
            continue;
        };
        let before = &log[..i];
        for part in before
            .iter()
            .filter(|l| l.starts_with("PUT ") && upload_id_of(l) == Some(id))
        {
            if !before.contains(&format!("DONE {part}")) {
                found.push(format!("{line} while {part} was being stored"));
            }
        }
    }
    found
}

/// Every file under `dir` (metadata side files and partial files apart), with its bytes.
pub fn files_under(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path
                .extension()
                .is_some_and(|e| e == "mp4" || e == "mkv" || e == "partial")
            {
                let key = path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                out.insert(key, std::fs::read(&path).expect("readable"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

//! When a file is complete: the pure rules, with time passed in. A file needs its completion
//! marker (if the source has one), then must have settled (mtime old enough, or unchanged for
//! `settle` of this machine's clock; a marker alone suffices with `complete_when = "marker"`),
//! and a FHIR Bulk Data manifest goes only once every file it lists is delivered (the gate in
//! `mod.rs` asks the journal).
//!
//! Must not break: nothing is offered before it is complete by these rules, and a manifest is
//! never offered as an ordinary file.

use std::time::{Duration, Instant, SystemTime};

use crate::config::Completion;
use crate::version::Version;

/// What a scan does next with one regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The completion marker it needs is missing: remember it, wait for the marker.
    AwaitMarker,
    /// Still changing: look again when it is due.
    Unsettled,
    /// Complete, and a `manifest.json`: it goes only once the files it lists are delivered.
    CheckManifest,
    /// Complete: offer it to the journal.
    Offer,
}

/// The completion rule for one file: `marked` (its marker is there, or it needs none),
/// `settled` (by `settle`), the source's rule, and its file name.
pub fn next(marked: bool, settled: bool, rule: &Completion, file_name: &str) -> Next {
    if !marked {
        return Next::AwaitMarker;
    }
    // With a marker rule, the marker says the file is complete.
    let complete = settled
        || matches!(
            rule,
            Completion::FileMarker { .. } | Completion::DirMarker(_)
        );
    match (complete, file_name == MANIFEST) {
        (false, _) => Next::Unsettled,
        (true, true) => Next::CheckManifest,
        (true, false) => Next::Offer,
    }
}

/// A file seen but not settled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// The version being tracked.
    pub fp: Version,
    /// When this version was first seen (this machine's monotonic clock).
    pub since: Instant,
}

/// The settle rule. Returns whether the file is complete, and what to remember if it is not.
pub fn settle(
    prev: Option<&Tracked>,
    fp: &Version,
    mtime: SystemTime,
    now: SystemTime,
    now_mono: Instant,
    settle: Duration,
) -> (bool, Tracked) {
    let unchanged = prev.filter(|t| t.fp == *fp);
    let tracked = Tracked {
        fp: fp.clone(),
        since: unchanged.map_or(now_mono, |t| t.since),
    };
    let old_enough = now.duration_since(mtime).is_ok_and(|age| age >= settle);
    let stable_long_enough =
        unchanged.is_some_and(|t| now_mono.saturating_duration_since(t.since) >= settle);
    (old_enough || stable_long_enough, tracked)
}

/// When a tracked file should be looked at again.
pub fn due(
    t: &Tracked,
    mtime: SystemTime,
    now: SystemTime,
    now_mono: Instant,
    settle: Duration,
) -> Instant {
    let by_clock = t.since + settle;
    let by_mtime = match now.duration_since(mtime) {
        Ok(age) => now_mono + settle.saturating_sub(age),
        Err(_) => by_clock,
    };
    by_clock.min(by_mtime) + Duration::from_millis(10)
}

/// A study directory as one version: its total size, its newest mtime, and a digest of every
/// file's path and version (in the walk's order) as the "inode", so that any file changing,
/// appearing or disappearing is a new version. Returns it with the newest mtime.
pub fn study_version<'a>(
    files: impl Iterator<Item = (&'a std::path::Path, &'a Version, SystemTime)>,
) -> (Version, SystemTime) {
    let mut h = crate::hash::Sha256::new();
    let (mut size, mut newest) = (0u64, SystemTime::UNIX_EPOCH);
    for (rel, v, mtime) in files {
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(format!("\0{v:?}\0"));
        size = size.saturating_add(v.size());
        newest = newest.max(mtime);
    }
    let d = h.finalize();
    let digest = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let mtime_ns = newest
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    (
        Version::File {
            size,
            mtime_ns,
            inode: digest,
        },
        newest,
    )
}

/// The file name of a FHIR Bulk Data manifest.
pub const MANIFEST: &str = "manifest.json";

/// What a `manifest.json` is, for ordering.
#[derive(Debug, PartialEq, Eq)]
pub enum Manifest {
    /// Not a FHIR Bulk Data manifest: an ordinary file.
    NotBulkData,
    /// A Bulk Data manifest listing these file names (in its directory).
    Lists(Vec<String>),
    /// A Bulk Data manifest (it has `transactionTime` and `output`) that can never be
    /// published: an output entry without a string URL, or a URL whose last segment is not a
    /// file name (empty, `.`, `..`). Reported and held, never sent as an ordinary file.
    Invalid(String),
}

/// Reads a Bulk Data export manifest (`transactionTime`, `output[]` with `url`): the file names
/// it lists are the last segments of the output URLs.
pub fn parse_manifest(bytes: &[u8]) -> Manifest {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Manifest::NotBulkData;
    };
    let (Some(_), Some(output)) = (
        v.get("transactionTime").and_then(|t| t.as_str()),
        v.get("output").and_then(|o| o.as_array()),
    ) else {
        return Manifest::NotBulkData;
    };
    let mut names = Vec::new();
    for (i, entry) in output.iter().enumerate() {
        let Some(url) = entry.get("url").and_then(|u| u.as_str()) else {
            return Manifest::Invalid(format!(
                "output[{i}].url is not a string ({})",
                entry.get("url").map_or("missing".into(), |u| u.to_string())
            ));
        };
        let path = url.split(['?', '#']).next().unwrap_or(url);
        match path.rsplit('/').next() {
            Some(name) if !name.is_empty() && name != "." && name != ".." => {
                names.push(name.to_string())
            }
            _ => {
                return Manifest::Invalid(format!(
                    "output[{i}].url {url:?} does not end in a file name"
                ))
            }
        }
    }
    Manifest::Lists(names)
}

/// What a Bulk Data manifest says of the file `name` in its directory (its `type` and
/// `count`), if it lists it.
pub fn manifest_expect(bytes: &[u8], name: &str) -> Option<crate::validate::fhir::Expect> {
    if !matches!(parse_manifest(bytes), Manifest::Lists(_)) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("output")?.as_array()?.iter().find_map(|entry| {
        let url = entry.get("url")?.as_str()?;
        let path = url.split(['?', '#']).next().unwrap_or(url);
        (path.rsplit('/').next() == Some(name)).then(|| crate::validate::fhir::Expect {
            resource_type: entry
                .get("type")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            count: entry.get("count").and_then(serde_json::Value::as_u64),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: Version = Version::File {
        size: 1,
        mtime_ns: 1,
        inode: 1,
    };
    const S: Duration = Duration::from_secs(30);

    /// Every combination of marker, settledness, rule and name has its one next step.
    #[test]
    fn the_completion_rule() {
        use Next::*;
        let settle = Completion::Settle;
        let marker = Completion::DirMarker("_SUCCESS".into());
        for rule in [&settle, &marker] {
            for name in ["a.ndjson", MANIFEST] {
                for settled in [false, true] {
                    assert_eq!(next(false, settled, rule, name), AwaitMarker);
                }
            }
        }
        assert_eq!(next(true, false, &settle, "a.ndjson"), Unsettled);
        assert_eq!(next(true, false, &settle, MANIFEST), Unsettled);
        assert_eq!(next(true, true, &settle, "a.ndjson"), Offer);
        assert_eq!(next(true, true, &settle, MANIFEST), CheckManifest);
        // The marker is there: complete whether or not it has settled.
        assert_eq!(next(true, false, &marker, "a.ndjson"), Offer);
        assert_eq!(next(true, false, &marker, MANIFEST), CheckManifest);
    }

    /// A study's version changes when any file changes, appears or goes, and not otherwise.
    #[test]
    fn a_study_is_one_version_of_all_its_files() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let a = (std::path::PathBuf::from("s/a.dcm"), FP, t);
        let b = (
            std::path::PathBuf::from("s/b.dcm"),
            FP,
            t + Duration::from_secs(5),
        );
        let v = |fs: &[&(std::path::PathBuf, Version, SystemTime)]| {
            study_version(fs.iter().map(|(p, v, m)| (p.as_path(), v, *m)))
        };
        let (both, newest) = v(&[&a, &b]);
        assert_eq!(newest, t + Duration::from_secs(5));
        assert_eq!(both, v(&[&a, &b]).0);
        assert_ne!(both, v(&[&a]).0);
        let b2 = (
            b.0.clone(),
            Version::File {
                size: 1,
                mtime_ns: 1,
                inode: 2,
            },
            b.2,
        );
        assert_ne!(both, v(&[&a, &b2]).0);
    }

    /// A file older than `settle` is complete at once.
    #[test]
    fn old_mtime_is_settled_at_first_sight() {
        let now = SystemTime::now();
        let (ready, _) = settle(
            None,
            &FP,
            now - Duration::from_secs(31),
            now,
            Instant::now(),
            S,
        );
        assert!(ready);
    }

    /// A fresh file waits until unchanged for `settle`; a change restarts the clock.
    #[test]
    fn fresh_file_waits_until_stable_for_settle() {
        let now = SystemTime::now();
        let t0 = Instant::now();
        let (ready, t) = settle(None, &FP, now, now, t0, S);
        assert!(!ready);
        let (ready, t) = settle(
            Some(&t),
            &FP,
            now,
            now + Duration::from_secs(10),
            t0 + Duration::from_secs(10),
            S,
        );
        assert!(!ready);
        assert_eq!(t.since, t0);
        // A change restarts the clock.
        let grown = Version::File {
            size: 2,
            mtime_ns: 1,
            inode: 1,
        };
        let (ready, t2) = settle(
            Some(&t),
            &grown,
            now,
            now + Duration::from_secs(29),
            t0 + Duration::from_secs(29),
            S,
        );
        assert!(!ready);
        assert_eq!(t2.since, t0 + Duration::from_secs(29));
        let (ready, _) = settle(
            Some(&t2),
            &grown,
            now,
            now + Duration::from_secs(60),
            t0 + Duration::from_secs(60),
            S,
        );
        assert!(ready);
    }

    /// A file server whose clock runs ahead: this machine's clock decides.
    #[test]
    fn mtime_in_the_future_falls_back_to_local_clock() {
        let now = SystemTime::now();
        let t0 = Instant::now();
        let future = now + Duration::from_secs(3600);
        let (ready, t) = settle(None, &FP, future, now, t0, S);
        assert!(!ready);
        let (ready, _) = settle(Some(&t), &FP, future, now + S, t0 + S, S);
        assert!(ready);
    }

    /// `settle = 0` takes every file at once.
    #[test]
    fn zero_settle_takes_everything() {
        let now = SystemTime::now();
        assert!(settle(None, &FP, now, now, Instant::now(), Duration::ZERO).0);
    }

    /// A Bulk Data manifest lists its output files by name; other JSON is an ordinary file; a
    /// manifest that cannot name its files is invalid.
    #[test]
    fn bulk_data_manifest_lists_output_file_names() {
        let m = br#"{"transactionTime": "2026-11-26T10:00:00Z", "request": "x",
            "requiresAccessToken": true,
            "output": [
              {"type": "Patient", "url": "https://fhir.example/exports/123/Patient.ndjson"},
              {"type": "Observation", "url": "https://fhir.example/x/Observation-1.ndjson?sig=abc"}
            ], "error": []}"#;
        assert_eq!(
            parse_manifest(m),
            Manifest::Lists(vec!["Patient.ndjson".into(), "Observation-1.ndjson".into()])
        );
        // Other JSON called manifest.json is an ordinary file.
        assert_eq!(parse_manifest(br#"{"output": []}"#), Manifest::NotBulkData);
        assert_eq!(parse_manifest(b"not json"), Manifest::NotBulkData);
        // A Bulk Data manifest whose URLs cannot name a file is invalid, not an ordinary file.
        for bad in [
            r#"{"transactionTime": "t", "output": [{"type": "Patient"}]}"#,
            r#"{"transactionTime": "t", "output": [{"url": 42}]}"#,
            r#"{"transactionTime": "t", "output": [{"url": "https://h/x/.."}]}"#,
            r#"{"transactionTime": "t", "output": [{"url": "https://h/x/"}]}"#,
        ] {
            assert!(
                matches!(parse_manifest(bad.as_bytes()), Manifest::Invalid(_)),
                "{bad}"
            );
        }
    }
}

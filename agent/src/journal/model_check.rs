//! The journal, model-checked (as Vector checks its disk buffer): random sequences of what the
//! agent does to the journal (offer, a source changing, hash, begin a multipart upload, record a
//! part, complete, deliver, retry, start over, after_upload, reject) and of crashes (the files
//! as they are on disk, reopened elsewhere; the old connection dropped without a checkpoint),
//! run against the real journal and against a plain in-memory model. After every step:
//! - the journal holds exactly what the model holds: nothing offered is lost, every recorded
//!   part survives a crash, nothing changes that the step did not change;
//! - every row's state moved only along an allowed transition (`ALLOWED`);
//! - a delivered version is not offered again (offering it once more adds no row);
//! - `runnable` returns exactly the rows with work left.
//!
//! The number of cases is bounded (`CASES`, or `PROPTEST_CASES`) to keep CI within budget.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::model::{Custody, Landed, PartRow, State, Version, VersionColumns};
use super::store::{Candidate, Hashed, Journal};

const CASES: u32 = 40;
const SOURCE: &str = "src";
/// Paths in play: few, so that versions of one path meet.
const PATHS: usize = 3;

/// One thing the agent does, or a crash. `pick` chooses among the rows the step applies to.
#[derive(Debug, Clone)]
enum Op {
    /// A source offers a settled file: `version` is its content (a new version is a change).
    Offer {
        path: usize,
        version: u8,
    },
    /// The hash pass; with `stale`, the file changed since it was listed (the fingerprint given
    /// is not the row's) and nothing may be written.
    Hash {
        pick: usize,
        stale: bool,
    },
    BeginMultipart {
        pick: usize,
    },
    RecordPart {
        pick: usize,
        number: u32,
    },
    Complete {
        pick: usize,
    },
    Deliver {
        pick: usize,
        keep: bool,
    },
    Retry {
        pick: usize,
    },
    StartOver {
        pick: usize,
    },
    AfterUpload {
        pick: usize,
    },
    Reject {
        pick: usize,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let pick = any::<usize>();
    prop_oneof![
        3 => (0..PATHS, 0u8..3).prop_map(|(path, version)| Op::Offer { path, version }),
        2 => (pick, prop::bool::weighted(0.2)).prop_map(|(pick, stale)| Op::Hash { pick, stale }),
        2 => pick.prop_map(|pick| Op::BeginMultipart { pick }),
        3 => (pick, 1u32..4).prop_map(|(pick, number)| Op::RecordPart { pick, number }),
        1 => pick.prop_map(|pick| Op::Complete { pick }),
        2 => (pick, any::<bool>()).prop_map(|(pick, keep)| Op::Deliver { pick, keep }),
        1 => pick.prop_map(|pick| Op::Retry { pick }),
        1 => pick.prop_map(|pick| Op::StartOver { pick }),
        1 => pick.prop_map(|pick| Op::AfterUpload { pick }),
        1 => pick.prop_map(|pick| Op::Reject { pick }),
        1 => Just(Op::Crash),
    ]
}

/// The transitions a row may make in one step (besides staying where it is).
const ALLOWED: &[(State, State)] = &[
    (State::Pending, State::Uploading),
    (State::Uploading, State::Completing),
    (State::Uploading, State::Delivered),
    (State::Uploading, State::Done),
    (State::Completing, State::Delivered),
    (State::Completing, State::Done),
    (State::Delivered, State::Done),
    (State::Uploading, State::Pending),
    (State::Completing, State::Pending),
    (State::Pending, State::Rejected),
    (State::Uploading, State::Rejected),
    (State::Completing, State::Rejected),
    (State::Pending, State::Quarantined),
];

/// What the model (and the check) knows of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    id: i64,
    rel_path: PathBuf,
    fingerprint: Version,
    state: State,
    sha256: Option<[u8; 32]>,
    upload_id: Option<String>,
    attempts: u32,
    parts: BTreeMap<u32, PartRow>,
}

/// The versions a path goes through: files, and for the other paths bucket objects (listed
/// with an ETag, or without one).
fn fingerprint(path: usize, version: u8) -> Version {
    let size = 100 + u64::from(version);
    match path % 3 {
        0 => Version::File {
            size,
            mtime_ns: i64::from(version) * 1_000,
            inode: 7,
        },
        1 => Version::object(
            size,
            Some(i64::from(version) + 1),
            Some(&format!("\"e{version}\"")),
        ),
        _ => Version::object(size, Some(i64::from(version) + 1), None),
    }
}

/// A version the source changed to meanwhile (never one that `fingerprint` makes).
fn stale(v: &Version) -> Version {
    match v {
        Version::File {
            size,
            mtime_ns,
            inode,
        } => Version::File {
            size: *size,
            mtime_ns: mtime_ns + 1,
            inode: *inode,
        },
        Version::Object {
            size,
            last_modified,
            ..
        } => Version::object(*size, *last_modified, Some("\"other\"")),
    }
}

fn rel(path: usize) -> PathBuf {
    PathBuf::from(format!("dir/file-{path}.ndjson"))
}

fn sha(fp: &Version) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&fp.size().to_le_bytes());
    h
}

fn part(number: u32) -> PartRow {
    PartRow {
        number,
        size: 5 << 20,
        sha256_b64: Some(format!("sha-{number}")),
        crc64nvme_b64: None,
        etag: format!("etag-{number}"),
    }
}

/// The model: rows in id order (SQLite gives ids in order; rows are never deleted).
#[derive(Debug, Default)]
struct Model {
    rows: Vec<Row>,
}

impl Model {
    fn newest(&self, rel: &Path) -> Option<&Row> {
        self.rows.iter().rev().find(|r| r.rel_path == rel)
    }

    /// Rows in one of `states`; `pick` chooses one.
    fn pick(&self, pick: usize, states: &[State]) -> Option<Row> {
        let among: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| states.contains(&r.state))
            .collect();
        (!among.is_empty()).then(|| among[pick % among.len()].clone())
    }

    fn row_mut(&mut self, id: i64) -> &mut Row {
        self.rows
            .iter_mut()
            .find(|r| r.id == id)
            .expect("known row")
    }

    /// The offer rule, written plainly: a path's first sighting or a new version of a path
    /// with nothing in transfer is a new row; a pending row that changed is updated in place;
    /// the same version is never a second row.
    fn offer(&mut self, rel: PathBuf, fp: Version) {
        match self.newest(&rel).cloned() {
            Some(r) if r.fingerprint == fp => {}
            Some(r) if r.state == State::Pending => {
                let row = self.row_mut(r.id);
                row.fingerprint = fp;
                row.sha256 = None;
            }
            Some(r) if matches!(r.state, State::Uploading | State::Completing) => {}
            _ => {
                let id = self.rows.len() as i64 + 1;
                self.rows.push(Row {
                    id,
                    rel_path: rel,
                    fingerprint: fp,
                    state: State::Pending,
                    sha256: None,
                    upload_id: None,
                    attempts: 0,
                    parts: BTreeMap::new(),
                });
            }
        }
    }
}

/// Every row and part as the journal holds them.
fn dump(j: &Journal) -> Vec<Row> {
    j.with(|c| {
        let mut parts: BTreeMap<i64, BTreeMap<u32, PartRow>> = BTreeMap::new();
        let mut q = c.prepare(
            "SELECT object_id, part_number, size, sha256_b64, etag FROM parts ORDER BY 1, 2",
        )?;
        for p in q.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                PartRow {
                    number: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    sha256_b64: Some(r.get::<_, String>(3)?).filter(|s| !s.is_empty()),
                    crc64nvme_b64: None,
                    etag: r.get(4)?,
                },
            ))
        })? {
            let (id, p) = p?;
            parts.entry(id).or_default().insert(p.number, p);
        }
        let mut q = c.prepare(
            "SELECT id, rel_path, kind, size, mtime_ns, inode, etag, state, sha256, upload_id,
                    attempts
               FROM objects ORDER BY id",
        )?;
        let rows = q.query_map([], |r| {
            let id: i64 = r.get(0)?;
            let sha: Option<Vec<u8>> = r.get(8)?;
            Ok(Row {
                id,
                rel_path: PathBuf::from(
                    String::from_utf8_lossy(&r.get::<_, Vec<u8>>(1)?).into_owned(),
                ),
                fingerprint: VersionColumns::read(r, 2)?,
                state: r.get(7)?,
                sha256: sha.map(|v| v.try_into().expect("32 bytes")),
                upload_id: r.get(9)?,
                attempts: r.get(10)?,
                parts: BTreeMap::new(),
            })
        })?;
        let mut rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        for row in &mut rows {
            row.parts = parts.remove(&row.id).unwrap_or_default();
        }
        Ok(rows)
    })
    .expect("dump")
}

/// A power cut: the files as they are on disk now, opened in another place (the running
/// journal's connection is dropped afterwards, never checkpointed into the copy).
fn crash(j: Journal, dir: &Path, n: usize) -> Journal {
    let from = j.path().to_path_buf();
    let to = dir.join(format!("j{n}.db"));
    for suffix in ["", "-wal"] {
        let f = PathBuf::from(format!("{}{suffix}", from.display()));
        if f.exists() {
            std::fs::copy(&f, format!("{}{suffix}", to.display())).expect("copy");
        }
    }
    let reopened = Journal::open(&to).expect("reopen after a crash");
    drop(j);
    reopened
}

async fn step(j: &Journal, m: &mut Model, op: &Op) {
    match *op {
        Op::Offer { path, version } => {
            let cand = Candidate {
                rel_path: rel(path),
                key: format!("k/{path}"),
                version: fingerprint(path, version),
            };
            j.offer(SOURCE.into(), vec![cand], true).await.unwrap();
            m.offer(rel(path), fingerprint(path, version));
        }
        Op::Hash { pick, stale } => {
            let Some(r) = m.pick(pick, &[State::Pending]) else {
                return;
            };
            let fp = if stale {
                self::stale(&r.fingerprint)
            } else {
                r.fingerprint.clone()
            };
            let hashed = Hashed {
                sha256: sha(&fp),
                parts: Vec::new(),
                ctime_ns: None,
            };
            let wrote = j.set_hashed(r.id, fp.clone(), hashed, None).await.unwrap();
            assert_eq!(wrote, !stale, "set_hashed on {r:?} with {fp:?}");
            if !stale {
                let row = m.row_mut(r.id);
                row.state = State::Uploading;
                row.sha256 = Some(sha(&fp));
                row.upload_id = None;
            }
        }
        Op::BeginMultipart { pick } => {
            let Some(r) = m.pick(pick, &[State::Uploading]) else {
                return;
            };
            if r.upload_id.is_some() {
                return;
            }
            let upload = format!("upload-{}", r.id);
            j.begin_multipart(r.id, upload.clone(), 5 << 20)
                .await
                .unwrap();
            m.row_mut(r.id).upload_id = Some(upload);
        }
        Op::RecordPart { pick, number } => {
            let Some(r) = m.pick(pick, &[State::Uploading]) else {
                return;
            };
            if r.upload_id.is_none() {
                return;
            }
            j.record_part(r.id, part(number)).await.unwrap();
            m.row_mut(r.id).parts.insert(number, part(number));
        }
        Op::Complete { pick } => {
            let Some(r) = m.pick(pick, &[State::Uploading]) else {
                return;
            };
            if r.upload_id.is_none() || r.parts.is_empty() {
                return;
            }
            j.set_state(r.id, State::Completing).await.unwrap();
            m.row_mut(r.id).state = State::Completing;
        }
        Op::Deliver { pick, keep } => {
            let Some(r) = m.pick(pick, &[State::Uploading, State::Completing]) else {
                return;
            };
            let sha = r.sha256.expect("hashed before any byte is sent");
            let landed = Landed {
                etag: Some(format!("\"{}\"", r.id)),
                ..Landed::default()
            };
            let wrote = j
                .delivered(
                    r.id,
                    r.fingerprint.clone(),
                    sha,
                    landed,
                    Custody::default(),
                    keep,
                )
                .await
                .unwrap();
            assert!(wrote, "delivered {r:?}");
            let row = m.row_mut(r.id);
            row.state = if keep { State::Done } else { State::Delivered };
            row.parts.clear();
        }
        Op::Retry { pick } => {
            let Some(r) = m.pick(pick, &State::ACTIVE) else {
                return;
            };
            j.retry_later(r.id, 0, true, "try again".into())
                .await
                .unwrap();
            m.row_mut(r.id).attempts += 1;
        }
        Op::StartOver { pick } => {
            let Some(r) = m.pick(pick, &[State::Uploading, State::Completing]) else {
                return;
            };
            j.reset(r.id, None, "NoSuchUpload".into()).await.unwrap();
            let row = m.row_mut(r.id);
            row.state = State::Pending;
            row.sha256 = None;
            row.upload_id = None;
            row.parts.clear();
        }
        Op::AfterUpload { pick } => {
            let Some(r) = m.pick(pick, &[State::Delivered]) else {
                return;
            };
            // The call the scheduler makes: the row done, its receipt's event appended.
            j.after_upload_done(r.id, "delete", "deleted".into())
                .await
                .unwrap();
            m.row_mut(r.id).state = State::Done;
        }
        Op::Reject { pick } => {
            let Some(r) = m.pick(pick, &State::UNSENT) else {
                return;
            };
            j.finish_with_error(r.id, State::Rejected, "too large".into())
                .await
                .unwrap();
            let row = m.row_mut(r.id);
            row.state = State::Rejected;
            row.parts.clear();
        }
        Op::Crash => unreachable!("handled by the driver"),
    }
}

fn check(before: &[Row], after: &[Row], m: &Model, op: &Op) {
    assert_eq!(
        after,
        m.rows.as_slice(),
        "journal and model differ after {op:?}"
    );
    for row in after {
        if let Some(old) = before.iter().find(|o| o.id == row.id) {
            assert!(
                old.state == row.state || ALLOWED.contains(&(old.state, row.state)),
                "row {} went {} -> {} on {op:?}",
                row.id,
                old.state,
                row.state
            );
        } else {
            assert_eq!(row.state, State::Pending, "a new row starts pending");
        }
    }
    // A version delivered is not offered again: offering the newest delivered version of a
    // path once more adds nothing (a path that changed in between and changed back is a new
    // version, and goes again).
    if let Op::Offer { path, version } = *op {
        let newest = before.iter().rev().find(|r| r.rel_path == rel(path));
        if newest.is_some_and(|r| {
            State::LANDED.contains(&r.state) && r.fingerprint == fingerprint(path, version)
        }) {
            assert_eq!(
                after.len(),
                before.len(),
                "{op:?} offered a delivered version again"
            );
        }
    }
}

/// Every delivered version has exactly one receipt, and nothing else has one.
fn check_receipts(j: &Journal, after: &[Row], op: &Op) {
    let with_receipt: Vec<i64> = j
        .with(|c| {
            let mut q = c.prepare("SELECT object_id FROM receipts ORDER BY object_id")?;
            let ids = q.query_map([], |r| r.get(0))?;
            ids.collect()
        })
        .unwrap();
    let landed: Vec<i64> = after
        .iter()
        .filter(|r| State::LANDED.contains(&r.state))
        .map(|r| r.id)
        .collect();
    assert_eq!(with_receipt, landed, "receipts after {op:?}");
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(&dir.path().join("j0.db")).unwrap();
    let mut m = Model::default();
    let mut before = dump(&j);
    for (n, op) in ops.iter().enumerate() {
        if let Op::Crash = op {
            j = crash(j, dir.path(), n + 1);
        } else {
            step(&j, &mut m, op).await;
        }
        let after = dump(&j);
        check(&before, &after, &m, op);
        check_receipts(&j, &after, op);
        let runnable: Vec<i64> = j
            .runnable(1000, None, false, Vec::new())
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        let active: Vec<i64> = m
            .rows
            .iter()
            .filter(|r| State::ACTIVE.contains(&r.state))
            .map(|r| r.id)
            .collect();
        assert_eq!(runnable, active, "runnable after {op:?}");
        before = after;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(CASES),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random sequences of the agent's journal operations and crashes, checked against the model
    /// after every step.
    #[test]
    fn the_journal_keeps_what_the_model_keeps(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}

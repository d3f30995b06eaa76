//! Journal types and the pure rules for new observations.
//!
//! Must not break: `offer_action` never adds a second row for a version already known, and never
//! touches a row in transfer (the uploader checks the version itself).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where an object is in its life (see the state diagram in `journal/mod.rs`); stored as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Uploading,
    Completing,
    Delivered,
    Done,
    Rejected,
    Vanished,
    /// Another writer's object is at the key (`overwrite = "own"`): left alone, source kept.
    Conflict,
    /// Failed its record check (`validate`): not sent; a new version is checked again.
    Quarantined,
}

impl State {
    /// Every state, in the order of the diagram.
    pub const ALL: [State; 9] = [
        State::Pending,
        State::Uploading,
        State::Completing,
        State::Delivered,
        State::Done,
        State::Rejected,
        State::Vanished,
        State::Conflict,
        State::Quarantined,
    ];

    /// States with work left: the scheduler dispatches these (a `delivered` row still owes its
    /// after_upload action). The partial indexes of schema 2 list exactly these.
    pub const ACTIVE: [State; 4] = [
        State::Pending,
        State::Uploading,
        State::Completing,
        State::Delivered,
    ];
    /// States whose bytes are still to be sent.
    pub const UNSENT: [State; 3] = [State::Pending, State::Uploading, State::Completing];
    /// States whose bytes are in the bucket, verified.
    pub const LANDED: [State; 2] = [State::Delivered, State::Done];
    /// States that hold a path back until the operator acts (shown in `status`).
    pub const HELD: [State; 3] = [State::Rejected, State::Conflict, State::Quarantined];

    /// The state's name in the journal and in `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Uploading => "uploading",
            State::Completing => "completing",
            State::Delivered => "delivered",
            State::Done => "done",
            State::Rejected => "rejected",
            State::Vanished => "vanished",
            State::Conflict => "conflict",
            State::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for State {
    /// The state's name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    /// A state by its name; anything else is an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}"))
    }
}

/// The SQL list of `states` (`'pending', 'uploading'`), for `state IN (...)`.
pub fn states_sql(states: &[State]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl rusqlite::types::ToSql for State {
    /// Stored as its name.
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

/// A state string this build does not know is an error (a journal from another build, or
/// damage), never a guess.
impl rusqlite::types::FromSql for State {
    /// Read from its name.
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        s.parse()
            .map_err(|e: String| rusqlite::types::FromSqlError::Other(e.into()))
    }
}

pub use crate::version::Version;

/// How a version is kept in a row: its kind and the columns of schema 1 and 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionColumns {
    /// `file` or `object`.
    pub kind: &'static str,
    /// The size in bytes.
    pub size: i64,
    /// A file's mtime in ns; an object's LastModified in seconds times 10^9 (0: none).
    pub mtime_ns: i64,
    /// A file's inode (0 for objects).
    pub inode: i64,
    /// The listed ETag (objects only).
    pub etag: Option<String>,
}

impl VersionColumns {
    /// The columns that hold `v`.
    pub fn of(v: &Version) -> VersionColumns {
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        match v {
            Version::File {
                size,
                mtime_ns,
                inode,
            } => VersionColumns {
                kind: "file",
                size: as_i64(*size),
                mtime_ns: *mtime_ns,
                inode: as_i64(*inode),
                etag: None,
            },
            Version::Object {
                etag,
                size,
                last_modified,
            } => VersionColumns {
                kind: "object",
                size: as_i64(*size),
                mtime_ns: last_modified.map_or(0, |s| s.saturating_mul(1_000_000_000)),
                inode: 0,
                etag: etag.clone(),
            },
        }
    }

    /// The version these columns hold; an unknown kind is an error.
    pub fn version(&self) -> Result<Version, String> {
        let size = u64::try_from(self.size).map_err(|_| format!("negative size {}", self.size))?;
        match self.kind {
            "file" => Ok(Version::File {
                size,
                mtime_ns: self.mtime_ns,
                inode: self.inode.cast_unsigned(),
            }),
            "object" => Ok(Version::Object {
                etag: self.etag.clone(),
                size,
                // 0: the listing gave no LastModified (an object of exactly the epoch reads
                // as one without a time, which only means its time is not checked).
                last_modified: (self.mtime_ns != 0).then_some(self.mtime_ns / 1_000_000_000),
            }),
            other => Err(format!("unknown version kind {other:?}")),
        }
    }

    /// Reads the five columns starting at `first` (kind, size, mtime_ns, inode, etag).
    pub fn read(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Version> {
        let kind: String = r.get(first)?;
        let cols = VersionColumns {
            kind: match kind.as_str() {
                "file" => "file",
                "object" => "object",
                _ => "unknown",
            },
            size: r.get(first + 1)?,
            mtime_ns: r.get(first + 2)?,
            inode: r.get(first + 3)?,
            etag: r.get(first + 4)?,
        };
        cols.version().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(first, rusqlite::types::Type::Text, e.into())
        })
    }
}

/// One row of `objects`: one version of one source object and where its delivery stands.
#[derive(Debug, Clone)]
pub struct ObjectRow {
    /// The row id: dispatch order, and the key of its parts.
    pub id: i64,
    /// The source's name (`[[source]] name`).
    pub source: String,
    /// The path relative to the source root (or key below the bucket source's prefix).
    pub rel_path: PathBuf,
    /// The destination key.
    pub key: String,
    /// The source version this row is about.
    pub version: Version,
    /// Where its delivery stands.
    pub state: State,
    /// The whole object's SHA-256, fixed before any byte is sent.
    pub sha256: Option<[u8; 32]>,
    /// The multipart upload, once CreateMultipartUpload answered.
    pub upload_id: Option<String>,
    /// The part size of that upload (parts resume with the same size).
    pub part_size: Option<u64>,
    /// Failed attempts so far (they grow the retry delay).
    pub attempts: u32,
    /// Bucket sources listed without an ETag: the one the transfer pinned itself to.
    pub pinned_etag: Option<String>,
    /// The destination ETag recorded by the newest earlier delivery of this key: a new version
    /// may replace that object only (`If-Match`); None means the key should be free.
    pub prior_etag: Option<String>,
    /// Directory sources: the file's ctime when its hash was fixed (multipart uploads).
    pub ctime_ns: Option<i64>,
    /// The SHA-256 of each part, fixed with the whole-object hash (multipart uploads).
    pub part_hashes: Option<Vec<[u8; 32]>>,
    /// Its source's priority when it was offered (higher goes first).
    pub priority: i64,
    /// `on_invalid = "upload-flagged"`: the check it failed (it is sent tagged).
    pub flag: Option<String>,
    /// The multipart upload is checked by a full-object CRC-64/NVME and was started without a
    /// hash pass: `sha256` and `crc64nvme` are fixed only once every byte was read.
    pub streamed: bool,
    /// The whole object's CRC-64/NVME (streamed uploads, once read).
    pub crc64nvme: Option<u64>,
}

impl ObjectRow {
    /// Bucket sources: the ETag every read is pinned to (as listed, or pinned by the transfer).
    pub fn source_etag(&self) -> Option<&str> {
        self.version.listed_etag().or(self.pinned_etag.as_deref())
    }
}

/// What the destination answered for a delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Landed {
    /// The destination object's ETag (what a new version may replace).
    pub etag: Option<String>,
    /// Its VersionId, where the bucket is versioned.
    pub version: Option<String>,
    /// The checksum the server reported for what it stored (`sha256:<base64>`).
    pub checksum: Option<String>,
    /// Server-side encryption as the server reported it (else as requested).
    pub sse: Option<String>,
    /// The KMS key id, likewise.
    pub kms_key_id: Option<String>,
    /// Whether `sse` and `kms_key_id` come from the server's answer.
    pub sse_confirmed: bool,
    /// Single PUTs of files: the ctime when the bytes were read (a multipart upload's is in
    /// the row, fixed with its hash).
    pub source_ctime_ns: Option<i64>,
}

/// What the journal cannot know of a delivery itself, for its receipt: who delivered it, to
/// which endpoint and bucket, from which source bucket, and what follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Custody {
    /// `[agent] name`.
    pub agent: String,
    /// The destination endpoint's host[:port], or the relay's address.
    pub endpoint: String,
    /// The destination bucket.
    pub bucket: String,
    /// Bucket sources: the source bucket.
    pub source_bucket: Option<String>,
    /// Bucket sources: the source key prefix (the key is prefix + path).
    pub source_prefix: String,
    /// `keep`, `delete` or `move`.
    pub after_upload: &'static str,
    /// When this attempt began (ms since the epoch); a multipart upload's recorded start wins.
    pub started_ms: Option<i64>,
    /// Leave the source path (or source key) out of the receipt: keys are pseudonymised, or
    /// `log_paths = "keys"`. The journal's row keeps it for `ha-edge receipts` on the box.
    pub withhold_path: bool,
}

/// A part the server acknowledged (kept in the `parts` table).
pub use crate::s3::multipart::PartRow;

/// What an offer of a settled file does to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferAction {
    /// Never seen, or a new version of something finished: a new pending row.
    Insert,
    /// A pending row whose file changed before its upload began: refresh its version.
    Refresh,
    /// Already known as it is, or an upload in progress (the uploader checks the version).
    Nothing,
}

/// The rule for a settled file given the newest journal row for the same path. With
/// `reupload_changed` false (`on_change = "ignore"`), a delivered path is never sent again.
pub fn offer_action(
    latest: Option<(State, &Version)>,
    seen: &Version,
    reupload_changed: bool,
) -> OfferAction {
    match latest {
        None => OfferAction::Insert,
        Some((_, v)) if v == seen => OfferAction::Nothing,
        Some((State::Pending, _)) => OfferAction::Refresh,
        Some((State::Uploading | State::Completing, _)) => OfferAction::Nothing,
        Some((State::Delivered | State::Done, _)) if !reupload_changed => OfferAction::Nothing,
        Some((
            State::Delivered
            | State::Done
            | State::Rejected
            | State::Vanished
            | State::Conflict
            | State::Quarantined,
            _,
        )) => OfferAction::Insert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &Version = &Version::File {
        size: 10,
        mtime_ns: 1,
        inode: 7,
    };
    const B: &Version = &Version::File {
        size: 11,
        mtime_ns: 2,
        inode: 7,
    };

    /// The offer rule for every state: the same version is never a second row, a pending row is
    /// refreshed, a row in transfer is left alone, a finished one gets a new version (unless
    /// `on_change = "ignore"`).
    #[test]
    fn offer_rules() {
        assert_eq!(offer_action(None, A, true), OfferAction::Insert);
        for st in State::ALL {
            assert_eq!(
                offer_action(Some((st, A)), A, true),
                OfferAction::Nothing,
                "{st}"
            );
        }
        assert_eq!(
            offer_action(Some((State::Pending, A)), B, true),
            OfferAction::Refresh
        );
        assert_eq!(
            offer_action(Some((State::Uploading, A)), B, true),
            OfferAction::Nothing
        );
        assert_eq!(
            offer_action(Some((State::Done, A)), B, true),
            OfferAction::Insert
        );
        assert_eq!(
            offer_action(Some((State::Rejected, A)), B, true),
            OfferAction::Insert
        );
        // on_change = "ignore": delivered paths stay delivered; a rejected one may be retried.
        assert_eq!(
            offer_action(Some((State::Done, A)), B, false),
            OfferAction::Nothing
        );
        assert_eq!(
            offer_action(Some((State::Rejected, A)), B, false),
            OfferAction::Insert
        );
        // A quarantined file that changes is checked again, whatever on_change says.
        for reupload in [true, false] {
            assert_eq!(
                offer_action(Some((State::Quarantined, A)), B, reupload),
                OfferAction::Insert
            );
        }
    }

    /// A version survives its columns, and an unknown kind is an error.
    #[test]
    fn versions_round_trip_through_their_columns() {
        for v in [
            A.clone(),
            Version::object(5, Some(1_764_000_000), Some("\"e\"")),
            Version::object(5, None, None),
        ] {
            assert_eq!(VersionColumns::of(&v).version().unwrap(), v);
        }
        let mut bad = VersionColumns::of(A);
        bad.kind = "unknown";
        assert!(bad.version().is_err());
    }

    /// Every state's name parses back to it; nothing else parses.
    #[test]
    fn state_names_round_trip() {
        for st in State::ALL {
            assert_eq!(st.as_str().parse::<State>().unwrap(), st);
        }
        assert!("bogus".parse::<State>().is_err());
    }

    /// The dispatch queries are served by the partial indexes of schema 2 only if they list
    /// the same states.
    #[test]
    fn active_states_are_the_indexed_ones() {
        let indexed = format!("WHERE state IN ({})", states_sql(&State::ACTIVE));
        assert_eq!(
            super::super::schema::MIGRATIONS[1]
                .matches(&indexed)
                .count(),
            2
        );
    }

    #[test]
    fn an_unknown_state_in_the_journal_is_an_error() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let got: rusqlite::Result<State> = c.query_row("SELECT 'bogus'", [], |r| r.get(0));
        assert!(got.is_err(), "{got:?}");
        let got: State = c.query_row("SELECT 'conflict'", [], |r| r.get(0)).unwrap();
        assert_eq!(got, State::Conflict);
    }
}

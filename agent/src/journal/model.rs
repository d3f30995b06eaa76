//! Journal types and the pure rules for new observations.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

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
}

impl State {
    pub const ALL: [State; 8] = [
        State::Pending,
        State::Uploading,
        State::Completing,
        State::Delivered,
        State::Done,
        State::Rejected,
        State::Vanished,
        State::Conflict,
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
    pub const HELD: [State; 2] = [State::Rejected, State::Conflict];

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
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
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
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

/// A state string this build does not know is an error (a journal from another build, or
/// damage), never a guess.
impl rusqlite::types::FromSql for State {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        s.parse()
            .map_err(|e: String| rusqlite::types::FromSqlError::Other(e.into()))
    }
}

/// What identifies one version of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

impl Fingerprint {
    pub fn of(meta: &std::fs::Metadata) -> Fingerprint {
        use std::os::unix::fs::MetadataExt;
        Fingerprint {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            inode: meta.ino(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ObjectRow {
    pub id: i64,
    pub source: String,
    pub rel_path: PathBuf,
    pub key: String,
    pub fingerprint: Fingerprint,
    pub state: State,
    pub sha256: Option<[u8; 32]>,
    pub upload_id: Option<String>,
    pub part_size: Option<u64>,
    pub attempts: u32,
    /// Bucket sources: the source object's ETag (as listed, or pinned by the transfer).
    pub etag: Option<String>,
    /// The destination ETag recorded by the newest earlier delivery of this key: a new version
    /// may replace that object only (`If-Match`); None means the key should be free.
    pub prior_etag: Option<String>,
    /// Directory sources: the file's ctime when its hash was fixed (multipart uploads).
    pub ctime_ns: Option<i64>,
    /// The SHA-256 of each part, fixed with the whole-object hash (multipart uploads).
    pub part_hashes: Option<Vec<[u8; 32]>>,
}

/// What the destination answered for a delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Landed {
    pub etag: Option<String>,
    pub version: Option<String>,
}

/// A part the server acknowledged (kept in the `parts` table).
pub use crate::s3::multipart::PartRow;

/// What an offer of a settled file does to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferAction {
    /// Never seen, or a new version of something finished: a new pending row.
    Insert,
    /// A pending row whose file changed before its upload began: refresh its fingerprint.
    Refresh,
    /// Already known as it is, or an upload in progress (the uploader checks the fingerprint).
    Nothing,
}

/// The rule for a settled file given the newest journal row for the same path. With
/// `reupload_changed` false (`on_change = "ignore"`), a delivered path is never sent again.
pub fn offer_action(
    latest: Option<(State, Fingerprint)>,
    seen: Fingerprint,
    reupload_changed: bool,
) -> OfferAction {
    match latest {
        None => OfferAction::Insert,
        Some((_, fp)) if fp == seen => OfferAction::Nothing,
        Some((State::Pending, _)) => OfferAction::Refresh,
        Some((State::Uploading | State::Completing, _)) => OfferAction::Nothing,
        Some((State::Delivered | State::Done, _)) if !reupload_changed => OfferAction::Nothing,
        Some((
            State::Delivered | State::Done | State::Rejected | State::Vanished | State::Conflict,
            _,
        )) => OfferAction::Insert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Fingerprint = Fingerprint {
        size: 10,
        mtime_ns: 1,
        inode: 7,
    };
    const B: Fingerprint = Fingerprint {
        size: 11,
        mtime_ns: 2,
        inode: 7,
    };

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
    }

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

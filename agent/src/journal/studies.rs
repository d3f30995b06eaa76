//! Studies: directories released whole (`complete_when.stable_dir`), and their completion
//! objects.
//!
//! Must not break: a study's files and its row are written in one transaction (a crash never
//! leaves files released without their study, or a study without its files), and a study is
//! marked complete only after its completion object is in the bucket.

use std::path::PathBuf;

use rusqlite::{params, OptionalExtension};

use super::model::State;
use super::queries::offer_in;
use super::store::{path_bytes, Candidate, Journal, JournalError, OfferStats};

/// A released study whose completion object is not written yet.
#[derive(Debug, Clone)]
pub struct OpenStudy {
    pub id: i64,
    pub source: String,
    /// The completion object's key.
    pub key: String,
    /// Its files, relative to the source root.
    pub files: Vec<PathBuf>,
    /// Why it cannot complete yet, once noted.
    pub note: Option<String>,
}

/// Where one file of a study stands.
#[derive(Debug, Clone)]
pub struct StudyFile {
    pub state: State,
    pub key: String,
    pub size: u64,
    pub sha256: Option<[u8; 32]>,
}

impl Journal {
    /// Offers a study's files in one transaction with its row; the row is written only when
    /// something new was released (a study seen again unchanged adds nothing).
    pub async fn offer_study(
        &self,
        source: String,
        batch: Vec<Candidate>,
        reupload_changed: bool,
        dir: PathBuf,
        completion_key: String,
    ) -> Result<OfferStats, JournalError> {
        self.call_at(move |c, now| {
            let stats = offer_in(c, now, &source, &batch, reupload_changed)?;
            if stats.inserted + stats.refreshed > 0 {
                let files: Vec<String> = batch
                    .iter()
                    .map(|b| b.rel_path.to_string_lossy().into_owned())
                    .collect();
                c.execute(
                    "INSERT INTO studies (source, dir, key, files, released_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        source,
                        path_bytes(&dir),
                        completion_key,
                        serde_json::to_string(&files).unwrap_or_default(),
                        now
                    ],
                )?;
            }
            Ok(stats)
        })
        .await
        .inspect(|stats| self.offered(stats))
    }

    /// Released studies without their completion object, oldest first.
    pub async fn open_studies(&self) -> Result<Vec<OpenStudy>, JournalError> {
        self.call(|c| {
            let mut q = c.prepare_cached(
                "SELECT id, source, key, files, note FROM studies
                  WHERE completed_ms IS NULL ORDER BY id LIMIT 100",
            )?;
            let rows = q.query_map([], |r| {
                let files: String = r.get(3)?;
                Ok(OpenStudy {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    key: r.get(2)?,
                    files: serde_json::from_str::<Vec<String>>(&files)
                        .unwrap_or_default()
                        .into_iter()
                        .map(PathBuf::from)
                        .collect(),
                    note: r.get(4)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The newest row of each file of a study (None: never seen).
    pub async fn study_files(
        &self,
        source: String,
        files: Vec<PathBuf>,
    ) -> Result<Vec<Option<StudyFile>>, JournalError> {
        self.call(move |c| {
            let mut q = c.prepare_cached(
                "SELECT state, key, size, sha256 FROM objects
                  WHERE source = ?1 AND rel_path = ?2 ORDER BY id DESC LIMIT 1",
            )?;
            files
                .iter()
                .map(|f| {
                    q.query_row(params![source, path_bytes(f)], |r| {
                        let sha: Option<Vec<u8>> = r.get(3)?;
                        Ok(StudyFile {
                            state: r.get(0)?,
                            key: r.get(1)?,
                            size: r.get::<_, i64>(2)?.max(0).unsigned_abs(),
                            sha256: sha.and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()),
                        })
                    })
                    .optional()
                })
                .collect()
        })
        .await
    }

    /// The completion object is in the bucket.
    pub async fn study_completed(&self, id: i64) -> Result<(), JournalError> {
        self.call_at(move |c, now| {
            c.execute(
                "UPDATE studies SET completed_ms = ?2, note = NULL WHERE id = ?1",
                params![id, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Why a study cannot complete yet (kept, so it is logged once).
    pub async fn study_note(&self, id: i64, note: String) -> Result<(), JournalError> {
        self.call(move |c| {
            c.execute(
                "UPDATE studies SET note = ?2 WHERE id = ?1",
                params![id, note],
            )?;
            Ok(())
        })
        .await
    }

    /// A newer release of the same directory supersedes an open older one.
    pub async fn supersede_studies(&self) -> Result<usize, JournalError> {
        self.call_at(|c, now| {
            c.execute(
                "UPDATE studies SET completed_ms = ?1, note = 'superseded'
                  WHERE completed_ms IS NULL AND EXISTS (
                        SELECT 1 FROM studies n WHERE n.source = studies.source
                           AND n.dir = studies.dir AND n.id > studies.id)",
                [now],
            )
        })
        .await
    }
}

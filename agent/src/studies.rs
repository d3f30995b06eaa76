//! Completion objects of studies (`complete_when.stable_dir`): once every file a study released
//! is delivered and verified, `{dir}/_complete.json` goes to the bucket, listing each file's
//! key, size and SHA-256, so that cloud-side consumers wait for it as they wait for a FHIR
//! manifest.
//!
//! # Design
//! - The source writes a `studies` row in the same transaction as the study's files; this task
//!   looks at open rows (every second in the daemon, once at the end of `--once`) and asks the
//!   journal where each file stands. All landed: PUT the object (its SHA-256 checked by the
//!   server), then mark the row complete. A file that can no longer land (quarantined,
//!   rejected, in conflict, gone) keeps the study open; that is logged once.
//! - The object names keys only, never source paths (a study directory's name is often an
//!   accession or patient number).
//!
//! Must not break: `_complete.json` is written only after the last file is verified, and
//! a study is marked complete only after its object is in the bucket.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::journal::{Journal, JournalError, OpenStudy, State};
use crate::s3::{ObjectMeta, Precondition, S3Client};

/// One file in a completion object.
#[derive(Debug, Serialize)]
struct File {
    key: String,
    size: u64,
    sha256: String,
}

/// The completion object.
#[derive(Debug, Serialize)]
struct Complete<'a> {
    format: u32,
    source: &'a str,
    agent: &'a str,
    /// When the last file was verified and this object written (RFC 3339, ms).
    completed_at: String,
    files: Vec<File>,
}

/// What one look at a study found.
enum Look {
    /// Every file landed: the object's bytes.
    Ready(Vec<u8>),
    /// Files still on their way.
    Waiting,
    /// A file can no longer land as it is (why).
    Stuck(String),
}

async fn look(journal: &Journal, study: &OpenStudy, agent: &str) -> Result<Look, JournalError> {
    let rows = journal
        .study_files(study.source.clone(), study.files.clone())
        .await?;
    let mut files = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(f) = row else {
            return Ok(Look::Stuck(
                "a file of the study is not in the journal".into(),
            ));
        };
        match f.state {
            s if State::LANDED.contains(&s) => files.push(File {
                key: f.key,
                size: f.size,
                sha256: f.sha256.map(hex::encode).unwrap_or_default(),
            }),
            s if State::ACTIVE.contains(&s) => return Ok(Look::Waiting),
            s => {
                return Ok(Look::Stuck(format!(
                    "its file {} is {s} (see status)",
                    f.key
                )))
            }
        }
    }
    let body = Complete {
        format: 1,
        source: &study.source,
        agent,
        completed_at: crate::receipts::record::rfc3339_ms(crate::receipts::record::now_ms()),
        files,
    };
    Ok(Look::Ready(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    ))
}

/// Writes the completion objects of studies whose files are all delivered; returns how many.
pub async fn complete_ready(
    journal: &Journal,
    client: &S3Client,
    agent: &str,
) -> Result<usize, JournalError> {
    // Reads only, while no study is open (the daemon looks every second).
    if journal.open_studies().await?.is_empty() {
        return Ok(0);
    }
    journal.supersede_studies().await?;
    let mut written = 0;
    for study in journal.open_studies().await? {
        match look(journal, &study, agent).await? {
            Look::Waiting => {}
            Look::Stuck(why) => {
                if study.note.as_deref() != Some(why.as_str()) {
                    tracing::error!(completion = %study.key, reason = %why, "study incomplete: its completion object waits");
                    journal.study_note(study.id, why).await?;
                }
            }
            Look::Ready(body) => {
                let sha = crate::hash::Sha256::digest(&body);
                let meta = ObjectMeta {
                    content_type: Some("application/json".into()),
                    ..ObjectMeta::default()
                };
                match client
                    .put_object(&study.key, body.into(), &sha, &Precondition::None, &meta)
                    .await
                {
                    Ok(_) => {
                        journal.study_completed(study.id).await?;
                        tracing::info!(completion = %study.key, files = study.files.len(), "study delivered whole: completion object written");
                        written += 1;
                    }
                    Err(e) => {
                        tracing::warn!(completion = %study.key, error = %e, "completion object not written; trying again");
                    }
                }
            }
        }
    }
    Ok(written)
}

/// The daemon's task: looks every second until `stop`.
pub async fn run(
    journal: Journal,
    client: Arc<S3Client>,
    agent: String,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = complete_ready(&journal, &client, &agent).await {
            tracing::warn!(error = %e, "studies: journal failed; trying again");
        }
    }
}

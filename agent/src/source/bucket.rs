//! Discovery in a bucket (`type = "s3"`, typically the institution's MinIO): ListObjectsV2 with
//! pagination every `poll_interval`, each object offered to the journal with a version of
//! (size, LastModified, ETag). The journal decides what is new: a restart lists again and sends
//! nothing twice; an object whose ETag, size or LastModified changed is a new version.
//!
//! Objects appear whole when their PUT or multipart completion finishes, so there is no settle
//! rule here. Keys are mapped exactly (`keymap::bucket_key`): a key with an empty, `.` or `..`
//! segment or a control character is refused, never normalised onto another key.
//!
//! # Design
//! - One task per bucket source: list the whole prefix every `poll_interval` (or when a MinIO
//!   notification stream says something changed), offering each page as it comes; a listing
//!   that fails is logged once per cause and retried with a growing delay (`RECONNECT`).
//! - `Version::Object` carries the listed ETag, size and LastModified: a restart lists again and
//!   the journal finds nothing new; a new ETag is a new version.
//! - After delivery (`after_upload`), the object is deleted or copied then deleted only if a
//!   HEAD shows the version delivered, and the copy is conditional on that ETag.
//!
//! Must not break: a listing only offers; an object is deleted or moved only by `after_upload`,
//! and only if it is still the version delivered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch, Notify};

use super::fs::SourceReport;
use crate::config::{AfterUpload, OnChange, S3Destination, SourceConfig, SourceKind};
use crate::journal::{Candidate, Journal, JournalError};
use crate::keymap;
use crate::retry::Backoff;
use crate::s3::{S3Client, S3Error};
use crate::version::{rfc3339_secs, Version};

/// Quiet time after a bucket event before listing, to take a burst in one listing.
const HINT_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);
/// A notification stream silent this long is assumed dead and opened again.
const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(300);
/// Delay before opening a lost notification stream again.
const RECONNECT: Backoff = Backoff {
    base: std::time::Duration::from_secs(1),
    cap: std::time::Duration::from_secs(60),
};

/// Whether a line of a ListenBucketNotification stream reports an event (MinIO also sends
/// keep-alive blank lines, and `{"Records":null}`).
pub fn is_event(line: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    v.get("Records")
        .and_then(|r| r.as_array())
        .is_some_and(|r| !r.is_empty())
}

/// Keeps MinIO's ListenBucketNotification stream open, reconnecting with a growing delay when it
/// is lost, and turns each event into a hint to list now. Loss and recovery are logged once
/// each; the listing every poll interval goes on regardless.
async fn listen(
    client: Arc<S3Client>,
    source: String,
    prefix: String,
    hints: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut lost = false;
    loop {
        let why = match client.listen_notifications(&prefix).await {
            Ok(mut resp) => {
                if lost {
                    tracing::info!(source = %source, "bucket notification stream open again");
                    lost = false;
                } else {
                    tracing::info!(source = %source, "listening to bucket notifications");
                }
                failures = 0;
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        _ = stop.changed() => return,
                        c = tokio::time::timeout(STREAM_IDLE, resp.chunk()) => c,
                    };
                    match chunk {
                        Ok(Ok(Some(bytes))) => {
                            buf.extend_from_slice(&bytes);
                            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> = buf.drain(..=nl).collect();
                                if is_event(&line) {
                                    let _ = hints.try_send(());
                                }
                            }
                        }
                        Ok(Ok(None)) => break "the server closed the stream".to_string(),
                        Ok(Err(e)) => break e.to_string(),
                        Err(_) => break "no data or keep-alive for 5 minutes".to_string(),
                    }
                }
            }
            Err(e) => e.for_operator(),
        };
        if !lost {
            tracing::warn!(source = %source, reason = %why, "bucket notification stream lost; reconnecting (listings every poll interval go on)");
            lost = true;
        }
        failures += 1;
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(RECONNECT.nth(failures, fastrand::f64())) => {}
        }
    }
}

/// The settings of a bucket source.
pub fn conn(cfg: &SourceConfig) -> Option<&S3Destination> {
    match &cfg.kind {
        SourceKind::Bucket(c) => Some(c),
        SourceKind::Dir => None,
    }
}

/// One bucket source: its settings, its server, and where it offers.
pub struct BucketSource {
    cfg: SourceConfig,
    client: Arc<S3Client>,
    /// The destination's key prefix.
    dest_prefix: String,
    journal: Journal,
    wake: Arc<Notify>,
    warned: HashSet<String>,
    /// The listing error being reported (logged once until the listing works again).
    failing: Option<String>,
}

impl BucketSource {
    /// A source listing `cfg`'s bucket through `client`, mapping keys under the destination
    /// `prefix`.
    pub fn new(
        cfg: SourceConfig,
        client: Arc<S3Client>,
        dest_prefix: String,
        journal: Journal,
        wake: Arc<Notify>,
    ) -> BucketSource {
        BucketSource {
            cfg,
            client,
            dest_prefix,
            journal,
            wake,
            warned: HashSet::new(),
            failing: None,
        }
    }

    /// The source's key prefix in its bucket.
    fn prefix(&self) -> &str {
        conn(&self.cfg).map_or("", |c| c.prefix.as_str())
    }

    /// Runs until `stop` turns true: a full listing every `poll_interval`, and with
    /// `notifications` one sooner after each burst of bucket events.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<SourceReport, JournalError> {
        tracing::info!(source = %self.cfg.name, bucket = %self.client.bucket(), prefix = %self.prefix(), endpoint = %self.client.endpoint(), poll = %humantime::format_duration(self.cfg.poll_interval), notifications = self.cfg.notifications, "listing the bucket (ListObjectsV2) every poll interval");
        let (hint_tx, mut hints) = mpsc::channel::<()>(1);
        let listener = self.cfg.notifications.then(|| {
            tokio::spawn(listen(
                self.client.clone(),
                self.cfg.name.clone(),
                self.prefix().to_string(),
                hint_tx,
                stop.clone(),
            ))
        });
        let mut total = SourceReport::default();
        loop {
            let r = self.scan_once().await?;
            total.offered += r.offered;
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                Some(()) = hints.recv() => {
                    // Gather the rest of the burst into one listing.
                    tokio::time::sleep(HINT_DEBOUNCE).await;
                    while hints.try_recv().is_ok() {}
                }
            }
        }
        if let Some(l) = listener {
            l.abort();
        }
        Ok(total)
    }

    /// One full listing; returns what it found. A listing that fails is reported once per
    /// cause (log, `status`) and counted in `failed`.
    pub async fn scan_once(&mut self) -> Result<SourceReport, JournalError> {
        let mut report = SourceReport::default();
        match self.list_all(&mut report).await {
            Ok(()) => {
                if let Some(was) = self.failing.take() {
                    tracing::info!(source = %self.cfg.name, previous_error = %was, "bucket listing works again");
                    self.journal
                        .set_agent_state(format!("source.{}", self.cfg.name), "ok".into())
                        .await?;
                }
            }
            Err(ListStop::Journal(e)) => return Err(e),
            Err(ListStop::S3(e)) => {
                report.failed += 1;
                let msg = e.for_operator();
                if self.failing.as_deref() != Some(msg.as_str()) {
                    tracing::error!(source = %self.cfg.name, error = %msg, "cannot list the source bucket; trying again every poll interval");
                    self.journal.note_error(msg.clone()).await?;
                    let since = humantime::format_rfc3339_seconds(SystemTime::now());
                    self.journal
                        .set_agent_state(
                            format!("source.{}", self.cfg.name),
                            format!("listing fails since {since}: {msg}"),
                        )
                        .await?;
                    self.failing = Some(msg);
                }
            }
        }
        Ok(report)
    }

    /// One full listing, page by page, each page offered as it comes.
    async fn list_all(&mut self, report: &mut SourceReport) -> Result<(), ListStop> {
        let prefix = self.prefix().to_string();
        let moved_to = match &self.cfg.after_upload {
            AfterUpload::MoveToPrefix(p) => Some(p.clone()),
            _ => None,
        };
        let mut token: Option<String> = None;
        loop {
            let page = self.client.list_objects(&prefix, token.as_deref()).await?;
            let mut batch = Vec::with_capacity(page.objects.len());
            for o in page.objects {
                // Folder placeholders, and what this source moved away itself.
                if o.key.ends_with('/') || moved_to.as_deref().is_some_and(|m| o.key.starts_with(m))
                {
                    continue;
                }
                let Some(rest) = o.key.strip_prefix(&prefix) else {
                    continue;
                };
                report.seen += 1;
                if !self.cfg.selects(Path::new(rest)) {
                    continue;
                }
                let mapped = match self.cfg.key_template.as_ref() {
                    None => keymap::bucket_key(&self.dest_prefix, rest),
                    Some(t) => keymap::key_of(
                        &self.dest_prefix,
                        Some(t),
                        &crate::phi::KeyInput {
                            source: &self.cfg.name,
                            rel: Path::new(rest),
                            discovered: jiff::Timestamp::now(),
                            sha256: None,
                        },
                    ),
                }
                .and_then(|k| keymap::unreserved(k, self.cfg.reserved_prefix.as_deref()));
                let key = match mapped {
                    Ok(k) => k,
                    Err(why) => {
                        report.refused += 1;
                        if self.warned.insert(o.key.clone()) {
                            tracing::warn!(source = %self.cfg.name, key = %crate::phi::shown(Path::new(&o.key)), reason = %why, "refused: key cannot be carried across");
                            self.journal
                                .note_refused(
                                    self.cfg.name.clone(),
                                    vec![(
                                        PathBuf::from(rest),
                                        format!("key cannot be carried across: {why}"),
                                    )],
                                )
                                .await?;
                        }
                        continue;
                    }
                };
                let secs = o.last_modified.as_deref().and_then(rfc3339_secs);
                batch.push(Candidate {
                    rel_path: PathBuf::from(rest),
                    key,
                    version: Version::object(o.size, secs, o.etag.as_deref()),
                });
            }
            if !batch.is_empty() {
                let reupload = self.cfg.on_change == OnChange::Upload;
                let stats = self
                    .journal
                    .offer(self.cfg.name.clone(), batch, reupload)
                    .await?;
                report.offered += stats.inserted;
                if stats.inserted + stats.refreshed > 0 {
                    tracing::debug!(source = %self.cfg.name, new = stats.inserted, changed = stats.refreshed, "queued objects");
                    self.wake.notify_one();
                }
            }
            match page.next_token {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => break,
            }
        }
        Ok(())
    }
}

/// Why a listing stopped.
#[derive(Debug, thiserror::Error)]
enum ListStop {
    #[error(transparent)]
    S3(#[from] S3Error),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What happened to a bucket object after delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketAfter {
    /// `keep`: nothing was sent.
    Kept,
    Deleted,
    Moved,
    /// A newer version is there now: left alone (the listing finds it).
    LeftChanged,
    Gone,
}

/// Applies `after_upload` to a delivered object, only if it is still the version delivered
/// (HEAD first; the copy is also conditional on the ETag).
pub async fn after_upload(
    client: &S3Client,
    key: &str,
    rest: &Path,
    action: &AfterUpload,
    version: &Version,
    pinned_etag: Option<&str>,
) -> Result<BucketAfter, S3Error> {
    let plan = match after_plan(action, rest) {
        Ok(None) => return Ok(BucketAfter::Kept),
        Ok(Some(plan)) => plan,
        Err(why) => return Err(S3Error::Setup(why)),
    };
    let Some(head) = client.head_object(key).await? else {
        return Ok(BucketAfter::Gone);
    };
    if !version.matches_object(
        pinned_etag,
        Some(head.size),
        head.last_modified.as_deref(),
        head.etag.as_deref(),
    ) {
        return Ok(BucketAfter::LeftChanged);
    }
    let tag = head.etag.unwrap_or_default();
    match plan {
        After::MoveTo(to) => {
            client.copy_object(key, &to, &tag).await?;
            client.delete_object(key).await?;
            Ok(BucketAfter::Moved)
        }
        After::Delete => {
            client.delete_object(key).await?;
            Ok(BucketAfter::Deleted)
        }
    }
}

/// What a bucket source does to a delivered object.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Delete,
    /// Copy to this key, then delete.
    MoveTo(String),
}

/// The `after_upload` setting as requests: None for `keep` (nothing is sent at all). Every
/// setting is named, so a new one cannot fall into deleting by a wildcard arm.
fn after_plan(action: &AfterUpload, rest: &Path) -> Result<Option<After>, String> {
    match action {
        AfterUpload::Keep => Ok(None),
        AfterUpload::Delete => Ok(Some(After::Delete)),
        AfterUpload::MoveToPrefix(p) => {
            Ok(Some(After::MoveTo(format!("{p}{}", rest.to_string_lossy()))))
        }
        AfterUpload::MoveTo(dir) => Err(format!(
            "after_upload = {{ move_to = {:?} }} is for directory sources; a bucket source moves with move_to_prefix",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 18: `keep` never deletes, whoever calls; every setting maps to its own plan.
    #[test]
    fn f18_after_upload_keep_sends_nothing_and_every_setting_is_explicit() {
        let rest = Path::new("a/b.ndjson");
        assert_eq!(after_plan(&AfterUpload::Keep, rest), Ok(None));
        assert_eq!(
            after_plan(&AfterUpload::Delete, rest),
            Ok(Some(After::Delete))
        );
        assert_eq!(
            after_plan(&AfterUpload::MoveToPrefix("done/".into()), rest),
            Ok(Some(After::MoveTo("done/a/b.ndjson".into())))
        );
        assert!(after_plan(&AfterUpload::MoveTo("/x".into()), rest).is_err());
    }

    /// MinIO notification lines are told apart from keep-alives and other documents.
    #[test]
    fn notification_lines() {
        let ev = br#"{"Records":[{"eventVersion":"2.0","eventSource":"minio:s3","eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"onprem"},"object":{"key":"exports%2Fa.ndjson","size":3}}}]}"#;
        assert!(is_event(ev));
        assert!(!is_event(b" \n"));
        assert!(!is_event(br#"{"Records":null}"#));
        assert!(!is_event(b"<ListBucketResult/>"));
    }
}

//! `run --once --dry-run`: a destination that sends nothing. Each object the scheduler would
//! deliver is printed (why, size, key) and left as it was; the run works on a copy of the
//! journal, so the real one is not changed either.

use std::sync::Mutex;

use tokio::sync::watch;

use super::read::Origin;
use super::s3::Confirm;
use super::{Destination, Outcome, Preflight, Unrecorded};
use crate::journal::{Journal, ObjectRow};

/// Lists instead of sending.
pub struct DryRun {
    /// The real journal (read-only), to say why an object would go: none (a fresh start).
    real: Option<Journal>,
    /// What was listed, in order.
    pub listed: Mutex<Vec<String>>,
}

impl DryRun {
    /// A dry run that compares with the real journal, if there is one.
    pub fn new(real: Option<Journal>) -> DryRun {
        DryRun {
            real,
            listed: Mutex::new(Vec::new()),
        }
    }

    /// Why `row` would be sent: `new` (never seen), `changed` (a new version of something
    /// seen), or `pending` (waiting in the journal already: an earlier run left it).
    fn why(&self, row: &ObjectRow) -> &'static str {
        let Some(j) = &self.real else { return "new" };
        match j.seen_before(row.id, &row.source, &row.rel_path) {
            Ok((true, _)) => "pending",
            Ok((false, true)) => "changed",
            _ => "new",
        }
    }
}

impl Destination for DryRun {
    async fn deliver(
        &self,
        row: &ObjectRow,
        _origin: &Origin,
        _confirm: Confirm,
        _stop: watch::Receiver<bool>,
    ) -> (Outcome, Unrecorded) {
        let line = format!(
            "{:<8} {:>12}  {}",
            self.why(row),
            row.version.size(),
            row.key
        );
        crate::out(&format!("{line}\n"));
        self.listed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(line);
        (Outcome::Listed, None)
    }

    async fn preflight(&self) -> Preflight {
        Preflight::Ok
    }

    async fn ready(&self) {}

    fn endpoint(&self) -> String {
        "dry-run://".into()
    }

    fn bucket(&self) -> String {
        "(dry run)".into()
    }

    async fn close(&self) {}
}

//! What an operator sees of a running agent or relay: Prometheus metrics and health endpoints
//! (`metrics.rs`, `serve.rs`).

pub mod metrics;
pub mod serve;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;

use crate::journal::Journal;

/// The agent's `/metrics`: the counters, and what waits per source read from the journal at
/// each scrape (its own read-only connection: a scrape never waits for the writer).
pub struct AgentExporter {
    /// The journal file.
    pub journal: PathBuf,
    /// The sources, so that each shows from 0.
    pub sources: Vec<String>,
    reader: Mutex<Option<Journal>>,
}

impl AgentExporter {
    /// An exporter for the journal at `journal`.
    pub fn new(journal: PathBuf, sources: Vec<String>) -> AgentExporter {
        for s in &sources {
            metrics::agent().register_source(s);
        }
        AgentExporter {
            journal,
            sources,
            reader: Mutex::new(None),
        }
    }

    /// Sets the pending gauges from the journal.
    fn refresh(&self) {
        let m = metrics::agent();
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reader.is_none() {
            *reader = Journal::open_readonly(&self.journal).ok();
        }
        let Some(j) = reader.as_ref() else { return };
        let Ok(pending) = j.pending_by_source() else {
            *reader = None;
            return;
        };
        let now = crate::receipts::record::now_ms();
        for s in &self.sources {
            let l = metrics::SourceLabel { source: s.clone() };
            let p = pending.iter().find(|p| &p.source == s);
            m.pending_objects
                .get_or_create(&l)
                .set(p.map_or(0, |p| i64::try_from(p.objects).unwrap_or(i64::MAX)));
            m.pending_bytes
                .get_or_create(&l)
                .set(p.map_or(0, |p| i64::try_from(p.bytes).unwrap_or(i64::MAX)));
            #[allow(clippy::cast_precision_loss)]
            let age = p.map_or(0.0, |p| (now - p.oldest_ms).max(0) as f64 / 1000.0);
            m.oldest_pending_age.get_or_create(&l).set(age);
        }
    }
}

impl serve::Exporter for AgentExporter {
    fn metrics(&self) -> Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move {
            // One aggregate read of the journal (WAL: it never waits for the writer); short
            // enough to run on the agent's one runtime thread.
            self.refresh();
            metrics::agent().encode()
        })
    }

    fn ready(&self) -> Result<(), String> {
        metrics::agent().ready()
    }
}

//! `ha-edge status`: a read-only look at the journal, safe while the daemon runs.

use std::fmt::Write as _;

use crate::journal::Status;

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "journal: {}", s.journal.display());
    if let Some(d) = s.agent.get("destination") {
        let _ = writeln!(out, "destination: {d}");
    }
    for (name, v) in &s.agent {
        if let Some(source) = name.strip_prefix("source.") {
            let _ = writeln!(out, "source {source}: {v}");
        }
    }
    if let Some(t) = s.agent.get("started") {
        let _ = writeln!(
            out,
            "last start: {t} (pid {})",
            s.agent.get("pid").map_or("?", |p| p.as_str())
        );
    }
    let _ = writeln!(out, "objects:");
    for (state, n) in &s.objects {
        let _ = writeln!(out, "  {state:<11} {n}");
    }
    let _ = writeln!(
        out,
        "bytes pending: {} ({})",
        s.bytes_pending,
        bytesize::ByteSize(s.bytes_pending).display().iec()
    );
    let _ = writeln!(
        out,
        "bytes delivered: {} ({})",
        s.bytes_delivered,
        bytesize::ByteSize(s.bytes_delivered).display().iec()
    );
    match s.oldest_pending_age_secs {
        Some(age) => {
            let _ = writeln!(
                out,
                "oldest pending: {} ago",
                humantime::format_duration(std::time::Duration::from_secs(age))
            );
        }
        None => {
            let _ = writeln!(out, "oldest pending: none");
        }
    }
    if s.last_errors.is_empty() {
        let _ = writeln!(out, "last errors: none");
    } else {
        let _ = writeln!(out, "last errors (newest first):");
        for e in &s.last_errors {
            let _ = writeln!(
                out,
                "  {} {}{}",
                e.at,
                e.key
                    .as_deref()
                    .map(|k| format!("{k}: "))
                    .unwrap_or_default(),
                e.message
            );
        }
    }
    out
}

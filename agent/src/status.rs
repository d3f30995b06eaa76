//! `ha-edge status`: a read-only look at the journal, safe while the daemon runs.
//!
//! # Health
//! | health | exit | when |
//! |---|---|---|
//! | healthy | 0 | nothing held, nothing stale, the destination accepting |
//! | degraded | 1 | paths held (refused, rejected, conflict, quarantined), a source's keys refused, or the oldest pending object older than `--stale-after` |
//! | refusing | 3 | the destination refuses us (credentials, bucket, region, relay) |
//! | unreachable | 3 | the destination does not answer |
//! | (journal) | 4 | no journal, or it cannot be read |
//!
//! `health_detail` says why, in the words of the journal's facts.
//!
//! Must not break: read-only, safe while the daemon runs; the exit codes (0 healthy, 1 degraded, 3
//! refusing or unreachable, 4 journal) are an interface.

use std::fmt::Write as _;

use serde::Serialize;

use crate::journal::Status;

/// How the agent is doing, for a monitoring check (`status` exit codes 0, 1 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Nothing held, nothing stale, the destination accepting.
    Healthy,
    /// Work is held (refused, rejected, conflicts, quarantined), a source's keys are refused, or pending
    /// work is older than the threshold.
    Degraded,
    /// The destination refuses us (credentials, bucket, region).
    Refusing,
    /// The destination does not answer.
    Unreachable,
}

impl Health {
    /// `status`'s exit code for this health.
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Refusing | Health::Unreachable => 3,
        }
    }
}

/// `status --json`: the journal's facts, and what they mean.
#[derive(Debug, Serialize)]
pub struct Report {
    /// How the agent is doing, in one word.
    pub health: Health,
    /// One sentence per reason the health is not `healthy`.
    pub health_detail: Vec<String>,
    /// Everything the journal says.
    #[serde(flatten)]
    pub status: Status,
}

/// Judges the journal's facts: the worst reason wins.
pub fn assess(status: Status, stale_after: std::time::Duration) -> Report {
    let mut health = Health::Healthy;
    let mut detail = Vec::new();
    let mut worse = |h: Health, why: String, health: &mut Health| {
        let rank = |h: Health| match h {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Unreachable => 2,
            Health::Refusing => 3,
        };
        if rank(h) > rank(*health) {
            *health = h;
        }
        detail.push(why);
    };
    if let Some(d) = status.agent.get("destination") {
        if d.starts_with("refusing") {
            worse(Health::Refusing, format!("destination {d}"), &mut health);
        } else if d.starts_with("unreachable") {
            worse(Health::Unreachable, format!("destination {d}"), &mut health);
        }
    }
    for (name, v) in &status.agent {
        if let Some(source) = name.strip_prefix("source.") {
            if v.starts_with("refused") {
                worse(
                    Health::Degraded,
                    format!("source {source} {v}"),
                    &mut health,
                );
            }
        }
    }
    if status.held.count > 0 {
        worse(
            Health::Degraded,
            format!(
                "{} file(s) held back (refused, rejected, in conflict or quarantined): see held",
                status.held.count
            ),
            &mut health,
        );
    }
    if let Some(age) = status.oldest_pending_age_secs {
        if age >= stale_after.as_secs() {
            worse(
                Health::Degraded,
                format!(
                    "the oldest pending object has waited {} (more than {})",
                    humantime::format_duration(std::time::Duration::from_secs(age)),
                    humantime::format_duration(stale_after)
                ),
                &mut health,
            );
        }
    }
    Report {
        health,
        health_detail: detail,
        status,
    }
}

/// The report for a terminal.
pub fn render_report(r: &Report) -> String {
    let mut out = format!(
        "health: {}\n",
        serde_json::to_value(r.health)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    for d in &r.health_detail {
        let _ = writeln!(out, "  {d}");
    }
    out.push_str(&render_text(&r.status));
    out
}

/// The journal's part of the report for a terminal.
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
    if let Some(c) = s.agent.get("config") {
        let _ = writeln!(out, "config in force: {c}");
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
    let settling: u64 = s.settling.iter().map(|x| x.count).sum();
    match s.settling.iter().map(|x| x.oldest_secs).max() {
        Some(oldest) if settling > 0 => {
            let _ = writeln!(out, "settling {settling} (oldest {oldest} s)");
            for x in &s.settling {
                let _ = writeln!(
                    out,
                    "  {}: {} (oldest {} s)",
                    x.source, x.count, x.oldest_secs
                );
            }
        }
        _ => {
            let _ = writeln!(out, "settling 0");
        }
    }
    if s.held.count == 0 {
        let _ = writeln!(out, "held: none");
    } else {
        let _ = writeln!(out, "held: {} (newest first):", s.held.count);
        for h in &s.held.last {
            let _ = writeln!(
                out,
                "  {} {} {}/{}: {}",
                h.at, h.state, h.source, h.path, h.reason
            );
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

/// `ha-edge status --objects`: the objects, newest first (exit 0, or 2 config, 4 journal).
pub fn objects(
    file: &std::path::Path,
    json: bool,
    state: Option<crate::cli::ObjectState>,
    limit: usize,
) -> std::process::ExitCode {
    use crate::cli::ObjectState as S;
    use crate::journal::ObjectFilter as F;
    let path = match crate::config::journal_path(file) {
        Ok(p) => p,
        Err(e) => return crate::fail(crate::EXIT_CONFIG, e),
    };
    let filter = match state {
        None => F::Open,
        Some(S::Pending) => F::Pending,
        Some(S::Uploading) => F::Uploading,
        Some(S::Refused) => F::Refused,
        Some(S::Quarantined) => F::Quarantined,
        Some(S::Conflict) => F::Conflict,
        Some(S::Failed) => F::Failed,
    };
    let mut items = match crate::journal::Journal::open_readonly(&path)
        .and_then(|j| j.list_objects(filter, limit))
    {
        Ok(i) => i,
        Err(e) => return crate::fail(crate::EXIT_JOURNAL, e),
    };
    if crate::config::keys_only(file) {
        for i in &mut items {
            i.path = "(withheld)".into();
        }
    }
    if json {
        crate::out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        ));
    } else {
        crate::out(&render_objects(&items));
    }
    std::process::ExitCode::SUCCESS
}

/// `ha-edge lookup KEY`: the source path(s) behind a key (exit 0 found, 1 not found, 2 config,
/// 4 journal). It shows the path whatever `log_paths` says: it is the operator's own lookup.
pub fn lookup(file: &std::path::Path, key: String, json: bool) -> std::process::ExitCode {
    let path = match crate::config::journal_path(file) {
        Ok(p) => p,
        Err(e) => return crate::fail(crate::EXIT_CONFIG, e),
    };
    let items = match crate::journal::Journal::open_readonly(&path).and_then(|j| j.lookup(key)) {
        Ok(i) => i,
        Err(e) => return crate::fail(crate::EXIT_JOURNAL, e),
    };
    if json {
        crate::out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        ));
    } else {
        let mut out = String::new();
        for i in &items {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{} bytes",
                i.source, i.path, i.state, i.size
            );
        }
        if items.is_empty() {
            out.push_str("(no object with this key in the journal)\n");
        }
        crate::out(&out);
    }
    if items.is_empty() {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// `status --objects` for a terminal: one line per object.
pub fn render_objects(items: &[crate::journal::ObjectItem]) -> String {
    let mut out = format!(
        "{:<10} {:>12} {:>8}  {}\n",
        "STATE", "SIZE", "AGE", "KEY (last error)"
    );
    for i in items {
        let age =
            humantime::format_duration(std::time::Duration::from_secs(i.age_secs)).to_string();
        let age = age
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let what = if i.key.is_empty() {
            format!("{}/{}", i.source, i.path)
        } else {
            i.key.clone()
        };
        let _ = write!(out, "{:<10} {:>12} {:>8}  {what}", i.state, i.size, age);
        if let Some(e) = &i.last_error {
            let _ = write!(out, " ({e})");
        }
        out.push('\n');
    }
    if items.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

//! `ha-edge receipts [verify]`: print the journal's receipts, or check the chain in the bucket.
//!
//! Must not break: the output formats (one receipt per line as stored, with its
//! `after_upload_at` added; CSV with `CSV_HEADER`) and the exit codes (0 ok, 1 the chain does not
//! hold, 2 config or usage, 4 journal).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::{ReceiptFormat, ReceiptsAction};
use crate::config::{Config, Destination};
use crate::journal::{Journal, ReceiptLine};
use crate::{err_line, fail, EXIT_CONFIG, EXIT_INCOMPLETE, EXIT_JOURNAL};

use super::record::{Receipt, CSV_HEADER};

/// What `ha-edge receipts` was asked.
pub struct Args {
    pub since: Option<String>,
    pub until: Option<String>,
    pub source: Option<String>,
    pub format: ReceiptFormat,
    pub action: Option<ReceiptsAction>,
}

/// Runs `ha-edge receipts`.
pub fn main(file: &Path, args: Args) -> ExitCode {
    if let Some(ReceiptsAction::Verify {
        bucket,
        prefix,
        agent,
    }) = args.action
    {
        return verify(file, bucket, prefix, agent.as_deref());
    }
    let path = match crate::config::journal_path(file) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let mut filter = crate::journal::ReceiptFilter {
        source: args.source,
        ..Default::default()
    };
    for (arg, slot, name) in [
        (&args.since, &mut filter.since_ms, "--since"),
        (&args.until, &mut filter.until_ms, "--until"),
    ] {
        if let Some(t) = arg {
            match parse_time(t, super::record::now_ms()) {
                Ok(ms) => *slot = Some(ms),
                Err(e) => return fail(EXIT_CONFIG, format!("{name} {t:?}: {e}")),
            }
        }
    }
    let journal = match Journal::open_readonly(&path) {
        Ok(j) => j,
        Err(e) => return fail(EXIT_JOURNAL, e),
    };
    let format = args.format;
    let mut csv =
        (format == ReceiptFormat::Csv).then(|| csv::Writer::from_writer(std::io::stdout()));
    if let Some(w) = csv.as_mut() {
        if w.write_record(CSV_HEADER).is_err() {
            return ExitCode::SUCCESS;
        }
    }
    let mut stdout = std::io::stdout();
    let printed = journal.for_each_receipt(filter, move |line| {
        let ReceiptLine::Receipt {
            json,
            after_upload_at,
            ..
        } = line
        else {
            return Ok(());
        };
        match csv.as_mut() {
            Some(w) => {
                let r: Receipt = serde_json::from_str(&json).map_err(std::io::Error::other)?;
                w.write_record(r.csv_fields(after_upload_at.as_deref()))?;
                Ok(())
            }
            None => {
                // The receipt as stored, with the time of its after_upload event (if any).
                let mut v: serde_json::Value =
                    serde_json::from_str(&json).map_err(std::io::Error::other)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("after_upload_at".into(), after_upload_at.into());
                }
                writeln!(stdout, "{v}")
            }
        }
    });
    match printed {
        // A closed pipe (`| head`) ends the output quietly.
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_JOURNAL, e),
    }
}

/// An RFC 3339 time, or an age (`24h`: that long ago), as ms since the epoch.
fn parse_time(t: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(st) = humantime::parse_rfc3339_weak(t) {
        return st
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .map_err(|e| e.to_string());
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        Err(_) => Err("not an RFC 3339 time (2026-12-01T08:00:00Z) nor an age (24h)".into()),
    }
}

/// `ha-edge receipts verify`.
fn verify(
    file: &Path,
    bucket: Option<String>,
    prefix: Option<String>,
    agent: Option<&str>,
) -> ExitCode {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let Destination::S3(mut dest) = config.destination.clone() else {
        return fail(
            EXIT_CONFIG,
            "receipts verify reads the bucket: the destination must be S3",
        );
    };
    if let Some(b) = bucket {
        dest.bucket = b;
    }
    let prefix = prefix.unwrap_or_else(|| {
        config
            .receipts
            .as_ref()
            .map_or("_receipts/", |r| r.prefix.as_str())
            .to_string()
    });
    let creds = match crate::s3::credentials::resolve(&dest) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, format!("destination: {e}")),
    };
    // On the box, each batch is also compared with what this agent's journal recorded.
    let local = if config.agent.journal.exists() {
        match Journal::open_readonly(&config.agent.journal).and_then(|j| j.batches()) {
            Ok(b) => Some(b),
            Err(e) => return fail(EXIT_JOURNAL, e),
        }
    } else {
        None
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_INCOMPLETE, format!("cannot start the runtime: {e}")),
    };
    let name = config.agent.name.clone();
    let result = rt.block_on(async {
        let client = crate::s3::S3Client::new(
            &dest,
            creds,
            config.agent.max_retries,
            config.agent.request_timeout,
            2,
        )
        .map_err(|e| e.for_operator())?;
        super::verify::verify(
            &client,
            &prefix,
            agent,
            local.as_deref().map(|b| (name.as_str(), b)),
        )
        .await
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(EXIT_INCOMPLETE, format!("receipts verify: {e}")),
    };
    for p in &report.problems {
        err_line(&format!("ha-edge: receipts verify: {p}"));
    }
    crate::out(&format!(
        "{} batches, {} receipts, {} objects checked under s3://{}/{prefix}: {}\n",
        report.batches,
        report.receipts,
        report.objects_checked,
        dest.bucket,
        if report.problems.is_empty() {
            "the chain holds".to_string()
        } else {
            format!("{} problems", report.problems.len())
        }
    ));
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INCOMPLETE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times are absolute (RFC 3339) or ages; anything else is refused.
    #[test]
    fn times_are_rfc3339_or_an_age() {
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", 0).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("1h", 10_000_000).unwrap(),
            10_000_000 - 3_600_000
        );
        assert!(parse_time("yesterday", 0).is_err());
    }
}

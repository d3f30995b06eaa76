//! `ha-edge receipts verify`: walks the receipt batches in the bucket and checks the chain and
//! the objects it names. Runs wherever the bucket can be read (the cloud side needs no access
//! to the box); on the box it also compares each batch with the SHA-256 the journal recorded,
//! which catches a rewritten last batch too (the chain alone cannot: nothing follows it).
//!
//! Checks, per agent: batches numbered 1, 2, ... without a gap; each header's `prev_sha256`
//! equal to the SHA-256 of the previous batch's bytes; header counts equal to the lines; every
//! line a receipt or event of this agent; the newest receipt of each key matches the object in
//! the bucket (size, stored SHA-256, and the ETag when the receipt's version is still current).

use std::collections::{BTreeMap, HashMap};

use crate::hash::Sha256;
use crate::journal::BatchRow;
use crate::s3::S3Client;

use super::batch::Header;
use super::record::{AfterUploadEvent, Receipt};

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Batches read.
    pub batches: usize,
    /// Receipts in them.
    pub receipts: usize,
    /// Objects checked against the bucket (the newest receipt of each key).
    pub objects_checked: usize,
    /// Every problem, in order; empty means the chain holds.
    pub problems: Vec<String>,
}

/// Reads every batch under `prefix` (of `agent` only, if given) and checks them; `local` are
/// an agent's name and the batches its journal recorded, when run on the box.
pub async fn verify(
    client: &S3Client,
    prefix: &str,
    agent: Option<&str>,
    local: Option<(&str, &[BatchRow])>,
) -> Result<Report, String> {
    let list_prefix = match agent {
        Some(a) => format!("{prefix}{a}/"),
        None => prefix.to_string(),
    };
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_objects(&list_prefix, token.as_deref())
            .await
            .map_err(|e| e.for_operator())?;
        keys.extend(page.objects.into_iter().map(|o| o.key));
        match page.next_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    // Per agent, in key order (day folders, then the zero-padded number).
    let mut by_agent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in keys {
        let rest = &k[prefix.len().min(k.len())..];
        let Some((a, _)) = rest.split_once('/') else {
            continue;
        };
        if k.ends_with(".ndjson") {
            by_agent.entry(a.to_string()).or_default().push(k.clone());
        }
    }
    let mut report = Report::default();
    if by_agent.is_empty() {
        report
            .problems
            .push(format!("no receipt batches under {list_prefix:?}"));
    }
    for (agent_name, mut keys) in by_agent {
        let local = local.filter(|(a, _)| *a == agent_name).map(|(_, b)| b);
        let local_by_seq: HashMap<i64, &BatchRow> = local
            .unwrap_or_default()
            .iter()
            .map(|b| (b.seq, b))
            .collect();
        keys.sort();
        let mut prev_sha: Option<String> = None;
        let mut newest: HashMap<String, Receipt> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let want_seq = i as i64 + 1;
            let got = client
                .get_range(key, 0, 0, None)
                .await
                .map_err(|e| e.for_operator())?;
            report.batches += 1;
            let sha = hex::encode(Sha256::digest(&got.body));
            let text = String::from_utf8_lossy(&got.body);
            let mut lines = text.lines();
            let header: Option<Header> = lines.next().and_then(|l| serde_json::from_str(l).ok());
            let Some(header) = header else {
                report
                    .problems
                    .push(format!("{key}: the first line is not a batch header"));
                prev_sha = Some(sha);
                continue;
            };
            if header.batch != want_seq {
                report.problems.push(format!(
                    "{key}: batch {} where batch {want_seq} was expected (a batch is missing or out of place)",
                    header.batch
                ));
            }
            if header.agent != agent_name {
                report.problems.push(format!(
                    "{key}: header names agent {:?}, stored under {agent_name:?}",
                    header.agent
                ));
            }
            if header.prev_sha256 != prev_sha {
                report.problems.push(format!(
                    "{key}: prev_sha256 {} does not match the previous batch's SHA-256 {} (a batch was changed, removed or inserted)",
                    header.prev_sha256.as_deref().unwrap_or("(none)"),
                    prev_sha.as_deref().unwrap_or("(none: this should be batch 1)")
                ));
            }
            if let Some(b) = local_by_seq.get(&header.batch) {
                if b.sha256 != sha {
                    report.problems.push(format!(
                        "{key}: SHA-256 {sha} differs from the {} the agent's journal recorded for batch {}",
                        b.sha256, b.seq
                    ));
                }
            }
            let (mut receipts, mut events) = (0u64, 0u64);
            for (n, line) in lines.enumerate() {
                if let Ok(r) = serde_json::from_str::<Receipt>(line) {
                    receipts += 1;
                    if r.agent != agent_name {
                        report.problems.push(format!(
                            "{key} line {}: receipt of agent {:?}",
                            n + 2,
                            r.agent
                        ));
                    }
                    newest.insert(r.destination.key.clone(), r);
                } else if serde_json::from_str::<AfterUploadEvent>(line).is_ok() {
                    events += 1;
                } else {
                    report.problems.push(format!(
                        "{key} line {}: neither a receipt nor an event",
                        n + 2
                    ));
                }
            }
            if (receipts, events) != (header.receipts, header.events) {
                report.problems.push(format!(
                    "{key}: holds {receipts} receipts and {events} events, the header says {} and {}",
                    header.receipts, header.events
                ));
            }
            report.receipts += usize::try_from(receipts).unwrap_or(usize::MAX);
            prev_sha = Some(sha);
        }
        if let Some(local) = local {
            let in_bucket = keys.len() as i64;
            let confirmed = local
                .iter()
                .filter(|b| b.uploaded_ms.is_some())
                .map(|b| b.seq)
                .max()
                .unwrap_or(0);
            if confirmed > in_bucket {
                report.problems.push(format!(
                    "the journal confirmed {confirmed} batches, the bucket holds {in_bucket} (batches were removed)"
                ));
            }
        }
        let mut objects: Vec<(String, Receipt)> = newest.into_iter().collect();
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, r) in objects {
            report.objects_checked += 1;
            check_object(client, &key, &r, &mut report.problems).await?;
        }
    }
    Ok(report)
}

/// The newest receipt of `key` against the object in the bucket.
async fn check_object(
    client: &S3Client,
    key: &str,
    r: &Receipt,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    if r.destination.bucket != client.bucket() && !r.destination.bucket.is_empty() {
        // Delivered to another bucket: not this one's to check.
        return Ok(());
    }
    let head = client
        .head_object(key)
        .await
        .map_err(|e| e.for_operator())?;
    let Some(h) = head else {
        problems.push(format!(
            "{key}: receipt {} names an object that is not in the bucket",
            r.receipt
        ));
        return Ok(());
    };
    if h.size != r.source.size {
        problems.push(format!(
            "{key}: {} bytes in the bucket, receipt {} says {}",
            h.size, r.receipt, r.source.size
        ));
    }
    // A multipart object checked by a full-object CRC-64/NVME carries no SHA-256 (its metadata
    // was fixed before its bytes were read): the server's CRC, which it checked against the
    // bytes it assembled, must be the receipt's.
    let receipt_crc = r
        .destination
        .checksum
        .as_deref()
        .and_then(|c| c.strip_prefix("crc64nvme:"));
    match (h.meta_sha256.as_deref(), receipt_crc) {
        (Some(s), _) if s == r.sha256 => {}
        (Some(s), _) => problems.push(format!(
            "{key}: stored SHA-256 {s}, receipt {} says {}",
            r.receipt, r.sha256
        )),
        (None, Some(want)) => match h.checksum_crc64nvme.as_deref() {
            Some(got) if got == want => {}
            got => problems.push(format!(
                "{key}: stored CRC64NVME {}, receipt {} says {want}",
                got.unwrap_or("none"),
                r.receipt
            )),
        },
        (None, None) => problems.push(format!(
            "{key}: the object carries no SHA-256 to compare with receipt {}",
            r.receipt
        )),
    }
    if let (Some(want), Some(got)) = (&r.destination.etag, &h.etag) {
        if want != got {
            problems.push(format!(
                "{key}: ETag {got} in the bucket, receipt {} says {want} (replaced since?)",
                r.receipt
            ));
        }
    }
    Ok(())
}

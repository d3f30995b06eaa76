//! `ha-edge check FILE...`: the record checks of `validate`, on files given by hand (before an
//! export is wired to a source, or to see why a file was quarantined). Reads each file once, in
//! 1 MiB chunks, on this thread; prints one line per file and the check's throughput.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use super::{dicom, fhir, Invalid, Kind};
use crate::cli::CheckKind;

/// Checks one file; the number of bytes read.
fn check_file(
    path: &Path,
    kind: Kind,
    max_line: usize,
) -> std::io::Result<(u64, Result<String, Invalid>)> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    match kind {
        Kind::Dicom => {
            let mut head = Vec::new();
            (&mut f).take(dicom::HEAD as u64).read_to_end(&mut head)?;
            read += head.len() as u64;
            Ok((
                read,
                dicom::check(&head)
                    .map(|i| format!("DICOM, transfer syntax {}", i.transfer_syntax)),
            ))
        }
        _ => {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let manifest = path.with_file_name(crate::source::fs::MANIFEST);
            let expect = std::fs::read(manifest)
                .ok()
                .and_then(|m| crate::source::fs::manifest_expect(&m, name))
                .unwrap_or_default();
            let mut c = fhir::NdjsonCheck::new(max_line, expect);
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 || c.failed() {
                    break;
                }
                read += n as u64;
                c.feed(&buf[..n]);
            }
            Ok((read, c.finish().map(|n| format!("{n} FHIR resources"))))
        }
    }
}

/// Checks every file; exit 0 if all pass, 1 if any fails, 2 if one cannot be read.
pub fn check(kind: Option<CheckKind>, max_line: usize, files: &[std::path::PathBuf]) -> ExitCode {
    let started = Instant::now();
    let (mut bytes, mut failed, mut unreadable) = (0u64, 0usize, 0usize);
    let mut out = String::new();
    for path in files {
        let kind = match kind {
            Some(CheckKind::FhirNdjson) => Kind::FhirNdjson,
            Some(CheckKind::Dicom) => Kind::Dicom,
            None if path.extension().is_some_and(|e| e == "dcm") => Kind::Dicom,
            None => Kind::FhirNdjson,
        };
        match check_file(path, kind, max_line) {
            Ok((n, verdict)) => {
                bytes += n;
                match verdict {
                    Ok(what) => out.push_str(&format!("ok       {}: {what}\n", path.display())),
                    Err(e) => {
                        failed += 1;
                        out.push_str(&format!("invalid  {}: {e}\n", path.display()));
                    }
                }
            }
            Err(e) => {
                unreadable += 1;
                out.push_str(&format!("error    {}: {e}\n", path.display()));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    out.push_str(&format!(
        "{} file(s), {failed} invalid, {bytes} bytes in {secs:.3} s ({:.0} MB/s)\n",
        files.len(),
        bytes as f64 / secs / 1e6
    ));
    crate::out(&out);
    match (unreadable, failed) {
        (0, 0) => ExitCode::SUCCESS,
        (0, _) => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

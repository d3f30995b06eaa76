//! The record-check corpus: generated FHIR Bulk Data NDJSON and DICOM Part 10 files, valid and
//! broken in each way ha-edge checks (no real patient data: names and ids are made up).

use std::path::Path;

/// A made-up name that must never appear outside the box when paths are withheld.
pub const MARKER: &str = "MUSTERMANN_MAX_4711";

fn patient(i: usize) -> String {
    format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"name\":[{{\"family\":\"Muster{i}\",\"given\":[\"Max\"]}}],\"gender\":\"male\",\"birthDate\":\"1970-01-{:02}\"}}",
        i % 28 + 1
    )
}

fn observation(i: usize) -> String {
    format!(
        "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"status\":\"final\",\"code\":{{\"coding\":[{{\"system\":\"http://loinc.org\",\"code\":\"8867-4\",\"display\":\"Heart rate\"}}]}},\"subject\":{{\"reference\":\"Patient/p{i}\"}},\"valueQuantity\":{{\"value\":{},\"unit\":\"beats/minute\"}}}}",
        60 + i % 40
    )
}

/// `n` Patient or Observation resources, one per line.
pub fn ndjson(kind: &str, n: usize) -> String {
    (0..n)
        .map(|i| if kind == "Patient" { patient(i) } else { observation(i) } + "\n")
        .collect()
}

fn manifest(entries: &[(&str, &str, usize)]) -> String {
    let out: Vec<String> = entries
        .iter()
        .map(|(name, ty, count)| {
            format!("{{\"type\":\"{ty}\",\"url\":\"https://fhir.example/out/{name}\",\"count\":{count}}}")
        })
        .collect();
    format!(
        "{{\"transactionTime\":\"2026-12-01T08:00:00Z\",\"request\":\"https://fhir.example/$export\",\"requiresAccessToken\":true,\"output\":[{}],\"error\":[]}}",
        out.join(",")
    )
}

/// A minimal DICOM Part 10 file (explicit VR little endian) of one study and series.
pub fn dicom(study: &str, series: &str) -> Vec<u8> {
    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        let mut v = v.to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        out.extend(g.to_le_bytes());
        out.extend(e.to_le_bytes());
        out.extend(vr);
        if matches!(vr, b"OB" | b"SQ") {
            out.extend([0, 0]);
            out.extend(u32::try_from(v.len()).unwrap().to_le_bytes());
        } else {
            out.extend(u16::try_from(v.len()).unwrap().to_le_bytes());
        }
        out.extend(v);
    }
    let mut meta = Vec::new();
    el(&mut meta, 2, 1, b"OB", &[0, 1]);
    el(&mut meta, 2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.7");
    el(&mut meta, 2, 3, b"UI", format!("{series}.1").as_bytes());
    el(&mut meta, 2, 0x10, b"UI", b"1.2.840.10008.1.2.1");
    let mut out = vec![0u8; 128];
    out.extend(b"DICM");
    el(
        &mut out,
        2,
        0,
        b"UL",
        &u32::try_from(meta.len()).unwrap().to_le_bytes(),
    );
    out.extend(meta);
    el(&mut out, 8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.7");
    // A sequence of undefined length holding an item of undefined length, before the UIDs (a
    // reader must walk it to find them).
    out.extend([0x08, 0, 0x10, 0x11]);
    out.extend(b"SQ");
    out.extend([0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    out.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    el(&mut out, 8, 0x1150, b"UI", b"1.2.3");
    out.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    out.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    el(&mut out, 0x10, 0x10, b"PN", b"Muster^Max");
    el(&mut out, 0x20, 0x0D, b"UI", study.as_bytes());
    el(&mut out, 0x20, 0x0E, b"UI", series.as_bytes());
    el(&mut out, 0x7FE0, 0x10, b"OB", &[7u8; 256]);
    out
}

/// Writes the corpus under `root`; returns (relative path, the reason a check must give)
/// for every file that must be quarantined. Everything else must be delivered, except
/// `export1/manifest.json`, which is held because files it lists are quarantined.
pub fn write(root: &Path) -> Vec<(String, &'static str)> {
    let w = |rel: &str, bytes: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        crate::write_settled(&p, bytes);
    };
    // export1: two good files, one of the wrong type, one whose count is off; its manifest waits.
    w("export1/patients.ndjson", ndjson("Patient", 3).as_bytes());
    w(
        "export1/observations.ndjson",
        ndjson("Observation", 2).as_bytes(),
    );
    w(
        "export1/wrongtype.ndjson",
        ndjson("Observation", 2).as_bytes(),
    );
    w("export1/countoff.ndjson", ndjson("Patient", 2).as_bytes());
    w(
        "export1/manifest.json",
        manifest(&[
            ("patients.ndjson", "Patient", 3),
            ("observations.ndjson", "Observation", 2),
            ("wrongtype.ndjson", "Patient", 2),
            ("countoff.ndjson", "Patient", 5),
        ])
        .as_bytes(),
    );
    // export2: complete and valid; its manifest goes once its file is in.
    w("export2/p.ndjson", ndjson("Patient", 2).as_bytes());
    w(
        "export2/manifest.json",
        manifest(&[("p.ndjson", "Patient", 2)]).as_bytes(),
    );
    // Loose files, each broken in one way.
    let mut bad_utf8 = ndjson("Patient", 1).into_bytes();
    bad_utf8.extend(b"{\"resourceType\":\"Patient\",\"id\":\"x\",\"n\":\"\xc3\x28\"}\n");
    w("loose/badutf8.ndjson", &bad_utf8);
    let good = ndjson("Patient", 2);
    w(
        "loose/truncated.ndjson",
        &good.as_bytes()[..good.len() - 10],
    );
    w(
        "loose/array.ndjson",
        format!("[{}]\n", patient(1)).as_bytes(),
    );
    w(
        "loose/notfhir.ndjson",
        format!("{{\"resourceType\":\"{MARKER}\",\"id\":\"1\"}}\n").as_bytes(),
    );
    w(
        "loose/longline.ndjson",
        format!(
            "{}\n{{\"resourceType\":\"Patient\",\"id\":\"l\",\"text\":\"{}\"}}\n",
            patient(0),
            "y".repeat(3000)
        )
        .as_bytes(),
    );
    // DICOM: one good file, one without the preamble, one without the meta group.
    let ok = dicom("1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.1.1");
    w("dicom/ok.dcm", &ok);
    w("dicom/nopreamble.dcm", &ok[128..]);
    let meta_end = 132 + 12 + u32::from_le_bytes(ok[140..144].try_into().unwrap()) as usize;
    let mut no_meta = ok[..132].to_vec();
    no_meta.extend(&ok[meta_end..]);
    w("dicom/nometa.dcm", &no_meta);
    vec![
        (
            "export1/wrongtype.ndjson".into(),
            "where the manifest lists this file as Patient",
        ),
        (
            "export1/countoff.ndjson".into(),
            "2 resources where the manifest's count says 5",
        ),
        ("loose/badutf8.ndjson".into(), "not valid UTF-8"),
        ("loose/truncated.ndjson".into(), "truncated JSON"),
        ("loose/array.ndjson".into(), "not a JSON object"),
        (
            "loose/notfhir.ndjson".into(),
            "not a FHIR R4/R5 resource type",
        ),
        ("loose/longline.ndjson".into(), "longer than max_line"),
        ("dicom/nopreamble.dcm".into(), "no DICM prefix"),
        ("dicom/nometa.dcm".into(), "no File Meta Information group"),
    ]
}

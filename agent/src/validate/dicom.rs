//! DICOM Part 10 files: the 128-byte preamble and `DICM`, a File Meta Information group (0002)
//! with a Transfer Syntax UID, and, where the head of the data set allows, the Study and Series
//! Instance UIDs (for study-level completeness).
//!
//! Only the head of the file is read (`HEAD` bytes): the meta group, then the data set's
//! elements in tag order until (0020,000E) is passed. Explicit and implicit VR little endian are
//! walked, sequences of undefined length included; other transfer syntaxes (deflated, big
//! endian) are valid files whose UIDs are simply not read.
//!
//! Written by hand rather than with dicom-rs's `dicom-object`: the checks need a few hundred
//! lines, the crate's data dictionary alone would cost far more of the 8 MiB binary budget (see
//! the README's figures).
//!
//! Must not break: a UID is an identifier, never put in a reason or a log line.

use super::Invalid;

/// How much of a file is read: enough for the meta group and the usual modules before the UIDs.
pub const HEAD: usize = 1 << 20;

/// What a valid file told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DicomInfo {
    pub transfer_syntax: String,
    /// (0020,000D), when the data set's head could be read.
    pub study_uid: Option<String>,
    /// (0020,000E), likewise.
    pub series_uid: Option<String>,
}

fn invalid(offset: u64, reason: impl Into<String>) -> Invalid {
    Invalid {
        rule: "dicom",
        line: None,
        offset: Some(offset),
        reason: reason.into(),
    }
}

/// Checks the head of a file (`head` is its first bytes, at most `HEAD`).
pub fn check(head: &[u8]) -> Result<DicomInfo, Invalid> {
    if head.len() < 132 {
        return Err(invalid(
            0,
            "too short for a DICOM Part 10 file (no preamble)",
        ));
    }
    if &head[128..132] != b"DICM" {
        return Err(invalid(
            128,
            "no DICM prefix after the 128-byte preamble (not a DICOM Part 10 file)",
        ));
    }
    let mut r = Reader {
        buf: head,
        pos: 132,
        implicit: false,
    };
    let mut ts = None;
    let mut meta = 0;
    while let Some(&[g0, g1]) = head.get(r.pos..r.pos + 2) {
        if u16::from_le_bytes([g0, g1]) != 0x0002 {
            break;
        }
        let at = r.pos as u64;
        let Some(e) = r.element() else {
            return Err(invalid(at, "File Meta Information element cut short"));
        };
        meta += 1;
        if e.tag == (0x0002, 0x0010) {
            ts = r.value(&e).map(uid);
        }
        if !r.skip(&e, 0) {
            return Err(invalid(at, "File Meta Information element cut short"));
        }
    }
    if meta == 0 {
        return Err(invalid(132, "no File Meta Information group (0002)"));
    }
    let Some(ts) = ts.filter(|t| !t.is_empty()) else {
        return Err(invalid(
            132,
            "File Meta Information has no Transfer Syntax UID (0002,0010)",
        ));
    };
    let mut info = DicomInfo {
        transfer_syntax: ts.clone(),
        ..DicomInfo::default()
    };
    // The data set: explicit VR little endian unless the syntax says otherwise.
    r.implicit = match ts.as_str() {
        "1.2.840.10008.1.2" => true,
        "1.2.840.10008.1.2.2" | "1.2.840.10008.1.2.1.99" => return Ok(info),
        _ => false,
    };
    while let Some(e) = r.element() {
        if e.tag > (0x0020, 0x000E) {
            break;
        }
        match e.tag {
            (0x0020, 0x000D) => info.study_uid = r.value(&e).map(uid),
            (0x0020, 0x000E) => info.series_uid = r.value(&e).map(uid),
            _ => {}
        }
        if !r.skip(&e, 0) {
            break;
        }
    }
    Ok(info)
}

/// A UID value without its padding.
fn uid(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// One element's header.
struct Element {
    tag: (u16, u16),
    /// Explicit VR, or `None` (implicit, or an item/delimiter).
    vr: Option<[u8; 2]>,
    /// The value length (0xFFFF_FFFF: undefined).
    len: u32,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
/// Sequences nest at most this deep before the walk gives up (the UIDs are then not read).
const MAX_DEPTH: usize = 16;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    implicit: bool,
}

impl Reader<'_> {
    fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.buf.get(at..at + 2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.buf.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads the header at the position and moves past it.
    fn element(&mut self) -> Option<Element> {
        let tag = (self.u16_at(self.pos)?, self.u16_at(self.pos + 2)?);
        if tag.0 == 0xFFFE || self.implicit {
            let len = self.u32_at(self.pos + 4)?;
            self.pos += 8;
            return Some(Element { tag, vr: None, len });
        }
        let vr = self.buf.get(self.pos + 4..self.pos + 6)?;
        let vr = [vr[0], vr[1]];
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let (len, header) = if long {
            (self.u32_at(self.pos + 8)?, 12)
        } else {
            (u32::from(self.u16_at(self.pos + 6)?), 8)
        };
        self.pos += header;
        Some(Element {
            tag,
            vr: Some(vr),
            len,
        })
    }

    /// The value of an element of defined length (the position is at its start).
    fn value(&self, e: &Element) -> Option<&[u8]> {
        if e.len == UNDEFINED {
            return None;
        }
        self.buf
            .get(self.pos..self.pos + usize::try_from(e.len).ok()?)
    }

    /// Moves past an element's value; false if the head ends first or nesting is too deep.
    fn skip(&mut self, e: &Element, depth: usize) -> bool {
        if e.len != UNDEFINED {
            let Ok(n) = usize::try_from(e.len) else {
                return false;
            };
            self.pos = self.pos.saturating_add(n);
            return self.pos <= self.buf.len();
        }
        if depth >= MAX_DEPTH {
            return false;
        }
        // Undefined length: a sequence (SQ, or UN holding one, or implicit) of items.
        let was = self.implicit;
        if e.vr == Some(*b"UN") {
            self.implicit = true;
        }
        let ok = self.items(depth + 1);
        self.implicit = was;
        ok
    }

    /// Items up to the sequence delimiter.
    fn items(&mut self, depth: usize) -> bool {
        loop {
            let Some(item) = self.element() else {
                return false;
            };
            match item.tag {
                (0xFFFE, 0xE0DD) => return true,
                (0xFFFE, 0xE000) if item.len != UNDEFINED => {
                    if !self.skip(&item, depth) {
                        return false;
                    }
                }
                (0xFFFE, 0xE000) => loop {
                    // An item of undefined length: elements up to the item delimiter.
                    let Some(inner) = self.element() else {
                        return false;
                    };
                    if inner.tag == (0xFFFE, 0xE00D) {
                        break;
                    }
                    if !self.skip(&inner, depth) {
                        return false;
                    }
                },
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid file passes and its UIDs are read past a nested sequence of undefined length.
    #[test]
    fn a_valid_file_passes_and_its_uids_are_read() {
        let f = ha_edge_tests::corpus::dicom("1.2.826.0.1.1", "1.2.826.0.1.1.2");
        let info = check(&f).unwrap();
        assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(info.study_uid.as_deref(), Some("1.2.826.0.1.1"));
        assert_eq!(info.series_uid.as_deref(), Some("1.2.826.0.1.1.2"));
    }

    /// No preamble, no meta group, no transfer syntax: each is found; a head that ends early
    /// in the data set is still a valid file (its UIDs unknown).
    #[test]
    fn each_defect_is_named() {
        let f = ha_edge_tests::corpus::dicom("1.2", "1.2.3");
        let e = check(&f[128..]).unwrap_err();
        assert!(
            e.reason.contains("DICM") || e.reason.contains("preamble"),
            "{}",
            e.reason
        );
        assert!(check(b"short").unwrap_err().reason.contains("too short"));
        let mut no_meta = vec![0u8; 128];
        no_meta.extend(b"DICM");
        no_meta.extend([0x08, 0, 0x16, 0, b'U', b'I', 2, 0, b'1', 0]);
        assert!(check(&no_meta).unwrap_err().reason.contains("no File Meta"));
        let mut no_ts = vec![0u8; 128];
        no_ts.extend(b"DICM");
        no_ts.extend([2, 0, 1, 0, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
        assert!(check(&no_ts)
            .unwrap_err()
            .reason
            .contains("Transfer Syntax"));
        let pn = f.windows(4).position(|w| w == [0x10, 0, 0x10, 0]).unwrap();
        let info = check(&f[..pn + 3]).unwrap();
        assert_eq!(info.study_uid, None);
        assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2.1");
    }
}

//! What identifies one version of a source object: the journal's unit (a new version is a new
//! row), and what every read of a transfer is checked against. Shared by sources (which observe
//! versions), the journal (which records them) and sinks (which read them), so that none of
//! those imports another.
//!
//! | | a file | a bucket object |
//! |---|---|---|
//! | identity | size, mtime (ns), inode | listed ETag, size, LastModified (s) |
//! | pinned besides | ctime, when the hash is fixed | the ETag a transfer pinned, if none was listed |
//! | checked on every read | version and ctime of the open file | size, LastModified and ETag in the answer |
//!
//! Must not break: two observations of the same bytes compare equal, and a rewrite the source
//! can show compares unequal; for a file, ctime is deliberately not part of the identity (a
//! chmod or a link count change is not new content) but is pinned when the hash is fixed.

use std::time::UNIX_EPOCH;

/// One version of a file or of a bucket object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Version {
    /// A file: its size, modification time (ns since the epoch) and inode.
    File {
        size: u64,
        mtime_ns: i64,
        inode: u64,
    },
    /// A bucket object as listed: its ETag (None if the listing had none), size and
    /// LastModified in whole seconds (what HEAD can confirm).
    Object {
        etag: Option<String>,
        size: u64,
        last_modified: Option<i64>,
    },
}

impl Version {
    /// The version of a file as `metadata` shows it.
    pub fn of_file(meta: &std::fs::Metadata) -> Version {
        use std::os::unix::fs::MetadataExt;
        Version::File {
            size: meta.len(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            inode: meta.ino(),
        }
    }

    /// The version of a bucket object as a listing shows it.
    pub fn object(size: u64, last_modified: Option<i64>, etag: Option<&str>) -> Version {
        Version::Object {
            etag: etag.map(str::to_string),
            size,
            last_modified,
        }
    }

    /// Feeds what identifies this version into `h`, in bytes that stay the same from build to
    /// build (unlike `Hash`): for names that must outlive a restart.
    pub fn feed(&self, h: &mut crate::hash::Sha256) {
        match self {
            Version::File {
                size,
                mtime_ns,
                inode,
            } => {
                h.update(b"file\0");
                h.update(size.to_be_bytes());
                h.update(mtime_ns.to_be_bytes());
                h.update(inode.to_be_bytes());
            }
            Version::Object {
                etag,
                size,
                last_modified,
            } => {
                h.update(b"object\0");
                h.update(etag.as_deref().unwrap_or("").as_bytes());
                h.update([0]);
                h.update(size.to_be_bytes());
                h.update(last_modified.unwrap_or(i64::MIN).to_be_bytes());
            }
        }
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Version::File { size, .. } | Version::Object { size, .. } => *size,
        }
    }

    /// A bucket object's ETag as listed.
    pub fn listed_etag(&self) -> Option<&str> {
        match self {
            Version::Object { etag, .. } => etag.as_deref(),
            Version::File { .. } => None,
        }
    }

    /// Whether what a server says about an object (HEAD or GET headers) is still this
    /// version: same size, same LastModified second, the ETag known (as listed, or `pinned` by
    /// the transfer when the listing had none). Anything the server leaves out is not held
    /// against it. A file is never the same as an object.
    pub fn matches_object(
        &self,
        pinned: Option<&str>,
        size: Option<u64>,
        last_modified: Option<&str>,
        etag: Option<&str>,
    ) -> bool {
        let Version::Object {
            etag: listed,
            size: ours,
            last_modified: secs,
        } = self
        else {
            return false;
        };
        let size_ok = size.is_none_or(|s| s == *ours);
        let time_ok = secs.is_none_or(|want| {
            last_modified
                .and_then(http_date_secs)
                .is_none_or(|s| s == want)
        });
        let etag_ok = match (listed.as_deref().or(pinned), etag) {
            (Some(k), Some(e)) => unquote(k) == unquote(e),
            _ => true,
        };
        size_ok && time_ok && etag_ok
    }
}

/// An ETag without quotes or weak marker.
pub fn unquote(etag: &str) -> &str {
    let t = etag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.trim_matches('"')
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-26T10:00:00.000Z`, as in listings).
pub fn rfc3339_secs(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()
}

/// Seconds since the epoch of an HTTP date (`Thu, 26 Nov 2026 10:00:00 GMT`, as in
/// `Last-Modified`).
pub fn http_date_secs(s: &str) -> Option<i64> {
    /// Month names of HTTP dates.
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let f: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = f.as_slice() else {
        return None;
    };
    let m = MONTHS.iter().position(|x| x == mon)? + 1;
    let day: u32 = day.parse().ok()?;
    rfc3339_secs(&format!("{year}-{m:02}-{day:02}T{hms}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing's RFC 3339 time and a header's HTTP date name the same second.
    #[test]
    fn dates_from_listings_and_headers_agree() {
        let a = rfc3339_secs("2026-11-26T10:00:00.000Z").unwrap();
        let b = http_date_secs("Thu, 26 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(a, b);
        assert_eq!(rfc3339_secs("2026-11-26T10:00:00Z"), Some(a));
        assert_eq!(http_date_secs("Thu, 26 Nov 2026 10:00:01 GMT"), Some(a + 1));
        assert_eq!(http_date_secs("26 Nov 2026"), None);
        assert_eq!(http_date_secs("Thu, 26 Foo 2026 10:00:00 GMT"), None);
    }

    /// Quotes and weak markers do not count in ETag comparisons.
    #[test]
    fn etags_compare_without_quotes() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("W/\"abc\""), "abc");
    }

    /// What a server says about an object is matched against the listed version; a listing
    /// without an ETag is matched by the ETag the transfer pinned.
    #[test]
    fn object_versions_match_what_the_server_says() {
        let t = rfc3339_secs("2026-11-26T10:00:00Z");
        let lm = Some("Thu, 26 Nov 2026 10:00:00 GMT");
        let listed = Version::object(10, t, Some("\"e1\""));
        assert!(listed.matches_object(None, Some(10), lm, Some("e1")));
        assert!(!listed.matches_object(None, Some(10), lm, Some("\"e2\"")));
        assert!(!listed.matches_object(None, Some(11), lm, Some("\"e1\"")));
        assert!(!listed.matches_object(
            None,
            Some(10),
            Some("Thu, 26 Nov 2026 10:00:01 GMT"),
            Some("\"e1\"")
        ));
        // Nothing said, nothing held against it.
        assert!(listed.matches_object(None, None, None, None));
        let bare = Version::object(10, t, None);
        assert!(bare.matches_object(None, Some(10), lm, Some("\"any\"")));
        assert!(!bare.matches_object(Some("\"p\""), Some(10), lm, Some("\"q\"")));
        assert!(bare.matches_object(Some("\"p\""), Some(10), lm, Some("p")));
        let file = Version::File {
            size: 10,
            mtime_ns: 0,
            inode: 1,
        };
        assert!(!file.matches_object(None, Some(10), None, None));
        // ETag changes make a new version; quoting alone does not matter to the server check.
        assert_ne!(listed, Version::object(10, t, Some("\"e2\"")));
    }
}

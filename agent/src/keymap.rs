//! Maps a path relative to a source root onto an S3 object key.
//!
//! The mapping is the identity on ordinary names (`a/b.ndjson` becomes `prefix + "a/b.ndjson"`),
//! so operators find their files where they expect them. Names that cannot be carried across
//! safely are refused rather than rewritten, because any rewriting scheme can make two different
//! files collide on one key: S3 keys are UTF-8, so names with invalid UTF-8 are refused, and so
//! are control characters (newlines in keys break log lines and many S3 tools), `.`/`..`
//! segments, absolute paths and keys longer than S3's 1,024-byte limit. Percent-encoding for the
//! request URL happens in the S3 client, not here.
//!
//! Must not break: the mapping is injective (two different paths never get one key); a name that
//! cannot be mapped is refused, never rewritten.

use std::path::{Component, Path};

/// S3's limit on key length, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Why a name cannot be carried across as a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the path is absolute")]
    Absolute,
    #[error("the path has a '.' or '..' segment")]
    DotSegment,
    #[error("the name is not valid UTF-8")]
    NotUtf8,
    #[error("the name contains a control character")]
    ControlChar,
    #[error("the key would be {0} bytes, more than S3's 1024")]
    TooLong(usize),
    #[error("the path is empty")]
    Empty,
    #[error("the key has an empty segment ('//', or a leading or trailing '/')")]
    EmptySegment,
    /// The key would fall under a prefix ha-edge writes itself (the receipt batches).
    #[error("the key {0:?} would fall under {1:?}, where ha-edge keeps its receipt batches")]
    Reserved(String, String),
    /// The key template could not be expanded for this file.
    #[error("key_template: {0}")]
    Template(String),
}

/// The key of a file: `prefix` + its `key_template` expansion (else its relative path), held
/// to the same rules as any key.
pub fn key_of(
    prefix: &str,
    template: Option<&crate::phi::Template>,
    input: &crate::phi::KeyInput<'_>,
) -> Result<String, KeyError> {
    match template {
        None => object_key(prefix, input.rel),
        Some(t) => {
            let rest = t.expand(input).map_err(KeyError::Template)?;
            object_key(prefix, Path::new(&rest))
        }
    }
}

/// `key`, unless it falls under `reserved` (the receipt batches' prefix, when set).
pub fn unreserved(key: String, reserved: Option<&str>) -> Result<String, KeyError> {
    match reserved {
        Some(r) if key.starts_with(r) => Err(KeyError::Reserved(key, r.to_string())),
        _ => Ok(key),
    }
}

/// A key prefix that authorizes whole path segments: it always ends in '/', so `fhir/dkfz/`
/// covers `fhir/dkfz/x` and never `fhir/dkfz-other/x` or `fhir/dkfzx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// Parses a configured prefix; a missing trailing '/' is added (it names a folder either
    /// way). Refused: empty (every key), a leading '/', empty, `.` or `..` segments.
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let trimmed = s.strip_suffix('/').unwrap_or(s);
        if trimmed.is_empty() {
            return Err("must not be empty: it would authorize every key (name the folder, e.g. \"fhir/dkfz/\")".into());
        }
        if trimmed.starts_with('/') {
            return Err("must not start with '/'".into());
        }
        for seg in trimmed.split('/') {
            match seg {
                "" => return Err("must not have an empty segment ('//')".into()),
                "." | ".." => return Err("must not have '.' or '..' segments".into()),
                s if s.chars().any(char::is_control) => {
                    return Err("must not contain control characters".into())
                }
                _ => {}
            }
        }
        Ok(Prefix(format!("{trimmed}/")))
    }

    /// Whether `key` lies under this prefix (by segments: the prefix ends in '/').
    pub fn covers(&self, key: &str) -> bool {
        key.starts_with(&self.0)
    }

    /// Whether one prefix lies under the other (or they are equal).
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.covers(&other.0) || other.covers(&self.0)
    }

    /// The prefix, ending in '/' (or empty).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Prefix {
    /// The prefix as configured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The destination key for a bucket source's object, from the part of its key below the source
/// prefix. Keys are split on '/' exactly as written: an empty, `.` or `..` segment is refused
/// rather than normalised, so two source keys can never land on one destination key.
pub fn bucket_key(prefix: &str, rest: &str) -> Result<String, KeyError> {
    if rest.is_empty() {
        return Err(KeyError::Empty);
    }
    for seg in rest.split('/') {
        match seg {
            "" => return Err(KeyError::EmptySegment),
            "." | ".." => return Err(KeyError::DotSegment),
            s if s.chars().any(char::is_control) => return Err(KeyError::ControlChar),
            _ => {}
        }
    }
    let key = format!("{prefix}{rest}");
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(key.len()));
    }
    Ok(key)
}

/// The object key for `rel` (relative to the source root) under `prefix`.
pub fn object_key(prefix: &str, rel: &Path) -> Result<String, KeyError> {
    let mut key = String::with_capacity(prefix.len() + rel.as_os_str().len());
    key.push_str(prefix);
    let mut first = true;
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                let name = name.to_str().ok_or(KeyError::NotUtf8)?;
                if name.chars().any(char::is_control) {
                    return Err(KeyError::ControlChar);
                }
                if !first {
                    key.push('/');
                }
                key.push_str(name);
                first = false;
            }
            Component::CurDir | Component::ParentDir => return Err(KeyError::DotSegment),
            Component::RootDir | Component::Prefix(_) => return Err(KeyError::Absolute),
        }
    }
    if first {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(key.len()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    /// Ordinary names map to themselves under the prefix.
    #[test]
    fn ordinary_paths_keep_their_names() {
        assert_eq!(
            object_key("fhir/", Path::new("2026/Patient.ndjson")).unwrap(),
            "fhir/2026/Patient.ndjson"
        );
        assert_eq!(
            object_key("", Path::new("a b+c%d.ndjson")).unwrap(),
            "a b+c%d.ndjson"
        );
        assert_eq!(
            object_key("p/", Path::new("ümlaut/日本.dcm")).unwrap(),
            "p/ümlaut/日本.dcm"
        );
    }

    /// Control characters, invalid UTF-8, `.`/`..`, absolute paths and over-long keys are refused,
    /// never rewritten.
    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(
            object_key("", Path::new("../etc/passwd")),
            Err(KeyError::DotSegment)
        );
        assert_eq!(
            object_key("", Path::new("a/../../b")),
            Err(KeyError::DotSegment)
        );
        assert_eq!(
            object_key("", Path::new("/etc/passwd")),
            Err(KeyError::Absolute)
        );
        assert_eq!(
            object_key("", Path::new("a\nb")),
            Err(KeyError::ControlChar)
        );
        assert_eq!(object_key("", Path::new("")), Err(KeyError::Empty));
        let bad = Path::new(OsStr::from_bytes(b"caf\xe9.txt"));
        assert_eq!(object_key("", bad), Err(KeyError::NotUtf8));
        let long = "x".repeat(1025);
        assert_eq!(
            object_key("", Path::new(&long)),
            Err(KeyError::TooLong(1025))
        );
    }

    /// A bucket source's key maps exactly, or is refused when it has an empty, `.` or `..`
    /// segment.
    #[test]
    fn bucket_keys_map_exactly_or_not_at_all() {
        assert_eq!(
            bucket_key("onprem/", "2026/Patient.ndjson").unwrap(),
            "onprem/2026/Patient.ndjson"
        );
        assert_eq!(bucket_key("", "a b+%.dcm").unwrap(), "a b+%.dcm");
        // Path-style normalisation would merge these with "a/b": refused instead.
        assert_eq!(bucket_key("", "a//b"), Err(KeyError::EmptySegment));
        assert_eq!(bucket_key("", "a/./b"), Err(KeyError::DotSegment));
        assert_eq!(bucket_key("", "/a"), Err(KeyError::EmptySegment));
        assert_eq!(bucket_key("", "../x"), Err(KeyError::DotSegment));
        assert_eq!(bucket_key("", "a\rb"), Err(KeyError::ControlChar));
        assert_eq!(bucket_key("", ""), Err(KeyError::Empty));
        assert_eq!(
            bucket_key("p/", &"x".repeat(1023)),
            Err(KeyError::TooLong(1025))
        );
    }

    /// A leading dash is an ordinary character in a key.
    #[test]
    fn leading_dash_is_just_a_name() {
        assert_eq!(object_key("", Path::new("-rf")).unwrap(), "-rf");
    }
}

//! Identifiers that need not leave the box: key templates with pseudonyms, and log lines that
//! name keys instead of source paths.
//!
//! # Design
//! - A `Template` (`key_template = "{source}/{date:%Y/%m/%d}/{hmac:dir}/{name}"`) is parsed and
//!   checked once with the config: it must not be able to map two files to one key. It expands
//!   per file from the relative path, the source's name, the discovery date (UTC) and, for
//!   `{hmac:…}`, the site's pseudonymisation key.
//! - The pseudonymisation key comes from the credentials (`pseudonym_key` in
//!   `$CREDENTIALS_DIRECTORY`, or `[agent] pseudonym_key_file`), never from the TOML, and is
//!   never printed. `{hmac:X}` is HMAC-SHA256(key, X), the first 16 bytes in hex (128 bits).
//! - The mapping back (key → source path) exists only in the local journal: `ha-edge lookup`.
//! - `log_paths = "keys"` (process-wide, set once at start): `shown` renders a source path as
//!   `(withheld)`, so log lines, journaled errors and `status` carry the destination key only.
//!
//! Must not break: with `log_paths = "keys"`, no code path formats a source path into output
//! except `ha-edge receipts` and `ha-edge lookup` (on-box tools, by design).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static KEYS_ONLY: AtomicBool = AtomicBool::new(false);
static PSEUDONYM_KEY: OnceLock<ring::hmac::Key> = OnceLock::new();

/// `log_paths = "keys"` for this process.
pub fn set_keys_only(on: bool) {
    KEYS_ONLY.store(on, Ordering::Relaxed);
}

/// Whether source paths are withheld from output.
pub fn keys_only() -> bool {
    KEYS_ONLY.load(Ordering::Relaxed)
}

/// A source path as output may show it.
pub struct Shown<'a>(&'a Path);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(f, self.0, keys_only())
    }
}

fn render(f: &mut fmt::Formatter<'_>, p: &Path, keys_only: bool) -> fmt::Result {
    if keys_only {
        f.write_str("(withheld)")
    } else {
        write!(f, "{}", p.display())
    }
}

/// `p` for a log line, an error or `status`: itself, or `(withheld)` with `log_paths = "keys"`.
pub fn shown(p: &Path) -> Shown<'_> {
    Shown(p)
}

/// Installs the site's pseudonymisation key (once per process; later calls keep the first).
pub fn set_pseudonym_key(bytes: &[u8]) {
    let _ = PSEUDONYM_KEY.set(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes));
}

/// Sets this process up for `config`: `log_paths`, and the pseudonymisation key when a key
/// template uses `{hmac:…}` (read from the credentials; never logged).
pub fn install(config: &crate::config::Config) -> Result<(), String> {
    set_keys_only(config.agent.keys_only);
    let hmac = config
        .sources
        .iter()
        .any(|s| s.key_template.as_ref().is_some_and(Template::uses_hmac));
    if hmac {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
        let key = read_pseudonym_key(creds.as_deref(), config.agent.pseudonym_key_file.as_deref())?;
        set_pseudonym_key(&key);
    }
    Ok(())
}

/// Reads the pseudonymisation key: `pseudonym_key` in `$CREDENTIALS_DIRECTORY` first, else
/// `file`. At least 16 bytes (a trailing newline is not part of it).
pub fn read_pseudonym_key(
    credentials_dir: Option<&Path>,
    file: Option<&Path>,
) -> Result<Vec<u8>, String> {
    let path = match (credentials_dir.map(|d| d.join("pseudonym_key")), file) {
        (Some(p), _) if p.exists() => p,
        (_, Some(f)) => f.to_path_buf(),
        (Some(p), None) => p,
        (None, None) => {
            return Err("no pseudonymisation key: put it in the credentials directory as pseudonym_key (systemd LoadCredential=pseudonym_key:...) or set [agent] pseudonym_key_file".into())
        }
    };
    let mut bytes =
        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < 16 {
        return Err(format!(
            "{} holds {} bytes; a pseudonymisation key needs at least 16 (e.g. head -c 32 /dev/urandom | base64)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// A path component a placeholder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The relative path.
    Path,
    /// Its directory (empty in the root).
    Dir,
    /// Its file name.
    Name,
    /// The name without its last extension.
    Stem,
    /// The last extension, without the dot.
    Ext,
}

impl Component {
    fn parse(s: &str) -> Option<Component> {
        Some(match s {
            "path" => Component::Path,
            "dir" => Component::Dir,
            "name" => Component::Name,
            "stem" => Component::Stem,
            "ext" => Component::Ext,
            _ => return None,
        })
    }

    fn of(self, rel: &Path) -> String {
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s.to_string(), e.to_string()),
            _ => (name.to_string(), String::new()),
        };
        match self {
            Component::Path => rel.to_string_lossy().into_owned(),
            Component::Dir => rel
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Component::Name => name.into_owned(),
            Component::Stem => stem,
            Component::Ext => ext,
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Plain(Component),
    Hmac(Component),
    Source,
    Date(String),
    Sha256,
}

/// A parsed `key_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// What one file's key is made of.
pub struct KeyInput<'a> {
    pub source: &'a str,
    pub rel: &'a Path,
    /// When it was discovered (its `{date:…}`, in UTC).
    pub discovered: jiff::Timestamp,
    /// The content's SHA-256 (`{sha256}`), when the template needs it.
    pub sha256: Option<[u8; 32]>,
}

impl Template {
    /// Parses and checks a template: known placeholders only, and no two files on one key.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("unclosed '{{' in {s:?}"));
            };
            let inner = &rest[open + 1..open + close];
            let part = match inner.split_once(':') {
                None if inner == "source" => Part::Source,
                None if inner == "sha256" => Part::Sha256,
                None => Part::Plain(Component::parse(inner).ok_or_else(|| unknown(inner))?),
                Some(("hmac", c)) => Part::Hmac(Component::parse(c).ok_or_else(|| unknown(inner))?),
                Some(("date", f)) => {
                    jiff::fmt::strtime::format(f, jiff::Timestamp::UNIX_EPOCH)
                        .map_err(|e| format!("{{date:{f}}}: {e}"))?;
                    if f.contains("..") {
                        return Err(format!("{{date:{f}}} must not make '..'"));
                    }
                    Part::Date(f.to_string())
                }
                Some(_) => return Err(unknown(inner)),
            };
            parts.push(part);
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if s.contains('}')
            && parts
                .iter()
                .any(|p| matches!(p, Part::Lit(l) if l.contains('}')))
        {
            return Err(format!("unmatched '}}' in {s:?}"));
        }
        let t = Template { parts };
        t.check_injective()?;
        Ok(t)
    }

    /// Whether `{hmac:…}` is used (the pseudonymisation key is then required).
    pub fn uses_hmac(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Hmac(_)))
    }

    /// Whether `{sha256}` is used (the content must be hashed before its key is known).
    pub fn uses_sha256(&self) -> bool {
        self.parts.contains(&Part::Sha256)
    }

    /// The literal text before the first placeholder other than `{source}` (with `source`
    /// put in): the part of the key space every key of this source shares.
    pub fn fixed_prefix(&self, source: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Source => out.push_str(source),
                _ => break,
            }
        }
        out
    }

    /// Refuses a template under which two files can share a key.
    fn check_injective(&self) -> Result<(), String> {
        use Component::*;
        let has = |c: Component| {
            self.parts
                .iter()
                .any(|p| matches!(p, Part::Plain(x) | Part::Hmac(x) if *x == c))
        };
        if has(Path) || self.uses_sha256() {
            return Ok(());
        }
        let name_ok = has(Name) || (has(Stem) && has(Ext));
        let pos = |cs: &[Component]| {
            self.parts
                .iter()
                .position(|p| matches!(p, Part::Plain(x) | Part::Hmac(x) if cs.contains(x)))
        };
        let dir_at = self
            .parts
            .iter()
            .rposition(|p| matches!(p, Part::Plain(Dir) | Part::Hmac(Dir)));
        let name_at = pos(&[Name, Stem, Ext]);
        let separated = match (dir_at, name_at) {
            (Some(d), Some(n)) if d < n => self.parts[d + 1..n]
                .iter()
                .any(|p| matches!(p, Part::Lit(l) if l.contains('/'))),
            _ => false,
        };
        if name_ok && separated {
            return Ok(());
        }
        Err("can map two files to one key: it needs {path}, {hmac:path} or {sha256}, or a directory ({dir} or {hmac:dir}) then '/' then the name ({name}, {hmac:name}, or {stem} and {ext}); e.g. \"{source}/{hmac:dir}/{name}\"".into())
    }

    /// The key part of one file (before the destination's and the source's prefix). Empty
    /// segments (a file in the root has an empty `{dir}`) collapse.
    pub fn expand(&self, k: &KeyInput<'_>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Source => out.push_str(k.source),
                Part::Plain(c) => out.push_str(&c.of(k.rel)),
                Part::Hmac(c) => out.push_str(&hmac_hex(c.of(k.rel).as_bytes())?),
                Part::Date(f) => out.push_str(
                    &jiff::fmt::strtime::format(f, k.discovered).map_err(|e| e.to_string())?,
                ),
                Part::Sha256 => match k.sha256 {
                    Some(h) => out.push_str(&hex::encode(h)),
                    None => return Err("{sha256} needs the content's hash".into()),
                },
            }
        }
        let collapsed: Vec<&str> = out.split('/').filter(|s| !s.is_empty()).collect();
        Ok(collapsed.join("/"))
    }
}

fn unknown(p: &str) -> String {
    format!("unknown placeholder {{{p}}} (known: path, dir, name, stem, ext, source, date:FORMAT, hmac:COMPONENT, sha256)")
}

/// HMAC-SHA256 of `data` under the site's key: the first 16 bytes, in hex.
fn hmac_hex(data: &[u8]) -> Result<String, String> {
    let key = PSEUDONYM_KEY
        .get()
        .ok_or("no pseudonymisation key loaded for {hmac:…}")?;
    let tag = ring::hmac::sign(key, data);
    Ok(hex::encode(&tag.as_ref()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(rel: &'a str) -> KeyInput<'a> {
        KeyInput {
            source: "pacs",
            rel: Path::new(rel),
            discovered: "2026-12-01T10:00:00Z".parse().unwrap(),
            sha256: Some([0xab; 32]),
        }
    }

    /// Every placeholder expands as documented; an empty {dir} collapses.
    #[test]
    fn placeholders_expand() {
        set_pseudonym_key(b"0123456789abcdef-test-key");
        let t = Template::parse("{source}/{date:%Y/%m/%d}/{dir}/{stem}.{ext}").unwrap();
        assert_eq!(
            t.expand(&input("MUSTER/a.dcm")).unwrap(),
            "pacs/2026/12/01/MUSTER/a.dcm"
        );
        assert_eq!(t.expand(&input("a.dcm")).unwrap(), "pacs/2026/12/01/a.dcm");
        let t = Template::parse("{source}/{hmac:dir}/{name}").unwrap();
        let k = t.expand(&input("MUSTER/series1/a.dcm")).unwrap();
        assert!(!k.contains("MUSTER"), "{k}");
        let hex = k.split('/').nth(1).unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        // The same directory gets the same pseudonym; another one another.
        assert_eq!(
            k.split('/').nth(1),
            t.expand(&input("MUSTER/series1/b.dcm"))
                .unwrap()
                .split('/')
                .nth(1)
        );
        assert_ne!(
            k.split('/').nth(1),
            t.expand(&input("OTHER/series1/a.dcm"))
                .unwrap()
                .split('/')
                .nth(1)
        );
        let t = Template::parse("{sha256}").unwrap();
        assert_eq!(t.expand(&input("x")).unwrap(), "ab".repeat(32));
        assert_eq!(
            Template::parse("{path}")
                .unwrap()
                .expand(&input("a/b/c"))
                .unwrap(),
            "a/b/c"
        );
    }

    /// Templates that can put two files on one key are refused, with the way out.
    #[test]
    fn templates_that_collide_are_refused() {
        for bad in [
            "{source}/{name}",
            "{dir}",
            "{hmac:dir}{name}",
            "{name}/{dir}",
            "{date:%Y}/{stem}",
            "{dir}/{stem}",
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains("two files"), "{bad}: {e}");
        }
        for good in [
            "{path}",
            "{hmac:path}",
            "{sha256}",
            "x/{dir}/{name}",
            "{hmac:dir}/{hmac:name}",
            "{dir}/{stem}.{ext}",
        ] {
            Template::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        assert!(Template::parse("{nope}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(Template::parse("{path").unwrap_err().contains("unclosed"));
    }

    /// Distinct paths never share a key under an accepted template (a sample of tricky names).
    #[test]
    fn accepted_templates_keep_paths_apart() {
        set_pseudonym_key(b"0123456789abcdef-test-key");
        let paths = [
            "a/bc",
            "ab/c",
            "a/b.c",
            "a.b/c",
            "a/b/c",
            "a/b",
            "b",
            "a/.c",
            "x/y.tar.gz",
            "x/y.tar",
        ];
        for t in [
            "{dir}/{name}",
            "{hmac:dir}/{name}",
            "{dir}/{stem}.{ext}",
            "{path}",
        ] {
            let t = Template::parse(t).unwrap();
            let keys: std::collections::HashSet<String> =
                paths.iter().map(|p| t.expand(&input(p)).unwrap()).collect();
            assert_eq!(keys.len(), paths.len(), "{t:?}");
        }
    }

    #[test]
    fn withheld_paths() {
        struct R(bool);
        impl fmt::Display for R {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                render(f, Path::new("MUSTER/a.dcm"), self.0)
            }
        }
        assert_eq!(R(true).to_string(), "(withheld)");
        assert_eq!(R(false).to_string(), "MUSTER/a.dcm");
    }
}

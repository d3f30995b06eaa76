//! Globs on relative paths (`include`, `exclude`, `validate` rules), with the `glob` crate's
//! patterns: `*` and `?` match any characters (`/` included, as globset did), `**` any number
//! of directories, `[...]` classes. No regex engine behind them: globset's cost the static binary
//! about 400 KiB. Brace alternation (`{a,b}`) is refused with a clear message rather than
//! matched literally (list the patterns separately).

use std::path::Path;

const OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: false,
    require_literal_leading_dot: false,
};

/// One pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(glob::Pattern);

impl Glob {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn new(s: &str) -> Result<Glob, String> {
        if s.contains('{') || s.contains('}') {
            return Err(
                "brace alternation ({a,b}) is not supported: list each pattern separately".into(),
            );
        }
        glob::Pattern::new(s)
            .map(Glob)
            .map_err(|e| e.msg.to_string())
    }

    /// Whether a relative path matches.
    pub fn is_match(&self, p: impl AsRef<Path>) -> bool {
        self.0.matches_path_with(p.as_ref(), OPTIONS)
    }
}

/// Several patterns: a path matches if any does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobSet(Vec<Glob>);

impl GlobSet {
    /// No pattern: matches nothing.
    pub fn empty() -> GlobSet {
        GlobSet(Vec::new())
    }

    /// A set of these patterns.
    pub fn new(globs: Vec<Glob>) -> GlobSet {
        GlobSet(globs)
    }

    /// Whether any pattern matches the relative path.
    pub fn is_match(&self, p: impl AsRef<Path>) -> bool {
        let p = p.as_ref();
        self.0.iter().any(|g| g.is_match(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns of the example config and the tests mean what they meant with globset.
    #[test]
    fn patterns_match_as_documented() {
        let g = |s: &str| Glob::new(s).unwrap();
        let m = |s: &str, p: &str| g(s).is_match(p);
        assert!(m("**/*.ndjson", "a.ndjson"));
        assert!(m("**/*.ndjson", "x/y/a.ndjson"));
        assert!(!m("**/*.ndjson", "x/a.json"));
        assert!(m("**/.*", ".hidden"));
        assert!(m("**/.*", "d/.hidden"));
        assert!(!m("**/.*", "d/visible"));
        assert!(m("**/*.tmp", "d/e/a.tmp"));
        // `*` crosses directories, as globset's default did.
        assert!(m("*.tmp", "a.tmp"));
        assert!(m("*.tmp", "d/a.tmp"));
        assert!(m("exports/*", "exports/a/b"));
        assert!(m("Patient?.ndjson", "Patient1.ndjson"));
        assert!(m("[AB]*.dcm", "B1.dcm"));
        assert!(!m("[AB]*.dcm", "C1.dcm"));
        assert!(Glob::new("[unclosed").is_err());
        assert!(Glob::new("{a,b}.ndjson").unwrap_err().contains("brace"));
        let set = GlobSet::new(vec![g("*.tmp"), g("**/.*")]);
        assert!(set.is_match("x/.y") && set.is_match("a.tmp") && !set.is_match("a.ndjson"));
        assert!(!GlobSet::empty().is_match("a"));
    }
}

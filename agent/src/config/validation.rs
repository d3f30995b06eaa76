//! A source's `validate`, `max_line`, `on_invalid` and `quarantine_dir` keys.
//!
//! `validate` is one check for every file (`"fhir-ndjson"`, `"dicom"`, `"none"`) or a list of
//! `{ include = "glob", as = "check" }`, the first match deciding (files matching none are not
//! checked).

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::Validator;
use crate::validate::{Kind, OnInvalid, Rules};

/// The raw keys.
pub(super) struct RawValidation {
    pub validate: Option<Spanned<toml::Value>>,
    pub max_line: Option<Spanned<toml::Value>>,
    pub on_invalid: Option<Spanned<String>>,
    pub quarantine_dir: Option<Spanned<String>>,
}

const KINDS: &str = "\"fhir-ndjson\", \"dicom\" or \"none\"";

impl Validator<'_> {
    /// The validation rules of source `i` (rooted at `path` for a directory source).
    pub(super) fn validation(
        &mut self,
        i: usize,
        raw: RawValidation,
        path: Option<&Path>,
        is_bucket: bool,
    ) -> Rules {
        let at = |k: &str| format!("source[{i}].{k}");
        let mut rules = Rules::default();
        if let Some(v) = raw.validate {
            let sp = v.span();
            match v.into_inner() {
                toml::Value::String(s) => match Kind::parse(&s) {
                    Some(k) => rules.rules.push((None, k)),
                    None => self.problem(
                        sp,
                        &at("validate"),
                        format!("must be {KINDS} (or a list of {{ include = \"**/*.ndjson\", as = \"fhir-ndjson\" }}), got {s:?}"),
                    ),
                },
                toml::Value::Array(list) => {
                    for (j, item) in list.iter().enumerate() {
                        let key = at(&format!("validate[{j}]"));
                        let parsed = item.as_table().and_then(|t| {
                            let inc = t.get("include")?.as_str()?;
                            let kind = Kind::parse(t.get("as")?.as_str()?)?;
                            (t.len() == 2).then_some((inc.to_string(), kind))
                        });
                        match parsed {
                            Some((inc, kind)) => match crate::glob::Glob::new(&inc) {
                                Ok(g) => rules.rules.push((Some(g), kind)),
                                Err(e) => self.problem(
                                    sp.clone(),
                                    &key,
                                    format!("bad glob {inc:?}: {e}"),
                                ),
                            },
                            None => self.problem(
                                sp.clone(),
                                &key,
                                format!("must be {{ include = \"glob\", as = {KINDS} }}, got {item}"),
                            ),
                        }
                    }
                }
                other => self.problem(sp, &at("validate"), format!("must be {KINDS} or a list of rules, got {other}")),
            }
        }
        rules.max_line =
            usize::try_from(self.size(raw.max_line, &at("max_line"), 1024, 1 << 30, 16 << 20))
                .unwrap_or(usize::MAX);
        if let Some(o) = raw.on_invalid {
            rules.on_invalid = match o.get_ref().as_str() {
                "quarantine" => OnInvalid::Quarantine,
                "upload-flagged" => OnInvalid::UploadFlagged,
                other => {
                    self.problem(
                        o.span(),
                        &at("on_invalid"),
                        format!("must be \"quarantine\" or \"upload-flagged\", got {other:?}"),
                    );
                    OnInvalid::Quarantine
                }
            };
        }
        if let Some(q) = raw.quarantine_dir {
            let dir = PathBuf::from(q.get_ref());
            if is_bucket {
                self.problem(
                    q.span(),
                    &at("quarantine_dir"),
                    "only applies to type = \"fs\" sources (a bucket object that fails is left where it is)",
                );
            } else if !dir.is_absolute() {
                self.problem(q.span(), &at("quarantine_dir"), "must be an absolute path");
            } else if path.is_some_and(|p| dir.starts_with(p)) {
                self.problem(
                    q.span(),
                    &at("quarantine_dir"),
                    "must be outside the source path (a quarantined file would be found again)",
                );
            } else {
                rules.quarantine_dir = Some(dir);
            }
        }
        rules
    }
}

//! Where the S3 keys come from. Never from the TOML, never into a log line.
//!
//! If the config names `profile` or `credentials_file`, that shared credentials file is used and
//! nothing else. Otherwise the first of these that is present wins:
//! 1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) in the environment;
//! 2. files `aws_access_key_id`, `aws_secret_access_key` (+ `aws_session_token`) in
//!    `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`). The packaged unit loads the whole
//!    directory `/etc/ha-edge/credentials` under the ID `ha-edge`, which systemd names
//!    `ha-edge_aws_access_key_id` and so on; both spellings are accepted;
//! 3. the AWS shared credentials file (`$AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`),
//!    profile `$AWS_PROFILE` or `default`, if it exists;
//! 4. temporary keys, fetched and renewed before they expire (`refresh.rs`): web identity
//!    (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, IAM roles for service accounts), then a
//!    container credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, EKS Pod Identity).
//!
//! Must not break: no key or token ever reaches a log line or an error message (only the access
//! key ID and where it came from).

use std::fmt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::refresh::{self, Refreshing};
use crate::config::S3Destination;

/// A key pair (and session token), with where it came from; its Debug never shows the secret.
/// Temporary keys (`refresh` set) are fetched when first used and renewed before they expire.
#[derive(Clone)]
pub struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    /// Where they came from, for logs ("environment", "systemd credentials", "profile x in F").
    pub origin: String,
    refresh: Option<Arc<Refreshing>>,
}

impl fmt::Debug for Credentials {
    /// The access key ID and origin only: never the secret or the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("origin", &self.origin)
            .finish()
    }
}

impl Credentials {
    /// Credentials given directly (tests, the relay's store).
    pub fn new(ak: &str, sk: &str, token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: ak.to_string(),
            secret_access_key: sk.to_string(),
            session_token: token.map(str::to_string),
            origin: "given".into(),
            refresh: None,
        }
    }

    /// Temporary keys from `fetch`, fetched at first use.
    pub fn refreshing(fetch: refresh::Fetch) -> Result<Credentials, CredentialsError> {
        let r = Refreshing::new(fetch)?;
        Ok(Credentials {
            access_key_id: "(temporary, fetched at first use)".into(),
            secret_access_key: String::new(),
            session_token: None,
            origin: r.origin(),
            refresh: Some(Arc::new(r)),
        })
    }

    /// The keys to sign with now (temporary ones fetched or renewed as needed).
    pub async fn current(&self) -> Result<Credentials, CredentialsError> {
        match &self.refresh {
            None => Ok(self.clone()),
            Some(r) => r.current().await,
        }
    }

    /// The access key ID (not secret: it is logged with where it came from).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// For aws-sigv4.
    pub(super) fn to_aws(&self) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            self.session_token.clone(),
            None,
            "ha-edge",
        )
    }
}

/// Why no credentials could be found or read; the message names the place, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} is set but {1} is not")]
    HalfSet(&'static str, &'static str),
    #[error("cannot read credential file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credential file {0} is empty")]
    Empty(PathBuf),
    #[error("profile {profile:?} not found in {file} (or it lacks aws_access_key_id / aws_secret_access_key)")]
    NoProfile { profile: String, file: PathBuf },
    #[error("cannot get temporary credentials from {origin}: {detail}")]
    Fetch { origin: String, detail: String },
    #[error("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, provide aws_access_key_id and aws_secret_access_key via systemd LoadCredential=, use an AWS shared credentials file, or web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)")]
    NotFound,
    #[error("no keys for the source bucket: set ONPREM_S3_ACCESS_KEY and ONPREM_S3_SECRET_KEY, provide onprem_s3_access_key and onprem_s3_secret_key via systemd LoadCredential=, or name a profile / credentials_file in the source")]
    SourceNotFound,
}

/// The names one credential chain looks under: the destination's (AWS_*) or a bucket source's
/// (ONPREM_S3_*). Both chains have the same order; only the names and the last fallback differ.
struct Chain {
    env_key: &'static str,
    env_secret: &'static str,
    env_token: Option<&'static str>,
    env_origin: &'static str,
    file_key: &'static str,
    file_secret: &'static str,
    file_token: Option<&'static str>,
    /// Fall back to `~/.aws/credentials` (profile `$AWS_PROFILE`) when nothing else is set.
    default_shared_file: bool,
    not_found: fn() -> CredentialsError,
}

/// The destination's places (`AWS_*` variables, `$CREDENTIALS_DIRECTORY`).
const DESTINATION: Chain = Chain {
    env_key: "AWS_ACCESS_KEY_ID",
    env_secret: "AWS_SECRET_ACCESS_KEY",
    env_token: Some("AWS_SESSION_TOKEN"),
    env_origin: "environment",
    file_key: "aws_access_key_id",
    file_secret: "aws_secret_access_key",
    file_token: Some("aws_session_token"),
    default_shared_file: true,
    not_found: || CredentialsError::NotFound,
};

/// A bucket source's places (`ONPREM_S3_*` variables, `onprem_s3_*` credential files), so they
/// never mix with the destination's.
const SOURCE: Chain = Chain {
    env_key: "ONPREM_S3_ACCESS_KEY",
    env_secret: "ONPREM_S3_SECRET_KEY",
    env_token: None,
    env_origin: "environment (ONPREM_S3_*)",
    file_key: "onprem_s3_access_key",
    file_secret: "onprem_s3_secret_key",
    file_token: None,
    default_shared_file: false,
    not_found: || CredentialsError::SourceNotFound,
};

/// A credential file in `dir` under its own name, or as systemd names it when the unit loads
/// the whole credentials directory under the ID `ha-edge` (`ha-edge_<name>`).
pub fn credential_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [name.to_string(), format!("ha-edge_{name}")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
}

/// Resolves the keys of a bucket source (the on-premise MinIO) from the process environment:
/// the shared credentials file if the source names `profile` or `credentials_file`; otherwise
/// `ONPREM_S3_ACCESS_KEY` + `ONPREM_S3_SECRET_KEY`; otherwise files `onprem_s3_access_key` and
/// `onprem_s3_secret_key` (or `ha-edge_`-prefixed) in `$CREDENTIALS_DIRECTORY`. The AWS_*
/// variables are the destination's and are never used for a source.
pub fn resolve_source(conn: &S3Destination) -> Result<Credentials, CredentialsError> {
    resolve_source_with(conn, &|k| std::env::var(k).ok())
}

/// A bucket source's credentials, with `env` standing in for the process environment (tests).
pub fn resolve_source_with(
    conn: &S3Destination,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, CredentialsError> {
    resolve_chain(conn, env, &SOURCE)
}

/// Resolves credentials for a destination from the process environment.
pub fn resolve(dest: &S3Destination) -> Result<Credentials, CredentialsError> {
    resolve_with(dest, &|k| std::env::var(k).ok())
}

/// `env` is injected so the chain can be tested without touching the process environment.
pub fn resolve_with(
    dest: &S3Destination,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials, CredentialsError> {
    resolve_chain(dest, env, &DESTINATION)
}

/// The first place of `chain` that has credentials.
fn resolve_chain(
    dest: &S3Destination,
    env: &dyn Fn(&str) -> Option<String>,
    chain: &Chain,
) -> Result<Credentials, CredentialsError> {
    let shared_file = || {
        dest.credentials_file
            .clone()
            .or_else(|| env("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from))
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))
    };
    if dest.profile.is_some() || dest.credentials_file.is_some() {
        let profile = dest.profile.clone().unwrap_or_else(|| "default".into());
        let file = shared_file().ok_or_else(chain.not_found)?;
        return from_shared_file(&file, &profile);
    }
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
    match (non_empty(chain.env_key), non_empty(chain.env_secret)) {
        (Some(ak), Some(sk)) => {
            let token = chain.env_token.and_then(non_empty);
            let mut c = Credentials::new(&ak, &sk, token.as_deref());
            c.origin = chain.env_origin.into();
            return Ok(c);
        }
        (Some(_), None) => return Err(CredentialsError::HalfSet(chain.env_key, chain.env_secret)),
        (None, Some(_)) => return Err(CredentialsError::HalfSet(chain.env_secret, chain.env_key)),
        (None, None) => {}
    }
    if let Some(dir) = non_empty("CREDENTIALS_DIRECTORY") {
        let dir = PathBuf::from(dir);
        let (ak, sk) = (
            credential_file(&dir, chain.file_key),
            credential_file(&dir, chain.file_secret),
        );
        if ak.is_some() || sk.is_some() {
            let ak = read_secret(&ak.unwrap_or_else(|| dir.join(chain.file_key)))?;
            let sk = read_secret(&sk.unwrap_or_else(|| dir.join(chain.file_secret)))?;
            let token = match chain.file_token.and_then(|t| credential_file(&dir, t)) {
                Some(p) => Some(read_secret(&p)?),
                None => None,
            };
            let mut c = Credentials::new(&ak, &sk, token.as_deref());
            c.origin = format!("systemd credentials in {}", dir.display());
            return Ok(c);
        }
    }
    if chain.default_shared_file {
        if let Some(file) = shared_file() {
            if file.exists() {
                let profile = non_empty("AWS_PROFILE").unwrap_or_else(|| "default".into());
                return from_shared_file(&file, &profile);
            }
        }
        if let Some(fetch) = refresh::from_env(env, &dest.region)? {
            return Credentials::refreshing(fetch);
        }
    }
    Err((chain.not_found)())
}

/// One secret from a file (trimmed), refused if empty.
fn read_secret(path: &Path) -> Result<String, CredentialsError> {
    let s = std::fs::read_to_string(path).map_err(|source| CredentialsError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let s = s.trim();
    if s.is_empty() {
        return Err(CredentialsError::Empty(path.to_path_buf()));
    }
    Ok(s.to_string())
}

/// A profile of an AWS shared credentials file.
fn from_shared_file(file: &Path, profile: &str) -> Result<Credentials, CredentialsError> {
    let text = std::fs::read_to_string(file).map_err(|source| CredentialsError::Unreadable {
        path: file.to_path_buf(),
        source,
    })?;
    let values = ini_section(&text, profile);
    let get = |k: &str| values.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(ak), Some(sk)) => {
            let mut c = Credentials::new(ak, sk, get("aws_session_token"));
            c.origin = format!("profile {profile} in {}", file.display());
            Ok(c)
        }
        _ => Err(CredentialsError::NoProfile {
            profile: profile.to_string(),
            file: file.to_path_buf(),
        }),
    }
}

/// The `key = value` pairs of `[section]` in an INI-style AWS credentials file.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            inside =
                name == section || name.strip_prefix("profile ").map(str::trim) == Some(section);
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dest() -> S3Destination {
        S3Destination {
            checksum: crate::config::Checksum::Crc64Nvme,
            overwrite: crate::config::Overwrite::Own,
            object_meta: crate::config::MetaRules::default(),
            endpoint: "http://127.0.0.1:9000".parse().unwrap(),
            region: "eu-central-1".into(),
            bucket: "b".into(),
            prefix: String::new(),
            sse: None,
            path_style: true,
            profile: None,
            credentials_file: None,
            ca_file: None,
        }
    }

    /// A bucket source never picks up the destination's keys (nor the reverse).
    #[test]
    fn source_keys_never_come_from_the_destination_variables() {
        let d = dest();
        let aws_only = env_of(&[("AWS_ACCESS_KEY_ID", "A"), ("AWS_SECRET_ACCESS_KEY", "S")]);
        assert!(matches!(
            resolve_source_with(&d, &aws_only),
            Err(CredentialsError::SourceNotFound)
        ));
        let onprem = env_of(&[
            ("AWS_ACCESS_KEY_ID", "A"),
            ("AWS_SECRET_ACCESS_KEY", "S"),
            ("ONPREM_S3_ACCESS_KEY", "minio"),
            ("ONPREM_S3_SECRET_KEY", "minio-secret"),
        ]);
        let c = resolve_source_with(&d, &onprem).unwrap();
        assert_eq!(c.access_key_id(), "minio");
        let half = env_of(&[("ONPREM_S3_ACCESS_KEY", "minio")]);
        assert!(matches!(
            resolve_source_with(&d, &half),
            Err(CredentialsError::HalfSet("ONPREM_S3_ACCESS_KEY", _))
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ha-edge_onprem_s3_access_key"), "K\n").unwrap();
        std::fs::write(dir.path().join("ha-edge_onprem_s3_secret_key"), "S\n").unwrap();
        let d2 = dir.path().to_str().unwrap().to_string();
        let creds = env_of(&[("CREDENTIALS_DIRECTORY", &d2)]);
        assert_eq!(
            resolve_source_with(&d, &creds).unwrap().access_key_id(),
            "K"
        );
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    /// The environment wins over files when the config names neither.
    #[test]
    fn environment_first() {
        let c = resolve_with(
            &dest(),
            &env_of(&[("AWS_ACCESS_KEY_ID", "AK"), ("AWS_SECRET_ACCESS_KEY", "SK")]),
        )
        .unwrap();
        assert_eq!(c.access_key_id(), "AK");
        assert_eq!(c.origin, "environment");
        assert!(
            !format!("{c:?}").contains("SK\""),
            "secret must not be in Debug output"
        );
    }

    /// An access key without its secret is an error, not a silent fallback.
    #[test]
    fn half_set_environment_is_an_error() {
        let e = resolve_with(&dest(), &env_of(&[("AWS_ACCESS_KEY_ID", "AK")])).unwrap_err();
        assert!(matches!(e, CredentialsError::HalfSet(..)));
    }

    /// Keys from `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    #[test]
    fn systemd_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("aws_access_key_id"), "AK2\n").unwrap();
        std::fs::write(dir.path().join("aws_secret_access_key"), "SK2\n").unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let c = resolve_with(&dest(), &env_of(&[("CREDENTIALS_DIRECTORY", &d)])).unwrap();
        assert_eq!(c.access_key_id(), "AK2");
        assert_eq!(c.secret_access_key, "SK2");
        // One file missing: a clear error, not a silent fall-through.
        std::fs::remove_file(dir.path().join("aws_secret_access_key")).unwrap();
        let e = resolve_with(&dest(), &env_of(&[("CREDENTIALS_DIRECTORY", &d)])).unwrap_err();
        assert!(e.to_string().contains("aws_secret_access_key"), "{e}");
        // As the packaged unit loads them: LoadCredential=ha-edge:/etc/ha-edge/credentials
        std::fs::remove_file(dir.path().join("aws_access_key_id")).unwrap();
        std::fs::write(dir.path().join("ha-edge_aws_access_key_id"), "AK3").unwrap();
        std::fs::write(dir.path().join("ha-edge_aws_secret_access_key"), "SK3").unwrap();
        let c = resolve_with(&dest(), &env_of(&[("CREDENTIALS_DIRECTORY", &d)])).unwrap();
        assert_eq!(
            (c.access_key_id(), c.secret_access_key.as_str()),
            ("AK3", "SK3")
        );
    }

    /// A profile of a shared credentials file.
    #[test]
    fn shared_file_profile() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(
            &f,
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[edge]\naws_access_key_id=E\naws_secret_access_key=ES\naws_session_token = T\n",
        )
        .unwrap();
        let mut d = dest();
        d.credentials_file = Some(f.clone());
        d.profile = Some("edge".into());
        let c = resolve_with(
            &d,
            &env_of(&[
                ("AWS_ACCESS_KEY_ID", "ignored"),
                ("AWS_SECRET_ACCESS_KEY", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.access_key_id(), "E");
        assert_eq!(c.session_token.as_deref(), Some("T"));
        d.profile = Some("nope".into());
        assert!(matches!(
            resolve_with(&d, &env_of(&[])),
            Err(CredentialsError::NoProfile { .. })
        ));
        let f = f.to_str().unwrap().to_string();
        let c = resolve_with(&dest(), &env_of(&[("AWS_SHARED_CREDENTIALS_FILE", &f)])).unwrap();
        assert_eq!(c.access_key_id(), "D");
    }

    /// No credentials anywhere: `NotFound`, never an empty key.
    #[test]
    fn nothing_found() {
        assert!(matches!(
            resolve_with(&dest(), &env_of(&[])),
            Err(CredentialsError::NotFound)
        ));
    }
}

//! Temporary credentials that are fetched, cached and fetched again before they expire: IAM
//! roles for service accounts (STS `AssumeRoleWithWebIdentity` with the projected token in
//! `AWS_WEB_IDENTITY_TOKEN_FILE`, role `AWS_ROLE_ARN`), and the container credentials endpoint
//! of EKS Pod Identity and ECS (`AWS_CONTAINER_CREDENTIALS_FULL_URI` with the token in
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, or `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`).
//!
//! # Design
//! - One cache per process place (`Refreshing`), shared by every request of an S3 client. A
//!   request asks for the current keys (`current`); they are fetched again when less than a
//!   quarter of their lifetime (at most 5 minutes) is left, so no request is signed with keys
//!   about to expire. One fetch at a time (a mutex around the cache): concurrent requests wait
//!   for it rather than each asking STS.
//! - A failed fetch while the cached keys are still valid keeps them (and is logged once per
//!   fetch); with no valid keys, the request fails as a transport error (retried, then an
//!   outage), since STS or the endpoint being unreachable is not a bad key.
//! - The token files are read at every fetch: Kubernetes rotates them.
//! - An http full URI must name a loopback address or the ECS/EKS endpoint, as in the AWS SDKs
//!   (`allowed_full_uri`): the token goes in clear over http.
//!
//! Must not break: no token, key or session token reaches a log line or an error message, nor
//! goes in clear to another host.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::credentials::{Credentials, CredentialsError};

/// What is asked for new keys.
#[derive(Debug, Clone)]
pub enum Fetch {
    /// STS AssumeRoleWithWebIdentity at `endpoint` (unsigned: the token is the proof).
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        endpoint: String,
        duration: Option<u32>,
    },
    /// A container credentials endpoint (EKS Pod Identity, ECS), with its authorization.
    Container {
        uri: String,
        token_file: Option<PathBuf>,
        token: Option<String>,
    },
}

impl Fetch {
    /// Where the keys come from, for logs (no secret in it).
    pub fn origin(&self) -> String {
        match self {
            Fetch::WebIdentity {
                role_arn, endpoint, ..
            } => format!("web identity for role {role_arn} (STS {endpoint})"),
            Fetch::Container { uri, .. } => format!("container credentials endpoint {uri}"),
        }
    }
}

/// Keys fetched, and when they expire.
#[derive(Clone)]
struct Fresh {
    keys: Credentials,
    expires: SystemTime,
    fetched: SystemTime,
}

impl Fresh {
    /// Whether they should be fetched again at `now`: less than a quarter of their lifetime (at
    /// most 5 minutes) left.
    fn stale(&self, now: SystemTime) -> bool {
        let lifetime = self
            .expires
            .duration_since(self.fetched)
            .unwrap_or_default();
        let margin = (lifetime / 4).min(Duration::from_secs(300));
        now + margin >= self.expires
    }

    fn valid(&self, now: SystemTime) -> bool {
        now < self.expires
    }
}

/// The cache of one source of temporary keys.
pub struct Refreshing {
    fetch: Fetch,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Fresh>>,
    /// Fetches done (for the log).
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Refreshing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refreshing")
            .field("origin", &self.fetch.origin())
            .finish()
    }
}

impl Refreshing {
    /// A cache for `fetch`; `http` is the client it asks with.
    pub fn new(fetch: Fetch) -> Result<Refreshing, CredentialsError> {
        let tls = super::tls_config(None).map_err(|e| CredentialsError::Fetch {
            origin: fetch.origin(),
            detail: e,
        })?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .user_agent(concat!("ha-edge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CredentialsError::Fetch {
                origin: fetch.origin(),
                detail: e.to_string(),
            })?;
        Ok(Refreshing {
            fetch,
            http,
            cache: tokio::sync::Mutex::new(None),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Where the keys come from.
    pub fn origin(&self) -> String {
        self.fetch.origin()
    }

    /// The keys to sign with now: the cached ones, or new ones when they are near their expiry.
    pub async fn current(&self) -> Result<Credentials, CredentialsError> {
        let mut cache = self.cache.lock().await;
        let now = SystemTime::now();
        if let Some(f) = cache.as_ref().filter(|f| !f.stale(now)) {
            return Ok(f.keys.clone());
        }
        match self.get().await {
            Ok(fresh) => {
                let n = 1 + self
                    .fetches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let left = fresh
                    .expires
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::info!(origin = %self.origin(), access_key_id = %fresh.keys.access_key_id(), valid_for = %humantime::format_duration(Duration::from_secs(left.as_secs())), fetch = n, "temporary credentials fetched");
                let keys = fresh.keys.clone();
                *cache = Some(fresh);
                Ok(keys)
            }
            Err(e) => match cache.as_ref().filter(|f| f.valid(now)) {
                Some(f) => {
                    tracing::warn!(error = %e, "cannot renew the temporary credentials; using the current ones until they expire");
                    Ok(f.keys.clone())
                }
                None => Err(e),
            },
        }
    }

    /// One fetch.
    async fn get(&self) -> Result<Fresh, CredentialsError> {
        let fail = |detail: String| CredentialsError::Fetch {
            origin: self.fetch.origin(),
            detail,
        };
        let fetched = SystemTime::now();
        match &self.fetch {
            Fetch::WebIdentity {
                token_file,
                role_arn,
                session_name,
                endpoint,
                duration,
            } => {
                let token = std::fs::read_to_string(token_file)
                    .map_err(|source| CredentialsError::Unreadable {
                        path: token_file.clone(),
                        source,
                    })?
                    .trim()
                    .to_string();
                if token.is_empty() {
                    return Err(CredentialsError::Empty(token_file.clone()));
                }
                let mut form = vec![
                    ("Action", "AssumeRoleWithWebIdentity".to_string()),
                    ("Version", "2011-06-15".to_string()),
                    ("RoleArn", role_arn.clone()),
                    ("RoleSessionName", session_name.clone()),
                    ("WebIdentityToken", token),
                ];
                if let Some(d) = duration {
                    form.push(("DurationSeconds", d.to_string()));
                }
                let body = form
                    .iter()
                    .map(|(k, v)| format!("{k}={}", form_encode(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                let resp = self
                    .http
                    .post(endpoint)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("accept", "application/xml")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| fail(super::describe(&e)))?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| fail(super::describe(&e)))?;
                if !status.is_success() {
                    return Err(fail(format!("STS answered {status}: {}", sts_error(&text))));
                }
                parse_sts(&text, fetched).map_err(fail)
            }
            Fetch::Container {
                uri,
                token_file,
                token,
            } => {
                let auth = match (token_file, token) {
                    (Some(f), _) => Some(
                        std::fs::read_to_string(f)
                            .map_err(|source| CredentialsError::Unreadable {
                                path: f.clone(),
                                source,
                            })?
                            .trim()
                            .to_string(),
                    ),
                    (None, Some(t)) => Some(t.clone()),
                    (None, None) => None,
                };
                let mut req = self.http.get(uri);
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                let resp = req.send().await.map_err(|e| fail(super::describe(&e)))?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| fail(super::describe(&e)))?;
                if !status.is_success() {
                    return Err(fail(format!("the endpoint answered {status}")));
                }
                parse_container(&text, fetched).map_err(fail)
            }
        }
    }
}

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An ISO 8601 / RFC 3339 time as STS and the container endpoints write it.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    let s = s.strip_suffix("+00:00").unwrap_or(s);
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .map_err(|e| format!("bad expiration {s:?}: {e}"))
}

/// The keys in an AssumeRoleWithWebIdentity answer.
fn parse_sts(xml: &str, fetched: SystemTime) -> Result<Fresh, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable answer: {e}"))?;
    let find = |name: &str| {
        doc.descendants()
            .find(|n| n.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(str::trim)
            .ok_or_else(|| format!("the answer has no {name}"))
    };
    let keys = Credentials::new(
        find("AccessKeyId")?,
        find("SecretAccessKey")?,
        Some(find("SessionToken")?),
    );
    Ok(Fresh {
        keys,
        expires: parse_time(find("Expiration")?)?,
        fetched,
    })
}

/// The code and message of an STS error answer (never the request, which holds the token).
fn sts_error(xml: &str) -> String {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return "unreadable answer".into();
    };
    let get = |name: &str| {
        doc.descendants()
            .find(|n| n.tag_name().name() == name)
            .and_then(|n| n.text())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    format!("{} {}", get("Code"), get("Message"))
}

/// The keys in a container endpoint's JSON answer.
fn parse_container(json: &str, fetched: SystemTime) -> Result<Fresh, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        access_key_id: String,
        secret_access_key: String,
        token: Option<String>,
        expiration: String,
    }
    let a: Answer = serde_json::from_str(json).map_err(|e| format!("unreadable answer: {e}"))?;
    Ok(Fresh {
        keys: Credentials::new(&a.access_key_id, &a.secret_access_key, a.token.as_deref()),
        expires: parse_time(&a.expiration)?,
        fetched,
    })
}

/// The temporary-credentials source the environment names, if any: web identity first (as the
/// AWS SDKs do), then a container endpoint. `region` picks the regional STS endpoint unless
/// `AWS_ENDPOINT_URL_STS` (or `AWS_ENDPOINT_URL`) names one.
pub fn from_env(
    env: &dyn Fn(&str) -> Option<String>,
    region: &str,
) -> Result<Option<Fetch>, CredentialsError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    match (get("AWS_WEB_IDENTITY_TOKEN_FILE"), get("AWS_ROLE_ARN")) {
        (Some(file), Some(role_arn)) => {
            let endpoint = get("AWS_ENDPOINT_URL_STS")
                .or_else(|| get("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
            let duration = match get("AWS_ROLE_SESSION_DURATION") {
                None => None,
                Some(d) => Some(d.parse::<u32>().map_err(|_| CredentialsError::Fetch {
                    origin: format!("web identity for role {role_arn}"),
                    detail: format!("AWS_ROLE_SESSION_DURATION must be seconds, got {d:?}"),
                })?),
            };
            return Ok(Some(Fetch::WebIdentity {
                token_file: PathBuf::from(file),
                role_arn,
                session_name: get("AWS_ROLE_SESSION_NAME")
                    .unwrap_or_else(|| format!("ha-edge-{}", std::process::id())),
                endpoint,
                duration,
            }));
        }
        (Some(_), None) => {
            return Err(CredentialsError::HalfSet(
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_ROLE_ARN",
            ))
        }
        (None, Some(_)) => {
            return Err(CredentialsError::HalfSet(
                "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
            ))
        }
        (None, None) => {}
    }
    let uri = match get("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        Some(full) => Some(allowed_full_uri(full)?),
        None => get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            .map(|r| format!("http://169.254.170.2{r}")),
    };
    Ok(uri.map(|uri| Fetch::Container {
        uri,
        token_file: get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
        token: get("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
    }))
}

/// `AWS_CONTAINER_CREDENTIALS_FULL_URI` if the pod's token may go there, as the AWS SDKs
/// decide: https anywhere, http only to a loopback address or the ECS (169.254.170.2) and EKS Pod
/// Identity (169.254.170.23, fd00:ec2::23) endpoints, so that a wrong value never sends the token
/// in clear across the network.
fn allowed_full_uri(full: String) -> Result<String, CredentialsError> {
    let refuse = |why: &str| CredentialsError::Fetch {
        origin: "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_string(),
        detail: format!("{why}, got {full:?}"),
    };
    let url = url::Url::parse(&full).map_err(|e| refuse(&format!("not a URL ({e})")))?;
    let ok = match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Domain(d))) => d.eq_ignore_ascii_case("localhost"),
        ("http", Some(url::Host::Ipv4(a))) => {
            a.is_loopback() || [[169, 254, 170, 2], [169, 254, 170, 23]].contains(&a.octets())
        }
        ("http", Some(url::Host::Ipv6(a))) => {
            a.is_loopback() || a == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)
        }
        _ => false,
    };
    if !ok {
        return Err(refuse(
            "must be https, or http to a loopback address or the ECS/EKS endpoint \
             (169.254.170.2, 169.254.170.23, fd00:ec2::23)",
        ));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_renewed_a_quarter_of_their_lifetime_early_at_most_five_minutes() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let f = |life: u64| Fresh {
            keys: Credentials::new("a", "b", None),
            expires: t0 + Duration::from_secs(life),
            fetched: t0,
        };
        // One hour: renewed from 55 minutes on.
        assert!(!f(3600).stale(t0 + Duration::from_secs(3299)));
        assert!(f(3600).stale(t0 + Duration::from_secs(3300)));
        // Twenty seconds: from 15 s on.
        assert!(!f(20).stale(t0 + Duration::from_secs(14)));
        assert!(f(20).stale(t0 + Duration::from_secs(15)));
    }

    #[test]
    fn answers_are_read() {
        let xml = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials><SessionToken>TOK</SessionToken><SecretAccessKey>SEC</SecretAccessKey><Expiration>2026-12-02T04:00:00.123Z</Expiration><AccessKeyId>ASIA1</AccessKeyId></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;
        let f = parse_sts(xml, SystemTime::now()).unwrap();
        assert_eq!(f.keys.access_key_id(), "ASIA1");
        assert_eq!(
            f.expires,
            humantime::parse_rfc3339("2026-12-02T04:00:00.123Z").unwrap()
        );
        let json = r#"{"AccessKeyId":"ASIA2","SecretAccessKey":"S","Token":"T","AccountId":"1","Expiration":"2026-12-02T04:00:00Z"}"#;
        assert_eq!(
            parse_container(json, SystemTime::now())
                .unwrap()
                .keys
                .access_key_id(),
            "ASIA2"
        );
    }

    #[test]
    fn the_environment_names_the_source() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = env(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ]);
        match from_env(&e, "eu-central-1").unwrap() {
            Some(Fetch::WebIdentity { endpoint, .. }) => {
                assert_eq!(endpoint, "https://sts.eu-central-1.amazonaws.com/")
            }
            other => panic!("{other:?}"),
        }
        let e = env(&[("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")]);
        assert!(from_env(&e, "eu-central-1").is_err());
        let e = env(&[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "/var/run/eks-token",
            ),
        ]);
        assert!(matches!(
            from_env(&e, "eu-central-1").unwrap(),
            Some(Fetch::Container { .. })
        ));
        assert!(from_env(&env(&[]), "eu-central-1").unwrap().is_none());
    }

    #[test]
    fn a_full_uri_that_would_send_the_token_in_clear_off_the_box_is_refused() {
        let full = |uri: &str| {
            let uri = uri.to_string();
            from_env(
                &move |k: &str| (k == "AWS_CONTAINER_CREDENTIALS_FULL_URI").then(|| uri.clone()),
                "eu-central-1",
            )
        };
        // As the AWS SDKs allow: https anywhere; http only to loopback or the ECS and EKS
        // Pod Identity link-local endpoints.
        for ok in [
            "https://creds.example.org/v1",
            "http://127.0.0.1:8080/v1/credentials",
            "http://127.3.4.5/v1",
            "http://localhost:9911/",
            "http://[::1]:80/x",
            "http://169.254.170.2/v2/credentials/abc",
            "http://169.254.170.23/v1/credentials",
            "http://[fd00:ec2::23]/v1/credentials",
        ] {
            assert!(
                matches!(full(ok), Ok(Some(Fetch::Container { .. }))),
                "{ok}"
            );
        }
        for bad in [
            "http://10.0.0.7/v1/credentials",
            "http://creds.example.org/v1",
            "http://169.254.169.254/latest",
            "ftp://127.0.0.1/x",
            "not a url",
        ] {
            let err = full(bad).expect_err(bad).to_string();
            assert!(err.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{err}");
        }
    }
}

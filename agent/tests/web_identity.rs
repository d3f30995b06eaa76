//! Temporary credentials for the S3 destination: IAM roles for service accounts (the agent
//! takes `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` and asks a local STS for keys,
//! AssumeRoleWithWebIdentity on moto's server) and EKS Pod Identity's container credentials
//! endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`,
//! served by `tests/moto/container_credentials.py` with keys from the same STS). The agent signs
//! with the keys and their session token, and asks again before they expire. moto's S3 runs with
//! request authentication on, so it verifies each SigV4 signature against the keys its STS
//! issued (a wrong secret is refused: checked first). `tests/moto/server.py` runs it, taking
//! AssumeRoleWithWebIdentity unsigned as AWS does.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const ROLE: &str = "arn:aws:iam::123456789012:role/ha-edge-relay";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A Python server of `tests/moto/` on 127.0.0.1 (its first argument the port), killed when
/// dropped: moto's, or the container credentials endpoint.
struct Server {
    child: Child,
    port: u16,
}

/// moto's server with request authentication on after the set-up's three calls.
type Moto = Server;

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tests/moto/<script>` with `args` after the port, and waits until it listens.
fn server(script: &str, args: &[String], env: &[(&str, &str)]) -> Server {
    let port = free_port();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/moto")
        .join(script);
    let child = Command::new("python3")
        .arg(path)
        .arg(port.to_string())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 (and pip install \"moto[server]\")");
    let s = Server { child, port };
    assert!(
        wait_until(Duration::from_secs(30), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "{script} did not start"
    );
    s
}

/// Runs a boto3 snippet against moto (`EP` is its endpoint); panics with its output if it fails.
fn boto(port: u16, code: &str) -> String {
    let script = format!(
        "import boto3, botocore, sys\nEP = 'http://127.0.0.1:{port}'\n\
         def c(svc, ak='testing', sk='testing', tok=None):\n    \
         return boto3.client(svc, endpoint_url=EP, region_name='us-east-1', aws_access_key_id=ak, aws_secret_access_key=sk, aws_session_token=tok)\n{code}"
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn moto() -> Moto {
    // The set-up's CreateRole, PutRolePolicy and CreateBucket go unauthenticated; every later
    // request must be signed with keys moto knows.
    let m = server("server.py", &[], &[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]);
    let port = m.port;
    boto(
        port,
        &format!(
            "import json\n\
             c('iam').create_role(RoleName='ha-edge-relay', AssumeRolePolicyDocument=json.dumps({{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Principal': {{'Federated': 'arn:aws:iam::123456789012:oidc-provider/oidc.eks.test'}}, 'Action': 'sts:AssumeRoleWithWebIdentity'}}]}}))\n\
             c('iam').put_role_policy(RoleName='ha-edge-relay', PolicyName='s3', PolicyDocument=json.dumps({{'Version': '2012-10-17', 'Statement': [{{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}}]}}))\n\
             c('s3').create_bucket(Bucket='landing')\n\
             # The server checks signatures from here on: a wrong secret is refused.\n\
             k = c('sts').assume_role_with_web_identity(RoleArn='{ROLE}', RoleSessionName='probe', WebIdentityToken='a-test-token')['Credentials']\n\
             try:\n    c('s3', k['AccessKeyId'], 'wrong', k['SessionToken']).put_object(Bucket='landing', Key='probe', Body=b'x')\n    sys.exit('moto accepted a wrong secret')\n\
             except botocore.exceptions.ClientError as e:\n    assert e.response['ResponseMetadata']['HTTPStatusCode'] == 403, e\n\
             c('s3', k['AccessKeyId'], k['SecretAccessKey'], k['SessionToken']).put_object(Bucket='landing', Key='probe', Body=b'x')\n"
        ),
    );
    m
}

/// The access key ID a request was signed with.
fn signed_with(r: &SeenRequest) -> Option<String> {
    let auth = r.header("authorization")?;
    let cred = auth.split("Credential=").nth(1)?;
    Some(cred.split('/').next()?.to_string())
}

/// A daemon whose keys come from `source` (the environment naming it, with `source_proxy`
/// in front of the credentials' server) delivers one object, then another after its 8-second
/// keys were renewed: both signed with keys moto issued, the second with other ones, every
/// request with the session token, and no token or secret in the log.
fn keys_are_fetched_used_and_renewed(
    moto: &Moto,
    source_proxy: &Proxy,
    source: &dyn Fn(&mut Command, &Path),
) {
    // A proxy in front of moto's S3, to see what signed each request.
    let s3 = Proxy::start(moto.port);
    let setup = Setup::new("landing");
    setup.write_config_with(
        &format!(
            "[destination]\ntype = \"s3\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             bucket = \"landing\"\nprefix = \"fhir/\"\npath_style = true\n",
            s3.endpoint()
        ),
        "",
        "poll_interval = \"1s\"",
    );
    let cfg = setup.config_path();
    let log = std::fs::File::create(setup.dir.path().join("daemon.log")).unwrap();
    let mut command = setup.command(bin(), &["run", "-c", cfg.to_str().unwrap()]);
    command
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", setup.dir.path())
        .stdout(Stdio::null())
        .stderr(log);
    source(&mut command, setup.dir.path());
    let mut daemon = command.spawn().unwrap();
    // Objects delivered, from `status --json`; None while the daemon is still opening its
    // journal (the file may exist before its schema does).
    let done = || {
        let out = setup
            .command(bin(), &["status", "-c", cfg.to_str().unwrap(), "--json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["objects"]["done"].as_u64()
    };
    let delivered = |n: u64| wait_until(Duration::from_secs(60), || done() == Some(n));
    let first = data(1, 3000);
    write_settled(&setup.src().join("a.ndjson"), &first);
    assert!(delivered(1), "{}", setup.daemon_log());
    let fetches_then = source_proxy.seen().len();
    assert!(fetches_then >= 1);
    // Past the renewal point of the first keys.
    std::thread::sleep(Duration::from_secs(7));
    let second = data(2, 5000);
    write_settled(&setup.src().join("b.ndjson"), &second);
    assert!(delivered(2), "{}", setup.daemon_log());
    let _ = daemon.kill();
    let _ = daemon.wait();

    assert!(
        source_proxy.seen().len() > fetches_then,
        "the keys were asked for again before they expired"
    );
    let puts: Vec<SeenRequest> = s3
        .seen()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path().contains(".ndjson"))
        .collect();
    let key_of = |name: &str| {
        puts.iter()
            .rev()
            .find(|r| r.path().ends_with(name))
            .and_then(signed_with)
            .unwrap_or_else(|| panic!("no PUT of {name}"))
    };
    let (ka, kb) = (key_of("a.ndjson"), key_of("b.ndjson"));
    assert!(ka.starts_with("ASIA") || ka.len() >= 16, "{ka}");
    assert_ne!(ka, kb, "the second object was signed with renewed keys");
    assert!(
        s3.seen()
            .iter()
            .all(|r| r.header("x-amz-security-token").is_some()),
        "every request carries the session token"
    );
    // Both objects are in moto's bucket, byte for byte.
    let got = boto(
        moto.port,
        "k = c('sts').assume_role_with_web_identity(RoleArn='arn:aws:iam::123456789012:role/ha-edge-relay', RoleSessionName='check', WebIdentityToken='a-test-token')['Credentials']\n\
         s3 = c('s3', k['AccessKeyId'], k['SecretAccessKey'], k['SessionToken'])\n\
         import hashlib\n\
         for key in ['fhir/a.ndjson', 'fhir/b.ndjson']:\n    print(hashlib.sha256(s3.get_object(Bucket='landing', Key=key)['Body'].read()).hexdigest())\n",
    );
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [sha256(&first), sha256(&second)]
    );
    // No token, secret or session token in the log.
    let log = setup.daemon_log();
    assert!(log.contains("temporary credentials fetched"), "{log}");
    assert!(!log.contains("test-service-account-token"), "{log}");
    assert!(!log.contains("SecretAccessKey"), "{log}");
}

#[test]
fn web_identity_keys_are_fetched_used_and_renewed_before_they_expire() {
    let moto = moto();
    // A proxy in front of moto's STS, to count the fetches.
    let sts = Proxy::start(moto.port);
    let sts_endpoint = sts.endpoint();
    keys_are_fetched_used_and_renewed(&moto, &sts, &|cmd, dir| {
        let token = dir.join("token");
        std::fs::write(
            &token,
            "eyJhbGciOiJSUzI1NiJ9.test-service-account-token.sig",
        )
        .unwrap();
        cmd.env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
            .env("AWS_ROLE_ARN", ROLE)
            .env("AWS_ROLE_SESSION_NAME", "relay-0")
            .env("AWS_ENDPOINT_URL_STS", &sts_endpoint)
            // Keys valid for 8 s: renewed when 2 s are left.
            .env("AWS_ROLE_SESSION_DURATION", "8");
    });
}

const POD_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.test-service-account-token.pod";

/// The container credentials endpoint of `tests/moto/container_credentials.py`, handing out
/// 8-second keys from moto's STS to whoever shows `POD_TOKEN`.
fn container_endpoint(moto: &Moto) -> Server {
    let args = [
        format!("http://127.0.0.1:{}/", moto.port),
        ROLE.to_string(),
        POD_TOKEN.to_string(),
        "8".to_string(),
    ];
    server("container_credentials.py", &args, &[])
}

#[test]
fn container_endpoint_keys_are_fetched_with_the_pod_token_used_and_renewed() {
    let moto = moto();
    let endpoint = container_endpoint(&moto);
    let proxy = Proxy::start(endpoint.port);
    let uri = format!("{}/v1/credentials", proxy.endpoint());
    keys_are_fetched_used_and_renewed(&moto, &proxy, &|cmd, dir| {
        // EKS Pod Identity: the URI, and the file of the pod's token (read at every fetch).
        let token = dir.join("eks-pod-identity-token");
        std::fs::write(&token, format!("{POD_TOKEN}\n")).unwrap();
        cmd.env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token);
    });
    assert!(
        proxy
            .seen()
            .iter()
            .all(|r| r.method == "GET" && r.header("authorization") == Some(POD_TOKEN)),
        "every fetch shows the pod's token"
    );
}

/// `ha-edge validate` against moto's S3 with no keys but what `source` puts in the environment
/// (given the set-up's directory): whether it succeeded, and its stderr.
fn validate_with(moto: &Moto, source: &dyn Fn(&mut Command, &Path)) -> (bool, String) {
    let setup = Setup::new("landing");
    setup.write_config_with(
        &format!(
            "[destination]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\n\
             bucket = \"landing\"\npath_style = true\n",
            moto.port
        ),
        "",
        "",
    );
    let cfg = setup.config_path();
    let mut command = setup.command(bin(), &["validate", "-c", cfg.to_str().unwrap()]);
    command
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", setup.dir.path());
    source(&mut command, setup.dir.path());
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_container_endpoint_that_refuses_the_token_is_a_clear_error() {
    let moto = moto();
    let endpoint = container_endpoint(&moto);
    let (ok, err) = validate_with(&moto, &|cmd, dir| {
        let token = dir.join("token");
        std::fs::write(&token, "another-pods-token").unwrap();
        cmd.env(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://127.0.0.1:{}/v1/credentials", endpoint.port),
        )
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token);
    });
    assert!(!ok, "{err}");
    assert!(err.contains("container credentials endpoint"), "{err}");
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("another-pods-token"), "{err}");
}

#[test]
fn a_refused_token_is_a_clear_error() {
    let moto = moto();
    // No token file where the environment says: named in the error, nothing sent.
    let (ok, err) = validate_with(&moto, &|cmd, dir| {
        cmd.env("AWS_WEB_IDENTITY_TOKEN_FILE", dir.join("missing-token"))
            .env("AWS_ROLE_ARN", ROLE)
            .env(
                "AWS_ENDPOINT_URL_STS",
                format!("http://127.0.0.1:{}", moto.port),
            );
    });
    assert!(!ok, "{err}");
    assert!(err.contains("missing-token"), "{err}");
}

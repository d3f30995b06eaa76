//! Tests of configuration loading: each problem reported with file, line and key, all at once,
//! and the defaults an operator gets when a key is left out.

use super::*;

fn good(dir: &Path) -> String {
    format!(
        r#"
[agent]
journal = "{d}/journal.db"

[[source]]
name = "fhir"
type = "fs"
path = "{d}/in"
include = ["**/*.ndjson"]
settle = "2s"

[destination]
type = "s3"
endpoint = "http://127.0.0.1:9000"
region = "eu-central-1"
bucket = "fhir-bucket"
prefix = "fhir/"
path_style = true
"#,
        d = dir.display()
    )
}

fn problems(text: &str) -> Vec<ConfigProblem> {
    Config::parse(Path::new("t.toml"), text)
        .unwrap_err()
        .problems
}

const BUCKET_ONLY: &str = r#"
[agent]
journal = "/var/lib/ha-edge/journal.db"

[[source]]
name = "minio"
type = "s3"
prefix = "exports/"
after_upload = { move_to_prefix = "processed/" }

[destination]
type = "s3"
endpoint = "https://s3.eu-central-1.amazonaws.com"
region = "eu-central-1"
bucket = "fhir-bucket"
"#;

/// A bucket source's endpoint and bucket may come from `ONPREM_S3_*` variables (the config
/// wins over them).
#[test]
fn bucket_source_takes_endpoint_and_bucket_from_the_environment() {
    let env = |k: &str| match k {
        "ONPREM_S3_ENDPOINT" => Some("http://10.0.0.5:9000".to_string()),
        "ONPREM_S3_BUCKET" => Some("exports-bucket".to_string()),
        _ => None,
    };
    let c = Config::parse_with_env(Path::new("t.toml"), BUCKET_ONLY, &env).unwrap();
    let SourceKind::Bucket(conn) = &c.sources[0].kind else {
        panic!("not a bucket source")
    };
    assert_eq!(conn.endpoint.as_str(), "http://10.0.0.5:9000/");
    assert_eq!(conn.bucket, "exports-bucket");
    assert_eq!(conn.region, "us-east-1");
    assert_eq!(conn.prefix, "exports/");
    assert!(conn.path_style);
    assert_eq!(
        c.sources[0].after_upload,
        AfterUpload::MoveToPrefix("processed/".into())
    );
    // The config wins over the environment.
    let text = BUCKET_ONLY.replace(
        "prefix = \"exports/\"",
        "prefix = \"exports/\"\nbucket = \"from-config\"",
    );
    let c = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap();
    let SourceKind::Bucket(conn) = &c.sources[0].kind else {
        panic!("not a bucket source")
    };
    assert_eq!(conn.bucket, "from-config");
    // Neither: both named, at the source's line.
    let err = Config::parse_with_env(Path::new("t.toml"), BUCKET_ONLY, &|_| None).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["source[0].endpoint", "source[0].bucket"]);
    assert!(err.problems[0].message.contains("ONPREM_S3_ENDPOINT"));
    assert_eq!(err.problems[0].line, 5);
}

/// A directory source with bucket keys (or the reverse) is a problem naming each misplaced key.
#[test]
fn keys_of_the_other_source_type_are_refused() {
    let env = |k: &str| match k {
        "ONPREM_S3_ENDPOINT" => Some("http://minio.local:9000".to_string()),
        "ONPREM_S3_BUCKET" => Some("bkt".to_string()),
        _ => None,
    };
    let text = BUCKET_ONLY.replace(
        "prefix = \"exports/\"",
        "prefix = \"exports/\"\nsettle = \"5s\"\npath = \"/srv\"",
    );
    let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["source[0].settle", "source[0].path"]);
    assert!(err.problems[0].message.contains("type = \"fs\""));
    // move_to is for files, move_to_prefix for objects.
    let text = BUCKET_ONLY.replace("move_to_prefix", "move_to");
    let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
    assert_eq!(err.problems[0].key, "source[0].after_upload");
    assert!(err.problems[0].message.contains("move_to_prefix"));
    let text = BUCKET_ONLY.replace("\"processed/\"", "\"/abs/\"");
    let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
    assert_eq!(err.problems[0].key, "source[0].after_upload.move_to_prefix");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let text = good(dir.path()).replace("settle = \"2s\"", "settle = \"2s\"\nbucket = \"x\"");
    assert_eq!(problems(&text)[0].key, "source[0].bucket");
}

/// Two bucket sources whose prefixes overlap would send one object twice: refused.
#[test]
fn overlapping_bucket_prefixes_are_refused() {
    let env = |k: &str| match k {
        "ONPREM_S3_ENDPOINT" => Some("http://minio.local:9000".to_string()),
        "ONPREM_S3_BUCKET" => Some("bkt".to_string()),
        _ => None,
    };
    let second = "\n[[source]]\nname = \"all\"\ntype = \"s3\"\nprefix = \"\"\n";
    let text = BUCKET_ONLY.replace("\n[destination]", &format!("{second}\n[destination]"));
    let err = Config::parse_with_env(Path::new("t.toml"), &text, &env).unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.key == "source[1].prefix" && p.message.contains("overlap")),
        "{err}"
    );
    // Apart in the source bucket, and in the destination (each its own key prefix).
    let other = second.replace("prefix = \"\"", "prefix = \"other/\"");
    let text = BUCKET_ONLY
        .replace("\n[destination]", &format!("{other}\n[destination]"))
        .replace(
            "name = \"minio\"\n",
            "name = \"minio\"\nkey_prefix = \"{source}/\"\n",
        )
        .replace(
            "name = \"all\"\n",
            "name = \"all\"\nkey_prefix = \"{source}/\"\n",
        );
    if let Err(e) = Config::parse_with_env(Path::new("t.toml"), &text, &env) {
        panic!("{e}\n{text}");
    }
}

/// The documented relay file is valid, and each mistake in it is reported at its key.
#[test]
fn relay_example_is_valid_and_mistakes_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/relay.toml"),
    )
    .unwrap();
    let mut text = text.replace(
        "/var/lib/ha-edge-relay",
        &dir.path().join("state").display().to_string(),
    );
    for f in ["server.pem", "server.key", "agents-ca.pem"] {
        let p = dir.path().join(f);
        std::fs::write(&p, "x").unwrap();
        text = text.replace(&format!("/etc/ha-edge/relay/{f}"), &p.display().to_string());
    }
    let c = RelayConfig::parse(Path::new("relay.toml"), &text).unwrap();
    assert_eq!(c.agents.len(), 2);
    assert_eq!(c.agents[1].prefix.as_str(), "fhir/embl/");
    assert!(
        matches!(&c.store, StoreConfig::S3 { bucket, part_size, assembly_memory } if bucket.bucket == "healthalliance-fhir" && *part_size == 16 << 20 && *assembly_memory == 128 << 20)
    );
    assert_eq!(c.stream_buffer, 4 << 20);
    assert_eq!(c.congestion, crate::config::Congestion::Bbr);
    assert_eq!(c.max_streams_per_agent, 64);
    let on_disk = text.replace("assembly_memory = \"128MiB\"", "assembly_memory = \"0\"");
    let c = RelayConfig::parse(Path::new("relay.toml"), &on_disk).unwrap();
    assert!(matches!(
        &c.store,
        StoreConfig::S3 {
            assembly_memory: 0,
            ..
        }
    ));
    let err = RelayConfig::parse(
        Path::new("relay.toml"),
        &text.replace("assembly_memory = \"128MiB\"", "assembly_memory = \"lots\""),
    )
    .unwrap_err();
    assert_eq!(err.problems[0].key, "store.assembly_memory");

    let bad = text
        .replace("listen = \"0.0.0.0:4433\"", "listen = \"anywhere\"")
        .replace("prefix = \"fhir/embl/\"", "prefix = \"../x/\"")
        .replace(
            "identity = \"embl-edge-01.agents.example.org\"",
            "identity = \"not a name\"",
        )
        .replace("region = \"eu-central-1\"", "region = \"eu central\"");
    let err = RelayConfig::parse(Path::new("relay.toml"), &bad).unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "relay.listen",
            "agent[1].identity",
            "agent[1].prefix",
            "store.region"
        ]
    );
    assert!(err.to_string().contains("relay.toml:"));
    // One prefix per identity.
    let twice = text.replace("embl-edge-01", "dkfz-edge-01");
    let err = RelayConfig::parse(Path::new("relay.toml"), &twice).unwrap_err();
    assert_eq!(err.problems[0].key, "agent[1].identity");
    assert!(err.problems[0].message.contains("listed twice"));
    // No [store], no [[agent]].
    let err =
        RelayConfig::parse(Path::new("r.toml"), "[relay]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(
        keys.contains(&"store") && keys.contains(&"agent") && keys.contains(&"relay.cert_file"),
        "{keys:?}"
    );
}

/// A QUIC destination without its CA, or with S3 keys, is a problem.
#[test]
fn quic_destination_needs_its_ca_and_refuses_s3_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let quic = format!(
        "[destination]\ntype = \"quic\"\nrelay = \"relay.example.org:4433\"\nca_file = \"{}\"\nprefix = \"fhir/dkfz/\"\n",
        ca.display()
    );
    let base = good(dir.path());
    let at = base.find("[destination]").unwrap();
    let text = format!("{}{quic}", &base[..at]);
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let Destination::Relay(r) = &c.destination else {
        panic!("a relay destination")
    };
    assert_eq!(r.server_name, "relay.example.org");
    assert_eq!(c.destination.prefix(), "fhir/dkfz/");
    assert_eq!(r.congestion, crate::config::Congestion::Bbr, "the default");
    assert_eq!(r.relays, ["relay.example.org:4433"]);
    // Several relays: tried in order; the server name defaults to the first one's host.
    let two = format!(
        "{}{}",
        &base[..at],
        quic.replace(
            "\"relay.example.org:4433\"",
            "[\"relay-a.example.org:4433\", \"10.0.0.7:4433\"]"
        )
    );
    let c = Config::parse(Path::new("t.toml"), &two).unwrap();
    let Destination::Relay(r) = &c.destination else {
        panic!("a relay destination")
    };
    assert_eq!(r.relays, ["relay-a.example.org:4433", "10.0.0.7:4433"]);
    assert_eq!(r.server_name, "relay-a.example.org");
    for bad in ["[]", "[\"a:1\", \"no-port\"]", "[1, 2]"] {
        let text = format!(
            "{}{}",
            &base[..at],
            quic.replace("\"relay.example.org:4433\"", bad)
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["destination.relay"], "{bad}");
    }
    let cubic = format!("{}{quic}congestion = \"cubic\"\n", &base[..at]);
    let c = Config::parse(Path::new("t.toml"), &cubic).unwrap();
    assert!(
        matches!(&c.destination, Destination::Relay(r) if r.congestion == crate::config::Congestion::Cubic)
    );
    let reno = format!("{}{quic}congestion = \"reno\"\n", &base[..at]);
    let p = problems(&reno);
    assert_eq!(p[0].key, "destination.congestion");
    assert!(
        p[0].message.contains("\"bbr\" or \"cubic\""),
        "{}",
        p[0].message
    );
    // On an S3 destination the key means nothing: named as misplaced.
    let s3 = base.replace("[destination]\n", "[destination]\ncongestion = \"bbr\"\n");
    let keys: Vec<String> = problems(&s3).into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["destination.congestion"]);
    let text = format!(
        "{}{}bucket = \"b-c-d\"\n",
        &base[..at],
        quic.replace("relay.example.org:4433", "no-port")
    );
    let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["destination.relay", "destination.bucket"]);
}

/// A minimal file gets the documented defaults.
#[test]
fn good_config_validates_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let c = Config::parse(Path::new("t.toml"), &good(dir.path())).unwrap();
    assert_eq!(c.agent.part_size, 8 << 20);
    assert_eq!(c.agent.concurrency, 4);
    assert_eq!(c.sources[0].settle, Duration::from_secs(2));
    assert!(c.sources[0].selects(Path::new("a/b.ndjson")));
    assert!(!c.sources[0].selects(Path::new("a/b.tmp")));
    let Destination::S3(d) = &c.destination else {
        panic!("an S3 destination")
    };
    assert_eq!(d.prefix, "fhir/");
    assert!(d.path_style);
}

/// `checksum` and `small_objects_in_flight`: defaults (CRC64NVME, 32 small objects), the
/// other scheme, and a wrong value or a number out of range named with its line.
#[test]
fn checksum_and_small_objects_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let c = Config::parse(Path::new("t.toml"), &good(dir.path())).unwrap();
    let Destination::S3(d) = &c.destination else {
        panic!("an S3 destination")
    };
    assert_eq!(d.checksum, Checksum::Crc64Nvme);
    assert_eq!(c.agent.small_objects_in_flight, 32);
    let text = good(dir.path()).replace(
        "path_style = true",
        "path_style = true\nchecksum = \"sha256\"",
    );
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let Destination::S3(d) = &c.destination else {
        panic!("an S3 destination")
    };
    assert_eq!(d.checksum, Checksum::Sha256);
    let text = good(dir.path())
        .replace("journal.db\"", "journal.db\"\nsmall_objects_in_flight = 0")
        .replace("path_style = true", "path_style = true\nchecksum = \"md5\"");
    let p = problems(&text);
    let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert_eq!(
        keys,
        [
            ("agent.small_objects_in_flight", 4),
            ("destination.checksum", 20)
        ],
        "{p:?}"
    );
    assert!(
        p[1].message.contains("\"crc64nvme\" or \"sha256\""),
        "{}",
        p[1].message
    );
}

/// A typo is reported with its line and dotted key.
#[test]
fn unknown_key_names_line_and_key() {
    let p = problems("[agent]\njournal = \"/j.db\"\nconcurency = 3\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].line, 3);
    assert_eq!(p[0].key, "agent.concurency");
    assert!(p[0].message.contains("unknown field"), "{}", p[0].message);
}

/// A value of the wrong type names the key it is at.
#[test]
fn wrong_type_names_dotted_key() {
    let p = problems("[agent]\njournal = 5\n");
    assert_eq!(p[0].line, 2);
    assert_eq!(p[0].key, "agent.journal");
}

/// Several problems are all reported in one pass, in file order.
#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let text = good(dir.path())
        .replace("journal.db\"", "journal.db\"\npart_size = \"1MiB\"")
        .replace("settle = \"2s\"", "settle = \"soon\"")
        .replace("fhir-bucket", "Bad_Bucket");
    let p = problems(&text);
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["agent.part_size", "source[0].settle", "destination.bucket"],
        "{p:?}"
    );
    assert_eq!(p[0].line, 4);
}

/// Relative source paths and sources inside one another are refused.
#[test]
fn relative_paths_and_overlaps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in/sub")).unwrap();
    let text = good(dir.path()).replace(
        &format!("journal = \"{}/journal.db\"", dir.path().display()),
        "journal = \"journal.db\"",
    ) + &format!(
        "\n[[source]]\nname = \"sub\"\ntype = \"fs\"\npath = \"{}/in/sub\"\n",
        dir.path().display()
    );
    // [[source]] after [destination] is valid TOML; the second source overlaps the first.
    let p = problems(&text);
    assert!(p.iter().any(|p| p.key == "agent.journal"), "{p:?}");
    assert!(
        p.iter()
            .any(|p| p.key == "source[1].path" && p.message.contains("overlap")),
        "{p:?}"
    );
}

/// The example file shipped with the package stays valid.
#[test]
fn documented_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("pseudonym.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let text = include_str!("../../../examples/ha-edge.toml")
        .replace("/srv/exports/fhir", &dir.path().display().to_string())
        .replace("/etc/ha-edge/pseudonym.key", &key.display().to_string());
    let c = Config::parse(Path::new("examples/ha-edge.toml"), &text).unwrap();
    let Destination::S3(d) = &c.destination else {
        panic!("an S3 destination")
    };
    assert_eq!(d.sse, Some(Sse::Aes256));
    assert_eq!(c.sources[0].after_upload, AfterUpload::Keep);
    assert_eq!(c.agent.multipart_threshold, 16 << 20);
    // The optional keys it shows commented out are valid as written, too.
    let optional = [
        "name = \"edge-dkfz-1\"",
        "metrics =",
        "receipts_keep =",
        "bandwidth =",
        "bandwidth_schedule =",
        "  { days",
        "]",
        "storage_class =",
        "tags =",
        "content_types =",
        "[receipts]",
        "prefix = \"_receipts/\"",
        "every =",
        "log_paths =",
        "pseudonym_key_file =",
        "max_line =",
        "on_invalid =",
        "quarantine_dir =",
        "key_template =",
    ];
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if optional.iter().any(|o| rest.starts_with(o)) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = Config::parse(Path::new("examples/ha-edge.toml"), &uncommented)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.agent.name, "edge-dkfz-1");
    assert!(c.agent.metrics.is_some());
    assert_eq!(c.agent.bandwidth.windows.len(), 2);
    assert!(c.receipts.is_some());
    assert_eq!(c.sources[0].priority, 10);
    assert!(c.agent.keys_only);
    assert!(c.sources[0].key_template.is_some());
    assert_eq!(
        c.sources[0]
            .validation
            .for_path(Path::new("a/Patient.ndjson")),
        crate::validate::Kind::FhirNdjson
    );
}

/// Sizes (`8 MiB`) and durations (`30s`) parse, with their bounds.
#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size(&toml::Value::String("8MiB".into())), Ok(8 << 20));
    assert_eq!(
        parse_size(&toml::Value::String("5 MiB".into())),
        Ok(5 << 20)
    );
    assert_eq!(parse_size(&toml::Value::Integer(1024)), Ok(1024));
    assert!(parse_size(&toml::Value::String("lots".into())).is_err());
    assert_eq!(
        parse_duration(&toml::Value::String("1m 30s".into())),
        Ok(Duration::from_secs(90))
    );
    assert!(parse_duration(&toml::Value::Boolean(true)).is_err());
}

/// Bucket names follow S3's rules.
#[test]
fn bucket_names() {
    assert!(check_bucket_name("healthalliance-fhir").is_ok());
    assert!(check_bucket_name("ab").is_err());
    assert!(check_bucket_name("-abc").is_err());
    assert!(check_bucket_name("ABC").is_err());
}

/// Lines and columns are counted from 1, as editors do.
#[test]
fn line_col_is_one_based() {
    assert_eq!(line_col("a\nbc\n", 0), (1, 1));
    assert_eq!(line_col("a\nbc\n", 3), (2, 2));
}

/// Finding 14: an unknown key and a type error no longer hide the other problems; every one is
/// reported with its line and key.
#[test]
fn f14_every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let text = good(dir.path())
        .replace(
            "[agent]\n",
            "[agent]\nconcurrency = \"four\"\nbogus_key = 1\n",
        )
        .replace("settle = \"2s\"", "settle = \"2s\"\nsettl = \"3s\"");
    let p = problems(&text);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"agent.concurrency"), "{p:?}");
    assert!(keys.iter().any(|k| k.contains("bogus_key")), "{p:?}");
    assert!(keys.iter().any(|k| k.contains("settl")), "{p:?}");
    assert!(p.iter().all(|p| p.line > 0), "{p:?}");
}

/// Finding 14: a log level that is not one (`warning`) would silence every log line.
#[test]
fn f14_a_log_level_that_is_not_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    for bad in ["warning", "ha_edge=loud", "infoo,ha_edge=debug"] {
        let text =
            good(dir.path()).replace("[agent]\n", &format!("[agent]\nlog_level = \"{bad}\"\n"));
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].key, "agent.log_level", "{bad}");
    }
    for ok in ["warn", "info", "ha_edge=debug,info", "off"] {
        let text =
            good(dir.path()).replace("[agent]\n", &format!("[agent]\nlog_level = \"{ok}\"\n"));
        assert!(Config::parse(Path::new("t.toml"), &text).is_ok(), "{ok}");
    }
}

/// The keys of chain of custody and operator control: a bad agent name, a receipts prefix that
/// is not one or lies in a source's keys, and a priority out of range are each named, at once.
#[test]
fn custody_and_priority_keys_are_checked_together() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let base = good(dir.path());
    let ok = base.replace(
        "[agent]\n",
        "[agent]\nname = \"edge-1\"\nreceipts_keep = \"400d\"\n",
    ) + "\n[receipts]\nprefix = \"_receipts/\"\nevery = \"5m\"\n";
    let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
    assert_eq!(c.agent.name, "edge-1");
    assert_eq!(
        c.agent.receipts_keep,
        Some(Duration::from_secs(400 * 86_400))
    );
    assert_eq!(c.receipts.unwrap().every, Duration::from_secs(300));
    let bad = base
        .replace("[agent]\n", "[agent]\nname = \"edge 1/x\"\n")
        .replace("[[source]]\n", "[[source]]\npriority = 5000\n")
        + "\n[receipts]\nprefix = \"receipts\"\n";
    let p = problems(&bad);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"agent.name"), "{p:?}");
    assert!(keys.contains(&"source[0].priority"), "{p:?}");
    assert!(keys.contains(&"receipts.prefix"), "{p:?}");
}

/// `bandwidth` and its timetable: the issue's example parses; a bad rate, day, time and a
/// missing rate are each named with their entry.
#[test]
fn bandwidth_and_its_timetable_are_checked() {
    use crate::bandwidth::Rate;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let base = good(dir.path());
    let ok = base.replace(
        "[agent]\n",
        "[agent]\nbandwidth = \"40Mbit\"\nbandwidth_schedule = [\
         { days = \"Mon-Fri\", from = \"07:00\", to = \"19:00\", rate = \"10Mbit\" },\
         { days = \"Sat-Sun\", rate = \"off\" }]\n",
    );
    let c = Config::parse(Path::new("t.toml"), &ok).unwrap();
    let s = &c.agent.bandwidth;
    assert_eq!(s.default, Rate::BytesPerSec(5_000_000));
    assert_eq!(s.rate_at(1, 8 * 60), Rate::BytesPerSec(1_250_000));
    assert_eq!(s.rate_at(6, 8 * 60), Rate::Unlimited);
    let bad = base.replace(
        "[agent]\n",
        "[agent]\nbandwidth = \"fast\"\nbandwidth_schedule = [\
         { days = \"Mon-Frei\", from = \"7am\", rate = \"10Mbit\" }, { days = \"Sun\" }]\n",
    );
    let p = problems(&bad);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "agent.bandwidth",
        "agent.bandwidth_schedule[0].days",
        "agent.bandwidth_schedule[0].from",
        "agent.bandwidth_schedule[1].rate",
    ] {
        assert!(keys.contains(&k), "{k}: {p:?}");
    }
}

/// Receipt batches at the bucket's root beside a source that sends to the root too: the
/// source refuses keys under the batches' prefix instead of the config being refused.
#[test]
fn a_source_sharing_the_root_with_receipts_reserves_their_prefix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let text = good(dir.path()).replace("prefix = \"fhir/\"", "prefix = \"\"")
        + "\n[receipts]\nprefix = \"_receipts/\"\n";
    let c = Config::parse(Path::new("t.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.sources[0].reserved_prefix.as_deref(), Some("_receipts/"));
    assert!(crate::keymap::unreserved("_receipts/x/1.ndjson".into(), Some("_receipts/")).is_err());
    assert!(crate::keymap::unreserved("_receiptsx".into(), Some("_receipts/")).is_ok());
    // A source with keys of its own does not.
    let apart = good(dir.path()) + "\n[receipts]\nprefix = \"_receipts/\"\n";
    let c = Config::parse(Path::new("t.toml"), &apart).unwrap();
    assert_eq!(c.sources[0].reserved_prefix, None);
}

/// Record checks, key templates and stable_dir: every wrong value is a problem naming its key,
/// all reported at once.
#[test]
fn record_checks_templates_and_studies_report_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    let text = good(dir.path()).replace(
        "settle = \"2s\"",
        &format!(
            "settle = \"2s\"\nvalidate = [{{ include = \"**/*.ndjson\", as = \"fhir\" }}]\nmax_line = \"10\"\non_invalid = \"drop\"\nquarantine_dir = \"{}/in/q\"\nkey_template = \"{{source}}/{{name}}\"\ncomplete_when = {{ stable_dir = \"0s\", depth = 0, marker = \"done\" }}",
            dir.path().display()
        ),
    );
    let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
    for want in [
        "source[0].validate[0]",
        "source[0].max_line",
        "source[0].on_invalid",
        "source[0].quarantine_dir",
        "source[0].key_template",
        "source[0].complete_when.stable_dir",
        "source[0].complete_when.depth",
        "source[0].complete_when.marker",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} not in {keys:?}");
    }
    // {hmac:…} without a pseudonymisation key is refused, naming where to put it.
    let text = good(dir.path()).replace(
        "settle = \"2s\"",
        "settle = \"2s\"\nkey_template = \"{source}/{hmac:dir}/{name}\"",
    );
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|p| p.key == "source[0].key_template" && p.message.contains("pseudonym_key")),
        "{p:?}"
    );
    // A good set parses into typed values.
    let key = dir.path().join("k");
    std::fs::write(&key, "0123456789abcdef0123").unwrap();
    let text = good(dir.path())
        .replace(
            "settle = \"2s\"",
            "settle = \"2s\"\nvalidate = \"dicom\"\non_invalid = \"upload-flagged\"\nkey_template = \"{source}/{hmac:dir}/{name}\"\ncomplete_when = { stable_dir = \"60s\", marker = \"{dir}.done\" }",
        )
        .replace(
            "[agent]\n",
            &format!("[agent]\nlog_paths = \"keys\"\npseudonym_key_file = \"{}\"\n", key.display()),
        );
    let c = Config::parse(Path::new("t.toml"), &text).unwrap();
    let s = &c.sources[0];
    assert!(c.agent.keys_only);
    assert_eq!(
        s.validation.for_path(Path::new("a/b.dcm")),
        crate::validate::Kind::Dicom
    );
    assert_eq!(
        s.validation.on_invalid,
        crate::validate::OnInvalid::UploadFlagged
    );
    assert!(s.complete_when.is_marker("STUDY1.done"));
    assert_eq!(
        s.complete_when.study_of(Path::new("STUDY1/s/a.dcm")),
        Some(PathBuf::from("STUDY1"))
    );
    assert_eq!(s.complete_when.study_of(Path::new("loose.dcm")), None);
}

/// The Kubernetes manifests' config files (deploy/k8s) are valid as shipped (only the mounted
/// files' paths are replaced).
#[test]
fn kubernetes_config_files_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, "x").unwrap();
        p.display().to_string()
    };
    let relay = include_str!("../../../deploy/k8s/relay/relay.toml")
        .replace("/etc/ha-edge/tls/tls.crt", &file("tls.crt"))
        .replace("/etc/ha-edge/tls/tls.key", &file("tls.key"))
        .replace("/etc/ha-edge/agents-ca/ca.crt", &file("agents-ca.crt"));
    let r = RelayConfig::parse(Path::new("relay.toml"), &relay).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.agents.len(), 2);
    assert!(r.metrics.is_some(), "the probes need the health port");
    let agent = include_str!("../../../deploy/k8s/agent/ha-edge.toml")
        .replace("/etc/ha-edge/relay-ca/ca.crt", &file("relay-ca.crt"));
    let c = Config::parse(Path::new("ha-edge.toml"), &agent).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(c.destination, Destination::Relay(_)));
    assert!(
        c.agent.metrics.is_some(),
        "the probes need the metrics port"
    );
}

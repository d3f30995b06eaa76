//! Crash at any moment: the real binary is killed with SIGKILL at seeded random moments while it
//! works through a mixed workload, restarted each time, then drained with `--once`. A second test
//! does the same with SIGTERM. A proxy between agent and server counts every byte sent.
//!
//! CI runs 20 kills over 200 files. The full variant (documented in the README):
//! `HA_EDGE_FULL=1 scripts/test.sh --test faults_crash -- --nocapture`
//! Any run can be replayed with `HA_EDGE_SEED=<seed>` (printed at the start).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ha_edge_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_ha-edge");
const MIB: u64 = 1024 * 1024;
const PART: u64 = 5 * MIB;
const PARTS_IN_FLIGHT: u64 = 2;

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn full() -> bool {
    std::env::var_os("HA_EDGE_FULL").is_some()
}

fn seed() -> u64 {
    std::env::var("HA_EDGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_126)
}

struct Rig {
    s3: S3Server,
    proxy: Proxy,
    setup: Setup,
    files: Vec<(String, Vec<u8>)>,
}

fn rig(bucket: &str, seed: u64, count: usize, delay_ms: u64) -> Rig {
    let s3 = S3Server::start();
    s3.create_bucket(bucket);
    let proxy = Proxy::start(s3.port);
    proxy.delay_ms.store(delay_ms, Ordering::Relaxed);
    let setup = Setup::new(bucket);
    let files = mixed_workload(seed, count);
    for (name, bytes) in &files {
        write_settled(&setup.src().join(name), bytes);
    }
    setup.write_config(
        &proxy.endpoint(),
        &format!(
            "part_size = \"5MiB\"\nmultipart_threshold = \"5MiB\"\nconcurrency = 4\n\
             parts_in_flight = {PARTS_IN_FLIGHT}\nshutdown_grace = \"60s\""
        ),
        "rescan_interval = \"1s\"",
    );
    Rig {
        s3,
        proxy,
        setup,
        files,
    }
}

impl Rig {
    fn unfinished(&self) -> usize {
        self.setup.journal_keys("state <> 'done'").len().max(
            self.files
                .len()
                .saturating_sub(self.setup.journal_keys("1").len()),
        )
    }

    /// Drains with `--once` and checks the bucket holds exactly the workload, byte for byte.
    fn drain_and_check(&self, bucket: &str) -> String {
        self.proxy.delay_ms.store(0, Ordering::Relaxed);
        let out = self.setup.run_once(bin());
        assert!(out.status.success(), "drain: {}", stderr_of(&out));
        let expected: BTreeSet<String> = self
            .files
            .iter()
            .map(|(n, _)| format!("fhir/{n}"))
            .collect();
        let got: BTreeSet<String> = self.s3.keys(bucket).into_iter().collect();
        assert_eq!(got, expected, "the bucket must hold exactly the workload");
        for (name, bytes) in &self.files {
            let stored = self
                .s3
                .object(bucket, &format!("fhir/{name}"))
                .expect("stored");
            assert_eq!(sha256(&stored), sha256(bytes), "{name} differs");
        }
        assert_eq!(
            self.setup.journal_counts(),
            vec![("done".to_string(), self.files.len() as i64)]
        );
        stderr_of(&out)
    }

    fn workload_bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_resends_within_bounds() {
    let seed = seed();
    // The proxy's delay per request paces the workload so that every kill lands mid-work.
    // (With SHA-256 from ring, the debug build hashes ~10x faster than with sha2, and a 10 ms
    // delay let seed 20261126 finish after 8 kills.)
    let (kills_wanted, count, delay) = if full() {
        (60, 400, 40)
    } else {
        (20, 200, 100)
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let r = rig("kill", seed, count, delay);
    eprintln!(
        "seed {seed}: {count} files, {:.1} MiB, {kills_wanted} kills",
        r.workload_bytes() as f64 / MIB as f64
    );
    let started = Instant::now();
    let mut kills_mid_work = 0;
    // Keys that were between "hashed" and "upload id recorded" when a kill landed: the only
    // place where an upload can exist that the journal does not know.
    let mut unrecorded_start_keys: BTreeSet<String> = BTreeSet::new();
    let mut cycles = 0;
    while kills_mid_work < kills_wanted {
        cycles += 1;
        assert!(
            cycles <= kills_wanted * 3,
            "the workload finished before {kills_wanted} kills: slow the proxy down"
        );
        let mut agent = r.setup.spawn_daemon(bin());
        std::thread::sleep(Duration::from_millis(rng.u64(150..900)));
        agent.kill().expect("SIGKILL");
        agent.wait().expect("reap");
        if r.unfinished() == 0 {
            break;
        }
        kills_mid_work += 1;
        unrecorded_start_keys.extend(
            r.setup
                .journal_keys("state = 'uploading' AND upload_id IS NULL"),
        );
    }
    let before_drain = r.proxy.data_bytes_sent();
    let drain_log = r.drain_and_check("kill");

    let sent = r.proxy.data_bytes_sent();
    let resent = sent - r.workload_bytes();
    let bound = kills_mid_work as u64 * PARTS_IN_FLIGHT * PART;
    eprintln!(
        "{kills_mid_work} kills mid-work in {cycles} cycles ({:.1} s); data sent {:.1} MiB for a \
         {:.1} MiB workload: re-sent {:.1} MiB (bound {:.1} MiB); drain sent {:.1} MiB; \
         interrupted upload starts: {}",
        started.elapsed().as_secs_f64(),
        sent as f64 / MIB as f64,
        r.workload_bytes() as f64 / MIB as f64,
        resent as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        (sent - before_drain) as f64 / MIB as f64,
        unrecorded_start_keys.len(),
    );
    assert!(
        kills_mid_work >= kills_wanted,
        "only {kills_mid_work} kills landed mid-work"
    );
    assert!(
        resent <= bound,
        "re-sent {resent} bytes over {kills_mid_work} crashes; bound {bound}"
    );
    // No upload left open, except where a kill landed between CreateMultipartUpload and
    // recording its id, on a server (s3s-fs) that cannot list uploads: then the agent must have
    // asked (ListMultipartUploads) and warned the operator.
    let open = r.s3.open_upload_keys();
    for key in &open {
        assert!(
            unrecorded_start_keys.contains(key),
            "upload of {key} left open on the server although the journal knew it"
        );
    }
    if !unrecorded_start_keys.is_empty() {
        let asked = r
            .proxy
            .seen()
            .iter()
            .filter(|q| q.op() == "ListMultipartUploads")
            .count();
        assert!(
            asked >= 1,
            "interrupted upload starts were not looked for on the server"
        );
    }
    if !open.is_empty() {
        assert!(
            r.setup
                .daemon_log()
                .contains("AbortIncompleteMultipartUpload")
                || drain_log.contains("AbortIncompleteMultipartUpload"),
            "an unrecoverable open upload must be reported"
        );
    }
    eprintln!("open uploads left on the server: {}", open.len());
}

#[test]
fn sigterm_at_random_moments_resends_nothing() {
    let seed = seed() + 1;
    let (stops_wanted, count, delay) = if full() { (20, 300, 40) } else { (6, 200, 10) };
    let mut rng = fastrand::Rng::with_seed(seed);
    let r = rig("term", seed, count, delay);
    let mut stops_mid_work = 0;
    let mut cycles = 0;
    while stops_mid_work < stops_wanted {
        cycles += 1;
        assert!(
            cycles <= stops_wanted * 3,
            "the workload finished too early"
        );
        let mut agent = r.setup.spawn_daemon(bin());
        std::thread::sleep(Duration::from_millis(rng.u64(150..900)));
        sigterm(&agent);
        let st = wait_within(&mut agent, Duration::from_secs(90));
        assert!(st.success(), "SIGTERM must exit 0: {st:?}");
        if r.unfinished() == 0 {
            break;
        }
        stops_mid_work += 1;
    }
    r.drain_and_check("term");
    let sent = r.proxy.data_bytes_sent();
    eprintln!(
        "{stops_mid_work} graceful stops mid-work: data sent {sent} bytes for a {} byte workload",
        r.workload_bytes()
    );
    assert!(stops_mid_work >= stops_wanted);
    assert_eq!(
        sent,
        r.workload_bytes(),
        "a graceful stop must re-send nothing"
    );
    let mut parts: Vec<(String, u32)> = r
        .proxy
        .seen()
        .iter()
        .filter_map(|q| {
            q.part_number()
                .map(|n| (q.target.split('?').next().unwrap_or("").to_string(), n))
        })
        .collect();
    let n = parts.len();
    parts.sort();
    parts.dedup();
    assert_eq!(parts.len(), n, "a part was sent twice");
    assert_eq!(r.s3.open_uploads(), 0);
}

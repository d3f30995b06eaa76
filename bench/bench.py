#!/usr/bin/env python3
"""Side-by-side upload benchmark: ha-edge vs rclone vs the AWS CLI on one S3 server.

Starts one s3s-fs on 127.0.0.1, generates the workloads once, then runs every tool on every
workload for several rounds, rotating the order of the tools each round so that none always
runs first (cold) or last. Each run uploads into a fresh bucket, is timed with /usr/bin/time
(wall time, peak RSS, CPU), and is verified: the bucket must then hold exactly the workload's
files with their sizes. Medians go to stdout as a Markdown table and to results.json.

What each tool read is measured too: for file workloads, `rchar` (bytes through read(2) and
friends, sockets included) of this process, which takes in its children's counts when they are
reaped; for the bucket workloads (`bucket-large`, `bucket-small`: a second s3s-fs plays the
on-premise MinIO, and the tools copy bucket to bucket), the GetObject body bytes that a
counting proxy in front of the source server passed on.

With --tls the destination is reached over https, as in production: stunnel (Debian's
stunnel4) terminates TLS in front of the destination s3s-fs with a certificate from a CA made
for the run, which every tool is told to trust. Its CPU is reported apart ("tls front cpu").

Run it through bench/run.sh, which installs the tools first.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1024 * 1024
AK, SK = "bench-access-key", "bench-secret-key"
# Comparable settings: 4 files at a time, 4 parts of 8 MiB in flight, multipart from 16 MiB.
TRANSFERS, PART_MIB, CUTOFF_MIB = 4, 8, 16

WORKLOADS = {
    "big": ("one 1 GiB file", [("one.bin", 1024 * MIB)]),
    "bucket-large": ("bucket: one 512 MiB object", [("large/one.bin", 512 * MIB)]),
    "bucket-small": ("bucket: 2,000 objects of 20 KiB",
                     [(f"small/d{i // 500}/f{i}.ndjson", 20 * 1024) for i in range(2000)]),
    # Peak RSS flat in object size (not in the default set).
    "bucket-64m": ("bucket: one 64 MiB object", [("o64m/one.bin", 64 * MIB)]),
    "bucket-2g": ("bucket: one 2 GiB object", [("o2g/one.bin", 2048 * MIB)]),
    # bucket-large's object as a local file: what the same destination takes from a client whose
    # source costs nothing (no source server, page cache), the bound of any bucket-to-bucket copy.
    "file-512m": ("one 512 MiB file", [("one.bin", 512 * MIB)]),
    "small": ("5,000 files of 20 KiB", [(f"d{i // 500}/f{i}.ndjson", 20 * 1024) for i in range(5000)]),
    "medium": ("200 files of 8 MiB", [(f"m{i}.bin", 8 * MIB) for i in range(200)]),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workload(root: Path, files):
    marker = root / ".complete"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    old = time.time() - 3600
    with open("/dev/urandom", "rb") as rnd:
        for rel, size in files:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                left = size
                while left:
                    chunk = rnd.read(min(left, 4 * MIB))
                    f.write(chunk)
                    left -= len(chunk)
            os.utime(p, (old, old))
    marker.write_text("ok")


def is_bucket(w):
    return w.startswith("bucket-")


def rchar_self():
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


class CountingProxy:
    """A TCP relay in front of the source server that counts the body bytes of GetObject
    answers (listings and HEADs are told apart by the request line). Bytes move with
    os.splice through a pipe, so the relay is not the bottleneck."""

    def __init__(self, upstream_port):
        import threading
        self.upstream = upstream_port
        self.lock = threading.Lock()
        self.get_bytes = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def reset(self):
        with self.lock:
            n, self.get_bytes = self.get_bytes, 0
        return n

    def accept(self):
        import threading
        while True:
            c, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, client):
        import threading
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        # Client -> server: the request heads are read here (to know which answers are object
        # bodies); server -> client: spliced, counted while a GetObject answer is on its way.
        kinds = []  # one per request sent, in order: True for GetObject
        cv = threading.Condition()

        def upstream():
            buf = b""
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, rest = buf.split(b"\r\n\r\n", 1)
                        line = head.split(b"\r\n", 1)[0].decode("latin-1")
                        method, target = (line.split(" ") + ["", ""])[:2]
                        query = target.split("?", 1)[1] if "?" in target else ""
                        get = method == "GET" and "list-type" not in query and "uploads" not in query \
                            and target.strip("/").count("/") >= 1
                        length = 0
                        for h in head.split(b"\r\n")[1:]:
                            k, _, v = h.decode("latin-1").partition(":")
                            if k.strip().lower() == "content-length":
                                length = int(v.strip())
                        with cv:
                            kinds.append((method, get))
                            cv.notify()
                        body, buf = rest[:length], rest[length:]
                        server.sendall(head + b"\r\n\r\n" + body)
                        while len(body) < length:
                            more = client.recv(min(65536, length - len(body)))
                            if not more:
                                return
                            server.sendall(more)
                            body += more
                    if buf and b"\r\n\r\n" not in buf and len(buf) > 65536:
                        server.sendall(buf)
                        buf = b""
            except OSError:
                pass
            finally:
                try:
                    server.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=upstream, daemon=True).start()
        r, w = os.pipe()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = server.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                head += b"\r\n\r\n"
                client.sendall(head)
                status = int(head.split(b" ", 2)[1])
                if status == 100:
                    continue
                length, chunked = 0, False
                for h in head.split(b"\r\n")[1:]:
                    k, _, v = h.decode("latin-1").partition(":")
                    k = k.strip().lower()
                    if k == "content-length":
                        length = int(v.strip())
                    elif k == "transfer-encoding" and "chunked" in v.lower():
                        chunked = True
                with cv:
                    while not kinds:
                        cv.wait()
                    method, get = kinds.pop(0)
                if method == "HEAD" or status in (204, 304):
                    length, chunked = 0, False
                if chunked:
                    # Not an object body (s3s-fs sends those with a length): pass it on.
                    while not buf.endswith(b"0\r\n\r\n"):
                        data = server.recv(65536)
                        if not data:
                            return
                        client.sendall(data)
                        buf += data
                        buf = buf[-5:]
                    buf = b""
                    continue
                pre, buf = buf[:length], buf[length:]
                client.sendall(pre)
                counted, left = len(pre), length - len(pre)
                while left > 0:
                    n = os.splice(server.fileno(), w, min(left, 1 << 20))
                    if n == 0:
                        return
                    m = 0
                    while m < n:
                        m += os.splice(r, client.fileno(), n - m)
                    left -= n
                    counted += n
                if get and 200 <= status < 300:
                    with self.lock:
                        self.get_bytes += counted
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(r)
            os.close(w)
            client.close()
            server.close()


def bucket_files(bucket_dir: Path):
    out = {}
    for dirpath, _, names in os.walk(bucket_dir):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(bucket_dir))] = p.stat().st_size
    return out


def timed(cmd, env, log):
    """Runs cmd under /usr/bin/time; returns (wall s, peak RSS KiB, user s, sys s, exit code)."""
    tfile = log.with_suffix(".time")
    full = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(tfile)] + cmd
    with open(log, "wb") as lf:
        rc = subprocess.call(full, env=env, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall, rss, user, sys_ = tfile.read_text().strip().splitlines()[-1].split()
    return float(wall), int(rss), float(user), float(sys_), rc


def make_pki(pki: Path, ca_name: str, leaves):
    """A fresh CA (`ca.pem`) in `pki`, and for each (name, subjectAltName) of `leaves` a P-256
    certificate `name.pem` with its key `name.key`, issued by it (openssl)."""
    shutil.rmtree(pki, ignore_errors=True)
    pki.mkdir(parents=True)
    def ossl(*a):
        subprocess.check_call(["openssl", *a], cwd=pki, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN={ca_name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    for name, san in leaves:
        cn = san.split(",")[0].split(":", 1)[1]
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (pki / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def start_tls_front(work: Path, upstream: int):
    """stunnel before 127.0.0.1:upstream, with a certificate for localhost from a fresh CA:
    (process, https endpoint, CA file)."""
    pki = work / "pki-s3"
    make_pki(pki, "bench S3 CA", [("s3", "DNS:localhost,IP:127.0.0.1")])
    port = free_port()
    conf = pki / "stunnel.conf"
    conf.write_text(f"foreground = yes\npid =\noutput = {pki}/stunnel.log\n\n[s3]\n"
                    f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\n"
                    f"cert = {pki}/s3.pem\nkey = {pki}/s3.key\n")
    proc = start_listening([shutil.which("stunnel4") or "stunnel", str(conf)], port)
    return proc, f"https://localhost:{port}", pki / "ca.pem"


def start_listening(cmd, port: int):
    """Starts the server `cmd` and waits (up to 10 s) until it listens on 127.0.0.1:port."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc


class Tools:
    def __init__(self, work: Path, endpoint: str, ha_edge: str, src_endpoint: str = "",
                 ca: Path = None):
        self.work, self.endpoint, self.ha_edge = work, endpoint, ha_edge
        self.src_endpoint = src_endpoint
        # The destination's CA (--tls): a line of the ha-edge configs, a flag of the others.
        self.ca_line = f'ca_file = "{ca}"\n' if ca else ""
        self.rclone_ca = ["--ca-cert", str(ca)] if ca else []
        self.aws_ca = ["--ca-bundle", str(ca)] if ca else []
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        rc = work / "rclone.conf"
        remote = lambda name, ep: (
            f"[{name}]\ntype = s3\nprovider = Other\n"
            f"endpoint = {ep}\nforce_path_style = true\nregion = us-east-1\n"
            f"access_key_id = {AK}\nsecret_access_key = {SK}\n"
        )
        rc.write_text(remote("bench", endpoint) + (remote("src", src_endpoint) if src_endpoint else ""))
        awscfg = work / "aws.config"
        awscfg.write_text(
            "[default]\nregion = us-east-1\ns3 =\n"
            f"  max_concurrent_requests = {TRANSFERS}\n"
            f"  multipart_chunksize = {PART_MIB}MB\n"
            f"  multipart_threshold = {CUTOFF_MIB}MB\n"
            "  addressing_style = path\n"
        )

    def command(self, tool, src, bucket: str, run_dir: Path):
        """The command line of `tool` copying `src` (a directory, or for a bucket workload the
        source bucket's prefix, "large" or "small") into `bucket`."""
        env = dict(self.base_env)
        if isinstance(src, str):
            if tool == "ha-edge":
                cfg = run_dir / "ha-edge.toml"
                cfg.write_text(
                    f'[agent]\njournal = "{run_dir}/journal.db"\nconcurrency = {TRANSFERS}\n'
                    f'parts_in_flight = {TRANSFERS}\npart_size = "{PART_MIB}MiB"\n'
                    f'multipart_threshold = "{CUTOFF_MIB}MiB"\nlog_level = "warn"\n\n'
                    f'[[source]]\nname = "minio"\ntype = "s3"\nendpoint = "{self.src_endpoint}"\n'
                    f'bucket = "onprem"\nprefix = "{src}/"\npath_style = true\n\n'
                    f'[destination]\ntype = "s3"\nendpoint = "{self.endpoint}"\nregion = "us-east-1"\n'
                    f'bucket = "{bucket}"\npath_style = true\n{self.ca_line}'
                )
                env.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK,
                           ONPREM_S3_ACCESS_KEY=AK, ONPREM_S3_SECRET_KEY=SK)
                return [self.ha_edge, "run", "-c", str(cfg), "--once"], env
            if tool == "rclone":
                env["RCLONE_CONFIG"] = str(self.work / "rclone.conf")
                return [
                    "rclone", "copy", f"src:onprem/{src}", f"bench:{bucket}",
                    "--transfers", str(TRANSFERS), "--checkers", "8",
                    "--s3-upload-concurrency", str(TRANSFERS),
                    "--s3-chunk-size", f"{PART_MIB}M", "--s3-upload-cutoff", f"{CUTOFF_MIB}M",
                ] + self.rclone_ca, env
            raise ValueError(f"{tool} has no bucket-to-bucket mode here")
        if tool in ("ha-edge", "ha-edge-custody"):
            # ha-edge-custody: the same, with the metrics endpoint on and receipt batches going
            # to the bucket (what #15 adds), to measure what they cost.
            custody = tool == "ha-edge-custody"
            extra = f'metrics = "127.0.0.1:{free_port()}"\nname = "bench"\n' if custody else ""
            receipts = '\n[receipts]\nprefix = "_receipts/"\nevery = "5m"\n' if custody else ""
            cfg = run_dir / "ha-edge.toml"
            cfg.write_text(
                f'[agent]\njournal = "{run_dir}/journal.db"\nconcurrency = {TRANSFERS}\n'
                f'parts_in_flight = {TRANSFERS}\npart_size = "{PART_MIB}MiB"\n'
                f'multipart_threshold = "{CUTOFF_MIB}MiB"\nlog_level = "warn"\n{extra}\n'
                f'[[source]]\nname = "bench"\ntype = "fs"\npath = "{src}"\nexclude = ["**/.*"]\n\n'
                f'[destination]\ntype = "s3"\nendpoint = "{self.endpoint}"\nregion = "us-east-1"\n'
                f'bucket = "{bucket}"\npath_style = true\n{self.ca_line}{receipts}'
            )
            env.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
            return [self.ha_edge, "run", "-c", str(cfg), "--once"], env
        if tool in ("rclone", "rclone-nohead"):
            env["RCLONE_CONFIG"] = str(self.work / "rclone.conf")
            # rclone-nohead: no HEAD after each upload (rclone then trusts the PUT's answer, as
            # ha-edge does with the SHA-256 the server computed, when it keeps the source).
            return [
                "rclone", "copy", str(src), f"bench:{bucket}",
                "--transfers", str(TRANSFERS), "--checkers", "8",
                "--s3-upload-concurrency", str(TRANSFERS),
                "--s3-chunk-size", f"{PART_MIB}M", "--s3-upload-cutoff", f"{CUTOFF_MIB}M",
                "--exclude", ".complete",
            ] + (["--s3-no-head"] if tool == "rclone-nohead" else []) + self.rclone_ca, env
        if tool == "aws":
            env.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK,
                       AWS_CONFIG_FILE=str(self.work / "aws.config"))
            return [
                "/usr/bin/aws", "s3", "cp", str(src), f"s3://{bucket}/", "--recursive",
                "--endpoint-url", self.endpoint, "--only-show-errors", "--exclude", ".complete",
            ] + self.aws_ca, env
        if tool == "ha-edge-quic":
            # The same agent, through the QUIC relay, which lands in the same server: the wall
            # time ends when the relay has verified and stored every object in S3.
            cfg = run_dir / "ha-edge.toml"
            pki = self.work / "pki"
            cfg.write_text(
                f'[agent]\njournal = "{run_dir}/journal.db"\nconcurrency = {TRANSFERS}\n'
                f'parts_in_flight = {TRANSFERS}\npart_size = "{PART_MIB}MiB"\n'
                f'multipart_threshold = "{CUTOFF_MIB}MiB"\nlog_level = "warn"\n\n'
                f'[[source]]\nname = "bench"\ntype = "fs"\npath = "{src}"\nexclude = ["**/.*"]\n\n'
                f'[destination]\ntype = "quic"\nrelay = "127.0.0.1:{self.relay_port}"\n'
                f'server_name = "relay.bench"\nca_file = "{pki}/ca.pem"\n'
                f'cert_file = "{pki}/agent.pem"\nkey_file = "{pki}/agent.key"\nprefix = "bench/{bucket}/"\n'
            )
            return [self.ha_edge, "run", "-c", str(cfg), "--once"], env
        raise ValueError(tool)

    def start_relay(self, s3dir: Path):
        """Certificates (openssl), a relay landing in bucket "quic" of the same server."""
        pki = self.work / "pki"
        make_pki(pki, "bench CA", [("relay", "DNS:relay.bench"), ("agent", "DNS:agent.bench")])
        (s3dir / "quic").mkdir(exist_ok=True)
        self.relay_port = free_port()
        state = self.work / "relay-state"
        shutil.rmtree(state, ignore_errors=True)
        cfg = self.work / "relay.toml"
        cfg.write_text(
            f'[relay]\nlisten = "127.0.0.1:{self.relay_port}"\ncert_file = "{pki}/relay.pem"\n'
            f'key_file = "{pki}/relay.key"\nclient_ca_file = "{pki}/ca.pem"\nstate_dir = "{state}"\n'
            f'log_level = "warn"\n\n[[agent]]\nidentity = "agent.bench"\nprefix = "bench/"\n\n'
            f'[store]\ntype = "s3"\nendpoint = "{self.endpoint}"\nregion = "us-east-1"\n'
            f'bucket = "quic"\npath_style = true\npart_size = "{PART_MIB}MiB"\n{self.ca_line}'
        )
        env = dict(self.base_env, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
        self.relay_log = open(self.work / "relay.log", "w")
        self.relay = subprocess.Popen([self.ha_edge, "relay", "-c", str(cfg)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=self.relay_log)
        time.sleep(1.0)
        if self.relay.poll() is not None:
            raise SystemExit("the relay did not start: " + (self.work / "relay.log").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ha-edge", required=True, help="the ha-edge binary to measure")
    ap.add_argument("--s3s-fs", required=True)
    ap.add_argument("--work", default="/var/tmp/ha-edge-bench", help="scratch dir (needs ~4 GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="big,small,medium")
    ap.add_argument("--tools", default="ha-edge,rclone,aws")
    ap.add_argument("--server-storage", choices=["tmpfs", "disk"], default="tmpfs",
                    help="where s3s-fs keeps objects: tmpfs (default, as root) keeps the server's "
                         "file system work (ext4 inode allocation dominated it) out of the client "
                         "comparison; disk uses the scratch dir")
    ap.add_argument("--tls", action="store_true",
                    help="reach the destination over https (stunnel in front of its s3s-fs)")
    args = ap.parse_args()

    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    s3dir = work / "s3"
    subprocess.call(["umount", "-q", str(s3dir)], stderr=subprocess.DEVNULL)
    shutil.rmtree(s3dir, ignore_errors=True)
    s3dir.mkdir()
    storage = "disk"
    if args.server_storage == "tmpfs":
        if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", str(s3dir)]) == 0:
            storage = "tmpfs"
        else:
            print("cannot mount a tmpfs for the server (not root?): using the disk", file=sys.stderr)
    args.storage = storage
    workloads = args.workloads.split(",")
    tools = args.tools.split(",")
    for w in workloads:
        print(f"preparing workload {w}: {WORKLOADS[w][0]}", file=sys.stderr)
        make_workload(work / "data" / w, WORKLOADS[w][1])

    def start_s3s(root):
        port = free_port()
        proc = start_listening(
            [args.s3s_fs, "--host", "127.0.0.1", "--port", str(port), "--access-key", AK, "--secret-key", SK, str(root)],
            port)
        return proc, port

    server, port = start_s3s(s3dir)
    front, endpoint, ca = None, f"http://127.0.0.1:{port}", None
    if args.tls:
        front, endpoint, ca = start_tls_front(work, port)
    # The on-premise bucket of the bucket workloads: a second s3s-fs, seeded through its API
    # (so it keeps each object's ETag instead of hashing the file on every request), behind
    # the counting proxy.
    source = proxy = None
    bucket_workloads = [w for w in workloads if is_bucket(w)]
    if bucket_workloads:
        srcdir = work / "s3src"
        subprocess.call(["umount", "-q", str(srcdir)], stderr=subprocess.DEVNULL)
        shutil.rmtree(srcdir, ignore_errors=True)
        srcdir.mkdir()
        if storage == "tmpfs":
            subprocess.call(["mount", "-t", "tmpfs", "-o", "size=3g", "tmpfs", str(srcdir)])
        (srcdir / "onprem").mkdir()
        source, src_port = start_s3s(srcdir)
        proxy = CountingProxy(src_port)
        seed_conf = work / "seed-rclone.conf"
        seed_conf.write_text(
            "[seed]\ntype = s3\nprovider = Other\n"
            f"endpoint = http://127.0.0.1:{src_port}\nforce_path_style = true\nregion = us-east-1\n"
            f"access_key_id = {AK}\nsecret_access_key = {SK}\n")
        for w in bucket_workloads:
            print(f"seeding the source bucket with {w}", file=sys.stderr)
            subprocess.check_call(
                ["rclone", "copy", str(work / "data" / w), "seed:onprem", "--exclude", ".complete",
                 "--transfers", "16", "--s3-upload-cutoff", "5G", "--s3-chunk-size", "64M"],
                env=dict(os.environ, RCLONE_CONFIG=str(seed_conf)))
    t = None
    try:
        t = Tools(work, endpoint, args.ha_edge,
                  f"http://127.0.0.1:{proxy.port}" if proxy else "", ca)
        if "ha-edge-quic" in tools:
            t.start_relay(s3dir)
        results = {w: {tool: [] for tool in tools} for w in workloads}
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[: r % len(tools)]
            for w in workloads:
                src = work / "data" / w
                expected = {rel: size for rel, size in WORKLOADS[w][1]}
                if is_bucket(w):
                    # Copied from the prefix "large/" or "small/": keys below it.
                    src = WORKLOADS[w][1][0][0].split("/", 1)[0]
                    expected = {rel.split("/", 1)[1]: size for rel, size in WORKLOADS[w][1]}
                for tool in order:
                    if is_bucket(w) and tool not in ("ha-edge", "rclone"):
                        continue
                    bucket = f"{tool.replace('-', '')}-{w}-{r}"
                    run_dir = work / "runs" / bucket
                    shutil.rmtree(run_dir, ignore_errors=True)
                    run_dir.mkdir(parents=True)
                    landed = s3dir / "quic" / "bench" / bucket if tool == "ha-edge-quic" else s3dir / bucket
                    landed.mkdir(parents=True)
                    subprocess.call(["sync"])
                    cmd, env = t.command(tool, src, bucket, run_dir)
                    srv_before = proc_cpu(server.pid)
                    tls_before = proc_cpu(front.pid) if front else 0.0
                    relay_before = proc_cpu(t.relay.pid) if tool == "ha-edge-quic" else 0.0
                    if proxy:
                        proxy.reset()
                    src_before = proc_cpu(source.pid) if source is not None else 0.0
                    rchar_before = rchar_self()
                    wall, rss, user, sys_, rc = timed(cmd, env, run_dir / "log.txt")
                    # Bytes read from the source: the proxy's count for a bucket, else what
                    # the tool's process read (rchar, sockets included).
                    read = proxy.reset() if is_bucket(w) else rchar_self() - rchar_before
                    srv_cpu = proc_cpu(server.pid) - srv_before
                    tls_cpu = proc_cpu(front.pid) - tls_before if front else 0.0
                    src_cpu = proc_cpu(source.pid) - src_before if is_bucket(w) else 0.0
                    relay_cpu = proc_cpu(t.relay.pid) - relay_before if tool == "ha-edge-quic" else 0.0
                    got = bucket_files(landed)
                    if tool == "ha-edge-custody":
                        batches = [k for k in got if k.startswith("_receipts/")]
                        if not batches:
                            print("ha-edge-custody: no receipt batch in the bucket", file=sys.stderr)
                            sys.exit(1)
                        got = {k: v for k, v in got.items() if not k.startswith("_receipts/")}
                    ok = rc == 0 and got == expected
                    print(f"round {r + 1} {w:6} {tool:7} {wall:7.2f}s rss {rss / 1024:6.1f} MiB "
                          f"cpu {user + sys_:6.2f}s server cpu {srv_cpu:6.2f}s "
                          + (f"source server cpu {src_cpu:6.2f}s " if is_bucket(w) else "")
                          + (f"relay cpu {relay_cpu:6.2f}s " if tool == "ha-edge-quic" else "")
                          + (f"tls front cpu {tls_cpu:6.2f}s " if front else "") +
                          f"read {read / MIB:8.1f} MiB "
                          f"{'ok' if ok else 'FAILED rc=%d files=%d' % (rc, len(got))}",
                          file=sys.stderr)
                    if not ok:
                        print((run_dir / "log.txt").read_text()[-3000:], file=sys.stderr)
                        sys.exit(1)
                    results[w][tool].append({"wall": wall, "rss_kib": rss, "cpu": user + sys_,
                                             "server_cpu": srv_cpu, "relay_cpu": relay_cpu,
                                             "read_bytes": read, "source_cpu": src_cpu,
                                             "tls_cpu": tls_cpu})
                    shutil.rmtree(landed)
    finally:
        if t is not None and getattr(t, "relay", None) is not None:
            hwm = [l for l in Path(f"/proc/{t.relay.pid}/status").read_text().splitlines()
                   if l.startswith("VmHWM:")]
            if hwm:
                print(f"relay peak RSS {int(hwm[0].split()[1]) / 1024:.1f} MiB", file=sys.stderr)
            t.relay.terminate()
            t.relay.wait()
        server.terminate()
        server.wait()
        if front is not None:
            front.terminate()
            front.wait()
        if source is not None:
            source.terminate()
            source.wait()
        if storage == "tmpfs":
            subprocess.call(["umount", str(s3dir)])
            if source is not None:
                subprocess.call(["umount", str(work / "s3src")])

    summary = report(results, workloads, tools, args)
    (work / "results.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))


def proc_cpu(pid):
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(results, workloads, tools, args):
    sizes = {"ha-edge": os.path.getsize(args.ha_edge)}
    rclone = shutil.which("rclone")
    if rclone:
        sizes["rclone"] = os.path.getsize(rclone)
    summary = {}
    print(f"\nMedians of {args.rounds} rounds; s3s-fs on 127.0.0.1 storing on {args.storage}; "
          f"{TRANSFERS} transfers, {TRANSFERS} parts of {PART_MIB} MiB in flight, multipart from "
          f"{CUTOFF_MIB} MiB.\n")
    print("| workload | tool | wall s | MB/s | files/s | peak RSS MiB | CPU s | CPU s/GB | server CPU s | read / size |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in workloads:
        files = WORKLOADS[w][1]
        total = sum(s for _, s in files)
        summary[w] = {}
        for tool in tools:
            runs = results[w][tool]
            if not runs:
                continue
            wall = statistics.median(x["wall"] for x in runs)
            rss = statistics.median(x["rss_kib"] for x in runs) / 1024
            cpu = statistics.median(x["cpu"] for x in runs)
            srv = statistics.median(x["server_cpu"] for x in runs)
            row = {
                "wall_s": wall, "mb_per_s": total / wall / 1e6, "files_per_s": len(files) / wall,
                "peak_rss_mib": rss, "cpu_s": cpu, "cpu_s_per_gb": cpu / (total / 1e9),
                "server_cpu_s": srv,
                "read_ratio": statistics.median(x["read_bytes"] for x in runs) / total,
            }
            summary[w][tool] = row
            print(f"| {WORKLOADS[w][0]} | {tool} | {wall:.2f} | {row['mb_per_s']:.1f} | "
                  f"{row['files_per_s']:.0f} | {rss:.1f} | {cpu:.2f} | {row['cpu_s_per_gb']:.2f} | "
                  f"{srv:.2f} | {row['read_ratio']:.2f} |")
    if any(is_bucket(w) for w in workloads):
        print("\nbucket workloads: CPU of the source server (the second s3s-fs), median: " + ", ".join(
            f"{WORKLOADS[w][0]} / {tool}: {statistics.median(x['source_cpu'] for x in results[w][tool]):.2f} s"
            for w in workloads if is_bucket(w) for tool in tools if results[w][tool]))
    if "ha-edge-quic" in tools:
        print("\nha-edge-quic: agent -> QUIC relay on 127.0.0.1 -> the same S3 server; the relay's "
              "CPU (median) was " + ", ".join(
                  f"{WORKLOADS[w][0]}: {statistics.median(x['relay_cpu'] for x in results[w]['ha-edge-quic']):.2f} s"
                  for w in workloads if results[w]["ha-edge-quic"]))
    if "ha-edge" in tools and "rclone" in tools:
        print("\n| workload | throughput ha-edge/rclone | peak RSS ha-edge/rclone | CPU ha-edge/rclone |")
        print("|---|---|---|---|")
        for w in workloads:
            h, r = summary[w]["ha-edge"], summary[w]["rclone"]
            print(f"| {WORKLOADS[w][0]} | {r['wall_s'] / h['wall_s']:.2f} | "
                  f"{h['peak_rss_mib'] / r['peak_rss_mib']:.2f} | {h['cpu_s'] / r['cpu_s']:.2f} |")
    if "ha-edge" in tools and "rclone-nohead" in tools:
        print("\nthroughput ha-edge / rclone --s3-no-head: " + ", ".join(
            f"{WORKLOADS[w][0]}: {summary[w]['rclone-nohead']['wall_s'] / summary[w]['ha-edge']['wall_s']:.2f}"
            for w in workloads))
    print("\nbinary sizes: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sizes.items()))
    return summary


if __name__ == "__main__":
    main()

"""CPU of one 1 GiB multipart upload (8 MiB parts) by two ha-edge binaries, alternating, on
tmpfs (/dev/shm) with s3s-fs (/opt/s3s-fs, scripts/install-s3s-fs.sh) on 127.0.0.1: the agent's
user+sys seconds and wall time per run, then medians. For a change's CPU cost, e.g.:

    python3 bench/cpu-compare.py OLD/ha-edge target/release/ha-edge 3
"""
import os, resource, shutil, subprocess, sys, time, socket

base, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
root = "/dev/shm/meas"
shutil.rmtree(root, ignore_errors=True)
os.makedirs(f"{root}/src"); os.makedirs(f"{root}/s3/bench")
with open(f"{root}/src/big.ndjson", "wb") as f:
    block = os.urandom(1 << 20)
    for _ in range(1024):
        f.write(block)
old = time.time() - 3600
os.utime(f"{root}/src/big.ndjson", (old, old))
port = 19555
s3 = subprocess.Popen(["/opt/s3s-fs/bin/s3s-fs", "--host", "127.0.0.1", "--port", str(port),
                       "--access-key", "ak", "--secret-key", "sk", f"{root}/s3"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError:
        time.sleep(0.1)
cfg = f"{root}/c.toml"
open(cfg, "w").write(f"""[agent]
journal = "{root}/state/j.db"
[[source]]
name = "x"
type = "fs"
path = "{root}/src"
[destination]
type = "s3"
endpoint = "http://127.0.0.1:{port}"
region = "eu-central-1"
bucket = "bench"
path_style = true
""")
env = dict(os.environ, AWS_ACCESS_KEY_ID="ak", AWS_SECRET_ACCESS_KEY="sk", RUST_LOG="warn")
res = {base: [], new: []}
for r in range(rounds):
    for b in (base, new):
        shutil.rmtree(f"{root}/state", ignore_errors=True)
        for e in os.listdir(f"{root}/s3/bench"):
            p = f"{root}/s3/bench/{e}"
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.time()
        out = subprocess.run([b, "run", "-c", cfg, "--once"], env=env, capture_output=True)
        wall = time.time() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        user = after.ru_utime - before.ru_utime
        res[b].append((cpu, user, wall))
        print(f"{'base' if b == base else 'new '} round {r}: cpu {cpu:.2f} s (user {user:.2f}), wall {wall:.2f} s", flush=True)
s3.terminate()
for b, name in ((base, "base"), (new, "new")):
    cpus = sorted(x[0] for x in res[b]); users = sorted(x[1] for x in res[b]); walls = sorted(x[2] for x in res[b])
    print(f"{name}: median cpu {cpus[len(cpus)//2]:.2f} s, user {users[len(users)//2]:.2f} s, wall {walls[len(walls)//2]:.2f} s")
shutil.rmtree(root, ignore_errors=True)

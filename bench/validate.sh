#!/usr/bin/env bash
# Record-check throughput: `ha-edge check` (the code `validate = "fhir-ndjson"` runs before a
# file is sent) over generated FHIR Bulk Data NDJSON, Synthea-like Patient and Observation
# resources (no real data). Prints MB/s per core (bytes / CPU seconds of the one thread) and
# wall-clock MB/s, median of the rounds.
#
#   bench/validate.sh [--mib N] [--rounds N]     (default 512 MiB per resource type, 5 rounds)
#   NETLAB=path/to/netlab.sh bench/validate.sh --link   (root: delivery over the WAN emulator,
#       RTT 40 ms, 100 Mbit/s, 8 x 32 MiB NDJSON files, validate on and off alternating)
#
# Uses the static release binary the packages ship (built if missing). Scratch space:
# /var/tmp/ha-edge-validate.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=512 rounds=5 link=0
while [ $# -gt 0 ]; do
  case "$1" in
    --link) link=1; shift ;;
    --mib) mib="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
bin="dist/ha-edge-$version-x86_64-unknown-linux-musl"
[ -x "$bin" ] || packaging/build.sh --no-package x86_64-unknown-linux-musl >/dev/null
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
work=/var/tmp/ha-edge-validate
mkdir -p "$work"
python3 - "$work" "$mib" <<'PY'
import json, os, random, sys
work, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
def patient(i):
    return {"resourceType": "Patient", "id": f"pat-{i:08d}",
            "meta": {"lastUpdated": "2026-11-30T12:00:00.000+01:00", "profile": ["http://hl7.org/fhir/StructureDefinition/Patient"]},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Generated</div>"},
            "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                           "valueAddress": {"city": "Heidelberg", "state": "BW", "country": "DE"}}],
            "identifier": [{"system": "urn:oid:1.2.276.0.76.4.8", "value": f"{rnd.randrange(10**9):09d}"},
                           {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                            "system": "https://klinik.example/mrn", "value": f"MRN{i:08d}"}],
            "name": [{"use": "official", "family": f"Muster{i % 997}", "given": ["Max", "Erika"][i % 2:][:1], "prefix": ["Dr."] if i % 7 == 0 else []}],
            "telecom": [{"system": "phone", "value": f"+49 6221 {rnd.randrange(10**6):06d}", "use": "home"}],
            "gender": ["male", "female"][i % 2], "birthDate": f"19{rnd.randrange(30, 99)}-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}",
            "address": [{"line": [f"Hauptstra\u00dfe {i % 200}"], "city": "Heidelberg", "postalCode": "69117", "country": "DE"}],
            "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M", "display": "Married"}]}}
def observation(i):
    return {"resourceType": "Observation", "id": f"obs-{i:08d}",
            "meta": {"lastUpdated": "2026-11-30T12:00:00.000+01:00"},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "Heart rate"},
            "subject": {"reference": f"Patient/pat-{i % 100000:08d}"},
            "encounter": {"reference": f"Encounter/enc-{i % 300000:08d}"},
            "effectiveDateTime": f"2026-{rnd.randrange(1, 12):02d}-{rnd.randrange(1, 29):02d}T{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:00+01:00",
            "issued": "2026-11-30T12:00:00.000+01:00",
            "valueQuantity": {"value": round(rnd.uniform(40, 180), 1), "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
for name, make in (("Patient", patient), ("Observation", observation)):
    path = os.path.join(work, f"{name}.ndjson")
    if os.path.exists(path) and os.path.getsize(path) >= mib << 20:
        continue
    with open(path, "w") as f:
        size, i = 0, 0
        while size < mib << 20:
            line = json.dumps(make(i), ensure_ascii=False, separators=(",", ":")) + "\n"
            f.write(line); size += len(line.encode()); i += 1
PY
printf '| file | size | lines | MB/s per core (CPU) | MB/s wall |\n|---|---|---|---|---|\n'
for name in Patient Observation; do
  f="$work/$name.ndjson"
  size=$(stat -c %s "$f"); lines=$(wc -l < "$f")
  cat "$f" > /dev/null   # warm the page cache: the check, not the disk, is measured
  cpu=() wall=()
  for _ in $(seq "$rounds"); do
    t=$( { /usr/bin/time -f "%U %S %e" "$bin" check --as fhir-ndjson "$f" >/dev/null; } 2>&1 | tail -n 1)
    read -r u s e <<<"$t"
    cpu+=("$(python3 -c "print($size / max($u + $s, 1e-3) / 1e6)")")
    wall+=("$(python3 -c "print($size / max($e, 1e-3) / 1e6)")")
  done
  med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  printf '| %s.ndjson | %d MiB | %d | %.0f | %.0f |\n' "$name" $((size >> 20)) "$lines" "$(med "${cpu[@]}")" "$(med "${wall[@]}")"
done

[ "$link" = 1 ] || exit 0
# Delivery over the emulated link, with and without the check: the agent in the `onprem`
# namespace, s3s-fs in `cloud`; throughput from the agent's own receipts.
netlab="${NETLAB:?set NETLAB to the WAN emulator (netlab.sh)}"
s3s="${S3S_FS_ROOT:-/opt/s3s-fs}/bin/s3s-fs"
scripts/install-s3s-fs.sh >/dev/null
run="$work/link"
rm -rf "$run"; mkdir -p "$run/files" "$run/s3"
split -C 32m -d -a 2 --additional-suffix=.ndjson "$work/Observation.ndjson" "$run/files/obs-"
ls "$run/files" | tail -n +9 | sed "s|^|$run/files/|" | xargs rm -f
touch -d '1 hour ago' "$run/files"/*
"$netlab" up --mode wire --delay 20 --rate 100mbit >/dev/null
trap '"$netlab" down >/dev/null 2>&1 || true; kill "${server:-0}" 2>/dev/null || true' EXIT
ip netns exec cloud "$s3s" --host 198.18.0.2 --port 19556 --access-key AK --secret-key SKSKSKSK "$run/s3" >/dev/null 2>&1 &
server=$!
sleep 1
printf '\n| over RTT 40 ms, 100 Mbit/s | round | MB delivered | seconds | Mbit/s |\n|---|---|---|---|---|\n'
for round in 1 2; do
  for mode in none fhir-ndjson; do
    r="$run/$mode-$round"; mkdir -p "$r" "$run/s3/v-$round-${mode/-/}"
    cat >"$r/agent.toml" <<TOML
[agent]
journal = "$r/journal.db"
log_level = "warn"
[[source]]
name = "obs"
type = "fs"
path = "$run/files"
validate = "$mode"
[destination]
type = "s3"
endpoint = "http://198.18.0.2:19556"
region = "eu-central-1"
bucket = "v-$round-${mode/-/}"
path_style = true
TOML
    t0=$(date +%s.%N)
    AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SKSKSKSK ip netns exec onprem "$bin" run --once -c "$r/agent.toml" 2>"$r/log"
    t1=$(date +%s.%N)
    bytes=$(du -cb "$run/files"/* | tail -n 1 | cut -f1)
    python3 -c "b=$bytes; s=$t1-$t0; print(f'| validate = \"$mode\" | $round | {b/1e6:.0f} | {s:.1f} | {b*8/s/1e6:.1f} |')"
  done
done

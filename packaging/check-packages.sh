#!/usr/bin/env bash
# Checks the built packages on this machine (as root): installs the x86_64 .deb, checks files,
# user and modes, validates the installed config, verifies the systemd unit, re-installs over a
# modified config (which must survive), purges, and checks that nothing is left behind.
# The .rpm is inspected with rpm -qip/-qlp/-qcp/--scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
deb="dist/ha-edge_${version}_amd64.deb"
rpm="dist/ha-edge-${version}-1.x86_64.rpm"
command -v rpm >/dev/null || { apt-get update -qq && apt-get install -y -qq rpm; }
fail() { echo "FAIL: $*" >&2; exit 1; }
mode() { stat -c '%a %U:%G' "$1"; }

echo "== $deb"
dpkg-deb --info "$deb" | sed -n '1,12p'
if dpkg -s ha-edge >/dev/null 2>&1; then dpkg -P ha-edge >/dev/null; fi
dpkg -i "$deb"
[ "$(mode /usr/bin/ha-edge)" = "755 root:root" ] || fail "/usr/bin/ha-edge: $(mode /usr/bin/ha-edge)"
[ "$(mode /etc/ha-edge/ha-edge.toml)" = "644 root:root" ] || fail "config: $(mode /etc/ha-edge/ha-edge.toml)"
[ "$(mode /etc/ha-edge/credentials)" = "700 root:root" ] || fail "credentials dir: $(mode /etc/ha-edge/credentials)"
[ "$(mode /var/lib/ha-edge)" = "750 ha-edge:ha-edge" ] || fail "state dir: $(mode /var/lib/ha-edge)"
getent passwd ha-edge | grep -q ':/var/lib/ha-edge:/usr/sbin/nologin$' || fail "user: $(getent passwd ha-edge)"
test -f /usr/lib/systemd/system/ha-edge.service || fail "unit missing"
test -f /usr/lib/systemd/system/ha-edge-relay.service || fail "relay unit missing"
test -f /usr/share/doc/ha-edge/examples/relay.toml || fail "relay example missing"
test ! -e /etc/ha-edge/relay.toml || fail "the package must not install a relay config"
test -f /usr/lib/sysusers.d/ha-edge.conf || fail "sysusers missing"
dpkg-query -W -f='${Conffiles}\n' ha-edge | grep -q '/etc/ha-edge/ha-edge.toml' || fail "config is not a conffile"
/usr/bin/ha-edge --version

# The installed config validates once its source directory exists and credentials are given.
made_src=0
if [ ! -d /srv/exports/fhir ]; then mkdir -p /srv/exports/fhir; made_src=1; fi
AWS_ACCESS_KEY_ID=check AWS_SECRET_ACCESS_KEY=check /usr/bin/ha-edge validate --offline -c /etc/ha-edge/ha-edge.toml

echo "== systemd unit"
systemd-analyze verify /usr/lib/systemd/system/ha-edge.service
systemd-analyze security --offline=yes /usr/lib/systemd/system/ha-edge.service 2>/dev/null | tail -n 1 || true
systemd-analyze verify /usr/lib/systemd/system/ha-edge-relay.service
systemd-analyze security --offline=yes /usr/lib/systemd/system/ha-edge-relay.service 2>/dev/null | tail -n 1 || true

echo "== upgrade keeps the operator's config"
echo "# edited by the operator" >>/etc/ha-edge/ha-edge.toml
dpkg -i --force-confold "$deb" >/dev/null
grep -q "edited by the operator" /etc/ha-edge/ha-edge.toml || fail "re-install replaced the edited config"

echo "== remove keeps state, purge removes everything"
touch /var/lib/ha-edge/journal.db
dpkg -r ha-edge >/dev/null
test ! -e /usr/bin/ha-edge || fail "binary left after remove"
test -e /var/lib/ha-edge/journal.db || fail "remove must keep the journal"
dpkg -P ha-edge >/dev/null
for p in /usr/bin/ha-edge /etc/ha-edge /var/lib/ha-edge /usr/lib/systemd/system/ha-edge.service \
         /usr/lib/systemd/system/ha-edge-relay.service \
         /usr/lib/sysusers.d/ha-edge.conf /usr/lib/tmpfiles.d/ha-edge.conf /usr/share/doc/ha-edge; do
  test ! -e "$p" || fail "$p left after purge"
done
! getent passwd ha-edge >/dev/null || fail "user left after purge"
! getent group ha-edge >/dev/null || fail "group left after purge"
[ "$made_src" = 1 ] && rmdir /srv/exports/fhir /srv/exports 2>/dev/null || true

echo "== $rpm"
rpm -qip "$rpm"
files="$(rpm -qlp "$rpm")"
echo "$files"
for f in /usr/bin/ha-edge /etc/ha-edge/ha-edge.toml /etc/ha-edge/credentials /var/lib/ha-edge \
         /usr/lib/systemd/system/ha-edge.service /usr/lib/systemd/system/ha-edge-relay.service \
         /usr/share/doc/ha-edge/examples/relay.toml; do
  grep -qx "$f" <<<"$files" || fail "$f missing from the rpm"
done
rpm -qcp "$rpm" | grep -qx /etc/ha-edge/ha-edge.toml || fail "config is not %config in the rpm"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm" | grep -q '^cn /etc/ha-edge/ha-edge.toml' \
  || fail "config is not %config(noreplace)"
rpm -qp --scripts "$rpm" | grep -q userdel || fail "rpm scripts missing"
echo "packages: all checks passed"

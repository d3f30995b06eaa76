#!/bin/sh
# After install or upgrade: the system user, the state and credentials directories, and a
# daemon-reload. The service is not enabled or started: the operator configures it first.
set -e
if ! getent passwd ha-edge >/dev/null; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/ha-edge.conf
  else
    useradd --system --user-group --home-dir /var/lib/ha-edge --no-create-home \
      --shell /usr/sbin/nologin --comment "ha-edge edge agent" ha-edge
  fi
fi
mkdir -p /var/lib/ha-edge /etc/ha-edge/credentials
chown ha-edge:ha-edge /var/lib/ha-edge
chmod 0750 /var/lib/ha-edge
chown root:root /etc/ha-edge/credentials
chmod 0700 /etc/ha-edge/credentials
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
  # An upgrade restarts a running agent (it resumes from its journal) or relay (agents resume
  # their transfers from what its disk holds).
  for unit in ha-edge.service ha-edge-relay.service; do
    if systemctl is-active --quiet "$unit"; then
      systemctl try-restart "$unit" || true
    fi
  done
fi
exit 0

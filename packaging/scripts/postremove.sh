#!/bin/sh
# After removal. Only a purge (dpkg -P) deletes state, credentials and the system user;
# a plain remove keeps them so that a re-install resumes from the journal.
set -e
if [ "$1" = "purge" ]; then
  rm -rf /var/lib/ha-edge /var/lib/ha-edge-relay /etc/ha-edge/credentials
  rmdir /etc/ha-edge 2>/dev/null || true
  if getent passwd ha-edge >/dev/null; then
    userdel ha-edge >/dev/null 2>&1 || true
  fi
  if getent group ha-edge >/dev/null; then
    groupdel ha-edge >/dev/null 2>&1 || true
  fi
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0

#!/bin/sh
# Before removal (not before an upgrade): stop and disable the services. The journal stays, so
# a re-install resumes where the agent stopped.
set -e
case "$1" in
  remove|purge|0)
    if [ -d /run/systemd/system ]; then
      for unit in ha-edge.service ha-edge-relay.service; do
        systemctl stop "$unit" >/dev/null 2>&1 || true
        systemctl disable "$unit" >/dev/null 2>&1 || true
      done
    fi
    ;;
esac
exit 0

#!/bin/sh
# Before removal (not before an upgrade): stop and disable the service. The journal stays, so
# a re-install resumes where the agent stopped.
set -e
case "$1" in
  remove|purge|0)
    if [ -d /run/systemd/system ]; then
      systemctl stop ha-edge.service >/dev/null 2>&1 || true
      systemctl disable ha-edge.service >/dev/null 2>&1 || true
    fi
    ;;
esac
exit 0

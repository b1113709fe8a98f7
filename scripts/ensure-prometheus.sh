#!/bin/sh
# Install Debian's prometheus when it is missing (the telemetry tests start their own).
set -eu
command -v prometheus >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "prometheus is missing and this user cannot install it: apt-get install prometheus" >&2
    exit 1
  fi
fi
echo "installing prometheus (Debian package) ..." >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2

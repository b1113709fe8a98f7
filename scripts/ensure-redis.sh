#!/bin/sh
# Install Debian's redis-server when it is missing (the Redis tests start their own).
set -eu
command -v redis-server >/dev/null 2>&1 && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "redis-server is missing and this user cannot install it: apt-get install redis-server" >&2
    exit 1
  fi
fi
echo "installing redis-server (Debian package) ..." >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >&2

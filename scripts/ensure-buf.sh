#!/bin/sh
# Print the path of buf (npm @bufbuild/buf, pinned), installing it into .tools/ first
# when it is missing. Needs node and npm (Debian packages `nodejs` and `npm`).
set -eu
VERSION=1.75.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUF="$ROOT/.tools/node_modules/.bin/buf"
if [ -x "$BUF" ] && "$BUF" --version 2>/dev/null | grep -qx "$VERSION"; then
  echo "$BUF"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "installing npm (Debian package, for buf) ..." >&2
  SUDO=""
  [ "$(id -u)" != 0 ] && SUDO="sudo -n"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >&2
fi
echo "installing buf $VERSION (npm @bufbuild/buf) into .tools/ ..." >&2
mkdir -p "$ROOT/.tools"
npm install --prefix "$ROOT/.tools" --no-save --no-audit --no-fund --silent \
  "@bufbuild/buf@$VERSION" >&2
echo "$BUF"

#!/bin/sh
# Print the path of a uv executable, installing uv from PyPI with pip when missing.
set -eu
if command -v uv >/dev/null 2>&1; then command -v uv; exit 0; fi
user_bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts", "posix_user"))')"
if [ ! -x "$user_bin/uv" ]; then
  python3 -m pip install --quiet --user --disable-pip-version-check uv >&2
fi
echo "$user_bin/uv"

#!/bin/sh
# `make lint`'s breaking-change check of the contract: `buf breaking` (the FILE rules of
# buf.yaml) between the working tree's protos/ and the previous release tag, the newest
# `v*` tag reachable from HEAD. Before the first release there is nothing to break:
# it says so in one line and succeeds. Run from the repository root.
set -eu
BUF=$("$(dirname "$0")/ensure-buf.sh")
if ! TAG=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null); then
  echo "buf breaking: skipped, no release tag (v*) yet"
  exit 0
fi
# The tag's buf.yaml and protos/, unpacked from git (works in a worktree too, and
# needs no network).
AGAINST=$(mktemp -d)
trap 'rm -rf "$AGAINST"' EXIT
git archive "$TAG" -- buf.yaml protos | tar -x -C "$AGAINST"
echo "buf breaking: against $TAG"
"$BUF" breaking --against "$AGAINST"

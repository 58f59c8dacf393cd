#!/usr/bin/env bash
# Checks proto/ for breaking changes (buf FILE rules) against the accepted contract baseline: the
# commit in .ci/buf-breaking-base. A deliberate break is accepted by moving that file to a newer
# commit in the same change, with the reason in the commit message. BASE=<ref> overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${BASE:-$(tr -d '[:space:]' < .ci/buf-breaking-base)}"
if ! git cat-file -e "${base}^{commit}" 2>/dev/null; then
  echo "buf breaking: baseline ${base} is not in this clone's history" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$base" proto buf.yaml | tar -x -C "$tmp"
mkdir -p "$tmp/.build"
cp -r .build/include "$tmp/.build/include"
npx buf breaking proto --against "$tmp/proto"
echo "buf breaking: no breaking changes against ${base:0:12}"

#!/usr/bin/env bash
# Replaces the vendored advisories with those of a RustSec advisory-db
# checkout, for the crates in Cargo.lock (deploy/advisory-db/README.md).
set -euo pipefail
src="${1:?usage: refresh.sh PATH-TO-ADVISORY-DB-CHECKOUT}"
cd "$(dirname "$0")/../.."
dest=deploy/advisory-db/advisory-db-3157b0e258782691/crates
rm -rf "$dest" && mkdir -p "$dest"
for c in $(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.lock | sort -u); do
  if [ -d "$src/crates/$c" ]; then cp -r "$src/crates/$c" "$dest/"; fi
done
echo "$(ls "$dest" | wc -l) crates, $(find "$dest" -name '*.md' | wc -l) advisories from $(git -C "$src" rev-parse HEAD 2>/dev/null || echo "$src")"

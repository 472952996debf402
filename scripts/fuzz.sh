#!/usr/bin/env bash
# Runs every fuzz target in the module for $FUZZTIME (default 200000x: a
# count of inputs), one at a time. A count, not a duration: Go 1.26's fuzz
# coordinator can fail a duration run at its deadline with "context deadline
# exceeded" and no failing input (golang/go#75804, fixed in Go 1.27).
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-200000x}
grep -rl --include='*_test.go' '^func Fuzz' . | while read -r f; do
  pkg=./$(dirname "${f#./}")
  for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | cut -d' ' -f2); do
    echo "fuzz $pkg $target for $fuzztime"
    go test -tags simulator -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg"
  done
done

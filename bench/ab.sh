#!/usr/bin/env bash
# Runs the same workloads with two sagatx binaries one after the other, so
# that a change is measured against its base on the same day and machine.
# Usage: bench/ab.sh BASE_BINARY NEW_BINARY [WORKLOADS...]
# (default workloads: memory, then postgres, which needs SAGATX_BENCH_PG_URL).
# Build the base with: git worktree add /tmp/base <commit> &&
#   (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target cargo build --release -p sagatx-cli)
set -euo pipefail
base="$1"; new="$2"; shift 2
workloads=("${@:-memory postgres}")
for w in ${workloads[@]}; do
  for b in "$base" "$new"; do
    echo "== $b $w"
    "$b" bench --workload "$w" 2>/dev/null
  done
done

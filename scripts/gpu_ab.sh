#!/usr/bin/env bash
# A/B on one GPU machine, so that times compare on the same card: scripts/gpu_pg_check.sh (with the caller's
# GRAPH_*, PROFILE_*, PG_CHECK ... settings) on this tree (a), then again with the patch $PATCH applied (b).
# REVERSE=1: (a) is this tree with $PATCH taken back (e.g. `git diff <baseline> > ab.patch`), (b) this tree.
# EARLY_TESTS run in (a) only.  Each half gets HALF_S seconds (default 280).  Logs: $OUT/a, $OUT/b.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
half=${HALF_S:-280}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
apply() { git apply "$@" "$PATCH" 2>/dev/null || patch -p1 "$@" < "$PATCH"; }
if [ "${REVERSE:-0}" = 1 ] && ! apply -R > /dev/null; then echo "=== a: $PATCH does not come off"; exit 2; fi
OUT=$out/a timeout "$half" bash scripts/gpu_pg_check.sh > "$out/a.txt" 2>&1
echo "=== a rc=$? at ${SECONDS}s"; cat "$out/a/summary.txt"
if ! apply > /dev/null; then echo "=== b: $PATCH does not apply"; exit 2; fi
EARLY_TESTS="" OUT=$out/b timeout "$half" bash scripts/gpu_pg_check.sh > "$out/b.txt" 2>&1
echo "=== b rc=$? at ${SECONDS}s"; cat "$out/b/summary.txt"

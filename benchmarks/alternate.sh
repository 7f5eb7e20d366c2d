#!/usr/bin/env bash
# Time one command as a user meets it (a fresh process, wall seconds) from an earlier revision and from the
# working tree, alternating, each run after a 3 s rest, so that both meet the machine in the same minutes.
#
#   benchmarks/alternate.sh REVISION N COMMAND...
#   benchmarks/alternate.sh 01cd00b 7 sweep run "$PWD/configs/quickstart.yaml" --out /tmp/tm --no-progress --overwrite
#
# Paths in COMMAND are to be absolute: each side runs in a working folder of its own (an MLflow store made
# there is its own). The earlier revision runs from a temporary worktree put first on PYTHONPATH (the
# installed `sweep` command then imports its sweep/ and workers/); both use the active environment. Each
# run prints "before|now SECONDS rc=CODE".
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
revision=$1 count=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d -t sweep-alternate-XXXXXX)
trap 'git -C "$root" worktree remove --force "$scratch/before" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
git -C "$root" worktree add --detach "$scratch/before" "$revision" >/dev/null 2>&1
mkdir -p "$scratch/cwd-before" "$scratch/cwd-now"
for _ in $(seq "$count"); do
    for side in before now; do
        sleep 3
        start=$(date +%s.%N)
        if [ "$side" = before ]; then
            (cd "$scratch/cwd-$side" && PYTHONPATH="$scratch/before" "$@") >"$scratch/$side.log" 2>&1 && rc=0 || rc=$?
        else
            (cd "$scratch/cwd-$side" && "$@") >"$scratch/$side.log" 2>&1 && rc=0 || rc=$?
        fi
        end=$(date +%s.%N)
        printf "%-6s %.2f rc=%s\n" "$side" "$(awk "BEGIN {print $end - $start}")" "$rc"
    done
done

#!/usr/bin/env bash
# Regression gate: run the probe suite on a checkpoint and fail when a metric drops below the baseline.
#
#   experiments/ci/gate.sh CHECKPOINT BASELINE.json [OUT]
#
# Environment: SUITE (default imagenet,knn), SEEDS (default 3), DATA (a --data NAME=ROOT; default the
# built-in demo data), TOLERANCES (space-separated METRIC=ABS, default "*=0.01"), SIGNIFICANT (default 1:
# a drop fails only when it is beyond its tolerance AND outside the noise, i.e. its paired bootstrap CI
# over the same images excludes 0, so the gate does not flap; 0: beyond the tolerance is enough),
# PROBE (the command).
# Exit: 0 all baseline metrics hold, 1 a metric regressed or a probe failed, 2 bad input.
# OUT/report/report.html is a self-contained report of baseline vs checkpoint, for the CI artifacts.
set -uo pipefail
CHECKPOINT=${1:?usage: gate.sh CHECKPOINT BASELINE.json [OUT]}
BASELINE=${2:?usage: gate.sh CHECKPOINT BASELINE.json [OUT]}
OUT=${3:-runs/ci}
PROBE=${PROBE:-probe}
read -r -a tolerances <<< "${TOLERANCES:-*=0.01}"

args=(run --encoder "$CHECKPOINT" --suite "${SUITE:-imagenet,knn}" --seeds "${SEEDS:-3}" --out "$OUT/run")
[ -n "${DATA:-}" ] && args+=(--data "$DATA")
"$PROBE" "${args[@]}"
rc=$?
[ "$rc" -ge 2 ] && exit "$rc"  # bad input; a failed probe (1) shows up below as missing metrics

"$PROBE" compare "$BASELINE" "$OUT/run" --out "$OUT/report" >/dev/null || echo "gate: no report (see above)" >&2
check=(check "$OUT/run" --baseline "$BASELINE")
for t in "${tolerances[@]}"; do check+=(--tolerance "$t"); done
[ "${SIGNIFICANT:-1}" != 0 ] && check+=(--significant)
"$PROBE" "${check[@]}"

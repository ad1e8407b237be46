#!/usr/bin/env bash
# Run an LM config's methods in parallel processes, then assemble one results.json and report.md.
#
#   bash benchmarks/lm/parallel.sh CONFIG OUT [JOBS] [--set section.field=value ...]
#
# Each method label (with its tuning study, when the config's tune section names it; a label of tune.methods alone
# runs only as LABEL-tuned) trains in its own process and folder, OUT/parts/LABEL; the teacher is trained once (the cache's lock makes the other processes wait for
# it). Then every part's runs/ and tune/ are copied into OUT and `thermokd lm --resume` assembles them without
# training anything again. Small LMs leave a GPU mostly idle: several processes keep it busy. Everything is
# resumable: run the same command again after an interruption.
#
# Environment: THERMOKD (default `thermokd`) is the command; THERMOKD_CACHE the teacher cache.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/lm/parallel.sh CONFIG OUT [JOBS] [--set section.field=value ...]" >&2
    exit 2
fi
CONFIG=$1 OUT=$2
shift 2
JOBS=4
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then JOBS=$1; shift; fi
SETS=("$@")
THERMOKD=${THERMOKD:-thermokd}
PY=${PYTHON:-python3}
mkdir -p "$OUT/parts"
# one invocation per OUT at a time: a second would start a second process on every part (and truncate its log)
exec 9> "$OUT/parts/.parallel.lock"
if ! flock -n 9; then
    echo "another benchmarks/lm/parallel.sh is running on $OUT; wait for it or stop it first" >&2
    exit 2
fi

# the labels to run (methods, then tuned labels not among them), those run at their preset, and those tuned, as the
# config (with the overrides) names them: one line each
{ read -r -a LABELS; read -r LISTED; read -r TUNED; } < <($PY - "$CONFIG" "${SETS[@]}" <<'EOF'
import sys
from thermokd.lm.config import load_lm_config
from thermokd.registry import normalise
cfg = load_lm_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"])
listed = [normalise(m) for m in cfg.methods]
print(" ".join(listed + [m for m in cfg.tune.methods if m not in listed]))
print(" ".join(listed))
print(" ".join(cfg.tune.methods))
EOF
)
TUNED=" $TUNED " LISTED=" $LISTED "

run_part() {
    local label=$1 tune="[]" methods="[]"
    [[ $TUNED == *" $label "* ]] && tune="[$label]"
    [[ $LISTED == *" $label "* ]] && methods="[$label]"
    local dir="$OUT/parts/${label//@/_at_}"
    if $THERMOKD lm --config "$CONFIG" "${SETS[@]}" --set "methods=$methods" --set "tune.methods=$tune" \
            --out "$dir" --resume --no-progress > "$dir.log" 2>&1; then
        echo "finished $label"
    else
        echo "FAILED $label (see $dir.log)"
    fi
}
export -f run_part
export CONFIG OUT THERMOKD TUNED LISTED
# the overrides, each quoted for the shell, so that a value with spaces reaches the workers whole
SETS_TEXT=$(if [ ${#SETS[@]} -gt 0 ]; then printf '%q ' "${SETS[@]}"; fi)
export SETS_TEXT

echo "${#LABELS[@]} methods (${LABELS[*]}), tuned: ${TUNED:- none}; $JOBS processes; logs in $OUT/parts/"
for label in "${LABELS[@]}"; do
    echo "$label"
done | xargs -P "$JOBS" -I{} bash -c 'eval "SETS=($SETS_TEXT)"; run_part "$1"' _ {}

for part in "$OUT"/parts/*/; do
    for sub in runs tune; do
        [ -d "$part$sub" ] && mkdir -p "$OUT/$sub" && cp -r "$part$sub"/. "$OUT/$sub"/
    done
done
$THERMOKD lm --config "$CONFIG" "${SETS[@]}" --out "$OUT" --resume --no-progress

#!/usr/bin/env bash
# The GPU check, on a lent GPU machine (bare, no network, its own CUDA torch, one command of at most 600 s):
# run from the repository root with the wheels of scripts/device-wheels.sh carried in .whl/.
#
#   bash scripts/device-check.sh [BUDGET_S]             the real run (default BUDGET_S 540: a 600 s call, with
#                                                       the packing and the transfer back)
#   bash scripts/device-check.sh --dry-run [BUDGET_S]   the same phases on this CPU with tiny stand-ins
#
# Everything goes under results/gpu-<kind>/ (kind: the CUDA device's name, `NVIDIA H200` → h200; the dry run's
# is dry-run, under a temporary RESULTS_ROOT unless one is given). After every phase that directory is packed
# into ONE archive, $OUT/gpu-<kind>.tar.gz (written as .part, then renamed: a kill at the call's limit leaves
# the last complete pack), beside $OUT/summary.txt (phases with exit code, seconds and limit; the device; the
# per-run table). The device tool brings back at most 8 files of $OUT, each ≤ 16 MiB, ≤ 64 MiB together, ≤ 2
# folders down, plain names: scripts/check_returned.py checks that at the end and its verdict is the exit
# code (0 ok, 1 not). Without $OUT the pack goes to RESULTS_ROOT/device-out/. Unpack it into results/ to
# commit it, or to resume in a second call (the sweeps run with --resume: recorded points are skipped).
#
# Phases, most valuable first, each under `timeout -k 10` with a limit of min(its cap, what is left of
# BUDGET_S less RESERVE_S for the final table and pack), skipped with a line when less than its minimum is left:
#   wheels     .whl/*.whl into /tmp/site (real run only)
#   probe      scripts/device_probe.py: device, driver, versions, SDPA backends, bf16 GEMM ceiling, cuBLAS workspace
#   gpu-1      tmath sweep sweeps/gpu-1.yaml (the 115 TFLOP/s point first), then its report, calibrate
#              (exit 2 = refused: recorded) and check --min-tflops 115 --scale-to-gpu (exit 1 = under the bar)
#   zero-1gpu  the same for sweeps/zero-1gpu.yaml
#   gpu-tests  pytest -m gpu (the CUDA measurement protocol)
#   zero3-tests  the two-rank ZeRO-3 tests on the device's torch (the barrier fix; real run only)
# Caps (seconds) can be set from the environment: GPU1_S, ZERO_S, TESTS_S, ZERO3_S, POINT_S (per sweep point).
# The dry run (no GPU): RESULTS_ROOT and $OUT default to temporary directories, PY to .venv/bin/python, the
# sweeps are their first 2 points shrunk to 2 layers on the CPU (scripts/dry_sweep.py), the probe runs on the
# CPU, calibrate fits the CPU runs; packing and the returned-files check are the real run's.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET_S=${BUDGET_S:-540}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *[!0-9]*|'') echo "device-check: error: unknown argument '$arg' (usage: device-check.sh [--dry-run] [BUDGET_S])"; exit 2 ;;
        *) BUDGET_S=$arg ;;
    esac
done
if ! [[ "$BUDGET_S" =~ ^[0-9]+$ ]] || [ "$BUDGET_S" -lt 60 ]; then
    echo "device-check: error: BUDGET_S must be a whole number of seconds, at least 60, got '$BUDGET_S'"
    exit 2
fi
RESERVE_S=${RESERVE_S:-20}
GPU1_S=${GPU1_S:-300} ZERO_S=${ZERO_S:-120} TESTS_S=${TESTS_S:-60} ZERO3_S=${ZERO3_S:-90} POINT_S=${POINT_S:-240}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ "$DRY" = 1 ]; then
    if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
    kind=dry-run
    RESULTS_ROOT=${RESULTS_ROOT:-$(mktemp -d -t device-check-results.XXXXXX)}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
else
    PY=${PY:-python3}
    kind=$(timeout -k 10 120 "$PY" -c "
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''
print(re.sub(r'[^a-z0-9]+', '-', name.lower().removeprefix('nvidia ')).strip('-') or 'none')" 2>/dev/null)
    if [ -z "$kind" ] || [ "$kind" = none ]; then
        echo "device-check: error: no CUDA device ($PY sees none, or torch does not import); without a GPU use --dry-run"
        exit 2
    fi
    RESULTS_ROOT=${RESULTS_ROOT:-results}
    export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RES=$RESULTS_ROOT/gpu-$kind
LOGS=$RES/logs
PACK_DIR=${OUT:-$RESULTS_ROOT/device-out}
ARCHIVE=gpu-$kind.tar.gz
STEPS=$RES/steps.tsv
mkdir -p "$LOGS" "$PACK_DIR" || { echo "device-check: error: cannot create $LOGS and $PACK_DIR"; exit 2; }
printf 'phase\texit\tseconds\tlimit\n' > "$STEPS"
tmath=("$PY" -m harness.cli)

say() { echo "device-check: $*" | tee -a "$LOGS/device-check.log"; }

note() {  # what an exit code means for a phase
    case "$1:$2" in
        *:0) ;;
        *:skip) echo "skipped" ;;
        *:signal) echo "stopped: the check was interrupted" ;;
        *:124|*:137) echo "hit its time limit" ;;
        *-check:1) echo "runs under the bar" ;;
        *-calibrate:2) echo "refused (see its log)" ;;
        *) echo "failed (see logs/$1.log)" ;;
    esac
}

summary() {  # one screen: phases, device, per-run table
    {
        echo "device-check gpu-$kind$([ "$DRY" = 1 ] && echo ' (DRY RUN, CPU stand-ins)'): $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
            "$(( $(date +%s) - START )) s of a $BUDGET_S s budget, on $(uname -n)"
        echo
        printf '%-20s %5s %8s %8s  %s\n' phase exit seconds limit note
        tail -n +2 "$STEPS" | while IFS=$'\t' read -r name rc secs limit; do
            printf '%-20s %5s %8s %8s  %s\n' "$name" "$rc" "$secs" "$limit" "$(note "$name" "$rc")"
        done
        if [ -f "$RES/probe.txt" ]; then
            echo
            sed '/^$/q' "$RES/probe.txt" | cut -c1-120  # the probe's page, without nvidia-smi's
        fi
        echo
        "$PY" scripts/run_table.py "$RES/gpu-1" "$RES/zero-1gpu" 2>&1
    } > "$RES/summary.txt"
}

pack() {  # the results directory into one archive, then summary.txt beside it, each by rename
    summary
    local err
    if ! err=$(tar -czf "$PACK_DIR/$ARCHIVE.part" -C "$RESULTS_ROOT" "gpu-$kind" 2>&1); then
        say "pack failed: ${err%%$'\n'*}"
        rm -f "$PACK_DIR/$ARCHIVE.part"
        return 1
    fi
    mv -f "$PACK_DIR/$ARCHIVE.part" "$PACK_DIR/$ARCHIVE"
    cp "$RES/summary.txt" "$PACK_DIR/summary.txt.part" && mv -f "$PACK_DIR/summary.txt.part" "$PACK_DIR/summary.txt"
}

step() {  # NAME CAP_S MIN_S CMD...: one phase under its own limit, logged to logs/NAME.log, then packed
    local name=$1 cap=$2 min=$3
    shift 3
    local t=$(( $(left) - RESERVE_S ))
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt "$min" ]; then
        say "skip $name: $(( t > 0 ? t : 0 )) s left of the budget, it needs $min s"
        printf '%s\tskip\t0\t%s\n' "$name" "$(( t > 0 ? t : 0 ))" >> "$STEPS"
        pack
        return 0
    fi
    say "== $name (limit $t s): $*"
    local t0 rc
    t0=$(date +%s)
    # In the background, so that a TERM or INT to this script reaches the phase now (on_signal), not after it.
    timeout -k 10 "$t" "$@" > >(tee -a "$LOGS/$name.log") 2>&1 &
    child=$! current=$name current_t0=$t0 current_limit=$t
    wait "$child"
    rc=$?
    child=
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$t" >> "$STEPS"
    local meaning
    meaning=$(note "$name" "$rc")
    say "$name: exit $rc in $(( $(date +%s) - t0 )) s${meaning:+: $meaning}"
    pack
    return "$rc"
}

child=
on_signal() {  # stop the running phase (timeout relays the signal to it, then KILLs after 10 s), pack, exit
    trap - INT TERM
    say "interrupted: stopping the running phase and packing what there is"
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child"
        printf '%s\tsignal\t%s\t%s\n' "$current" "$(( $(date +%s) - current_t0 ))" "$current_limit" >> "$STEPS"
    fi
    pack
    exit 130
}
trap on_signal INT TERM

say "gpu-$kind: budget $BUDGET_S s, results $RES, returned files $PACK_DIR ($([ "$DRY" = 1 ] && echo dry run || echo real run), $PY)"

if [ "$DRY" = 1 ]; then
    say "dry run: no wheel install ($(compgen -G '.whl/*.whl' | wc -l) wheels in .whl/ are for the GPU machine's CPython 3.12)"
elif compgen -G ".whl/*.whl" >/dev/null; then
    if step wheels 120 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        say "wheel install failed: the DeepSpeed points and anything needing the carried packages will fail"
    fi
else
    say "no .whl/ (scripts/device-wheels.sh builds it): the machine's own packages only"
fi

if [ "$DRY" = 1 ]; then
    step probe 90 20 "$PY" scripts/device_probe.py --out "$RES" --device cpu
else
    step probe 90 20 "$PY" scripts/device_probe.py --out "$RES" --device cuda
fi

SWEEP_DIR=sweeps
CAL_DEVICE=cuda
if [ "$DRY" = 1 ]; then
    SWEEP_DIR=$(mktemp -d -t device-check-sweeps.XXXXXX)
    trap 'rm -rf "$SWEEP_DIR"' EXIT
    CAL_DEVICE=cpu
    for s in gpu-1 zero-1gpu; do
        "$PY" scripts/dry_sweep.py "sweeps/$s.yaml" "$SWEEP_DIR/$s.yaml" --points 2 | tee -a "$LOGS/device-check.log" \
            || { say "error: cannot write the dry run's $s.yaml"; exit 2; }
    done
fi

sweep() {  # NAME CAP_S: one sweep file, then its report, calibration and throughput check
    local name=$1 cap=$2 t
    t=$(( $(left) - RESERVE_S ))
    [ "$t" -gt "$cap" ] && t=$cap
    local point=$(( t - 15 < POINT_S ? t - 15 : POINT_S ))
    [ "$point" -lt 30 ] && point=30
    step "$name" "$cap" 60 "${tmath[@]}" sweep "$SWEEP_DIR/$name.yaml" --out "$RES/$name" --resume --timeout "$point"
    if [ ! -s "$RES/$name/runs.jsonl" ]; then
        say "$name: no runs.jsonl: no report, calibration or check"
        return
    fi
    step "$name-report" 60 15 "${tmath[@]}" report "$RES/$name"
    step "$name-calibrate" 30 10 "${tmath[@]}" calibrate "$RES/$name" --device "$CAL_DEVICE"
    step "$name-check" 30 10 "${tmath[@]}" check "$RES/$name" --min-tflops 115 --scale-to-gpu
}

sweep gpu-1 "$GPU1_S"
sweep zero-1gpu "$ZERO_S"
step gpu-tests "$TESTS_S" 30 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
if [ "$DRY" = 0 ]; then
    # Issue 13's ZeRO-3 barrier fix on the device's own torch (2.11 there; CI runs 2.13): the two-rank ZeRO-3
    # tests, gloo ranks on the CPU. Real run only: the dry run's machine is CI's.
    step zero3-tests "$ZERO3_S" 30 "$PY" -m pytest -q -p no:cacheprovider tests/test_zero.py -k stage3
fi

pack
echo
cat "$RES/summary.txt"
echo
verdict=$("$PY" scripts/check_returned.py "$PACK_DIR")
rc=$?
echo "$verdict"
grep '^check_returned:' <<< "$verdict" >> "$PACK_DIR/summary.txt"
say "done in $(( $(date +%s) - START )) s → $PACK_DIR ($(ls "$PACK_DIR" | tr '\n' ' '))"
exit "$rc"

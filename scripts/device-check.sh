#!/usr/bin/env bash
# The GPU check, on a lent GPU machine (bare, no network, its own CUDA torch): run from the repository root
# with the wheels of scripts/device-wheels.sh carried in .whl/. Writes everything under results/gpu-<kind>/
# (or $OUT when the device tool gives one) so that it comes back to be committed:
#   1. the gpu-marked tests (the CUDA measurement protocol);
#   2. the issue-3 command on CUDA (gpt2, s=1024, b=4, pure bf16, reference model);
#   3. sweeps/gpu-1.yaml: one-GPU points (precision, recompute, attention, reference vs transformers, CUDA
#      autocast), then sweeps/zero-1gpu.yaml (ZeRO 0-3 with one rank), each bounded by BUDGET_S seconds;
#   4. report and calibration of each results directory.
# Usage: bash scripts/device-check.sh [BUDGET_S]   (default 420: leaves time in a 10-minute call)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${1:-420}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device-check: wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
kind=$(python3 -c "
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
print(re.sub(r'[^a-z0-9]+', '-', name.lower().removeprefix('nvidia ')).strip('-'))")
[ "$kind" = none ] && { echo "device-check: no CUDA device"; exit 2; }
DEST=${OUT:-results}/gpu-$kind
mkdir -p "$DEST"
tmath() { python3 -m harness.cli "$@"; }
nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$DEST/pytest-gpu.txt"
tmath measure --model gpt2 --seq 1024 --batch 4 --precision bf16 --impl reference --device cuda \
    --out "$DEST/measure-gpt2-bf16.jsonl" 2>&1 | tee "$DEST/measure-gpt2-bf16.txt"
for sweep in gpu-1 zero-1gpu; do
    t=$(left); [ "$t" -lt 60 ] && { echo "device-check: budget spent before $sweep"; break; }
    timeout "$t" python3 -m harness.cli sweep "sweeps/$sweep.yaml" --out "$DEST/$sweep" --resume --timeout 300
    tmath report "$DEST/$sweep"
    tmath calibrate "$DEST/$sweep" --device cuda
done
echo "device-check: done in $(( $(date +%s) - START )) s → $DEST"

#!/usr/bin/env bash
# DiffRatio vs DMD2, one full training iteration each, at EDM2-S and EDM2-M on synthetic latents, for the
# single backend and DeepSpeed ZeRO 1/2/3 at world size 1 (and DDP + ZeRO 1/2/3 on all GPUs when there are
# several). One command on a GPU machine, from anywhere:
#
#     bash bench/run_step_gpu.sh
#
# Writes step.csv, step.md (the README table), step.png (if matplotlib imports) and the sweep's console log
# to $OUT when it is set (the device runner's output folder), else appends to bench/results/step.csv.
# Needs no network and no install: the checkout is put on PYTHONPATH, and the Python packages the machine
# lacks (deepspeed and its pure-Python needs, PyYAML, safetensors, Pillow, ...) are unpacked from the wheels
# carried in .whl/ at the repository root (a wheel is a zip: no pip needed). A ZeRO case that cannot run
# (deepspeed missing, a method not on the distributed API yet) becomes a `skipped` row with the reason.
#
# Budget: MAX_SECONDS for the whole script, set-up and report included: each sweep gets what is left of it
# (RESERVE_SECONDS kept for the report), and a case that cannot start in time becomes a skipped row. The
# default 540 fits one 10-minute device call: about 7 minutes for the 16 cases (~25 s each on one H100), then
# the activation-checkpointing cases. Knobs (environment): WARMUP=5 ITERS=10 BATCH=s=32,m=16 SIZES=s,m
# MAX_SECONDS=540 RESERVE_SECONDS=20 CASE_TIMEOUT=150 CKPT=on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
WARMUP="${WARMUP:-5}"; ITERS="${ITERS:-10}"; BATCH="${BATCH:-s=32,m=16}"; SIZES="${SIZES:-s,m}"
MAX_SECONDS="${MAX_SECONDS:-540}"; RESERVE_SECONDS="${RESERVE_SECONDS:-20}"; CASE_TIMEOUT="${CASE_TIMEOUT:-150}"
seconds_left() {  # of the script's budget, less the report's reserve (and the CLI's start); at least 1 (0 = no limit)
  local left=$(( MAX_SECONDS - RESERVE_SECONDS - SECONDS ))
  echo $(( left > 1 ? left : 1 ))
}
# shellcheck source=use_carried_wheels.sh
source bench/use_carried_wheels.sh
# The rows' commit tag. A device machine gets the working tree without .git: name the commit when calling,
# FASTONESTEP_COMMIT=<git rev-parse --short HEAD here, plus -dirty for uncommitted changes> bash bench/run_step_gpu.sh
if [ -z "${FASTONESTEP_COMMIT:-}" ]; then
  FASTONESTEP_COMMIT=$("$PY" -c "from fastonestep.benchmark.kernels import git_commit; print(git_commit())")
fi
export FASTONESTEP_COMMIT
echo "rows tagged commit=$FASTONESTEP_COMMIT"
[ "$FASTONESTEP_COMMIT" != unknown ] || echo "WARNING: no commit known here (no .git): set FASTONESTEP_COMMIT" >&2

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
echo "GPUs: $NGPU"
if [ "$NGPU" -lt 1 ]; then
  echo "no CUDA GPU: this script measures GPU performance; on a CPU run 'fastonestep bench step --quick'" >&2
  exit 2
fi
PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$DEST/step.png")

COMMON=(--methods diffratio,dmd --sizes "$SIZES" --batch-per-gpu "$BATCH" --warmup "$WARMUP" --iters "$ITERS"
        --case-timeout "$CASE_TIMEOUT" --out "$DEST/step.csv")
# The headline comparison (single backend) runs first, then the ZeRO stages (2, the default stage, first).
"$PY" -m fastonestep bench step "${COMMON[@]}" --backends single,zero2,zero1,zero3 --max-seconds "$(seconds_left)" \
  2>&1 | tee "$DEST/step-sweep.log"
if [ "$NGPU" -gt 1 ]; then
  "$PY" -m fastonestep bench step "${COMMON[@]}" --backends ddp,zero2,zero1,zero3 --nproc "$NGPU" \
    --max-seconds "$(seconds_left)" 2>&1 | tee -a "$DEST/step-sweep.log"
fi
# What train.activation_checkpointing costs in images/s and saves in peak memory (single backend; CKPT=off skips).
if [ "${CKPT:-on}" = "on" ]; then
  "$PY" -m fastonestep bench step "${COMMON[@]}" --backends single --activation-checkpointing on \
    --max-seconds "$(seconds_left)" 2>&1 | tee -a "$DEST/step-sweep.log"
fi
"$PY" -m fastonestep bench step --no-run --out "$DEST/step.csv" "${PLOT[@]}" > "$DEST/step.md"
cat "$DEST/step.md"

#!/usr/bin/env bash
# Every GPU-only check and measurement of the project in one command, sized for one device call (phase limits
# 545 s in all, about 9 minutes plus set-up on one H100/H200, under the device tool's 10-minute limit per command), from
# the repo root:
#
#     FASTONESTEP_COMMIT=<commit> bash bench/run_gpu.sh   # device tool: carry [".whl"] (bash bench/make_wheels.sh)
#
# Phases, each under its own time limit, each run whatever the one before it did:
#   1. gpu-tests (TEST_SECONDS=200): the compiled Triton kernels (the gpu_* tests, and the NaN-row, extreme-logit,
#      RNG-regeneration and latent tests compiled on cuda), the CUDA op (built just in time here, into the cache
#      the later phases reuse), the fused-vs-eager convergence runs on cuda (fp32, fp16, bf16), the count of host
#      synchronisations in a training step (tests/test_host_sync.py), what activation checkpointing holds in CUDA
#      memory (tests/test_activation_checkpointing.py) and an exact resume with dropout on cuda
#      (tests/test_student_dropout.py). Most important first: a cut phase loses the last ones.
#   2. self-check (CHECK_SECONDS=30): kernels/self_check.py for triton and ext on cuda, as training runs it.
#   3. bench-kernels (KERNEL_SECONDS=150): `fastonestep bench kernels --quick` (eager, torch.compile, Triton,
#      CUDA op at B32-4x64x64 and the large size; fp32 first, every loss at both sizes, then bf16; rows are
#      written per case and no case starts in the process's last 40 s, so a short budget costs bf16 cases,
#      not losses).
#   4. bench-step (STEP_SECONDS=130): bench/run_step_gpu.sh, DiffRatio vs DMD2 at EDM2-S (STEP_SIZES=s), the single
#      backend first, then DeepSpeed bf16 ZeRO-2 (then 1, 3) while time is left: after set-up and before the
#      report about 85 s remain, enough for the two single-backend cases, ZeRO-2 only if they are quick. The
#      whole sweep (S and M, every stage, at most 9 minutes) is `bash bench/run_step_gpu.sh` in a call of its own.
#   5. bench-loader (LOADER_SECONDS=35): `fastonestep bench loader --data latents` on 1024 synthetic 4x64x64 latents
#      in the `dataset encode` layout, batch 32: the torch loader and the in-memory one (DALI is not installed on
#      the lent machine: its row says `skipped: DALI not installed`), each row's ratio to the fastest per-GPU data
#      consumption in the step.csv phase 4 just wrote (target: at least 3x).
# Writes summary.txt, kernels.csv, step.csv, loader.csv and results.tar.gz (each phase's log, kernels.png,
# step.md/.png) to $OUT (the device runner's folder: few files come back), else the same files unpacked to
# bench/results/. Copy the CSVs to bench/results/ and put the tables in the README.
# Exits 0 when every phase passed, 1 otherwise, 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
# A checkout used in place: fastonestep maps kernels/ itself (fastonestep/__init__.py); the carried wheels fill
# in what the machine lacks. The JIT-built op and Triton's cache stay out of $HOME, in one cache that the tests
# (FASTONESTEP_TEST_CACHE) and the later phases share.
# shellcheck source=use_carried_wheels.sh
source bench/use_carried_wheels.sh
export FASTONESTEP_CACHE="${FASTONESTEP_CACHE:-${TMPDIR:-/tmp}/fastonestep-cache}"
export FASTONESTEP_TEST_CACHE="$FASTONESTEP_CACHE"
# The rows' commit tag. A device machine gets the working tree without .git: name the commit when calling,
# FASTONESTEP_COMMIT=<git rev-parse --short HEAD here, plus -dirty for uncommitted changes> bash bench/run_gpu.sh
if [ -z "${FASTONESTEP_COMMIT:-}" ]; then
  FASTONESTEP_COMMIT=$("$PY" -c "from fastonestep.benchmark.kernels import git_commit; print(git_commit())")
fi
export FASTONESTEP_COMMIT
echo "rows tagged commit=$FASTONESTEP_COMMIT"
[ "$FASTONESTEP_COMMIT" != unknown ] || echo "WARNING: no commit known here (no .git): set FASTONESTEP_COMMIT" >&2
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU: these are the GPU-only checks; on a CPU run 'make test'" >&2
  exit 2
fi

failed=0
phase() {  # phase NAME SECONDS COMMAND...: time-limited, logged to $DEST/NAME.log, never stops the script
  local name=$1 seconds=$2 start=$SECONDS rc
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  timeout --signal=INT --kill-after=5 "$seconds" "$@" 2>&1 | tee "$DEST/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - start))s" | tee -a "$DEST/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
}

# TRITON_INTERPRET=0: the compiled kernels (tests/conftest.py turns the interpreter on unless told otherwise).
# Not the compile-only checks (test_*compile*_for_hopper): the real build and the kernels run here.
phase gpu-tests "${TEST_SECONDS:-200}" env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_triton_kernels.py tests/test_ext_op.py tests/test_fused_convergence.py tests/test_host_sync.py \
  tests/test_activation_checkpointing.py tests/test_student_dropout.py \
  -k "(gpu_ or cuda or converge or nonfinite or extreme or regeneration or flat_index or latent_sampling) and not for_hopper"
phase self-check "${CHECK_SECONDS:-30}" env TRITON_INTERPRET=0 "$PY" -c '
import sys
from fastonestep import losses
results = {impl: losses.impl_available(impl, "cuda") for impl in ("triton", "ext")}
for impl, (ok, why) in results.items():
    print(impl + ": " + ("matches the eager reference" if ok else why))
sys.exit(0 if all(ok for ok, _ in results.values()) else 1)'
# --max-seconds counts from the process start: no case starts in the last 40 s (one case in flight, compiling
# perhaps, then the table and the plot), so the phase ends by itself, report included, not by the timeout.
phase bench-kernels "${KERNEL_SECONDS:-150}" "$PY" -m fastonestep bench kernels --quick --out "$DEST/kernels.csv" \
  --plot "$DEST/kernels.png" --max-seconds $(( ${KERNEL_SECONDS:-150} - 40 ))
# MAX_SECONDS is the step script's whole budget (its set-up and report included); 5 s spare for the shutdown.
phase bench-step "${STEP_SECONDS:-130}" env OUT="$DEST" MAX_SECONDS=$(( ${STEP_SECONDS:-130} - 5 )) \
  CASE_TIMEOUT=100 CKPT=off SIZES="${STEP_SIZES:-s}" bash bench/run_step_gpu.sh
# The step.csv just written gives the consumption the loader must beat (rows of this commit win); without it the
# loader rows still come back, without a ratio.
phase bench-loader "${LOADER_SECONDS:-35}" "$PY" -m fastonestep bench loader --data latents --images 1024 \
  --batch 32 --batches 30 --workers 4 --step-csv "$DEST/step.csv" --out "$DEST/loader.csv"
# The device tool brings back only a few files: the CSVs and the summary as they are, the rest in one archive.
if [ -n "${OUT:-}" ]; then
  (cd "$DEST" && tar -czf results.tar.gz --remove-files --ignore-failed-read \
    gpu-tests.log self-check.log bench-kernels.log bench-step.log bench-loader.log step-sweep.log kernels.png \
    step.md step.png \
    2>/dev/null)
fi
cat "$DEST/summary.txt"
exit "$failed"

#!/usr/bin/env bash
# One pass of every check that needs a GPU, for an H200 (sm_90) machine, run from the repository
# root with $OUT set to a folder for the logs:
#
#   OUT=/tmp/out bash bench/gpu_check.sh
#
# Steps (each under `timeout`, the whole within about 6 minutes; a failed step does not stop the
# ones after it):
#   build      pip install --no-build-isolation --no-deps -e .  for TORCH_CUDA_ARCH_LIST=9.0  -> build.log
#   info       nvidia-smi and loracuda.build_info()                                          (stdout)
#   tests      python -m pytest -m cuda tests                         -> pytest_cuda.log, junit_cuda.xml
#   sanitizer  compute-sanitizer --tool memcheck python bench/sanitize_case.py  -> sanitizer.log
#   multi      python bench/multi_lora.py --device cuda --dtype bfloat16 (batched decode with 32-token
#              tiles that mix adapters beside decode and prefill)     -> multi_lora.txt
#   bench      loracuda bench --quick --device cuda --json            -> bench_quick.json, bench_quick.txt
# It ends with a table of each step's status (also in summary.txt) and exits non-zero if any failed.
#
# Environment: PYTHON (default python), CUDA_HOME (default: /usr/local/cuda, else the toolkit of
# nvcc), GPU_CHECK_SKIP_BUILD=1 to use an extension already built in place (a dry run of the script).
set -u

: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
TOTAL_S=${GPU_CHECK_TOTAL_S:-355}  # the whole script's budget in seconds
START=$(date +%s)

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
export CUDA_HOME
SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
  SANITIZER=$CUDA_HOME/bin/compute-sanitizer
fi

NAMES=()
STATUSES=()
SECONDS_TAKEN=()
NOTES=()
FAILED=0

# run_step NAME LIMIT_S NOTE FUNCTION: runs the shell function FUNCTION in a child bash under
# timeout (LIMIT_S, or what is left of the whole budget if less; timeout signals the child's whole
# process group) and records its status.
run_step() {
  local name=$1 limit=$2 note=$3 fn=$4
  local now left t0 rc status
  now=$(date +%s)
  left=$((TOTAL_S - (now - START)))
  if [ "$left" -lt 5 ]; then
    NAMES+=("$name"); STATUSES+=("SKIPPED"); SECONDS_TAKEN+=(0); NOTES+=("no time left")
    FAILED=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$fn"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    status="ok"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT"
  else
    status="FAIL($rc)"
  fi
  [ "$rc" -ne 0 ] && FAILED=1
  NAMES+=("$name"); STATUSES+=("$status"); SECONDS_TAKEN+=($(($(date +%s) - t0))); NOTES+=("$note")
  echo "=== $name: $status ==="
}

build() {
  if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
    echo "GPU_CHECK_SKIP_BUILD=1: using the extension already built" | tee "$OUT/build.log"
    return 0
  fi
  if [ -z "${CUDA_HOME:-}" ]; then
    echo "no CUDA toolkit found (set CUDA_HOME)" | tee "$OUT/build.log"
    return 1
  fi
  # LORACUDA_FORCE_CUDA: a build that silently dropped the CUDA kernels would be a failure here.
  TORCH_CUDA_ARCH_LIST=9.0 LORACUDA_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/build.log"
  return $rc
}

info() {
  nvidia-smi
  local smi=$?
  "$PYTHON" - <<'PY'
import torch
import loracuda
from loracuda.buildinfo import has_kernel, op_names
info = loracuda.build_info()
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
print("build_info", info)
missing = [op for op in op_names() if not has_kernel(op, "CUDA")]
print("CUDA kernels missing:", ", ".join(missing) or "none")
raise SystemExit(0 if "cuda" in info["backends"] and not missing else 1)
PY
  local rc=$?
  [ "$smi" -ne 0 ] && return "$smi"
  return $rc
}

cuda_tests() {
  "$PYTHON" -m pytest -m cuda tests -q -p no:cacheprovider --durations=15 --junitxml="$OUT/junit_cuda.xml" \
    >"$OUT/pytest_cuda.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/pytest_cuda.log"
  [ "$rc" -eq 5 ] && echo "pytest collected no CUDA test: that is a failure here"
  return $rc
}

sanitizer() {
  if [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
    return 1
  fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 30 \
    "$PYTHON" bench/sanitize_case.py >"$OUT/sanitizer.log" 2>&1
  local rc=$?
  grep -E "ERROR SUMMARY|failed|all ops ran" "$OUT/sanitizer.log" | tail -n 5
  return $rc
}

multi_lora_bench() {
  "$PYTHON" bench/multi_lora.py --device cuda --dtype bfloat16 --budget 0.3 >"$OUT/multi_lora.txt" 2>&1
  local rc=$?
  cat "$OUT/multi_lora.txt"
  return $rc
}

quick_bench() {
  "$PYTHON" -m loracuda.cli.main bench --quick --device cuda --json "$OUT/bench_quick.json" \
    >"$OUT/bench_quick.txt"
  local rc=$?
  grep -E "^(ops|layer)/|^  loracuda|^ceilings" "$OUT/bench_quick.txt" | head -n 60
  return $rc
}

export OUT PYTHON SANITIZER
export -f build info cuda_tests sanitizer multi_lora_bench quick_bench

# Limits in seconds, 355 in all (multi: 5 cases of about 1.5 s): the build is one architecture on 16 cores; the CUDA tests (about 870
# cases with the multi-LoRA and training ones, a few of them torch.compile) get the largest share.
run_step build 110 "build.log" build
run_step info 15 "stdout" info
run_step tests 120 "pytest_cuda.log, junit_cuda.xml" cuda_tests
run_step sanitizer 60 "sanitizer.log" sanitizer
run_step multi 15 "multi_lora.txt" multi_lora_bench
run_step bench 35 "bench_quick.txt, bench_quick.json" quick_bench

{
  echo
  echo "gpu_check summary ($(($(date +%s) - START)) s in all)"
  printf '%-10s %-11s %6s  %s\n' step status seconds logs
  for i in "${!NAMES[@]}"; do
    printf '%-10s %-11s %6s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
  done
  [ "$FAILED" -eq 0 ] && echo "result: all steps ok" || echo "result: FAILED"
} | tee "$OUT/summary.txt"
exit "$FAILED"

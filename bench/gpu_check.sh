#!/usr/bin/env bash
# One pass of every check that needs a GPU, for an H100 / H200 (sm_90) machine, run from the repository
# root:
#
#   GPU_CHECK_COMMIT=<commit> OUT=/tmp/out bash bench/gpu_check.sh
#
# Results: one folder <date>-<gpu>-<commit>-gpu_check (e.g. 2026-12-06-h100-de50238a1b2c-gpu_check),
# under $OUT when it is set (a GPU lease returns what is under $OUT), else under bench/results/; it is
# committed under bench/results/. It holds 7 files (a lease returns at most 8): build.log, tests.log,
# sanitizer.log, bench_quick.json, bench_quick.txt, summary.txt, gpu_check.json.
#
# Steps (each under `timeout`, the whole within GPU_CHECK_TOTAL_S = 540 s, so that one 10-minute call
# holds it; a failed step does not stop the ones after it):
#   build      pip install --no-build-isolation --no-deps -e .  for TORCH_CUDA_ARCH_LIST=9.0  -> build.log
#   info       nvidia-smi, torch, loracuda.build_info(), a CUDA kernel for every op          -> summary.txt
#   tests      python -m pytest -m cuda tests: the CUDA case of every test in the suite (ops, model-level
#              tests, compile, checkpointing, serving, host-synchronisation checks), on GPU_CHECK_WORKERS
#              pytest-xdist workers when xdist is installed                                  -> tests.log
#   memcheck   compute-sanitizer --tool memcheck python bench/sanitize_case.py             -> sanitizer.log
#   racecheck  compute-sanitizer --tool racecheck python bench/sanitize_case.py   -> sanitizer.log (appended)
#   bench      loracuda bench --quick --device cuda --json             -> bench_quick.json, bench_quick.txt
# The CPU cases of the suite are left to `make test` on any machine. The script ends with a table of each
# step's status (summary.txt; gpu_check.json adds the GPU, driver, torch, commit, test counts and
# sanitizer summaries) and exits non-zero if any step failed.
#
# The commit: git's HEAD (with "-dirty" for uncommitted changes) where the tree has its .git; a copy
# without it (a GPU lease sends the working tree alone) takes GPU_CHECK_COMMIT. gpu_check.json also
# records a hash of the sources; `bash bench/gpu_check.sh --fingerprint` prints it for a checkout, to match
# a run to its commit.
#
# Environment: PYTHON (default python3, else python), CUDA_HOME (default: /usr/local/cuda, else the toolkit
# of nvcc), GPU_CHECK_SKIP_BUILD=1 to use an extension already built in place (a dry run of the script),
# GPU_CHECK_WORKERS (pytest-xdist workers for the tests, default 4; 1: none).
set -u

# A hash of the sources (what the build and the tests read), independent of git.
fingerprint() {
  find csrc loracuda tests bench setup.py pyproject.toml -type f \
    \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name '*.inc' \
    -o -name '*.sh' -o -name '*.toml' \) -not -path '*/__pycache__/*' -not -path 'bench/results/*' |
    LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--fingerprint" ]; then
  fingerprint
  exit 0
fi

PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}  # the whole script's budget in seconds
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

# The results folder: <date>-<gpu>-<commit>-gpu_check.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
GPU_SLUG=$(printf '%s' "${GPU_NAME:-nogpu}" | tr 'A-Z' 'a-z' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g' | cut -d- -f1)
if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
  COMMIT=$GPU_CHECK_COMMIT
elif COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT=$COMMIT-dirty
else
  COMMIT=unknown-commit
fi
COMMIT=$(printf '%s' "$COMMIT" | tr -c 'A-Za-z0-9._-' '-')
FINGERPRINT=$(fingerprint)
RESULTS=${OUT:-bench/results}/$(date -u +%Y-%m-%d)-${GPU_SLUG:-nogpu}-$COMMIT-gpu_check
mkdir -p "$RESULTS"
SCRATCH=$(mktemp -d)  # files that are parsed, not kept (the junit report)
export LORACUDA_COMMIT=$COMMIT  # the bench's JSON records it where git cannot tell

NAMES=()
STATUSES=()
SECONDS_TAKEN=()
NOTES=()
FAILED=0

# run_step NAME LIMIT_S NOTE COMMAND: runs COMMAND (a shell function and its arguments) in a child bash
# under timeout (LIMIT_S, or what is left of the whole budget if less; timeout signals the child's whole
# process group) and records its status.
run_step() {
  local name=$1 limit=$2 note=$3 fn=$4
  local now left t0 rc status
  now=$(date +%s)
  left=$((TOTAL_S - (now - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then  # (timeout 0 would mean no limit at all)
    NAMES+=("$name"); STATUSES+=("SKIPPED"); SECONDS_TAKEN+=(0); NOTES+=("no time left")
    FAILED=1
    return
  fi
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
    echo "GPU_CHECK_SKIP_BUILD=1: using the extension already built" | tee "$RESULTS/build.log"
    return 0
  fi
  if [ -z "${CUDA_HOME:-}" ]; then
    echo "no CUDA toolkit found (set CUDA_HOME)" | tee "$RESULTS/build.log"
    return 1
  fi
  # LORACUDA_FORCE_CUDA: a build that silently dropped the CUDA kernels would be a failure here.
  TORCH_CUDA_ARCH_LIST=9.0 LORACUDA_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . >"$RESULTS/build.log" 2>&1
  local rc=$?
  tail -n 5 "$RESULTS/build.log"
  return $rc
}

info() {
  {
    echo "gpu_check: commit $COMMIT, sources $FINGERPRINT"
    nvidia-smi
    echo "nvidia-smi exit status $?"
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
    echo "build check exit status $?"
  } 2>&1 | tee "$RESULTS/summary.txt"
  grep -q "^nvidia-smi exit status 0" "$RESULTS/summary.txt" && grep -q "^build check exit status 0" "$RESULTS/summary.txt"
}

cuda_tests() {
  local options=""
  if [ "${GPU_CHECK_WORKERS:-4}" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    options="-n ${GPU_CHECK_WORKERS:-4}"
    # A kernel that never returns (a barrier some threads skip) would hang the step: with pytest-timeout,
    # its test's worker is ended after 150 s (reported as crashed) and a new worker takes the rest.
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && options="$options --timeout=150 --timeout-method=thread"
  fi
  # OMP_NUM_THREADS: the workers share the CPU cores for the float64 references.
  # shellcheck disable=SC2086  # $options: words on purpose
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} "$PYTHON" -m pytest -m cuda tests -v -p no:cacheprovider \
    --durations=15 --junitxml="$SCRATCH/junit.xml" $options >"$RESULTS/tests.log" 2>&1
  local rc=$?
  tail -n 25 "$RESULTS/tests.log"
  [ "$rc" -eq 5 ] && echo "pytest collected no CUDA test: that is a failure here"
  if [ "$rc" -eq 0 ] && ! tail -n 1 "$RESULTS/tests.log" | grep -qE "[0-9]+ passed"; then
    echo "no CUDA test passed (all skipped: no GPU visible, or no CUDA kernels): that is a failure here"
    rc=1
  fi
  return $rc
}

# sanitize TOOL: bench/sanitize_case.py (every op once on small odd shapes) under compute-sanitizer.
sanitize() {
  local tool=$1
  if [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found" | tee -a "$RESULTS/sanitizer.log"
    return 1
  fi
  echo "=== compute-sanitizer --tool $tool ===" >>"$RESULTS/sanitizer.log"
  # Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 30 \
    "$PYTHON" bench/sanitize_case.py >>"$RESULTS/sanitizer.log" 2>&1
  local rc=$?
  echo "=== compute-sanitizer --tool $tool: exit status $rc ===" >>"$RESULTS/sanitizer.log"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|failed|all ops ran|exit status" "$RESULTS/sanitizer.log" | tail -n 5
  return $rc
}

quick_bench() {
  "$PYTHON" -m loracuda.cli.main bench --quick --device cuda --json "$RESULTS/bench_quick.json" \
    >"$RESULTS/bench_quick.txt"
  local rc=$?
  grep -E "^(ops|layer)/|^  loracuda|^ceilings" "$RESULTS/bench_quick.txt" | head -n 60
  return $rc
}

export RESULTS SCRATCH PYTHON SANITIZER COMMIT FINGERPRINT
export -f build info cuda_tests sanitize quick_bench

# Limits in seconds, 540 in all: the build is one architecture, its 15 sources compiled at once on 16
# cores; the CUDA tests (about 1070 cases, a few of them compiling with inductor) get whatever the build
# and info leave beyond the 165 s kept for the sanitizer and the bench (at least about 210 s).
run_step build 150 "build.log" build
run_step info 30 "summary.txt" info
run_step tests $((TOTAL_S - ($(date +%s) - START) - 165)) "tests.log" cuda_tests
run_step memcheck 55 "sanitizer.log" "sanitize memcheck"
run_step racecheck 65 "sanitizer.log" "sanitize racecheck"
run_step bench 45 "bench_quick.txt, bench_quick.json" quick_bench

TOTAL_TAKEN=$(($(date +%s) - START))
{
  echo
  echo "gpu_check summary ($TOTAL_TAKEN s in all): $GPU_NAME, commit $COMMIT, sources $FINGERPRINT"
  printf '%-10s %-11s %6s  %s\n' step status seconds logs
  for i in "${!NAMES[@]}"; do
    printf '%-10s %-11s %6s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
  done
  [ "$FAILED" -eq 0 ] && echo "result: all steps ok" || echo "result: FAILED"
} | tee -a "$RESULTS/summary.txt"

# gpu_check.json: the same table with the machine, the commit, the test counts and sanitizer summaries.
STEPS=$(for i in "${!NAMES[@]}"; do printf '%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}"; done)
STEPS=$STEPS GPU_NAME=$GPU_NAME TOTAL_TAKEN=$TOTAL_TAKEN FAILED=$FAILED "$PYTHON" - <<'PY'
import json, os, re, subprocess
from datetime import datetime, timezone
from xml.etree import ElementTree

results, scratch = os.environ["RESULTS"], os.environ["SCRATCH"]
record = {
    "schema": 1,
    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "gpu": os.environ["GPU_NAME"] or None,
    "commit": os.environ["COMMIT"],
    "source_fingerprint": os.environ["FINGERPRINT"],
    "ok": os.environ["FAILED"] == "0",
    "seconds": int(os.environ["TOTAL_TAKEN"]),
    "steps": [
        {"name": name, "status": status, "seconds": int(seconds)}
        for name, status, seconds in (line.split("\t") for line in os.environ["STEPS"].splitlines())
    ],
}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    record["driver"], record["gpu_memory"] = [s.strip() for s in smi.split(",")][:2]
except (OSError, subprocess.SubprocessError, ValueError):
    pass
try:
    import torch
    record["torch"], record["torch_cuda"] = torch.__version__, torch.version.cuda
    import loracuda
    record["build_info"] = loracuda.build_info()
except Exception as error:  # a failed build: say why instead of the build info
    record["build_info_error"] = f"{type(error).__name__}: {error}"
junit = os.path.join(scratch, "junit.xml")
if os.path.exists(junit):
    suites = ElementTree.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record["cuda_tests"] = counts
log = os.path.join(results, "sanitizer.log")
if os.path.exists(log):
    record["sanitizer"] = [l.strip(" =\n") for l in open(log, errors="replace") if re.search(r"ERROR SUMMARY|RACECHECK SUMMARY", l)]
with open(os.path.join(results, "gpu_check.json"), "w") as f:
    json.dump(record, f, indent=1)
print("gpu_check: results in", results)
PY
rm -rf "$SCRATCH"
exit "$FAILED"

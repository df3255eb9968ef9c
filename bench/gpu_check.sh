#!/usr/bin/env bash
# The GPU run, in one call that fits the device budget (under 8 minutes on an H100/H200 machine
# with 16 cores): build for sm_90 against the torch there, the CUDA-device tests only, memcheck over
# every kernel family, the key benchmark cases. Every log and the results JSON land in OUT as they
# are produced, so a timeout still returns what was done; each phase prints its time.
#   bash bench/gpu_check.sh [OUT]          (make gpu-check; OUT defaults to bench/results)
# Without a GPU (the rehearsal on a CPU machine with a CUDA torch) the build and the test
# selection run, and the GPU phases say that they were skipped.
# Exit status: nonzero if the build fails, a test fails or memcheck finds an error.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget="${GPU_CHECK_BUDGET_S:-460}"  # racecheck and synccheck run only within it
start=$SECONDS
phase() { echo "== $1 (at $((SECONDS - start)) s)"; }

# torch takes the toolkit from CUDA_HOME, else from the nvcc on PATH, whose parent's parent is wrong
# where that nvcc is a wrapper script: take the folder nvcc itself reports when it holds the headers
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  bin=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | grep -m1 -o "_HERE_=[^ ]*" | cut -d= -f2)
  if [ -n "$bin" ] && [ -f "$bin/../include/cuda_runtime.h" ]; then
    CUDA_HOME=$(cd "$bin/.." && pwd); export CUDA_HOME
  fi
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}, nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"

phase "build against $("$python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
t=$SECONDS
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$python" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || {
  tail -30 "$out/build.log"; echo "gpu-check: build failed"; exit 1; }
echo "built in $((SECONDS - t)) s: $(ls weighted_loss/_C*.so)"
gpu=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")
[ "$gpu" = 1 ] || echo "no CUDA device: the rehearsal (the GPU phases are skipped)"

phase "CUDA tests (pytest --only-cuda)"
t=$SECONDS
timeout 240 "$python" -m pytest tests --only-cuda -q -p no:cacheprovider --maxfail=20 --continue-on-collection-errors \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
test_rc=$?
read -r passed failed skipped < <("$python" - "$out/tests.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(-1, -1, -1); sys.exit()
suites = [root] if root.tag == "testsuite" else list(root)
total = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - bad - skipped, bad, skipped)
PY
)
tail -3 "$out/tests.log"
echo "tests: $passed passed, $failed failed, $skipped skipped (rc=$test_rc) in $((SECONDS - t)) s"

phase "compute-sanitizer over bench/sanitize_cuda.py"
sanitizers=""
san_rc=0
if [ "$gpu" != 1 ]; then
  sanitizers="skipped(no-gpu)"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  sanitizers="not-installed"
else
  for tool in memcheck racecheck synccheck; do
    if [ "$tool" != memcheck ] && [ $((SECONDS - start)) -gt $((budget - 150)) ]; then
      sanitizers="$sanitizers $tool=skipped(time)"; continue
    fi
    t=$SECONDS
    timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$python" bench/sanitize_cuda.py >"$out/sanitizer-$tool.log" 2>&1
    rc=$?
    if grep -q "Device not supported\|not supported on this" "$out/sanitizer-$tool.log"; then
      state="unavailable"
    elif [ "$rc" -eq 0 ]; then
      state="clean"
    elif [ "$rc" -eq 124 ]; then
      state="timeout"
    else
      state="errors(rc=$rc)"; san_rc=1
    fi
    echo "compute-sanitizer $tool: $state in $((SECONDS - t)) s"
    sanitizers="$sanitizers $tool=$state"
  done
fi

phase "benchmark: key cases, fused vs native vs torch.compile, copy bandwidth"
# MONAI's and nnU-Net's losses for the Dice + cross-entropy case, where their wheels travelled with
# the tree (the machine has no network): `pip download --no-deps monai==1.5.0 nnunetv2==2.8.1
# -d bench/out/wheels` here, then the run tool's carry of bench/out/wheels
if ls bench/out/wheels/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-deps --no-index --target "$out/site" bench/out/wheels/*.whl \
    && export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}" \
    && echo "segmentation baselines: $(ls bench/out/wheels)"
fi
if [ "$gpu" = 1 ]; then
  "$python" bench/gpu_bench.py --key --out "$out" --tests-passed "$passed" \
    --tests-failed "$failed" --sanitizers "${sanitizers# }" 2>&1 | tee "$out/bench.log"
else
  echo "benchmark: skipped (no CUDA device)"
fi
phase "done"
[ "$test_rc" -eq 0 ] && [ "$san_rc" -eq 0 ]

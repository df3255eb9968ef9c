#!/usr/bin/env bash
# The GPU check, in one command on a GPU machine with no network: build the extension against the
# torch already there, run the test suite (its CUDA tests included: no host sync, CUDA graph
# replay, tests/test_cuda_runtime.py), run every kernel family under compute-sanitizer's memcheck,
# racecheck and synccheck, then benchmark fused vs native eager vs torch.compile and write
# bench/results/<date>-<gpu>.{json,md}.
#   bash bench/gpu_check.sh [results-dir]        (make gpu-check)
# Exit status: nonzero if the build fails, no GPU is visible, any test fails or a sanitizer finds
# an error (the benchmark still runs and records the counts).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${1:-bench/results}"
export PYTHONUNBUFFERED=1

echo "== build against $("$python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
"$python" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . || {
  echo "gpu-check: build failed"; exit 1; }
"$python" -c "import torch, weighted_loss; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

echo "== tests"
junit=$(mktemp)
"$python" -m pytest tests -q -p no:cacheprovider --junitxml="$junit"
test_rc=$?
read -r passed failed < <("$python" - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - bad - skipped, bad)
PY
)
echo "tests: $passed passed, $failed failed (pytest rc=$test_rc)"

echo "== compute-sanitizer (memcheck, racecheck, synccheck) over bench/sanitize_cuda.py"
# Every kernel family once, small. A runtime that refuses the tool (gVisor: "Device not
# supported") or a missing tool is reported, not counted as a failure; an error it finds is.
sanitizers=""
san_rc=0
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck synccheck; do
    log="$out/sanitizer-$tool.log"
    mkdir -p "$out"
    timeout 600 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      "$python" bench/sanitize_cuda.py >"$log" 2>&1
    rc=$?
    if grep -q "Device not supported\|not supported on this" "$log"; then
      state="unavailable"
    elif [ "$rc" -eq 0 ]; then
      state="clean"
    else
      state="errors(rc=$rc)"
      san_rc=1
    fi
    echo "compute-sanitizer $tool: $state ($log)"
    sanitizers="$sanitizers $tool=$state"
  done
else
  echo "compute-sanitizer: not installed"
  sanitizers="not-installed"
fi

echo "== benchmark"
"$python" bench/gpu_bench.py --out "$out" --tests-passed "$passed" --tests-failed "$failed" \
  --sanitizers "${sanitizers# }" || exit 1
[ "$test_rc" -eq 0 ] && [ "$san_rc" -eq 0 ]

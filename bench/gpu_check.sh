#!/usr/bin/env bash
# The GPU check, in one command on a GPU machine with no network: build the extension against the
# torch already there, run the test suite (its CUDA tests included), then benchmark fused vs
# native eager vs torch.compile and write bench/results/<date>-<gpu>.{json,md}.
#   bash bench/gpu_check.sh [results-dir]        (make gpu-check)
# Exit status: nonzero if the build fails, no GPU is visible, or any test fails (the benchmark
# still runs and records the counts).
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

echo "== benchmark"
"$python" bench/gpu_bench.py --out "$out" --tests-passed "$passed" --tests-failed "$failed" || exit 1
[ "$test_rc" -eq 0 ]

#!/usr/bin/env bash
# CI's packaging check: sdist -> wheel -> a fresh venv -> import -> a smoke test against PyTorch,
# and the one-line error of a build without torch. The wheel builds without the emulator (a
# test-only extension of its own, tests/emulation.py) and without debug info, as every build does;
# prints _C.so's size and checks that it holds no emulator. With WHEEL_OUT=DIR the wheel (and the
# torch version it was built against, DIR/torch-version) is kept there: CI's tests run its _C.so,
# so that the product is compiled once (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# build.__main__: a build/ folder in the clone would pass for the package "build" (a namespace)
$PYTHON -c "import build.__main__" 2>/dev/null || $PYTHON -m pip install -q build
$PYTHON -m build --sdist --no-isolation -o "$work/dist" . >/dev/null
sdist="$(ls "$work"/dist/*.tar.gz)"
echo "sdist: $(basename "$sdist") $(du -k "$sdist" | cut -f1) KiB, $(tar tzf "$sdist" | wc -l) files"

# a venv without torch: the build stops with one line saying what to do
$PYTHON -m venv "$work/bare"
if "$work/bare/bin/pip" install -q --no-build-isolation "$sdist" >"$work/bare.log" 2>&1; then
  echo "FAIL: built without torch" && exit 1
fi
grep -q "install torch first" "$work/bare.log" || { cat "$work/bare.log"; echo "FAIL: no hint"; exit 1; }
echo "without torch: $(grep -o 'weighted_loss builds.*' "$work/bare.log" | head -1)"

# a fresh venv with torch: wheel from the sdist, installed, imported, compared with PyTorch
$PYTHON -m venv "$work/venv"
py="$work/venv/bin/python"
$py -m pip install -q "torch==$TORCH_VERSION" numpy ninja "setuptools>=64" wheel
start=$(date +%s)
MAX_JOBS="${MAX_JOBS:-2}" $py -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheels" "$sdist"
echo "wheel built in $(( $(date +%s) - start )) s: $(ls "$work"/wheels)"
if [ -n "${WHEEL_OUT:-}" ]; then
  mkdir -p "$WHEEL_OUT"
  cp "$work"/wheels/*.whl "$WHEEL_OUT"/
  $py -c "import torch; print(torch.__version__)" > "$WHEEL_OUT/torch-version"
fi
# with its dependencies: the torch installed satisfies them, so nothing is fetched
$py -m pip install -q "$work"/wheels/*.whl
cd "$work"  # away from the clone, so the installed package is the one imported
$py - <<'PY'
import os
import torch
import torch.nn.functional as F
import weighted_loss as wl

so = next(f for f in os.listdir(os.path.dirname(wl.__file__)) if f.startswith("_C"))
with open(os.path.join(os.path.dirname(wl.__file__), so), "rb") as f:
    binary = f.read()
assert "site-packages" in wl.__file__, wl.__file__
# the emulator's strings (its error detail, its namespace) are in any build that holds it
assert b"CUDA emulator" not in binary and b"wl_emu" not in binary, "the emulator is in _C.so"
assert not hasattr(torch.ops.weighted_loss, "_emulator_enable")
x = torch.randn(64, 100, requires_grad=True)
y = torch.randint(0, 100, (64,))
w = torch.rand(100) + 0.5
ours = wl.cross_entropy(x, y, weight=w, label_smoothing=0.1)
ref = F.cross_entropy(x, y, weight=w, label_smoothing=0.1)
torch.testing.assert_close(ours, ref)
torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
t = torch.rand(64, 100)
torch.testing.assert_close(wl.binary_cross_entropy_with_logits(x, t),
                           F.binary_cross_entropy_with_logits(x, t))
print(f"installed wheel: import, cross-entropy and BCE as PyTorch; {so} "
      f"{len(binary) / 2**20:.1f} MiB, no emulator")
PY

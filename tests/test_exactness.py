"""The fused losses' float32/bfloat16 error as a multiple of PyTorch's own, on PyTorch's OpInfo and
ModuleInfo sample inputs and on realistic shapes (tests/exactness.py says how it is measured):
at most 2x on every CPU kernel build, and assert_close against PyTorch at default tolerances."""
import json
import os
import subprocess
import sys

import pytest
import torch

import weighted_loss as wl

import emulation

sys.path.insert(0, os.path.dirname(__file__))
import exactness  # noqa: E402

HERE = os.path.dirname(__file__)


def _check(rows, bar=True):
    over = [r for r in rows if r["ratio"] > exactness.BAR]
    far = sorted({r["case"] for r in rows if not r["close"]})
    msg = "\n".join(f"{r['case']} {r['dtype']} {r['output']}: ours {r['ours']:.3e}, PyTorch "
                    f"{r['pytorch']:.3e}, ratio {r['ratio']:.2f}" for r in over)
    if bar:
        assert not over, f"more than {exactness.BAR}x PyTorch's own error:\n{msg}"
    assert not far, f"not assert_close to PyTorch: {far}"


def test_cases_cover_both_losses_and_every_sample():
    cases = exactness.all_cases()
    names = [c[0] for c in cases]
    for prefix in ("nn.functional.cross_entropy#", "nn.functional.binary_cross_entropy_with_logits#",
                   "CrossEntropyLoss#", "BCEWithLogitsLoss#", "ce-seg-", "ce-16x32000", "ce-prob-"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(cases) > 150


def test_exact_as_pytorch_cpu_build_in_use():
    _check(exactness.report("cpu"))


@pytest.mark.parametrize("cap", ["default", "avx2"])
def test_exact_as_pytorch_other_cpu_builds(cap, tmp_path):
    if cap.upper() == wl.cpu_capability():
        pytest.skip(f"{cap} is the build in use (test_exact_as_pytorch_cpu_build_in_use)")
    out = tmp_path / "rows.json"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    subprocess.run([sys.executable, os.path.join(HERE, "exactness.py"), "--json", str(out)],
                   check=True, env=env, timeout=600, stdout=subprocess.DEVNULL)
    got = json.loads(out.read_text())
    assert got["cpu_capability"] == cap.upper()
    _check(got["rows"])


@pytest.mark.emulated
@pytest.mark.asan_skip
def test_emulated_cuda_kernels_close_to_pytorch():
    """The CUDA kernels through the emulator: assert_close to PyTorch on every sample. (Their
    error ratio is not held to 2x yet: on the GPU __expf is not the emulator's exp.)"""
    assert emulation.emulator_available(), "the emulated CUDA kernels are not built"
    _check(exactness.report("emulated"), bar=False)


def test_small_loss_is_exact():
    """A confident, correct row: lse - x_y cancels when computed through lse (the old kernels were
    off by 1.1e-7 here, over 100 ulp of the loss); through log1p of the sum below the max the error is
    that of x - max and the exps, a couple of ulp (PyTorch's, on this one row, happens to be less
    than one: exactness.py compares over many rows and draws)."""
    x = torch.tensor([[-4.826985, -7.582430, -0.604689]])
    y = torch.tensor([2])
    ref = torch.nn.functional.cross_entropy(x.double(), y)
    for logits in (x, torch.nn.functional.pad(x, (0, 70), value=-1e4)):  # small-row and row paths
        ours = (wl.cross_entropy(logits, y).double() - ref).abs()
        assert ours <= 4 * 2 ** -24 * ref, ours

"""The emulator of the CUDA execution model: its own C++ tests (kernels that use each feature give
the GPU's answer; kernels that break a rule fail loudly), the emulated_cuda() context, and the
check that the suite launched every kernel instantiation the launchers can choose."""
import os
import runpy
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from emulation import emulated_cuda, emulated_launches, emulating

pytestmark = pytest.mark.emulated  # (the sanitizer run's selection: conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "emulator")


def _compile_and_run(tmp_path, *flags):
    find = runpy.run_path(os.path.join(ROOT, "tests", "emulated", "headers.py"))["find"]
    includes = find()
    assert includes is not None, "no CUDA headers: run `make cuda-headers`"
    cxx = os.environ.get("CXX", "g++")
    assert shutil.which(cxx), f"{cxx} not found"
    exe = tmp_path / "emulator_test"
    src = os.path.join(EMULATOR, "test", "emulator_test.cpp")
    cmd = [cxx, "-std=c++20", "-O1", "-g", *flags, *(f"-I{d}" for d in includes), src, "-o", str(exe)]
    subprocess.run(cmd, check=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1")
    env.pop("LD_PRELOAD", None)  # the sanitized run's preload is for python, not this program
    return subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("flags", [(), ("-DWL_EMU_UCONTEXT",),
                                   ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")],
                         ids=["asm-switch", "ucontext", "asan-ubsan"])
@pytest.mark.asan_skip
def test_emulator_selftest(tmp_path, flags):
    out = _compile_and_run(tmp_path, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout


def test_context_switches_kernels_and_restores():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    name = "forward_rows_kernel<float, 0, false, 8>"
    before = emulated_launches()[name]
    wl.cross_entropy(x, t)  # the CPU kernels
    assert emulated_launches()[name] == before and not emulating()
    with emulated_cuda():
        assert emulating()
        with emulated_cuda(sm_count=4):
            loss = wl.cross_entropy(x, t)
        loss.backward()  # back in the outer context
        assert emulated_launches()[name] == before + 1
        assert emulated_launches()["backward_rows_kernel<float, 0, false, 8>"] > 0
    assert not emulating()
    wl.cross_entropy(x, t)
    assert emulated_launches()[name] == before + 1
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, t), x)[0])


def test_context_restores_after_an_error():
    with pytest.raises(RuntimeError, match="device-side assert"):
        with emulated_cuda():
            wl.cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1]))
    assert not emulating()
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):  # the CPU kernels again
        wl.cross_entropy(torch.randn(3, 4), torch.tensor([0, 9, 1]))


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_sm_count_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="sm_count must be a positive int"):
        with emulated_cuda(sm_count=bad):
            pass
    assert not emulating()


def test_launch_names_carry_template_arguments():
    names = emulated_launches()
    assert "forward_split_kernel<__nv_bfloat16, 2, true>" in names
    assert "backward_kernel<__half, __half, true, true, false, true, false>" in names
    assert "backward_kernel<__nv_bfloat16, float, true, true, false, true, false>" in names
    assert "backward_kernel<__half, __half, true, true, false, true, true>" in names
    assert len(names) == len(set(names)) >= 300


@pytest.mark.runs_last
def test_every_kernel_launched(request):
    """Every kernel instantiation the launchers can choose ran at least once in this session: the
    emulated suite reaches each dtype, mode, weighting and path. Runs after the rest (conftest)."""
    if not any("[emulated" in item.nodeid for item in request.session.items):
        pytest.skip("only meaningful after the emulated suite (run the whole of tests/)")
    never = sorted(name for name, n in emulated_launches().items() if n == 0)
    assert not never, f"{len(never)} kernel instantiations never launched: {never}"

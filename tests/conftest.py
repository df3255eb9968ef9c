import os
import subprocess
import sys
import zlib

import pytest
import torch

import weighted_loss  # noqa: F401  (loads the ops once for every test module)
from emulation import emulated_cuda

# torch.compile's caches in this clone (build/inductor), not the user's shared one: a cached graph
# keeps the output shapes an op's fake kernel gave when it was compiled, so after a fake kernel
# changed (the overlap op's, 2026-12-08) a cache from an older tree failed its stride checks.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "inductor"))


# "emulated": CPU tensors under emulation.emulated_cuda() (tests/emulation.py, an extension of its
# own), so the CUDA kernels run in the emulator, on every machine (without the CUDA headers to
# build it, these fail, saying why)
DEVICES = ["cpu", "emulated"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_DEVICES = ["emulated"] + (["cuda"] if torch.cuda.is_available() else [])


def _device(name):
    if name == "emulated":
        with emulated_cuda():
            yield torch.device("cpu")
    else:
        yield torch.device(name)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device the losses run on; tests check device.type and testing.emulating()."""
    yield from _device(request.param)


@pytest.fixture(params=GPU_DEVICES)
def gpu(request):
    """The CUDA kernels: in the emulator, and on a GPU when there is one."""
    yield from _device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "runs_last: runs after every other test of the session")
    config.addinivalue_line("markers", "grid: one case of a parity grid: a fixed sample of them "
                                       "runs unless --full-grid (or WL_FULL_GRID=1)")
    config.addinivalue_line("markers", "emulated: runs the CUDA kernels in the emulator (given to "
                                       "every test whose device or gpu parameter is 'emulated', "
                                       "and to the emulator's own tests): the sanitizer run's "
                                       "selection (make cuda-emu-asan)")
    config.addinivalue_line("markers", "asan_skip: repeats launches for numerics only (gradcheck, "
                                       "opcheck, PyTorch's samples, determinism repeats, the "
                                       "emulator's self-test): left out of the sanitizer run, "
                                       "whose last test checks that every kernel instantiation "
                                       "still ran")


@pytest.fixture
def both_builds(tmp_path):
    """run(body) executes `body` (Python that fills the dict `out` with tensors, given `torch` and
    `wl`) twice: in a subprocess whose CPU kernels are the DEFAULT (no AVX) build, forced with
    ATEN_CPU_CAPABILITY, and here with the build in use. Returns (default_out, here_out)."""
    def run(body):
        script = tmp_path / "run.py"
        script.write_text("import torch, weighted_loss as wl\nout = {}\n" + body +
                          f"\nout['cap'] = wl.cpu_capability()\n"
                          f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n")
        env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
        subprocess.run([sys.executable, str(script)], check=True, env=env)
        base = torch.load(tmp_path / "out.pt")
        assert base.pop("cap") == "DEFAULT"
        import weighted_loss as wl
        here = {}
        exec(body, {"torch": torch, "wl": wl, "out": here})
        return base, here
    return run


# of the cases marked grid, one in GRID_SAMPLE runs by default: a fixed choice by a hash of the
# test's id, the same on every run, spread over every parameter of the grid
GRID_SAMPLE = 4


def _on_cuda(item):
    """Whether a test runs on a CUDA device: its device (or gpu) parameter is "cuda", or it is
    marked cuda (the CUDA-only tests)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "cuda" in (params.get("device"), params.get("gpu")) or \
        item.get_closest_marker("cuda") is not None


def _on_emulator(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "emulated" in (params.get("device"), params.get("gpu"))


def _row_elsewhere(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    row, device = params.get("row"), params.get("device")
    devices = getattr(row, "devices", None)
    name = getattr(device, "type", device)
    return devices is not None and name is not None and name not in devices


def pytest_collection_modifyitems(config, items):
    """Marks the tests on the emulated device emulated; samples the parity grids (unless
    --full-grid); --only-cuda keeps the tests that run on a CUDA device; tests marked cuda are
    skipped without one; tests marked runs_last (the emulator's coverage check) run after all
    others."""
    for item in items:
        if _on_emulator(item):
            item.add_marker(pytest.mark.emulated)
    # a row of tests/losses.py on a device whose kernels it does not have yet: not a test
    absent = [item for item in items if _row_elsewhere(item)]
    if absent:
        config.hook.pytest_deselected(items=absent)
        items[:] = [item for item in items if not _row_elsewhere(item)]
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    if config.getoption("--only-cuda"):
        other = [item for item in items if not _on_cuda(item)]
        if other:
            config.hook.pytest_deselected(items=other)
            items[:] = [item for item in items if _on_cuda(item)]
    if not (config.getoption("--full-grid") or os.environ.get("WL_FULL_GRID") == "1"):
        skipped = [item for item in items if item.get_closest_marker("grid") is not None
                   and zlib.crc32(item.nodeid.encode()) % GRID_SAMPLE != 0]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            dropped = set(map(id, skipped))
            items[:] = [item for item in items if id(item) not in dropped]
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def pytest_addoption(parser):
    parser.addoption("--only-cuda", action="store_true",
                     help="only the tests that run on a CUDA device (the GPU run: "
                          "bench/gpu_check.sh)")
    parser.addoption("--full-grid", action="store_true",
                     help=f"every case of the parity grids (tests marked grid), not the fixed one "
                          f"in {GRID_SAMPLE} that runs by default (or WL_FULL_GRID=1)")
    parser.addoption("--fuzz-cases", type=int, default=None,
                     help="seeds of tests/fuzz.py per device in tests/test_fuzz.py (default 200, "
                          "or WL_FUZZ_CASES)")

import os
import subprocess
import sys

import pytest
import torch

import weighted_loss  # noqa: F401  (loads the ops once for every test module)
from emulation import emulated_cuda

# the benchmark's composites of the focal losses (bench/suite_focal.py: what users write without a
# fused kernel) are the tests' references too
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

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


def pytest_collection_modifyitems(config, items):
    """Tests marked runs_last (the emulator's coverage check) run after all others."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=None,
                     help="seeds of tests/fuzz.py per device in tests/test_fuzz.py (default 200, "
                          "or WL_FUZZ_CASES)")

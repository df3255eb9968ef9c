import os
import subprocess
import sys

import pytest
import torch

import weighted_loss  # noqa: F401  (loads the ops once for every test module)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


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

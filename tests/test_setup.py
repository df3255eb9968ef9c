"""setup.py's choice between the CUDA and the CPU-only build: the toolkit is taken from where nvcc
says it lives (a wrapper script on PATH is not the toolkit), checked for its headers, and a CUDA
torch without one builds the CPU kernels, saying why in one line. Fake toolkits and a fake nvcc;
torch's CUDA version set by hand (this torch may be a CPU build)."""
import importlib.util
import os
import stat

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("wl_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() does not run
    return mod


def _toolkit(root, headers):
    os.makedirs(os.path.join(root, "bin"))
    if headers:
        os.makedirs(os.path.join(root, "include"))
        open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    return str(root)


def _nvcc_wrapper(folder, real_home):
    """An `nvcc` script in folder that reports real_home's bin as its own, as a wrapper
    (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`) does."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvcc")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho '#$ _HERE_={real_home}/bin' >&2\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ("CUDA_HOME", "WEIGHTED_LOSS_CUDA", "FORCE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "guess"))  # no headers there
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    return tmp_path


def test_the_toolkit_is_where_nvcc_says_it_lives(env, monkeypatch):
    real = _toolkit(env / "cuda-13.0", headers=True)
    _nvcc_wrapper(env / "path", real)
    setup = _setup_module()
    assert setup.nvcc_home() == real
    assert setup.want_cuda()
    assert cpp_extension.CUDA_HOME == real and os.environ["CUDA_HOME"] == real


def test_without_headers_the_cpu_kernels_build_saying_why(env, capsys):
    _nvcc_wrapper(env / "path", _toolkit(env / "bare", headers=False))
    setup = _setup_module()
    assert not setup.want_cuda()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "building the CPU kernels only" in err[0]
    assert "cuda_runtime.h" in err[0] and str(env / "bare") in err[0]


def test_cuda_home_comes_first_and_the_switch_forces_either(env, monkeypatch):
    _nvcc_wrapper(env / "path", _toolkit(env / "other", headers=True))
    home = _toolkit(env / "home", headers=True)
    monkeypatch.setenv("CUDA_HOME", home)
    setup = _setup_module()
    assert setup.want_cuda() and cpp_extension.CUDA_HOME == home
    monkeypatch.setenv("WEIGHTED_LOSS_CUDA", "0")
    assert not setup.want_cuda()
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("WEIGHTED_LOSS_CUDA", "1")
    assert setup.want_cuda()


def test_a_cpu_torch_builds_the_cpu_kernels_silently(env, monkeypatch, capsys):
    _nvcc_wrapper(env / "path", _toolkit(env / "cuda", headers=True))
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not _setup_module().want_cuda()
    assert capsys.readouterr().err == ""

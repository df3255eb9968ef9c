"""pytest-benchmark suites of the fused losses against PyTorch:

    pytest bench/ --benchmark-only                 every case (CUDA if present, else CPU)
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,ops

Each shape and dtype is a group; native eager runs first in it and is the baseline: fused and
compiled report speedup_vs_native and GB/s (the case's minimal bytes over the median) in
extra_info. Without --benchmark-only (as in `make test`) only the smoke cases run.
"""
import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: a benchmark case that also runs in make test")


def pytest_collection_modifyitems(config, items):
    if config.getoption("benchmark_only", False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run it with `pytest bench/ --benchmark-only`")
    for item in items:
        if item.path.resolve().is_relative_to(HERE) and "smoke" not in item.keywords:
            item.add_marker(skip)

"""The CUDA runtime properties of every kernel family (tests/kernel_cases.py): on a GPU, a
forward+backward that never synchronizes the host (torch.cuda.set_sync_debug_mode("error")), and
one captured in a CUDA graph and replayed twice with the eager step's exact results. On every
machine: the cases launch every kernel family of the emulated CUDA build, and give the same
bits twice, so that the GPU checks run what they mean to."""
import pytest
import torch

from kernel_cases import CASES
from emulation import emulated_cuda, emulated_launches


def _family(name):
    return name.split("<")[0]


def test_cases_launch_every_kernel_family_and_repeat_exactly():
    before = emulated_launches()
    with emulated_cuda():
        for name, case in CASES.items():
            _, step = case(torch.device("cpu"))
            first, second = step(), step()
            for a, b in zip(first, second):
                assert torch.isfinite(a).all(), name
                assert torch.equal(a, b), name
    after = emulated_launches()
    ran = {_family(k) for k in after if after[k] > before[k]}
    assert ran == {_family(k) for k in after}, sorted({_family(k) for k in after} - ran)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_no_host_sync(name):
    _, step = CASES[name](torch.device("cuda"))
    step()  # lazy initialization (cuBLAS handles, the first allocation) may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_graph_replays_the_eager_step(name):
    _, step = CASES[name](torch.device("cuda"))
    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as PyTorch asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b), name

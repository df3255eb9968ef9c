"""Cross-entropy benchmarks: fused vs native eager vs torch.compile, forward+backward."""
import pytest
import torch
import torch.nn.functional as F

from harness import IMPLS, case_id, run_benchmark

CASES = [
    ((8192, 1000), torch.float32, {}),
    ((4096, 32000), torch.bfloat16, {}),
    ((2048, 32000), torch.float32, {"label_smoothing": 0.1}),
    ((16, 19, 128, 128), torch.float32, {"ignore_index": 255}),
]


@pytest.mark.parametrize("shape,dtype,kwargs,impl", [c + (i,) for c in CASES for i in IMPLS],
                         ids=case_id)
def test_cross_entropy(benchmark, shape, dtype, kwargs, impl):
    run_benchmark(benchmark, "ce", shape, dtype, kwargs, impl)


@pytest.mark.smoke
def test_smoke_cross_entropy(benchmark):
    """One small case through the benchmark path, checked against PyTorch (runs in make test)."""
    x, y, kw, (value, grad) = run_benchmark(benchmark, "ce", (64, 10), torch.float32, {}, "fused")
    xr = x.detach().requires_grad_(True)
    ref = F.cross_entropy(xr, y, **kw)
    (ref_grad,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(grad, ref_grad)

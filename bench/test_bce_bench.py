"""BCE-with-logits benchmarks: fused vs native eager vs torch.compile, forward+backward."""
import pytest
import torch

from harness import IMPLS, case_id, run_benchmark

CASES = [
    ((8192, 1000), torch.float32, {}),
    ((16, 5, 128, 128), torch.float32, {}),
    ((4096, 8192), torch.bfloat16, {}),
]


@pytest.mark.parametrize("shape,dtype,kwargs,impl", [c + (i,) for c in CASES for i in IMPLS],
                         ids=case_id)
def test_binary_cross_entropy_with_logits(benchmark, shape, dtype, kwargs, impl):
    run_benchmark(benchmark, "bce", shape, dtype, kwargs, impl)

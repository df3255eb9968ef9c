"""DTensor inputs (weighted_loss/_dtensor.py) over 2 and 4 gloo ranks (tests/dtensor_worker.py):
logits sharded on the classes (the vocab-parallel path, as loss_parallel()), on the batch or a
spatial dim (local rows, the exact mean), replicated; the focal losses; a column-parallel LM head;
FSDP2 with the head's weight sharded. Every loss and gradient equals PyTorch's (or, for the focal
losses, the same loss's) on the whole float64 tensors; unsupported layouts are refused."""
import pytest
import torch

import weighted_loss as wl
from test_distributed import _run

TOL = 1e-12  # float64 throughout (one float32 case, held to float32's rounding)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["ce", "reweight", "bce", "focal", "tp-head", "fsdp2", "fsdp2-llama",
                                  "fsdp2-llama-bf16"])
def test_dtensor_losses_equal_the_whole_tensors(case, world, tmp_path):
    ranks = _run(case, world, tmp_path, worker="dtensor_worker.py")
    assert ranks[0], "no sub-case ran"
    for got in ranks:
        assert got.keys() == ranks[0].keys()
        for name, errs in got.items():
            if len(errs) == 4:  # bfloat16: within 2x of PyTorch's own error against float64
                ours, theirs = errs[:2], errs[2:]
                assert all(o <= 2 * t + 1e-6 for o, t in zip(ours, theirs)), (name, errs)
                continue
            loss_err, grad_err = errs
            tol = 2e-6 if "float32" in name else TOL
            assert loss_err <= tol and grad_err <= tol, (name, loss_err, grad_err)


def test_dtensor_losses_under_torch_compile(tmp_path):
    for got in _run("compile", 2, tmp_path, worker="dtensor_worker.py"):
        assert set(got) == {"compile-batch", "compile-class"}
        for name, (loss_err, grad_err) in got.items():
            assert loss_err <= TOL and grad_err <= TOL, (name, loss_err, grad_err)


def test_plain_tensors_give_plain_tensors():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 2, 1, 0])
    out = wl.cross_entropy(x, y)
    assert type(out) is torch.Tensor

"""The CPU kernels and the (emulated) CUDA kernels take their scalar formulas from one header,
csrc/loss_math.h, so that the two cannot drift apart. Held here on the cases where they once did:
strong label smoothing (0.96, where 1 - float(0.96) is 5e-7 off 0.04) with probability targets,
and the softmax focal loss at gamma 2 and 5 with p near 0 and near 1 (where 1 - p has two forms).
The two builds still differ in their exp and in their summation order, so they are held to agree
within 2.5 ulp of the largest float64 value, and each to that of the float64 result."""
import pytest
import torch

import weighted_loss as wl
from emulation import emulated_cuda

pytestmark = pytest.mark.emulated  # (the CUDA kernels in the emulator: conftest)

ULPS = 2.5


def _run(fn, tensors):
    """The loss and the gradients of its floating tensors, at a fixed upstream gradient."""
    ts = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    loss = fn(*ts)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    return [loss.detach()] + list(torch.autograd.grad(
        loss, [t for t in ts if t.requires_grad], go.to(loss.dtype)))


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=g)
    # peaked targets: t' = (1 - s) t + s / C is then mostly its (1 - s) t term
    p = torch.softmax(torch.randn(8, 300, generator=g) * 6, 1)
    yield "smoothing-0.96-probabilities", lambda a, b: wl.cross_entropy(
        a, b, label_smoothing=0.96, reduction="none"), [x, p]
    yield "smoothing-0.96-indices", lambda a: wl.cross_entropy(
        a, p.argmax(1), label_smoothing=0.96, reduction="sum"), [x]
    for gamma in (2.0, 5.0):
        xs = torch.randn(16, 7, generator=g) * 12  # each row's p_y near 0 or near 1
        y = torch.where(torch.arange(16) % 2 == 0, xs.argmin(1), xs.argmax(1))
        pp = torch.softmax(torch.randn(16, 7, generator=g) * 4, 1)
        yield f"focal-{gamma:g}-indices", lambda a, gamma=gamma, y=y: wl.focal_loss(
            a, y, gamma, reduction="none"), [xs]
        yield f"focal-{gamma:g}-smoothing", lambda a, gamma=gamma, y=y: wl.focal_loss(
            a, y, gamma, label_smoothing=0.3, reduction="none"), [xs]
        yield f"focal-{gamma:g}-probabilities", lambda a, b, gamma=gamma: wl.focal_loss(
            a, b, gamma, label_smoothing=0.1, reduction="none"), [xs, pp]


CASES = {name: (fn, ts) for name, fn, ts in _cases()}


@pytest.mark.parametrize("name", CASES)
def test_cpu_and_cuda_kernels_agree(name):
    fn, tensors = CASES[name]
    cpu = _run(fn, tensors)
    with emulated_cuda():
        cuda = _run(fn, tensors)
    exact = _run(fn, [t.double() for t in tensors])
    for i, (c, k, e) in enumerate(zip(cpu, cuda, exact)):
        ulp = torch.finfo(c.dtype).eps * e.abs().max().item()
        for what, a, b in (("cpu-cuda", c, k), ("cpu-float64", c, e), ("cuda-float64", k, e)):
            off = (a.double() - b.double()).abs().max().item() / ulp
            assert off <= ULPS, (name, i, what, off)

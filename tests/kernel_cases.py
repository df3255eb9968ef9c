"""Small forward+backward calls that between them launch every kernel family of the library once:
cross-entropy over long rows, short rows (a warp or less), very long rows (a block; split
across blocks when the rows are few), (N, C, d...) lanes, probability targets, label smoothing,
z-loss and softcap, the softmax focal loss (over class indices, and over soft targets with its
second pass over each row: a block per row where cross-entropy would split it), the in-place backward of linear_cross_entropy, BCE
with broadcast weights, the sigmoid focal loss with a tensor alpha and a target gradient, and
Dice + cross-entropy (the overlap sums and their gradient).

Used where a whole run over the kernels matters more than any one value: the GPU runtime tests
(no host synchronization, CUDA graph capture and replay: tests/test_cuda_runtime.py) and
``bench/sanitize_cuda.py`` under compute-sanitizer; on the CPU and the emulator by the tests
that keep these cases working. ``CASES`` maps a name to ``fn(device) -> (inputs, step)``: the
inputs a step reads (tensors built once, so a CUDA graph can capture the step) and ``step()``,
which runs forward and backward and returns the loss and the gradients.
"""
from typing import Callable, Dict, List, Tuple

import torch

import weighted_loss as wl

Step = Callable[[], List[torch.Tensor]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, device, dtype=torch.float32, seed=0):
    x = torch.randn(shape, generator=_gen(seed)) * 3
    return x.to(device=device, dtype=dtype).requires_grad_()


def _index(shape, C, device, seed=1, ignore=None):
    t = torch.randint(0, C, shape, generator=_gen(seed))
    if ignore is not None:
        t.view(-1)[::4] = ignore
    return t.to(device)


def _weights(C, device, dtype=torch.float32, seed=2):
    return (torch.rand(C, generator=_gen(seed)) + 0.25).to(device=device, dtype=dtype)


def _step(loss_fn, wrt: Tuple[torch.Tensor, ...]) -> Step:
    def step():
        loss = loss_fn()
        return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, wrt)]
    return step


def _ce(shape, dtype=torch.float32, ignore_index=-100, **kw):
    def case(device):
        x = _logits(shape, device, dtype)
        C = shape[1]
        t = _index((shape[0], *shape[2:]), C, device, ignore=ignore_index)
        w = _weights(C, device, dtype)
        return (x, t, w), _step(
            lambda: wl.cross_entropy(x, t, w, ignore_index=ignore_index, **kw), (x,))
    return case


def _ce_prob(device):
    x = _logits((32, 500), device)
    t = torch.softmax(torch.randn(32, 500, generator=_gen(3)), 1).to(device).requires_grad_()
    w = _weights(500, device)
    return (x, t, w), _step(lambda: wl.cross_entropy(x, t, w, label_smoothing=0.1), (x, t))


def _focal(shape):
    def case(device):
        x = _logits(shape, device)
        t = _index((shape[0], *shape[2:]), shape[1], device, ignore=-100)
        w = _weights(shape[1], device)
        return (x, t, w), _step(lambda: wl.focal_loss(x, t, 2.0, w), (x,))
    return case


def _focal_soft(shape, prob):
    def case(device):
        x = _logits(shape, device)
        if prob:
            t = torch.softmax(torch.randn(shape, generator=_gen(11)), 1).to(device)
            t = t.requires_grad_()
        else:
            t = _index((shape[0], *shape[2:]), shape[1], device, ignore=-100)
        w = _weights(shape[1], device)
        return (x, t, w), _step(lambda: wl.focal_loss(x, t, 2.0, w, label_smoothing=0.1),
                                (x, t) if prob else (x,))
    return case


def _linear(device):
    h = _logits((64, 32), device, seed=4)
    lw = (torch.randn(1000, 32, generator=_gen(5)) * 0.2).to(device).requires_grad_()
    t = _index((64,), 1000, device, ignore=-100)
    return (h, lw, t), _step(
        lambda: wl.linear_cross_entropy(h, lw, t, label_smoothing=0.1, chunk_size=16), (h, lw))


def _dice_ce(device):
    x = _logits((2, 5, 6, 7, 8), device)
    t = _index((2, 6, 7, 8), 5, device, ignore=-100)
    w = _weights(5, device)
    return (x, t, w), _step(lambda: wl.dice_loss(x, t, weight=w, lambda_ce=1.0, batch=True),
                            (x,))


def _bce(shape, wshape, pshape):
    def case(device):
        x = _logits(shape, device)
        t = torch.rand(shape, generator=_gen(6)).to(device).requires_grad_()
        w = _weights(wshape, device) if wshape else None
        pw = (torch.rand(pshape, generator=_gen(7)) * 4).to(device)
        return (x, t, w, pw), _step(
            lambda: wl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw), (x, t))
    return case


def _sigmoid_focal(device):
    x = _logits((64, 100), device)
    t = (torch.rand(64, 100, generator=_gen(8)) < 0.1).float().to(device).requires_grad_()
    alpha = torch.rand(100, generator=_gen(9)).to(device)
    pw = (torch.rand(100, generator=_gen(10)) * 4).to(device)
    return (x, t, alpha, pw), _step(
        lambda: wl.sigmoid_focal_loss(x, t, alpha, 2.0, "mean", pos_weight=pw), (x, t))


CASES: Dict[str, Callable] = {
    "ce-rows-64x3000-ls": _ce((64, 3000), label_smoothing=0.1),
    "ce-short-rows-64x40": _ce((64, 40)),
    "ce-long-rows-16x40000-bf16": _ce((16, 40000), torch.bfloat16),
    "ce-split-2x200000-bf16": _ce((2, 200000), torch.bfloat16, label_smoothing=0.05),
    "ce-lanes-2x5x8x8-ignore": _ce((2, 5, 8, 8), ignore_index=3),
    "ce-z-softcap-32x1000": _ce((32, 1000), z_loss=1e-3, softcap=30.0),
    "ce-prob-32x500-ls": _ce_prob,
    "focal-32x1000": _focal((32, 1000)),
    "focal-lanes-2x19x8x8": _focal((2, 19, 8, 8)),
    "focal-ls-long-rows-2x20000": _focal_soft((2, 20000), False),
    "focal-prob-lanes-2x19x8x8": _focal_soft((2, 19, 8, 8), True),
    "linear-ce-64x32x1000": _linear,
    "bce-64x100-rowweight": _bce((64, 100), (64, 1), (100,)),
    "bce-seg-2x5x8x8": _bce((2, 5, 8, 8), None, (5, 1, 1)),
    "sigmoid-focal-alpha-64x100": _sigmoid_focal,
    "dice-ce-lanes-2x5x6x7x8": _dice_ce,
}

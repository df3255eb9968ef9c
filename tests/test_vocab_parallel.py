"""Vocab-parallel cross-entropy in one process: the shards' kernels (CPU and the CUDA kernels in
the emulator) and the merge of weighted_loss/vocab_parallel.py, with the group's all-gather
replaced by a stack of the shards' statistics. Across real gloo ranks:
tests/test_distributed.py (tests/vocab_parallel_worker.py)."""
import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from weighted_loss import _sharded
from bars import assert_within_2x

_ops = torch.ops.weighted_loss


def sharded(x, t, w, R, ignore_index=-100, ls=0.0, reduction="mean", grad_out=None, sizes=None):
    """The loss and the gradient of x (N, C) split into R shards (of `sizes` classes; equal by
    default), as R ranks compute them."""
    C = x.shape[1]
    sizes = tuple(sizes or (C // R,) * R)
    starts = [sum(sizes[:r]) for r in range(R)]
    shards = [x[:, o:o + n].detach() for o, n in zip(starts, sizes)]
    stats = torch.stack([_ops.cross_entropy_shard_forward(sh, t, w, ignore_index, ls, o, C)
                         for o, sh in zip(starts, shards)])
    row, wy, planes = _sharded._merge(stats, t, w, ignore_index, ls, sizes)
    tw = wy.sum()
    loss = row if reduction == "none" else row.sum() if reduction == "sum" else row.sum() / tw
    g = torch.ones_like(loss) if grad_out is None else grad_out
    grads = [_ops.cross_entropy_shard_backward(g.to(x.dtype), sh, t, w, planes,
                                               tw.to(planes.dtype), reduction, ignore_index, ls,
                                               o, C)
             for o, sh in zip(starts, shards)]
    return loss.to(x.dtype), torch.cat(grads, 1)


@pytest.mark.parametrize("sizes", [(3, 3, 3, 1), (4, 4, 2, 0), (10, 0)])
def test_uneven_and_empty_shards_merge_to_the_unsharded_loss(sizes):
    """A DTensor's Shard split (torch.chunk's sizes: the last shards smaller or empty)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 10, (6,), generator=g)
    t[1] = -100
    w = torch.rand(10, generator=g, dtype=torch.float64) + 0.2
    for ls in (0.0, 0.25):
        loss, grad = sharded(x, t, w, len(sizes), ls=ls, sizes=sizes)
        want, want_grad = reference(x, t, w, ls=ls)
        torch.testing.assert_close(loss, want, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, want_grad, rtol=1e-13, atol=1e-13)


def reference(x, t, w, ignore_index=-100, ls=0.0, reduction="mean", grad_out=None):
    x = x.detach().requires_grad_()
    loss = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, label_smoothing=ls,
                           reduction=reduction)
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), g


def batch(N, C, dtype, weight, seed=0, ignore_every=5, scale=3.0, device="cpu"):
    x, t, w = _batch(N, C, dtype, weight, seed, ignore_every, scale)
    return x.to(device), t.to(device), None if w is None else w.to(device)


def _batch(N, C, dtype, weight, seed, ignore_every, scale):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    # imbalanced labels, some ignored
    t = torch.multinomial(torch.linspace(1, 20, C) ** 2, N, replacement=True, generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype) if weight else None
    return x, t, w


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weight", [False, True])
def test_shards_equal_unsharded_float64(device, R, reduction, ls, weight):
    x, t, w = batch(23, 48, torch.float64, weight, device=device)
    gout = torch.rand(23, dtype=torch.float64, device=device) if reduction == "none" else None
    loss, g = sharded(x, t, w, R, ls=ls, reduction=reduction, grad_out=gout)
    ref, gref = reference(x, t, w, ls=ls, reduction=reduction, grad_out=gout)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,N,C", [(2, 64, 1000), (4, 16, 32000), (4, 3, 4 * 8192)])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_shards_within_2x_of_pytorch_error(R, N, C, dtype, ls):
    """Loss and gradient against float64 on the same rounded inputs: within 2x of PyTorch's own
    error in the same dtype (or of half an ulp of the largest value)."""
    x, t, w = batch(N, C, dtype, True, seed=C)
    loss, g = sharded(x, t, w, R, ls=ls)
    ref64, g64 = reference(x.double(), t, w.double(), ls=ls)
    pt, gpt = reference(x, t, w, ls=ls)
    for ours, theirs, exact in ((loss, pt, ref64), (g, gpt, g64)):
        assert_within_2x(ours, theirs, exact, dtype)


def test_shards_cuda_kernels_close(gpu):
    """The CUDA kernels in shard mode: rows of sub-warps, of a warp, of a block, and split across
    blocks (5 rows of 33,024 classes: fewer rows than twice the SM count)."""
    for (N, C, R) in ((37, 96, 2), (300, 2048, 4), (64, 8192, 2), (5, 4 * 8192 + 256, 4)):
        for ls in (0.0, 0.1):
            x, t, w = batch(N, C, torch.float32, True, seed=N, device=gpu)
            loss, g = sharded(x, t, w, R, ls=ls)
            ref, gref = reference(x, t, w, ls=ls)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(g, gref)


@pytest.mark.parametrize("R", [2, 4])
def test_nan_and_inf_rows_as_pytorch(device, R):
    """A NaN or +inf logit in one shard makes the whole row NaN (loss and every shard's gradient);
    a shard that is -inf throughout (a masked vocabulary block) does not; an ignored row's
    gradient is NaN where its log_softmax is, as in PyTorch."""
    x, t, _ = batch(8, 16, torch.float32, False, ignore_every=0, device=device)
    x[0, 1] = float("nan")
    x[1, 15] = float("inf")
    x[2, :4] = float("-inf")  # shard 0 of R = 4 masked, shard 0 of R = 2 half masked
    t[2] = 9
    x[3, :] = float("-inf")
    x[4, 3] = float("nan")
    t[4] = -100
    x[5, 2] = float("-inf")
    t[5] = 2  # the target itself masked: loss +inf
    loss, g = sharded(x, t, None, R, reduction="none")
    ref, gref = reference(x, t, None, reduction="none")
    torch.testing.assert_close(loss, ref, equal_nan=True)
    torch.testing.assert_close(g, gref, equal_nan=True)


def test_public_function_single_process_matches_cross_entropy(device):
    """Without torch.distributed initialized: one shard, all the shapes of F.cross_entropy."""
    g = torch.Generator().manual_seed(3)
    for shape in ((10,), (6, 10), (2, 10, 3, 4)):
        x = torch.randn(shape, generator=g).to(device).requires_grad_()
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, 10, tshape, generator=g).to(device)
        w = (torch.rand(10, generator=g) + 0.5).to(device)
        for red in ("mean", "sum", "none"):
            ours = wl.vocab_parallel_cross_entropy(x, t, weight=w, reduction=red,
                                                   label_smoothing=0.05)
            ref = F.cross_entropy(x, t, weight=w, reduction=red, label_smoothing=0.05)
            torch.testing.assert_close(ours, ref)
            go = torch.rand_like(ref)
            torch.testing.assert_close(torch.autograd.grad(ours, x, go)[0],
                                       torch.autograd.grad(ref, x, go)[0])


def test_errors_name_the_argument():
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 5, 2])
    with pytest.raises(ValueError, match=r"weight must hold all 6 classes .* got shape \(7,\)"):
        wl.vocab_parallel_cross_entropy(x, t, weight=torch.ones(7))
    with pytest.raises(TypeError, match="class indices"):
        wl.vocab_parallel_cross_entropy(x, torch.rand(4, 6))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        wl.vocab_parallel_cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="reduction must be"):
        wl.vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(IndexError, match="Target 6 is out of bounds"):
        wl.vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        wl.vocab_parallel_cross_entropy(x, t, process_group=object())
    with pytest.raises(RuntimeError, match=r"classes \[4, 10\) are not within the 8 classes"):
        _ops.cross_entropy_shard_forward(x, t, None, -100, 0.0, 4, 8)
    with pytest.raises(RuntimeError, match="label_smoothing must be between"):
        wl.vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)

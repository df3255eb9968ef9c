"""Every mode PyTorch users run, on every loss of the table (tests/losses.py), on every device:

- gradcheck in float64, with forward-mode AD (torch.autograd.forward_ad) checked beside it;
- gradgradcheck (double backward: create_graph=True, then differentiated again);
- parity with PyTorch's ops in float64: the loss, its gradients, its tangent (torch.func.jvp) and
  a Hessian-vector product (jvp of grad);
- torch.library.opcheck of every op call the loss makes, forward and backward, in float64,
  float32 and bfloat16 (the calls recorded as the loss runs, so every op and argument the
  library uses is checked, named as the library names them);
- torch.compile(fullgraph=True, dynamic=True): no graph break, the eager results (on the CPU and
  a GPU: the emulated kernels run the CPU's graph);
- the modes a loss does not support raise, never a silent zero; the fused backward ops are
  first-order (differentiated, they raise); a gradient penalty's gradient flows.
PyTorch's own samples of these modes (OpInfo, ModuleInfo): tests/test_pytorch_loss_tests.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import weighted_loss as wl

from losses import LOSSES, D
from weighted_loss._ops import RULES

ROWS = [pytest.param(row, id=row.name) for row in LOSSES]


def _leaves(sample):
    return tuple(t.detach().clone().requires_grad_() for t in sample.tensors)


def _grads(fn, tensors):
    """(loss, its gradient with respect to each tensor) at a fixed upstream gradient."""
    loss = fn(*tensors)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=D).reshape(loss.shape).to(loss)
    return [loss.detach(), *torch.autograd.grad(loss, tensors, go)]


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.asan_skip
def test_gradcheck(device, row):
    s = row.sample(device)
    assert torch.autograd.gradcheck(s.call, _leaves(s), check_forward_ad=row.forward_ad)


@pytest.mark.parametrize("row", [r for r in ROWS if r.values[0].double_backward])
@pytest.mark.asan_skip
def test_gradgradcheck(device, row):
    s = row.sample(device)
    assert torch.autograd.gradgradcheck(s.call, _leaves(s))


@pytest.mark.parametrize("row", ROWS)
def test_float64_equals_pytorch(device, row):
    """The loss and its gradients, tangent and Hessian-vector product as PyTorch's ops give them,
    to float64 rounding."""
    s = row.sample(device)
    close = dict(rtol=1e-9, atol=1e-12)
    for a, b in zip(_grads(s.call, _leaves(s)), _grads(s.reference, _leaves(s))):
        torch.testing.assert_close(a, b, **close)
    primals = tuple(t.detach() for t in s.tensors)
    g = torch.Generator().manual_seed(7)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=D).to(t) for t in primals)
    if row.forward_ad:
        got, want = jvp(s.call, primals, tangents), jvp(s.reference, primals, tangents)
        torch.testing.assert_close(got, want, **close)
        assert got[1].abs().max() > 0  # the tangent is there, not a silent zero
    if row.double_backward and row.forward_ad and s.call(*primals).dim() == 0:
        def first(f):  # the loss as a function of the first tensor, the others fixed
            return lambda a: f(a, *primals[1:])
        got = jvp(grad(first(s.call)), primals[:1], tangents[:1])
        want = jvp(grad(first(s.reference)), primals[:1], tangents[:1])
        torch.testing.assert_close(got, want, **close)


@pytest.mark.parametrize("row", [r for r in ROWS if not (r.values[0].double_backward and
                                                         r.values[0].forward_ad)])
def test_unsupported_modes_raise(device, row):
    s = row.sample(device)
    if not row.double_backward:
        leaves = _leaves(s)
        with pytest.raises(NotImplementedError):
            g = torch.autograd.grad(s.call(*leaves).sum(), leaves, create_graph=True)
            torch.autograd.grad(sum(v.sum() for v in g), leaves)
    if not row.forward_ad:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            jvp(s.call, tuple(t.detach() for t in s.tensors),
                tuple(torch.ones_like(t) for t in s.tensors))


class _Recorder(TorchDispatchMode):
    """Every call of a weighted_loss op under it, its arguments copied as they were; detached
    but for the forward ops with an autograd rule (_ops.RULES: the backward ops are first-order,
    the shard ops' gradient is vocab_parallel_cross_entropy's)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "weighted_loss":
            keep = func.overloadpacket in RULES

            def copy(a):
                if not isinstance(a, torch.Tensor):
                    return a
                return a.detach().clone().requires_grad_(keep and a.requires_grad)
            self.calls.append((func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.asan_skip
def test_opcheck(device, row, dtype):
    s = row.sample(device, dtype)
    leaves = _leaves(s)
    with _Recorder() as rec:
        loss = s.call(*leaves)
        torch.autograd.grad(loss, leaves, torch.ones_like(loss))
    assert rec.calls, "the loss called no weighted_loss op"
    for op, args, kwargs in rec.calls:
        torch.library.opcheck(op, args, kwargs)


# (the emulated kernels would run the CPU's graph: compiled on the devices that compile their own)
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("row", [r for r in ROWS if r.values[0].compile])
@pytest.mark.asan_skip
def test_compile_fullgraph(device, row):
    torch._dynamo.reset()
    s = row.sample(torch.device(device), torch.float32)
    # dynamic shapes: the fake kernels' shapes are symbolic, as a varying batch makes them
    compiled = torch.compile(s.call, fullgraph=True, dynamic=True)
    for a, b in zip(_grads(compiled, _leaves(s)), _grads(s.call, _leaves(s))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("row", ROWS)
def test_backward_ops_are_first_order(device, row):
    """Each fused backward op the loss calls, called on its own and differentiated, raises: the
    losses' double backward goes through PyTorch's ops (_composite) instead."""
    s = row.sample(device)
    leaves = _leaves(s)
    with _Recorder() as rec:
        loss = s.call(*leaves)
        torch.autograd.grad(loss, leaves, torch.ones_like(loss))
    backward = [(op, args, kw) for op, args, kw in rec.calls
                if op._schema.name.endswith("_backward")]
    for op, args, kwargs in backward:
        args = list(args)
        i = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and
                 a.is_floating_point() and a.numel())  # grad_loss
        args[i] = args[i].detach().requires_grad_()
        out = op(*args, **kwargs)
        first = next(o for o in (out if isinstance(out, tuple) else (out,)) if o.numel())
        with pytest.raises(NotImplementedError, match="first-order"):
            first.sum().backward()


def test_gradient_penalty_matches_pytorch(device):
    """A gradient penalty (the gradient's norm added to the loss, as WGAN-GP and R1 regularizers
    do): the penalty's own gradient flows, not silently dropped."""
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(8, 7, generator=g, dtype=D).to(device)
    y = torch.randint(0, 7, (8,), generator=g).to(device)
    w = (torch.rand(7, generator=g, dtype=D) + 0.5).to(device)
    grads = []
    for fn in (wl.cross_entropy, F.cross_entropy):
        x = x0.clone().requires_grad_()
        loss = fn(x, y, weight=w, label_smoothing=0.1)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + (gx ** 2).sum()).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)

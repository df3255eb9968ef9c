"""Every autograd mode PyTorch users run, against PyTorch: forward-mode AD (torch.func.jvp and
torch.autograd.forward_ad) of every loss, forward-over-reverse (jvp of grad, Hessian-vector
products, torch.func.hessian), double backward (gradgradcheck; a gradient penalty), and the
modes that are not supported raising rather than returning a silent zero."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jvp

import weighted_loss as wl
from suite_focal import focal_composite, sigmoid_focal_composite

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cases(device):
    """(name, ours, PyTorch's, x, others that carry tangents) in float64."""
    g = _gen(0)
    x = torch.randn(6, 5, generator=g, dtype=D).to(device)
    xs = torch.randn(2, 5, 3, 4, generator=g, dtype=D).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    y[1] = 2
    ys = torch.randint(0, 5, (2, 3, 4), generator=g).to(device)
    w = (torch.rand(5, generator=g, dtype=D) + 0.5).to(device)
    p = torch.softmax(torch.randn(6, 5, generator=g, dtype=D), 1).to(device)
    t = torch.rand(6, 5, generator=g, dtype=D).to(device)
    pw = (torch.rand(5, generator=g, dtype=D) * 3 + 0.5).to(device)
    cases = []
    for red in ("mean", "sum", "none"):
        kw = dict(weight=w, ignore_index=2, label_smoothing=0.1, reduction=red)
        cases += [
            (f"ce-{red}", lambda a, kw=kw: wl.cross_entropy(a, y, **kw),
             lambda a, kw=kw: F.cross_entropy(a, y, **kw), x, ()),
            (f"ce-seg-{red}", lambda a, red=red: wl.cross_entropy(a, ys, weight=w, reduction=red),
             lambda a, red=red: F.cross_entropy(a, ys, weight=w, reduction=red), xs, ()),
            (f"ce-prob-{red}",
             lambda a, b, red=red: wl.cross_entropy(a, b, weight=w, label_smoothing=0.2,
                                                    reduction=red),
             lambda a, b, red=red: F.cross_entropy(a, b, weight=w, label_smoothing=0.2,
                                                   reduction=red), x, (p,)),
            (f"bce-{red}",
             lambda a, b, red=red: wl.binary_cross_entropy_with_logits(a, b, pos_weight=pw,
                                                                       reduction=red),
             lambda a, b, red=red: F.binary_cross_entropy_with_logits(a, b, pos_weight=pw,
                                                                      reduction=red), x, (t,)),
            (f"focal-{red}",
             lambda a, red=red: wl.focal_loss(a, y, weight=w, label_smoothing=0.1, reduction=red),
             lambda a, red=red: focal_composite(a, y, weight=w, label_smoothing=0.1,
                                                reduction=red), x, ()),
            (f"sfocal-{red}",
             lambda a, b, red=red: wl.sigmoid_focal_loss(a, b, reduction=red),
             lambda a, b, red=red: sigmoid_focal_composite(a, b, reduction=red), x, (t,)),
        ]
    return cases


CASE_NAMES = [c[0] for c in _cases("cpu")]


def _case(name, device):
    return next(c for c in _cases(device) if c[0] == name)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jvp_matches_pytorch(device, name):
    """torch.func.jvp: the loss and its tangent, against the logits and every floating target."""
    _, ours, ref, x, others = _case(name, device)
    primals = (x, *others)
    tangents = tuple(torch.randn(a.shape, generator=_gen(7), dtype=D).to(device) for a in primals)
    got = jvp(ours, primals, tangents)
    want = jvp(ref, primals, tangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[1].abs().max() > 0  # the tangent is there, not a silent zero


@pytest.mark.parametrize("name", ["ce-mean", "ce-prob-none", "bce-sum", "sfocal-mean",
                                  "focal-none"])
def test_forward_ad_dual_tensors(device, name):
    _, ours, ref, x, others = _case(name, device)
    dx = torch.randn(x.shape, generator=_gen(3), dtype=D).to(device)
    out = []
    for fn in (ours, ref):
        with fwAD.dual_level():
            res = fn(fwAD.make_dual(x, dx), *others)
            out.append(fwAD.unpack_dual(res))
    assert out[0].tangent is not None
    torch.testing.assert_close(out[0].primal, out[1].primal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[0].tangent, out[1].tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ce-mean", "ce-prob-sum", "bce-mean", "focal-sum",
                                  "ce-seg-mean"])
def test_forward_over_reverse_and_hessian(device, name):
    """jvp of grad (a Hessian-vector product) and torch.func.hessian, as PyTorch's."""
    _, ours, ref, x, others = _case(name, device)
    if ours(x, *others).dim() != 0:
        pytest.fail("a case with a scalar loss")
    v = torch.randn(x.shape, generator=_gen(5), dtype=D).to(device)
    f_ours = lambda a: ours(a, *others)  # noqa: E731
    f_ref = lambda a: ref(a, *others)  # noqa: E731
    got = jvp(grad(f_ours), (x,), (v,))
    want = jvp(grad(f_ref), (x,), (v,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if x.numel() <= 30:
        torch.testing.assert_close(hessian(f_ours)(x), hessian(f_ref)(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in CASE_NAMES if not n.endswith("-none")] +
                         ["ce-none", "bce-none"])
def test_gradgradcheck(device, name):
    """Second derivatives (create_graph=True, then differentiated again), for every loss."""
    _, ours, _, x, others = _case(name, device)
    inputs = [x.detach().clone().requires_grad_()] + [
        o.detach().clone().requires_grad_() for o in others]
    if "prob" in name or "bce" in name or "sfocal" in name:
        fn = ours
    else:  # targets that carry no gradient
        inputs = inputs[:1]
        fn = ours
    assert torch.autograd.gradgradcheck(fn, tuple(inputs))


def test_gradient_penalty_matches_pytorch(device):
    """A gradient penalty: the penalty's own gradient flows (not silently dropped)."""
    g = _gen(9)
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


def test_z_loss_and_softcap_second_order(device):
    g = _gen(4)
    x = torch.randn(5, 6, generator=g, dtype=D).to(device).requires_grad_()
    y = torch.randint(0, 6, (5,), generator=g).to(device)
    assert torch.autograd.gradgradcheck(
        lambda a: wl.cross_entropy(a, y, z_loss=1e-2, softcap=3.0, label_smoothing=0.1), (x,))


def test_unsupported_modes_raise(device):
    """linear_cross_entropy's second derivative and the vocab-parallel loss under forward AD are
    not supported: they raise, never a silent zero."""
    g = _gen(2)
    h = torch.randn(6, 8, generator=g, dtype=D).to(device).requires_grad_()
    W = torch.randn(5, 8, generator=g, dtype=D).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        torch.autograd.grad(wl.linear_cross_entropy(h, W, y), h, create_graph=True)
    x = torch.randn(6, 5, dtype=D).to(device)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        jvp(lambda a: wl.vocab_parallel_cross_entropy(a, y), (x,), (torch.ones_like(x),))


def test_linear_cross_entropy_jvp(device):
    """Under forward AD linear_cross_entropy takes the logits' path (PyTorch ops), exact."""
    g = _gen(6)
    h = torch.randn(6, 8, generator=g, dtype=D).to(device)
    W = torch.randn(5, 8, generator=g, dtype=D).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    dh, dW = torch.randn_like(h), torch.randn_like(W)
    got = jvp(lambda a, b: wl.linear_cross_entropy(a, b, y, label_smoothing=0.1), (h, W),
              (dh, dW))
    want = jvp(lambda a, b: F.cross_entropy(F.linear(a, b), y, label_smoothing=0.1), (h, W),
               (dh, dW))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_unaffected():
    """Outside forward AD the ops' own autograd runs: torch.compile(fullgraph=True) traces it."""
    torch._dynamo.reset()
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    fn = torch.compile(lambda a: wl.cross_entropy(a, y, label_smoothing=0.1), fullgraph=True)
    loss = fn(x)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(x, y, label_smoothing=0.1))


# ------------------------------------------------------------------ PyTorch's own sample inputs

def _opinfo_samples():
    """(name, ours, PyTorch's, sample) for every OpInfo sample of the two functionals, float64,
    with their inputs (and probability/BCE targets) requiring grad as test_ops_gradients asks.
    Without torch.testing._internal's dependencies (expecttest: make test installs it) one entry
    that fails, so that the rest of the module still collects (the GPU run's CUDA tests)."""
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except ImportError as e:
        return [("unavailable", None, None, e)]
    ops = {"nn.functional.cross_entropy": (wl.cross_entropy, F.cross_entropy),
           "nn.functional.binary_cross_entropy_with_logits":
               (wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits)}
    out = []
    for op in op_db:
        if op.name in ops and op.variant_test_name == "":
            for i, s in enumerate(op.sample_inputs("cpu", D, requires_grad=True)):
                out.append((f"{op.name.split('.')[-1]}#{i}", *ops[op.name], s))
    return out


OPINFO = _opinfo_samples()


@pytest.mark.parametrize("k", range(len(OPINFO)), ids=[s[0] for s in OPINFO])
def test_opinfo_samples_every_autograd_mode(k):
    """PyTorch's samples of the two functionals (as test_ops_gradients and test_ops' forward-AD
    tests run them): gradcheck, gradgradcheck, and the forward-mode tangent of the loss equal to
    PyTorch's."""
    _, ours, theirs, s = OPINFO[k]
    if isinstance(s, ImportError):
        pytest.fail(f"PyTorch's OpInfo samples are not importable: {s}")
    x = s.input
    floats = [a for a in s.args if torch.is_tensor(a) and a.is_floating_point()]
    diff = [x] + [a for a in floats if a.requires_grad and a.shape == x.shape]

    def call(fn):
        def f(*d):  # the differentiable tensors replaced, the rest of the sample kept
            swap = {id(orig): new for orig, new in zip(diff[1:], d[1:])}
            return fn(d[0], *[swap.get(id(a), a) for a in s.args], **s.kwargs)
        return f

    assert torch.autograd.gradcheck(call(ours), diff)
    assert torch.autograd.gradgradcheck(call(ours), diff)
    tangents = tuple(torch.randn_like(d) for d in diff)
    prim = tuple(d.detach() for d in diff)
    o, to = jvp(call(ours), prim, tangents)
    r, tr = jvp(call(theirs), prim, tangents)
    torch.testing.assert_close(o, r)
    torch.testing.assert_close(to, tr)

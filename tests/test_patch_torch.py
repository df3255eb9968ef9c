"""wl.patch_torch(): PyTorch's names swapped for ours, restored on exit; under it every autograd
mode a user runs (a gradient penalty's double backward, forward AD, torch.func, torch.compile, a
transformers model's own loss) gives PyTorch's answer, and PyTorch's own tests of these losses
pass: the OpInfo samples of F.cross_entropy and F.binary_cross_entropy_with_logits through
test_ops_gradients' and test_ops_fwd_gradients' checks (PyTorch's TestGradients helpers, run on
the patched functions), their error inputs with PyTorch's exception classes and messages, and the
ModuleInfo samples of nn.CrossEntropyLoss and nn.BCEWithLogitsLoss as test_modules runs them
(forward against PyTorch's module, gradcheck, gradgradcheck, the error inputs)."""
import contextlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jvp

import weighted_loss as wl
from bars import assert_within_2x

# PyTorch's own, captured before any test patches them
CE, BCE = F.cross_entropy, F.binary_cross_entropy_with_logits
CE_MODULE, BCE_MODULE = torch.nn.CrossEntropyLoss, torch.nn.BCEWithLogitsLoss
D = torch.float64


@pytest.fixture
def patched():
    with wl.patch_torch():
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ the patch itself

def test_patch_swaps_every_name_and_the_context_restores_them():
    names = [(torch.nn, "CrossEntropyLoss"), (torch.nn.modules, "CrossEntropyLoss"),
             (torch.nn.modules.loss, "CrossEntropyLoss"), (torch.nn, "BCEWithLogitsLoss"),
             (torch.nn.modules, "BCEWithLogitsLoss"), (torch.nn.modules.loss, "BCEWithLogitsLoss"),
             (F, "cross_entropy"), (F, "binary_cross_entropy_with_logits")]
    before = [getattr(m, n) for m, n in names]
    assert not wl.is_patched()
    with wl.patch_torch():
        assert wl.is_patched()
        assert F.cross_entropy is wl.cross_entropy
        assert F.binary_cross_entropy_with_logits is wl.binary_cross_entropy_with_logits
        for m, n in names[:6]:
            assert getattr(m, n) is getattr(wl, n)
        with wl.patch_torch():  # idempotent, and nested uses compose
            assert F.cross_entropy is wl.cross_entropy
        assert wl.is_patched()
        # a module made under the patch is ours, with PyTorch's constructor and state_dict
        m = torch.nn.CrossEntropyLoss(weight=torch.ones(3), label_smoothing=0.1)
        assert type(m) is wl.CrossEntropyLoss and isinstance(m, CE_MODULE)
        assert list(m.state_dict()) == list(CE_MODULE(weight=torch.ones(3)).state_dict())
    assert [getattr(m, n) for m, n in names] == before
    assert not wl.is_patched()


def test_unpatch_restores_pytorchs_and_a_plain_call_patches_for_good():
    wl.patch_torch()
    try:
        assert wl.is_patched()
        wl.patch_torch()
    finally:
        wl.unpatch_torch()
    assert F.cross_entropy is CE and torch.nn.CrossEntropyLoss is CE_MODULE
    assert torch.nn.modules.loss.BCEWithLogitsLoss is BCE_MODULE


def test_concurrent_patches_leave_one_consistent_state():
    def work():
        for _ in range(50):
            wl.patch_torch()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert F.cross_entropy is wl.cross_entropy and torch.nn.BCEWithLogitsLoss is \
            wl.BCEWithLogitsLoss
    finally:
        wl.unpatch_torch()
    assert F.cross_entropy is CE and F.binary_cross_entropy_with_logits is BCE


def test_pytorch_modules_made_before_the_patch_compute_with_ours(patched):
    """nn.CrossEntropyLoss.forward looks F.cross_entropy up at call time: ours runs."""
    m = CE_MODULE()  # PyTorch's class, not ours
    x, y = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with torch.autograd.profiler.profile() as prof:
        m(x, y).backward()
    assert any("weighted_loss::" in e.name for e in prof.function_events)


def test_torchvision_sigmoid_focal_loss_signature(patched):
    """torchvision's names (inputs, targets) and defaults: its sigmoid_focal_loss, fused."""
    from weighted_loss.patch import _tv_sigmoid_focal_loss as tv
    x, t = torch.randn(6, 3, dtype=D), torch.rand(6, 3, dtype=D).round()
    torch.testing.assert_close(tv(inputs=x, targets=t, alpha=0.5, gamma=1, reduction="sum"),
                               wl.sigmoid_focal_loss(x, t, 0.5, 1.0, "sum"))
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        tv(x, t, reduction="avg")


# ------------------------------------------------------------------ every autograd mode, patched

def _losses(device):
    """(name, call with PyTorch's names looked up now, PyTorch's own, x, target) in float64."""
    g = _gen(3)
    x = torch.randn(6, 5, generator=g, dtype=D).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    p = torch.softmax(torch.randn(6, 5, generator=g, dtype=D), 1).to(device)
    t = torch.rand(6, 5, generator=g, dtype=D).to(device)
    w = (torch.rand(5, generator=g, dtype=D) + 0.5).to(device)
    pw = (torch.rand(5, generator=g, dtype=D) * 3 + 0.1).to(device)
    kw = dict(weight=w, label_smoothing=0.1)
    return [
        ("ce", lambda a, b: F.cross_entropy(a, b, **kw), lambda a, b: CE(a, b, **kw), x, y),
        ("ce-prob", lambda a, b: F.cross_entropy(a, b, **kw), lambda a, b: CE(a, b, **kw), x, p),
        ("ce-module", lambda a, b: torch.nn.CrossEntropyLoss(weight=w)(a, b),
         lambda a, b: CE_MODULE(weight=w)(a, b), x, y),
        ("bce", lambda a, b: F.binary_cross_entropy_with_logits(a, b, w, pos_weight=pw),
         lambda a, b: BCE(a, b, w, pos_weight=pw), x, t),
        ("bce-module", lambda a, b: torch.nn.BCEWithLogitsLoss(pos_weight=pw)(a, b),
         lambda a, b: BCE_MODULE(pos_weight=pw)(a, b), x, t),
    ]


@pytest.mark.parametrize("k", range(5))
def test_gradient_penalty_under_patch(device, k):
    """loss + |d loss / dx|^2, differentiated: the double backward that recursed forever when
    the library's composite called the (patched) F.binary_cross_entropy_with_logits."""
    name, ours, theirs, x0, t = _losses(device)[k]
    out = []
    for fn, patch in ((theirs, False), (ours, True)):
        x = x0.clone().requires_grad_()
        with wl.patch_torch() if patch else contextlib.nullcontext():
            loss = fn(x, t)
            (gx,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + (gx ** 2).sum()).backward()
        out.append(x.grad)
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("k", range(5))
def test_forward_ad_and_func_transforms_under_patch(device, k, patched):
    name, ours, theirs, x, t = _losses(device)[k]
    dx = torch.randn_like(x)
    for a, b in zip(jvp(lambda v: ours(v, t), (x,), (dx,)), jvp(lambda v: theirs(v, t), (x,), (dx,))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(grad(lambda v: ours(v, t))(x), grad(lambda v: theirs(v, t))(x),
                               rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(hessian(lambda v: ours(v, t))(x),
                               hessian(lambda v: theirs(v, t))(x), rtol=1e-9, atol=1e-12,
                               msg=name)


def test_focal_losses_double_backward_under_patch(patched):
    """The focal losses' composites (double backward) never call a patched name either."""
    from references import focal_composite
    g = _gen(5)
    x0 = torch.randn(7, 4, generator=g, dtype=D)
    y = torch.randint(0, 4, (7,), generator=g)
    t = torch.rand(7, 4, generator=g, dtype=D)
    for ours, ref in ((lambda a: wl.focal_loss(a, y, gamma=2.0, label_smoothing=0.1),
                       lambda a: focal_composite(a, y, 2.0, label_smoothing=0.1)),
                      (lambda a: wl.sigmoid_focal_loss(a, t, reduction="sum"), None)):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(ours(x), x, create_graph=True)
        (gg,) = torch.autograd.grad((gx ** 2).sum(), x)
        assert torch.isfinite(gg).all()
        if ref is not None:
            xr = x0.clone().requires_grad_()
            (gr,) = torch.autograd.grad(ref(xr), xr, create_graph=True)
            (ggr,) = torch.autograd.grad((gr ** 2).sum(), xr)
            torch.testing.assert_close(gg, ggr, rtol=1e-9, atol=1e-12)


def test_compile_under_patch(patched):
    """A compiled function that calls F.cross_entropy (ours under the patch): no graph break."""
    torch._dynamo.reset()
    x = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    fn = torch.compile(lambda a: F.cross_entropy(a, y, label_smoothing=0.1), fullgraph=True)
    loss = fn(x)
    loss.backward()
    torch.testing.assert_close(loss, CE(x, y, label_smoothing=0.1))
    xr = x.detach().clone().requires_grad_()
    CE(xr, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_transformers_model_loss_under_patch():
    """A transformers causal LM computes its own loss with nn.functional.cross_entropy: under the
    patch that call is ours (the op shows in the profile), with PyTorch's loss and gradients."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()  # no dropout: the same graph twice
    ids = torch.randint(0, 97, (3, 12), generator=_gen(1))
    labels = ids.clone()
    labels[0, :4] = -100
    results = []
    for patch in (False, True):
        model.zero_grad()
        with wl.patch_torch() if patch else contextlib.nullcontext():
            with torch.autograd.profiler.profile() as prof:
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
        ran = any("weighted_loss::" in e.name for e in prof.function_events)
        assert ran == patch
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # (transformers' loss casts the logits to float32 first: float32's tolerances)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1.3e-6, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_library_never_calls_a_name_the_patch_swaps(monkeypatch):
    """With PyTorch's names replaced by functions that raise, every loss runs forward, backward,
    double backward and forward AD: nothing inside the library looks them up."""
    def boom(*a, **k):
        raise AssertionError("the library called a name wl.patch_torch swaps")
    for name in ("cross_entropy", "binary_cross_entropy_with_logits"):
        monkeypatch.setattr(F, name, boom)
    for name in ("CrossEntropyLoss", "BCEWithLogitsLoss"):
        for where in (torch.nn, torch.nn.modules, torch.nn.modules.loss):
            monkeypatch.setattr(where, name, boom)
    g = _gen(7)
    x = torch.randn(5, 4, generator=g, dtype=D)
    y = torch.randint(0, 4, (5,), generator=g)
    t = torch.rand(5, 4, generator=g, dtype=D)
    W = torch.randn(4, 3, generator=g, dtype=D)
    losses = [lambda a: wl.cross_entropy(a, y, label_smoothing=0.1),
              lambda a: wl.cross_entropy(a, t.softmax(1), label_smoothing=0.1),
              lambda a: wl.binary_cross_entropy_with_logits(a, t, pos_weight=t[0] + 1),
              lambda a: wl.focal_loss(a, y, label_smoothing=0.1),
              lambda a: wl.sigmoid_focal_loss(a, t, reduction="mean"),
              lambda a: wl.linear_cross_entropy(a[:, :3], W, y),
              lambda a: wl.CrossEntropyLoss()(a, y) + wl.BCEWithLogitsLoss()(a, t)]
    for fn in losses:
        a = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(a), a, create_graph=fn is not losses[5])
        if gx.requires_grad:
            torch.autograd.grad((gx ** 2).sum(), a)
        jvp(fn, (x,), (torch.ones_like(x),))  # (linear: no double backward, by design)

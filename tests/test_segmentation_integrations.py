"""The MONAI and nnU-Net drop-ins (weighted_loss/integrations/monai.py, nnunet.py): the same value
and gradient as MONAI's and nnU-Net's losses (float64: to rounding; float32: within 2x of their
own error against float64), fused where the options allow, and the patches that swap them in.
MONAI's own tests of these losses, run under the patch: bench/monai_loss_tests.py."""
import pytest
import torch

from bars import assert_within_2x
from references import nnunet_reference

monai_losses = pytest.importorskip("monai.losses")
nnunet_losses = pytest.importorskip("nnunetv2.training.loss.compound_losses")
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss  # noqa: E402

from weighted_loss import _overlap  # noqa: E402
from weighted_loss.integrations import monai as wm  # noqa: E402
from weighted_loss.integrations import nnunet as wn  # noqa: E402

D = torch.float64


@pytest.fixture
def fused_calls(monkeypatch):
    """How often the fused op ran."""
    calls = []
    real = _overlap.softmax_terms

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(_overlap, "softmax_terms", counted)
    return calls


def _labels(shape, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=D) * 3
    y = torch.randint(0, shape[1] - (1 if ignore else 0), (shape[0], 1, *shape[2:]), generator=g)
    if ignore is not None:
        y[0, 0, :2] = ignore
    return x, y.to(D)


def _value_and_grad(loss, x, y):
    x = x.clone().requires_grad_()
    out = loss(x, y)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


MONAI_CASES = [
    ("DiceLoss", dict(to_onehot_y=True, softmax=True), "index"),
    ("DiceLoss", dict(softmax=True, include_background=False, squared_pred=True, batch=True,
                      reduction="none"), "onehot"),
    ("DiceLoss", dict(to_onehot_y=True, softmax=True, jaccard=True, weight=[1., 2., 3., 4.],
                      reduction="sum"), "index"),
    ("DiceCELoss", dict(to_onehot_y=True, softmax=True, include_background=False,
                        weight=torch.tensor([1., 2., 3., 4.], dtype=D), label_smoothing=0.1,
                        lambda_ce=0.7), "index"),
    ("DiceCELoss", dict(softmax=True), "onehot"),
    ("DiceFocalLoss", dict(to_onehot_y=True, softmax=True, gamma=2.0), "index"),
    ("GeneralizedDiceLoss", dict(to_onehot_y=True, softmax=True, w_type="simple"), "index"),
    ("GeneralizedDiceLoss", dict(to_onehot_y=True, softmax=True, batch=True, reduction="none"),
     "index"),
    ("TverskyLoss", dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7), "index"),
    ("TverskyLoss", dict(to_onehot_y=True, softmax=True, reduction="none"), "index"),
]


@pytest.mark.parametrize("name, kwargs, target", MONAI_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MONAI_CASES)])
def test_monai_float64_equal_and_fused(name, kwargs, target, fused_calls):
    x, y = _labels((2, 4, 8, 9))
    if target == "onehot":
        y = torch.nn.functional.one_hot(y[:, 0].long(), 4).movedim(-1, 1).to(D)
    theirs = _value_and_grad(getattr(monai_losses, name)(**kwargs), x, y)
    ours = _value_and_grad(getattr(wm, name)(**kwargs), x, y)
    assert fused_calls, "the fused op did not run"
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_monai_unfusable_options_run_monais_forward(fused_calls):
    x, y = _labels((2, 4, 8, 9))
    for kwargs in (dict(to_onehot_y=True, sigmoid=True), dict(to_onehot_y=True),
                   dict(to_onehot_y=True, other_act=torch.tanh)):
        a = wm.DiceLoss(**kwargs)(x, y)
        b = monai_losses.DiceLoss(**kwargs)(x, y)
        assert torch.equal(a, b)
    assert not fused_calls


def test_monai_scripted_module_is_monais():
    loss = wm.DiceCELoss(to_onehot_y=True, softmax=True)
    scripted = torch.jit.script(loss)
    x, y = _labels((2, 4, 8, 9))
    torch.testing.assert_close(scripted(x.float(), y.float()), loss(x.float(), y.float()))


def test_patch_monai_swaps_and_restores():
    import monai.losses
    from monai.losses import dice
    original = monai.losses.DiceCELoss
    with wm.patch_monai():
        assert monai.losses.DiceCELoss is wm.DiceCELoss and dice.DiceCELoss is wm.DiceCELoss
        assert isinstance(monai.losses.DiceCELoss().dice, wm.DiceLoss)
    assert monai.losses.DiceCELoss is original and dice.DiceLoss is not wm.DiceLoss
    wm.patch_monai()
    wm.unpatch_monai()
    assert monai.losses.DiceLoss is not wm.DiceLoss


NNUNET_CASES = [(shape, dc, ignore, batch, bg)
                for shape in [(2, 4, 24, 25), (2, 3, 10, 11, 12)]
                for dc in (SoftDiceLoss, MemoryEfficientSoftDiceLoss)
                for ignore in (None, 3)
                for batch in (False, True)
                for bg in (False, True)]


@pytest.mark.parametrize("shape, dice_class, ignore, batch_dice, do_bg", NNUNET_CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_nnunet_within_2x_of_nnunets_error(shape, dice_class, ignore, batch_dice, do_bg,
                                           fused_calls):
    """Loss and gradient in float32 within 2x of nnU-Net's own float32 error against the float64
    reference (its formulas in float64: tests/references.py)."""
    x, y = _labels(shape, ignore=ignore)
    kw = dict(soft_dice_kwargs=dict(batch_dice=batch_dice, do_bg=do_bg, smooth=1e-5, ddp=False),
              ce_kwargs={}, ignore_label=ignore, dice_class=dice_class)
    exact = _value_and_grad(
        lambda a, b: nnunet_reference(a, b, batch_dice=batch_dice, do_bg=do_bg,
                                      ignore_label=ignore,
                                      memory_efficient=dice_class is MemoryEfficientSoftDiceLoss),
        x, y)
    xf = x.float()
    ours = _value_and_grad(wn.DC_and_CE_loss(**kw), xf, y.float())
    theirs = _value_and_grad(nnunet_losses.DC_and_CE_loss(**kw), xf, y.float())
    assert fused_calls
    for k, what in enumerate(("loss", "gradient")):
        assert_within_2x(ours[k], theirs[k], exact[k], torch.float32, what)


def test_nnunet_compiled_dice_module_still_fuses(fused_calls):
    loss = wn.DC_and_CE_loss(dict(batch_dice=True, do_bg=False, smooth=1e-5, ddp=False), {})
    loss.dc = torch.compile(loss.dc)  # what nnU-Net's trainer does
    x, y = _labels((2, 3, 8, 8))
    torch.testing.assert_close(loss(x, y), nnunet_losses.DC_and_CE_loss(
        dict(batch_dice=True, do_bg=False, smooth=1e-5, ddp=False), {})(x, y))
    assert fused_calls


def test_patch_nnunet_swaps_and_restores():
    original = nnunet_losses.DC_and_CE_loss
    with wn.patch_nnunet():
        assert nnunet_losses.DC_and_CE_loss is wn.DC_and_CE_loss
    assert nnunet_losses.DC_and_CE_loss is original


def test_monai_exports_fused():
    """torch.export of MONAI's DiceCELoss, swapped: the graph calls the fused op."""
    loss = wm.DiceCELoss(to_onehot_y=True, softmax=True)
    x, y = _labels((2, 4, 8, 9))
    x, y = x.float(), y.float()
    ep = torch.export.export(loss, (x, y))
    assert any("cross_entropy_overlap" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, y), loss(x, y))

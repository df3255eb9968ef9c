"""torch.jit.script of every loss the library exports, and of a user's code under wl.patch_torch():
what TorchScript compiles in their place (weighted_loss/_script.py), saved, reloaded and equal to
the fused result; torchvision's focal loss where its detection models bound it (a stand-in
package: a real torchvision does not import beside this torch)."""
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import weighted_loss as wl

D = torch.float64


def _roundtrip(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _inputs(seed=0, shape=(6, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=D) * 3
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    y[0] = -100
    p = torch.softmax(torch.randn(shape, generator=g, dtype=D), 1)
    t = torch.rand(shape, generator=g, dtype=D)
    w = torch.rand(shape[1], generator=g, dtype=D) + 0.5
    return x, y, p, t, w


def _modules():
    """(name, eager module, its inputs (logits first)) for every exported module."""
    x, y, p, t, w = _inputs()
    sw = torch.rand(y.shape, dtype=D) + 0.5
    adj = torch.randn(5, dtype=D)
    return [
        ("ce", wl.CrossEntropyLoss(weight=w, label_smoothing=0.1), (x, y)),
        ("ce-prob-sum", wl.CrossEntropyLoss(reduction="sum"), (x, p)),
        ("bce", wl.BCEWithLogitsLoss(weight=w.view(5, 1), pos_weight=w.view(5, 1)), (x, t)),
        ("bce-prob", wl.BCELoss(reduction="none"), (torch.sigmoid(x), t)),
        ("focal", wl.FocalLoss(2.0, weight=w), (x, y)),
        ("focal-smooth-adjusted", wl.FocalLoss(3.0, weight=w, label_smoothing=0.2,
                                               logit_adjustment=adj), (x, y)),
        ("focal-sample-weight", wl.FocalLoss(0.5, reduction="sum"), (x, y, sw)),
        ("focal-prob", wl.FocalLoss(2.0, weight=w, label_smoothing=0.1), (x, p)),
        ("focal-none-1d", wl.FocalLoss(1.5, reduction="none"), (x[:, :, 0], y[:, 0])),
        ("sigmoid-focal", wl.SigmoidFocalLoss(), (x, t)),
        ("sigmoid-focal-no-alpha-mean", wl.SigmoidFocalLoss(-1, 1.5, "mean"), (x, t)),
        ("sigmoid-focal-tensors", wl.SigmoidFocalLoss(torch.rand(5, 1, dtype=D), 2.0, "sum",
                                                      weight=w.view(5, 1),
                                                      pos_weight=w.view(5, 1)), (x, t)),
    ]


MODULES = _modules()


@pytest.mark.parametrize("k", range(len(MODULES)), ids=[m[0] for m in MODULES])
def test_every_module_scripts_saves_reloads_and_equals_the_fused_loss(device, k):
    _, module, args = MODULES[k]
    scripted = _roundtrip(torch.jit.script(module))
    x = args[0].clone().requires_grad_()
    fused = module(x, *args[1:])
    got = scripted(x, *args[1:])
    assert got.dtype == fused.dtype and got.shape == fused.shape
    torch.testing.assert_close(got, fused, rtol=1e-10, atol=1e-12)
    g_fused, = torch.autograd.grad(fused.sum(), x)
    g_got, = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(g_got, g_fused, rtol=1e-9, atol=1e-12)


def test_the_stand_in_keeps_the_buffers_and_the_mode():
    m = wl.CrossEntropyLoss(weight=torch.rand(4)).eval()
    s = torch.jit.script(m)
    assert not s.training
    assert torch.equal(s.weight, m.weight)
    assert set(dict(s.named_buffers())) == set(dict(m.named_buffers()))


@pytest.mark.parametrize("module, option", [
    (lambda: wl.CrossEntropyLoss(z_loss=1e-4), "z_loss=0.0001"),
    (lambda: wl.CrossEntropyLoss(softcap=30.0), "softcap=30.0"),
    (lambda: wl.CrossEntropyLoss(logit_adjustment=torch.zeros(3)), "logit_adjustment"),
    (lambda: wl.BCELoss(pos_weight=torch.ones(3)), "pos_weight"),
])
def test_an_option_pytorch_lacks_is_refused_by_name(module, option):
    with pytest.raises(RuntimeError, match=f"with {option} has no TorchScript form"):
        torch.jit.script(module())


def test_the_library_functions_called_from_a_scripted_function():
    """wl.focal_loss and wl.sigmoid_focal_loss compile as their composites, the drop-ins as
    PyTorch's functions; keyword-only extras of ours need not script."""
    x, y, p, t, w = _inputs(1)

    def f(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, w: torch.Tensor):
        return (wl.focal_loss(x, y, 2.0, w, label_smoothing=0.1) +
                wl.sigmoid_focal_loss(x, t, 0.25, 2.0, "mean", w.view(5, 1)) +
                wl.cross_entropy(x, y, w) + wl.binary_cross_entropy_with_logits(x, t) +
                wl.binary_cross_entropy(torch.sigmoid(x), t))
    torch.testing.assert_close(torch.jit.script(f)(x, y, t, w), f(x, y, t, w),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- a user's program, patched

# a stand-in torchvision: ops.sigmoid_focal_loss in torchvision's scriptable form, and the
# detection modules that bind it at their import (retinanet.py and fcos.py do)
TORCHVISION = {
    "torchvision/__init__.py": "from . import ops, models\n",
    "torchvision/ops/__init__.py": "from .focal_loss import sigmoid_focal_loss\n",
    "torchvision/ops/focal_loss.py": '''
        import torch
        import torch.nn.functional as F

        def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                               gamma: float = 2, reduction: str = "none") -> torch.Tensor:
            p = torch.sigmoid(inputs)
            ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
            p_t = p * targets + (1 - p) * (1 - targets)
            loss = ce_loss * ((1 - p_t) ** gamma)
            if alpha >= 0:
                alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
                loss = alpha_t * loss
            if reduction == "mean":
                loss = loss.mean()
            elif reduction == "sum":
                loss = loss.sum()
            return loss
    ''',
    "torchvision/models/__init__.py": "from . import detection\n",
    "torchvision/models/detection/__init__.py": "from . import retinanet, fcos\n",
    "torchvision/models/detection/retinanet.py": '''
        import torch
        from ...ops import sigmoid_focal_loss

        def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return sigmoid_focal_loss(logits, targets, reduction="sum")
    ''',
    "torchvision/models/detection/fcos.py": '''
        import torch
        from ...ops import sigmoid_focal_loss

        def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return sigmoid_focal_loss(logits, targets, reduction="sum")
    ''',
}

# run in a fresh process: TorchScript caches what it compiled, which would hide a failure
PROGRAM = '''
import io, json, torch
import torch.nn.functional as F
import weighted_loss as wl
from torchvision.models.detection import fcos, retinanet

def user_fn(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, w: torch.Tensor):
    return (F.cross_entropy(x, y, w, label_smoothing=0.1) +
            F.binary_cross_entropy_with_logits(x, t, pos_weight=w) +
            F.binary_cross_entropy(torch.sigmoid(x), t, reduction="sum") +
            retinanet.classification_loss(x, t) + fcos.classification_loss(x, t))

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(5, 5)
        self.ce = torch.nn.CrossEntropyLoss(weight=torch.rand(5, dtype=torch.float64) + 0.5)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor):
        z = self.head(x)
        return self.ce(z, y) + self.bce(z, t)

def roundtrip(s):
    buf = io.BytesIO(); torch.jit.save(s, buf); buf.seek(0); return torch.jit.load(buf)

torch.manual_seed(0)
x = torch.randn(8, 5, dtype=torch.float64)
y, t, w = torch.randint(0, 5, (8,)), torch.rand(8, 5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
model = Model().double()
out = {}
with wl.patch_torch():
    out["retinanet_is_ours"] = "weighted_loss" in retinanet.sigmoid_focal_loss.__module__
    out["fcos_is_ours"] = "weighted_loss" in fcos.sigmoid_focal_loss.__module__
    with torch.autograd.profiler.profile() as prof:
        retinanet.classification_loss(x, t)
    out["retinanet_runs_the_fused_op"] = any("weighted_loss::sigmoid_focal" in e.name for e in prof.function_events)
    eager = user_fn(x, y, t, w).item()
    scripted_fn = roundtrip(torch.jit.script(user_fn))
    patched_model = Model().double()
    patched_model.load_state_dict(model.state_dict())
    scripted_model = roundtrip(torch.jit.script(patched_model))
    out["fn"] = [eager, scripted_fn(x, y, t, w).item()]
    out["model"] = [patched_model(x, y, t).item(), scripted_model(x, y, t).item()]
out["unpatched"] = [user_fn(x, y, t, w).item(), model(x, y, t).item()]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def patched_program(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    for path, text in TORCHVISION.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))
    (root / "program.py").write_text(PROGRAM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + sys.path))
    r = subprocess.run([sys.executable, str(root / "program.py")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_users_function_and_model_script_under_the_patch(patched_program):
    out = patched_program
    fn_eager, fn_scripted = out["fn"]
    model_eager, model_scripted = out["model"]
    unpatched_fn, unpatched_model = out["unpatched"]
    assert abs(fn_scripted - fn_eager) <= 1e-12 * abs(fn_eager)
    assert abs(fn_eager - unpatched_fn) <= 1e-12 * abs(unpatched_fn)
    assert abs(model_scripted - model_eager) <= 1e-12 * abs(model_eager)
    assert abs(model_eager - unpatched_model) <= 1e-12 * abs(unpatched_model)


def test_the_detection_models_focal_loss_is_patched_where_they_bound_it(patched_program):
    assert patched_program["retinanet_is_ours"] and patched_program["fcos_is_ours"]
    assert patched_program["retinanet_runs_the_fused_op"]

"""The segmentation cases of ``python bench/suite.py`` (``--loss seg``): Dice + cross-entropy,
forward+backward to the logits' gradient, fused (``wl.dice_loss(..., lambda_ce=1.0)``, MONAI's
DiceCELoss formula) against MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``, nnU-Net's
``DC_and_CE_loss`` (its default MemoryEfficientSoftDiceLoss, batch Dice, no background) and
``torch.compile`` of the composite (references.overlap_reference: MONAI's formulas in PyTorch's
ops). Class indices (B, 1, d...) for MONAI and nnU-Net, (B, d...) for ours. Peak memory is what
one forward+backward allocates beyond its inputs; the bytes are the logits read twice and their
gradient written once. Same method as suite.py's run_case: the implementations timed in
alternation, medians."""
import os
import sys

import torch

import weighted_loss as wl

import report

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from references import overlap_reference  # noqa: E402

# name, logits' shape, dtype
QUICK = [
    ("dice-ce-2x14x64x64x64-f32", (2, 14, 64, 64, 64), torch.float32),
    ("dice-ce-16x19x256x256-f32", (16, 19, 256, 256), torch.float32),
    ("dice-ce-2x14x64x64x64-bf16", (2, 14, 64, 64, 64), torch.bfloat16),
]
FULL = [
    ("dice-ce-2x14x128x128x128-bf16", (2, 14, 128, 128, 128), torch.bfloat16),
    ("dice-ce-2x117x64x64x64-bf16", (2, 117, 64, 64, 64), torch.bfloat16),
]
IMPLS = ("fused", "monai", "nnunet", "compiled")


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    # a background above 90%, the other classes rare, as a lesion or an organ in a volume
    probs = torch.full((shape[1],), 0.08 / (shape[1] - 1))
    probs[0] = 0.92
    y = torch.multinomial(probs, x.numel() // shape[1], replacement=True, generator=g)
    return x, y.view(shape[0], *shape[2:]).to(device)


def _implementations(use_compile):
    fns = {"fused": lambda x, y: wl.dice_loss(x, y, lambda_ce=1.0)}
    try:
        from monai.losses import DiceCELoss
        monai = DiceCELoss(to_onehot_y=True, softmax=True)
        fns["monai"] = lambda x, y: monai(x, y.unsqueeze(1))
    except ImportError:
        pass
    try:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        nnunet = DC_and_CE_loss(dict(batch_dice=True, smooth=1e-5, do_bg=False, ddp=False), {},
                                dice_class=MemoryEfficientSoftDiceLoss)
        fns["nnunet"] = lambda x, y: nnunet(x, y.unsqueeze(1))
    except ImportError:
        pass
    if use_compile:
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(lambda x, y: overlap_reference(x, y, lambda_ce=1.0))
    return fns


def run_case(name, shape, dtype, device, repeat, use_compile, bench, tick=None):
    """Every figure of one case; `bench` is bench/suite.py (timing and memory helpers)."""
    x, y = make_inputs(shape, dtype, device)
    fns = _implementations(use_compile)
    out = {"case": name, "loss": "dice+ce", "shape": list(shape), "dtype": bench.dtype_name(dtype),
           "bytes": 3 * x.numel() * x.element_size(),
           "input_mb": x.numel() * x.element_size() / 2 ** 20}
    xr = x.detach().requires_grad_()
    for kind, fn in list(fns.items()):
        try:
            fn(xr, y)
        except Exception as e:  # noqa: BLE001 - a compiler failure is reported, not fatal
            if kind != "compiled":
                raise
            out["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del fns[kind]
    forwards = {kind: (lambda fn=fn: fn(xr, y)) for kind, fn in fns.items()}

    def backward(value):
        return torch.autograd.grad(value, xr)
    medians = bench.time_rounds(forwards, backward, device, repeat, tick)
    for kind in fns:
        for what in ("fwd", "bwd", "fwd_bwd"):
            out[f"{kind}_{what}_ms"] = medians[kind, what]
        # beyond the logits and their gradient (what any implementation must hold)
        out[f"peak_mem_{kind}_mb"] = bench.peak_mb(
            lambda f=forwards[kind]: backward(f()), device) - out["input_mb"]
    for kind in fns:
        if kind != "fused":
            out[f"speedup_vs_{kind}"] = out[f"{kind}_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    return out


def _t(r, kind):
    return report.ms_cell(r, kind, 0)


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("fused ms fwd / bwd / total", lambda r: _t(r, "fused")),
    ("MONAI DiceCELoss ms", lambda r: _t(r, "monai")),
    ("nnU-Net DC_and_CE_loss ms", lambda r: _t(r, "nnunet")),
    ("compiled composite ms", lambda r: _t(r, "compiled")),
    ("speedup vs MONAI / nnU-Net / compiled",
     lambda r: report.speedups_cell(r, ("monai", "nnunet", "compiled"))),
    ("peak MiB beyond logits + gradient: fused / MONAI / nnU-Net / compiled (logits MiB)",
     lambda r: " / ".join(f"{r[f'peak_mem_{k}_mb']:.0f}" if f"peak_mem_{k}_mb" in r else "-"
                          for k in IMPLS) + f" ({r['input_mb']:.0f})"),
]


def markdown_table(rows):
    return report.columns_markdown(COLUMNS, rows)

"""The suite's precision bar, written once: a result within 2x of PyTorch's own error against
the float64 result on the same rounded inputs, or of a floor of half an ulp of the largest
float64 value (where PyTorch is exact by luck; the fuzzer's floor, tests/fuzz.py, is an ulp)."""
import torch

HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}


def assert_within_2x(ours, theirs, exact, dtype, *what, where=None, ulps=0.5):
    """|ours - exact| <= 2 max(|theirs - exact|, `ulps` ulps of dtype at max |exact|), over the
    elements `where` selects (a boolean mask; all by default). Nothing to compare passes."""
    ours, theirs, exact = ours.double(), theirs.double(), exact.double()
    if where is not None:
        ours, theirs, exact = ours[where], theirs[where], exact[where]
    if exact.numel() == 0:
        return
    err = (ours - exact).abs().max().item()
    bar = max((theirs - exact).abs().max().item(),
              2 * ulps * HALF_ULP[dtype] * exact.abs().max().item())
    assert err <= 2 * bar, (*what, err, bar)

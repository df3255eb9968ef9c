"""The suite's precision bar, written once: a result within 2x of PyTorch's own error against
the float64 result on the same rounded inputs, or of a floor of half an ulp of the largest
float64 value (where PyTorch is exact by luck)."""
import torch

HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}


def assert_within_2x(ours, theirs, exact, dtype, *what):
    """|ours - exact| <= 2 max(|theirs - exact|, half an ulp of dtype at max |exact|)."""
    exact = exact.double()
    err = (ours.double() - exact).abs().max().item()
    bar = max((theirs.double() - exact).abs().max().item(),
              HALF_ULP[dtype] * exact.abs().max().item())
    assert err <= 2 * bar, (*what, err, bar)

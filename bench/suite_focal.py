"""The focal losses' benchmark cases and the composites they are measured against (the "native"
column of python bench/suite.py): what users write, or call, without a fused kernel.

``sigmoid_focal_composite`` is the body of ``torchvision.ops.sigmoid_focal_loss`` (0.28), with
``weight`` and ``pos_weight`` passed to the BCE term; ``focal_composite`` the softmax focal loss as
it is usually written, from ``log_softmax`` and a gather. Both have wl's arguments, so the
benchmark calls every implementation the same way; neither is used by the library itself.
"""
import os
import sys

import torch

# the composites are the test suite's references (tests/references.py): one copy of each formula
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from references import focal_composite, sigmoid_focal_composite  # noqa: E402,F401

# name, loss, shape of the logits, dtype, extra keyword arguments (bench.py's QUICK and FULL)
QUICK = [
    ("focal-8192x1000-f32", "focal", (8192, 1000), torch.float32, {}),
    ("focal-seg-16x19x128x128-f32", "focal", (16, 19, 128, 128), torch.float32, {}),
    ("focal-ls-8192x1000-f32", "focal", (8192, 1000), torch.float32, {"label_smoothing": 0.1}),
    ("focal-ls-seg-16x19x128x128-f32", "focal", (16, 19, 128, 128), torch.float32,
     {"label_smoothing": 0.1}),
    ("sfocal-8192x1000-f32", "sfocal", (8192, 1000), torch.float32, {"reduction": "mean"}),
    ("sfocal-seg-16x19x128x128-f32", "sfocal", (16, 19, 128, 128), torch.float32,
     {"reduction": "mean"}),
]
FULL = [
    ("focal-seg-16x19x512x512-bf16", "focal", (16, 19, 512, 512), torch.bfloat16, {}),
    ("sfocal-8192x8192-bf16", "sfocal", (8192, 8192), torch.bfloat16, {"reduction": "mean"}),
]

"""Every kernel family once on the GPU (tests/kernel_cases.py), for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_cuda.py

Small inputs, one forward+backward each, then a device synchronization, so that a sanitizer run
stays within a minute or two even at its 10-100x slowdown. Prints each case as it finishes.
"""
import os
import sys

import torch

# the cases are a test fixture: tests/kernel_cases.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from kernel_cases import CASES  # noqa: E402


def main(names=None):
    if not torch.cuda.is_available():
        sys.exit("sanitize_cuda.py: no CUDA device")
    device = torch.device("cuda")
    for name, case in CASES.items():
        if names and not any(n in name for n in names):
            continue
        _, step = case(device)
        step()
        torch.cuda.synchronize()
        print(f"ran {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

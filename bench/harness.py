"""What the bench/ suites share: one timed forward+backward per implementation and case."""
import torch

from suite import LOSSES, bytes_min, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ("native", "fused", "compiled")  # native first: the group's baseline
_native_median = {}


def case_id(v):
    """Test ids: 8192x1000, float32, ls0.1 / ign255 / plain, fused."""
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    if isinstance(v, dict):
        short = {"label_smoothing": "ls", "ignore_index": "ign"}
        return "-".join(f"{short.get(k, k)}{val}" for k, val in v.items()) or "plain"
    return str(v).replace("torch.", "")


def run_benchmark(benchmark, loss, shape, dtype, kwargs, impl):
    """Times one forward+backward of `impl` on the case and records GB/s and the speedup over
    the group's native run; returns the loss and gradient of the last call."""
    x, y, kw = make_inputs(loss, shape, dtype, kwargs, DEVICE)
    fused, native = LOSSES[loss]
    fn = {"fused": fused, "native": native}.get(impl)
    if impl == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(native)
    xr = x.detach().requires_grad_(True)

    def step():
        value = fn(xr, y, **kw)
        (grad,) = torch.autograd.grad(value, xr)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return value, grad

    step()  # compiles the compiled one outside the timing
    group = f"{loss} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=str(DEVICE), bytes_min=bytes_min(loss, x))
    result = benchmark.pedantic(step, rounds=7, warmup_rounds=2, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
        benchmark.extra_info["GB/s"] = bytes_min(loss, x) / median / 1e9
        if impl == "native":
            _native_median[group] = median
        elif group in _native_median:
            benchmark.extra_info["speedup_vs_native"] = _native_median[group] / median
    return x, y, kw, result

"""Side-by-side benchmark: fused weighted_loss vs native PyTorch, forward, backward and total.

    python -m weighted_loss.bench [--device cpu|cuda] [--repeat 7] [--case NAME ...]

Every case computes the fused and the native loss and gradient once (their largest differences are
printed), then times fused and native forward and forward+backward in alternation, `repeat` rounds
after a warm-up, and reports medians (backward = forward+backward - forward). The bandwidth bound
of a case is its minimal bytes over the copy bandwidth measured in the same run: for
cross-entropy 3 x the logits (read forward, read + gradient write backward), for BCE 5 x the
logits (logits and targets read forward and backward, gradient written).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import weighted_loss as wl

# name, loss, shape of the logits, dtype, extra keyword arguments
CASES = [
    ("ce-8192x1000-f32", "ce", (8192, 1000), torch.float32, {}),
    ("ce-4096x32000-bf16", "ce", (4096, 32000), torch.bfloat16, {}),
    ("ce-2048x32000-f32-ls0.1", "ce", (2048, 32000), torch.float32, {"label_smoothing": 0.1}),
    ("ce-seg-16x19x128x128-f32-ign255", "ce", (16, 19, 128, 128), torch.float32,
     {"ignore_index": 255}),
    ("bce-8192x1000-f32-posw", "bce", (8192, 1000), torch.float32, {}),
    ("bce-seg-16x5x128x128-f32-posw", "bce", (16, 5, 128, 128), torch.float32, {}),
]
LOSSES = {
    "ce": (wl.cross_entropy, F.cross_entropy),
    "bce": (wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _median_ms(fn, device, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    return statistics.median(_time_ms(fn, device) for _ in range(repeat))


def copy_bandwidth_gbs(device, nbytes=256 << 20, repeat=7):
    """Bytes read + written per second by a large device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeat)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(loss, shape, dtype, kwargs, device, seed=0):
    """Logits, targets and the keyword arguments of the loss, with weights computed from the
    targets as users do: max(n)/n class weights for cross-entropy, pos_weight = #neg/#pos per
    class for BCE (positives 1-30% depending on the class)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    kwargs = dict(kwargs)
    if loss == "bce":
        rate = torch.linspace(0.01, 0.3, C).reshape(C, *([1] * (len(shape) - 2)))
        y = (torch.rand(shape, generator=g) < rate).float()
        dims = [d for d in range(len(shape)) if d != 1]
        pos = y.sum(dims, keepdim=True).squeeze(0)
        kwargs["pos_weight"] = ((y[0].numel() * shape[0] / C - pos) / pos.clamp(min=1)).to(device)
        return x, y.to(device=device, dtype=dtype), kwargs
    tshape = (shape[0], *shape[2:])
    y = torch.randint(0, C, tshape, generator=g)
    if "ignore_index" in kwargs:
        y[torch.rand(tshape, generator=g) < 0.1] = kwargs["ignore_index"]
    counts = torch.bincount(y[(y >= 0) & (y < C)], minlength=C).float() + 1
    kwargs["weight"] = (counts.max() / counts).to(device=device, dtype=dtype)
    return x, y.to(device), kwargs


def run_case(name, loss, shape, dtype, kwargs, device, repeat):
    """Fused and native timed in alternation (so both see the same machine noise)."""
    x, y, kw = make_inputs(loss, shape, dtype, kwargs, device)
    losses = dict(zip(("fused", "native"), LOSSES[loss]))
    out = {"case": name, "loss": loss, "shape": list(shape),
           "dtype": str(dtype).replace("torch.", "")}
    results, calls = {}, {}
    for kind, fn in losses.items():
        xr = x.detach().clone().requires_grad_(True)
        value = fn(xr, y, **kw)
        (grad,) = torch.autograd.grad(value, xr)
        results[kind] = (value.detach().float(), grad.float())
        calls[kind, "fwd"] = lambda fn=fn, xr=xr: fn(xr, y, **kw)
        calls[kind, "fwd_bwd"] = lambda fn=fn, xr=xr: torch.autograd.grad(fn(xr, y, **kw), xr)
        del value, grad
    times = {k: [] for k in calls}
    for k, f in calls.items():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in calls.items():
            times[k].append(_time_ms(f, device))
    for (kind, what), ts in times.items():
        out[f"{kind}_{what}_ms"] = statistics.median(ts)
    for kind in losses:
        out[f"{kind}_bwd_ms"] = out[f"{kind}_fwd_bwd_ms"] - out[f"{kind}_fwd_ms"]
    out["max_loss_diff"] = (results["fused"][0] - results["native"][0]).abs().max().item()
    out["max_grad_diff"] = (results["fused"][1] - results["native"][1]).abs().max().item()
    out["speedup"] = out["native_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    out["bytes_min"] = (3 if loss == "ce" else 5) * x.numel() * x.element_size()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--case", action="append", help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    bw = copy_bandwidth_gbs(device)
    print(f"device {device} ({wl.cpu_capability() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s")
    hdr = (f"{'case':34} {'fused fwd':>9} {'bwd':>7} {'total':>7} | {'native fwd':>10} {'bwd':>7} "
           f"{'total':>7} | {'speedup':>7} {'bound ms':>8} {'of bound':>8} | {'max |dloss|':>11} {'max |dgrad|':>11}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for name, loss, shape, dtype, kwargs in CASES:
        if args.case and not any(c in name for c in args.case):
            continue
        r = run_case(name, loss, shape, dtype, kwargs, device, args.repeat)
        r["bound_ms"] = r["bytes_min"] / (bw * 1e9) * 1e3
        r["bandwidth_fraction"] = r["bound_ms"] / r["fused_fwd_bwd_ms"]
        rows.append(r)
        print(f"{name:34} {r['fused_fwd_ms']:9.2f} {r['fused_bwd_ms']:7.2f} {r['fused_fwd_bwd_ms']:7.2f} | "
              f"{r['native_fwd_ms']:10.2f} {r['native_bwd_ms']:7.2f} {r['native_fwd_bwd_ms']:7.2f} | "
              f"{r['speedup']:6.2f}x {r['bound_ms']:8.2f} {100 * r['bandwidth_fraction']:7.0f}% | "
              f"{r['max_loss_diff']:11.2e} {r['max_grad_diff']:11.2e}", flush=True)
    return rows


if __name__ == "__main__":
    main()

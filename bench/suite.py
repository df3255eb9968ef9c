"""Side-by-side benchmark: fused weighted_loss vs native PyTorch eager vs torch.compile of the
native loss, forward, backward and total, with speed, bandwidth, memory and accuracy per case.

    python bench/suite.py                      quick suite on the best device (CUDA, else CPU)
    python bench/suite.py --full               the large GPU suite
    python bench/suite.py --shape 8192x32000 --dtype bfloat16 --loss ce bce
    python bench/suite.py --loss linear --full  fused linear + cross-entropy, large cases
    python bench/suite.py --loss focal sfocal   the focal losses vs their composites
    python bench/suite.py --loss seg            Dice + cross-entropy vs MONAI and nnU-Net
    options: --device, --dtype, --shape (repeatable), --loss, --case, --repeat, --no-compile, --out

Method. Every case first computes the loss and the logits' gradient once with each implementation
(which also compiles the compiled one) and records the largest differences from the native
result. Then, after two warm-up calls, it times the forward, the backward and forward+backward
of every implementation in alternation, `repeat` rounds (so all see the same machine noise), and
reports medians: three measurements, none derived from another (the backward alone runs on the
graph of a forward that is not timed), so no column can be negative. CUDA times come from CUDA events, CPU times from
perf_counter. The bandwidth bound is a case's minimal bytes: cross-entropy and the softmax focal
loss 3 x the logits (read forward, read backward, gradient written), BCE and the sigmoid focal
loss 5 x (logits and targets read forward and backward, gradient written); achieved GB/s =
those bytes / total time, also given as a fraction of the copy bandwidth measured in the same
run. Peak memory is what one forward+backward allocates beyond its inputs: the CUDA allocator's
peak on a GPU, the profiler's count of live CPU allocations on the CPU (the fused kernels' cached
gradient buffers included). Cases marked autocast run every implementation under torch.autocast
with float32 class weights, as mixed-precision training calls them: PyTorch computes its loss
on a float32 copy of the bfloat16 logits there, the fused kernels read them in place.

Writes <out>/<stamp>.json (device, versions, every figure) and <out>/<stamp>.png (speedup and
achieved bandwidth per case; needs matplotlib), and prints a table (rich if installed).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import weighted_loss as wl

import suite_focal
import suite_linear
import suite_segmentation
from report import COLUMNS, _Progress, environment, markdown_table, plot, print_table  # noqa: F401

# name, loss, shape of the logits, dtype, extra keyword arguments
QUICK = [
    ("ce-8192x1000-f32", "ce", (8192, 1000), torch.float32, {}),
    ("ce-4096x32000-bf16", "ce", (4096, 32000), torch.bfloat16, {}),
    ("ce-2048x32000-f32-ls0.1", "ce", (2048, 32000), torch.float32, {"label_smoothing": 0.1}),
    ("ce-seg-16x19x128x128-f32-ign255", "ce", (16, 19, 128, 128), torch.float32,
     {"ignore_index": 255}),
    ("bce-8192x1000-f32-posw", "bce", (8192, 1000), torch.float32, {}),
    ("bce-seg-16x5x128x128-f32-posw", "bce", (16, 5, 128, 128), torch.float32, {}),
    ("ce-autocast-8192x32000-bf16", "ce", (8192, 32000), torch.bfloat16, {"autocast": True}),
] + suite_focal.QUICK
FULL = [
    ("ce-8192x32000-bf16", "ce", (8192, 32000), torch.bfloat16, {}),
    ("ce-autocast-8192x32000-bf16", "ce", (8192, 32000), torch.bfloat16, {"autocast": True}),
    ("ce-8192x128256-bf16", "ce", (8192, 128256), torch.bfloat16, {}),
    ("ce-32768x32000-bf16", "ce", (32768, 32000), torch.bfloat16, {}),
    ("ce-8192x1000-f32", "ce", (8192, 1000), torch.float32, {}),
    ("ce-seg-16x19x512x512-bf16-ign255", "ce", (16, 19, 512, 512), torch.bfloat16,
     {"ignore_index": 255}),
    ("bce-8192x8192-bf16-posw", "bce", (8192, 8192), torch.bfloat16, {}),
] + suite_focal.FULL
LOSSES = {
    "ce": (wl.cross_entropy, F.cross_entropy),
    "bce": (wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    "focal": (wl.focal_loss, suite_focal.focal_composite),  # gamma = 2, class weights
    "sfocal": (wl.sigmoid_focal_loss, suite_focal.sigmoid_focal_composite),  # torchvision's
}
DTYPES = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16,
          "float64": torch.float64, "f64": torch.float64}
IMPLS = ("fused", "native", "compiled")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(
            f"--shape must look like 8192x32000 or 16x19x512x512 (N x C [x d...]), got {text!r}")
    return shape


def parse_dtype(text):
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"--dtype must be one of {', '.join(sorted(DTYPES))}, got {text!r}")
    return DTYPES[text]


# ----------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device):
    """Milliseconds of one call: CUDA events on a GPU, perf_counter around a sync on the CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth_gbs(device, nbytes=None, repeat=7):
    """Bytes read + written per second by a large copy on the device (the same run's yardstick)."""
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device) for _ in range(repeat))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_backward_ms(forward, backward, device):
    """Milliseconds of a backward alone: the forward that builds its graph runs first, untimed."""
    out = forward()
    _sync(device)
    return time_ms(lambda: backward(out), device)


def time_rounds(forwards, backward, device, repeat, tick=None):
    """{(kind, "fwd" | "bwd" | "fwd_bwd"): median ms} of each implementation's forward
    (``forwards[kind]()``), its backward alone (``backward(output)``, see time_backward_ms) and
    the two in one call, timed in alternation ``repeat`` rounds after two warm-up calls of each;
    tick() after each round."""
    timers = {}
    for kind, fwd in forwards.items():
        timers[kind, "fwd"] = lambda fwd=fwd: time_ms(fwd, device)
        timers[kind, "bwd"] = lambda fwd=fwd: time_backward_ms(fwd, backward, device)
        timers[kind, "fwd_bwd"] = lambda fwd=fwd: time_ms(lambda: backward(fwd()), device)
    for timer in timers.values():  # warm-up
        timer()
        timer()
    times = {k: [] for k in timers}
    for _ in range(repeat):
        for k, timer in timers.items():
            times[k].append(timer())
        if tick:
            tick()
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mb(fn, device):
    """MiB that one call allocates at its peak beyond what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    # CPU: the profiler's allocation events (every CPU allocation and free, in time order)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
    except AttributeError:  # the profiler's internals moved: report no figure rather than a wrong one
        return float("nan")
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


class _quiet_stderr:
    """Silences file descriptor 2 (the profiler's C++ start/stop lines) for a moment."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


# ----------------------------------------------------------------------------------- cases

def make_inputs(loss, shape, dtype, kwargs, device, seed=0):
    """Logits, targets and the keyword arguments of the loss, with weights computed from the
    targets as users do: max(n)/n class weights for cross-entropy and the softmax focal loss,
    pos_weight = #neg/#pos per class for BCE (positives 1-30% depending on the class); the sigmoid
    focal loss takes BCE's targets with torchvision's defaults (alpha 0.25, gamma 2) instead.
    Under autocast (kwargs' "autocast", popped here) the weights stay float32, as users keep
    them."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    kwargs = dict(kwargs)
    wdtype = torch.float32 if kwargs.pop("autocast", False) else dtype
    if loss in ("bce", "sfocal"):
        rate = torch.linspace(0.01, 0.3, C).reshape(C, *([1] * (len(shape) - 2)))
        y = (torch.rand(shape, generator=g) < rate).to(dtype)
        dims = [d for d in range(len(shape)) if d != 1]
        pos = y.float().sum(dims, keepdim=True).squeeze(0)
        total = y.numel() / C
        if loss == "bce":
            kwargs["pos_weight"] = ((total - pos) / pos.clamp(min=1)).to(device=device)
        return x, y.to(device), kwargs
    tshape = (shape[0], *shape[2:])
    y = torch.randint(0, C, tshape, generator=g)
    if "ignore_index" in kwargs:
        y[torch.rand(tshape, generator=g) < 0.1] = kwargs["ignore_index"]
    counts = torch.bincount(y[(y >= 0) & (y < C)], minlength=C).float() + 1
    kwargs["weight"] = (counts.max() / counts).to(device=device, dtype=wdtype)
    return x, y.to(device), kwargs


def bytes_min(loss, x):
    return (3 if loss in ("ce", "focal") else 5) * x.numel() * x.element_size()


def select_cases(args):
    """The cases the arguments ask for, as (name, loss, shape, dtype, kwargs)."""
    losses = args.loss or (["ce"] if args.shape else list(LOSSES))
    if args.shape:
        dtypes = args.dtype or [torch.float32]
        return [(f"{loss}-{'x'.join(map(str, s))}-{dtype_name(d)}", loss, s, d, {})
                for s in args.shape for loss in losses for d in dtypes]
    cases = []
    for name, loss, shape, dtype, kw in (FULL if args.full else QUICK):
        if loss not in losses or (args.case and not any(c in name for c in args.case)):
            continue
        for d in (args.dtype or [dtype]):
            cases.append((name if d == dtype else f"{name}-as-{dtype_name(d)}", loss, shape, d, kw))
    return cases


def select_linear_cases(args):
    """The linear + cross-entropy cases (suite_linear.py) the arguments ask for."""
    if args.shape or (args.loss and "linear" not in args.loss):
        return []
    picked = []
    for name, n, h, c, dtype in (suite_linear.FULL if args.full else suite_linear.QUICK):
        if args.case and not any(k in name for k in args.case):
            continue
        for d in (args.dtype or [dtype]):
            picked.append((name if d == dtype else f"{name}-as-{dtype_name(d)}", n, h, c, d))
    return picked


def select_segmentation_cases(args):
    """The Dice + cross-entropy cases (suite_segmentation.py) the arguments ask for."""
    if args.shape or (args.loss and "seg" not in args.loss):
        return []
    picked = []
    for name, shape, dtype in (suite_segmentation.FULL if args.full else suite_segmentation.QUICK):
        if args.case and not any(k in name for k in args.case):
            continue
        for d in (args.dtype or [dtype]):
            picked.append((name if d == dtype else f"{name}-as-{dtype_name(d)}", shape, d))
    return picked


def run_case(name, loss, shape, dtype, kwargs, device, repeat, use_compile=True, tick=None):
    """Every figure of one case as a dict; tick() is called after each timing round."""
    x, y, kw = make_inputs(loss, shape, dtype, kwargs, device)
    fused, native = LOSSES[loss]
    fns = {"fused": fused, "native": native}
    out = {"case": name, "loss": loss, "shape": list(shape), "N": shape[0], "C": shape[1],
           "dtype": dtype_name(dtype), "options": {k: v for k, v in kwargs.items()}}
    if use_compile:
        torch._dynamo.reset()  # a fresh compile per case, far from the recompile limit
        fns["compiled"] = torch.compile(native)
    if kwargs.get("autocast"):
        fns = {k: _under_autocast(f, device, dtype) for k, f in fns.items()}

    def step(fn):
        xr = x.detach().requires_grad_(True)
        value = fn(xr, y, **kw)
        (grad,) = torch.autograd.grad(value, xr)
        return value, grad

    results = {}
    for kind, fn in list(fns.items()):
        try:
            value, grad = step(fn)
            _sync(device)
        except Exception as e:  # noqa: BLE001 - a compiler that fails here is reported, not fatal
            if kind != "compiled":
                raise
            out["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del fns[kind]
            continue
        results[kind] = (value.detach().double(), grad.double())
    ref_v, ref_g = results["native"]
    for kind in results:
        if kind != "native":
            out[f"{kind}_max_loss_diff"] = (results[kind][0] - ref_v).abs().max().item()
            out[f"{kind}_max_grad_diff"] = (results[kind][1] - ref_g).abs().max().item()
    del results, ref_v, ref_g

    xr = x.detach().requires_grad_(True)
    forwards = {kind: (lambda fn=fn: fn(xr, y, **kw)) for kind, fn in fns.items()}

    def backward(value):
        return torch.autograd.grad(value, xr)
    medians = time_rounds(forwards, backward, device, repeat, tick)
    nbytes = bytes_min(loss, x)
    out["bytes_min"] = nbytes
    for kind in fns:
        for what in ("fwd", "bwd", "fwd_bwd"):
            out[f"{kind}_{what}_ms"] = medians[kind, what]
        out[f"{kind}_gbs"] = nbytes / (out[f"{kind}_fwd_bwd_ms"] * 1e-3) / 1e9
        out[f"peak_mem_{kind}_mb"] = peak_mb(lambda f=forwards[kind]: backward(f()), device)
    out["speedup_vs_native"] = out["native_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    if "compiled" in fns:
        out["speedup_vs_compiled"] = out["compiled_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    return out


def _under_autocast(fn, device, dtype):
    def call(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args, **kwargs)
    return call


def measure(cases, device, repeat, use_compile=True, progress=True):
    """run_case over `cases` behind a progress bar; the copy bandwidth of the same run is added
    to every case as bandwidth_fraction (fused) and <impl>_bandwidth_fraction."""
    bw = copy_bandwidth_gbs(device)
    rows = []
    with _Progress(len(cases) * repeat, enabled=progress) as bar:
        for case in cases:
            bar.describe(case[0])
            r = run_case(*case, device, repeat, use_compile, tick=bar.advance)
            for kind in IMPLS:
                if f"{kind}_gbs" in r:
                    r[f"{kind}_bandwidth_fraction"] = r[f"{kind}_gbs"] / bw
            r["bandwidth_fraction"] = r["fused_bandwidth_fraction"]
            r["bound_ms"] = r["bytes_min"] / (bw * 1e9) * 1e3
            rows.append(r)
    return bw, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:9]))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--full", action="store_true", help="the large GPU suite instead of the quick one")
    ap.add_argument("--shape", type=parse_shape, action="append",
                    help="a logits shape such as 8192x32000 instead of the suite (repeatable)")
    ap.add_argument("--dtype", type=parse_dtype, action="append",
                    help="float32, bfloat16, float16 or float64 (repeatable; overrides the suite's)")
    ap.add_argument("--loss", nargs="+", choices=sorted(LOSSES) + ["linear", "seg"],
                    help="ce, bce, focal, sfocal (suite_focal.py), linear (suite_linear.py), seg "
                         "(suite_segmentation.py) or several")
    ap.add_argument("--case", action="append", help="only suite cases whose name contains this")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed rounds per case (default 7 on CPU, 20 on CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=os.path.join("bench", "out"), help="folder for JSON and PNG")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.repeat is not None and args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    repeat = args.repeat or (20 if device.type == "cuda" else 7)
    cases = select_cases(args)
    linear = select_linear_cases(args)
    seg = select_segmentation_cases(args)
    if not cases and not linear and not seg:
        ap.error("no case matches the arguments")

    env = environment(device)
    print(f"weighted_loss benchmark on {env['device']} ({device.type}), torch {env['torch']}, "
          f"{len(cases) + len(linear) + len(seg)} cases x {repeat} rounds", flush=True)
    bw, rows = measure(cases, device, repeat, not args.no_compile, not args.no_progress)
    if rows:
        print_table(env, bw, rows)
    lin_rows = [suite_linear.run_case(*c, device, repeat, not args.no_compile, sys.modules[__name__])
                for c in linear]
    if lin_rows:
        print("fused linear + cross-entropy (suite_linear.py)")
        print(suite_linear.markdown_table(lin_rows))
    seg_rows = [suite_segmentation.run_case(*c, device, repeat, not args.no_compile,
                                            sys.modules[__name__]) for c in seg]
    if seg_rows:
        print("Dice + cross-entropy (suite_segmentation.py)")
        print(suite_segmentation.markdown_table(seg_rows))

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(args.out, stamp)
    with open(stem + ".json", "w") as f:
        json.dump({"stamp": stamp, "environment": env, "copy_bandwidth_gbs": bw, "repeat": repeat,
                   "method": __doc__.split("Method. ")[1].split("\n\n")[0].replace("\n", " "),
                   "cases": rows, "linear_cases": lin_rows, "segmentation_cases": seg_rows}, f,
                  indent=2)
    with open(stem + ".md", "w") as f:
        if rows:
            f.write(markdown_table(env, bw, rows) + "\n")
        else:
            f.write(f"{env['device']}, torch {env['torch']}\n\n")
        if lin_rows:
            f.write(suite_linear.markdown_table(lin_rows))
        if seg_rows:
            f.write("\n" + suite_segmentation.markdown_table(seg_rows))
    wrote = [stem + ".json", stem + ".md"]
    try:
        if rows:
            plot(stem + ".png", env, bw, rows)
            wrote.append(stem + ".png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or `make bench`)")
    print("wrote " + ", ".join(wrote))
    return rows


if __name__ == "__main__":
    main()

"""The linear + cross-entropy cases of ``python bench/suite.py`` (``--loss linear``):
``wl.linear_cross_entropy`` against native ``F.cross_entropy(F.linear(h, W), y, weight=w)`` (what
PyTorch's ``F.linear_cross_entropy`` computes by default), PyTorch's chunked path (its
``F.linear_cross_entropy`` with ``options=LinearCrossEntropyOptions()``, torch 2.13 on) and
``torch.compile`` of the native one, forward+backward to the gradients of the hidden states and of the
classifier's weight, with class weights from the batch's label counts. Peak memory is what one
forward+backward allocates beyond its inputs (as for the other cases); the matmuls' TFLOP/s are
6 N H C over the fused total. Same method as bench.py's run_case: correctness first, warm-up,
then the implementations timed in alternation, medians."""
import statistics

import torch
import torch.nn.functional as F

import weighted_loss as wl

import report

# name, N (rows), H (hidden), C (classes), dtype
QUICK = [("linear-1024x512x32000-f32", 1024, 512, 32000, torch.float32)]
FULL = [
    ("linear-2048x1024x32000-f32", 2048, 1024, 32000, torch.float32),
    ("linear-4096x1024x32000-bf16", 4096, 1024, 32000, torch.bfloat16),
    ("linear-8192x1024x32000-f32", 8192, 1024, 32000, torch.float32),
    ("linear-8192x1024x32000-bf16", 8192, 1024, 32000, torch.bfloat16),
    ("linear-16384x4096x128256-bf16", 16384, 4096, 128256, torch.bfloat16),
]
IMPLS = ("fused", "native", "chunked", "compiled")


def _native(h, lw, y, weight):
    return F.cross_entropy(F.linear(h, lw), y, weight=weight)


def _fused(h, lw, y, weight):
    return wl.linear_cross_entropy(h, lw, y, weight=weight)


def _chunked(h, lw, y, weight):
    """PyTorch's own chunked path (it never holds the whole logits)."""
    return F.linear_cross_entropy(h, lw, y, weight=weight,
                                  options=torch.nn.LinearCrossEntropyOptions())


def make_inputs(n, hidden, classes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
    lw = (torch.randn(classes, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=dtype)
    # Zipf-like labels, as a language model's tokens; max(n)/n weights over the classes seen
    probs = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64)
    y = torch.multinomial(probs, n, replacement=True, generator=g).to(device)
    counts = torch.bincount(y, minlength=classes).double().clamp(min=1)
    w = (counts.max() / counts).to(device=device, dtype=dtype)
    return h, lw, y, w


def _matmuls_ms(h, lw, device, repeat, bench):
    """The floor: the three matmuls any implementation does (logits, and the gradients of the
    hidden states and of the weight from an N x C gradient), alone, median ms."""
    g = torch.empty(h.shape[0], lw.shape[0], dtype=h.dtype, device=device).normal_()

    def run():
        torch.mm(h, lw.t())
        torch.mm(g, lw)
        torch.mm(g.t(), h)
    run()
    bench._sync(device)
    ms = statistics.median(bench.time_ms(run, device) for _ in range(repeat))
    del g
    return ms


def run_case(name, n, hidden, classes, dtype, device, repeat, use_compile, bench, tick=None):
    """Every figure of one case; `bench` is bench/suite.py (timing and memory helpers)."""
    h, lw, y, w = make_inputs(n, hidden, classes, dtype, device)
    fns = {"fused": _fused, "native": _native}
    if hasattr(torch.nn, "LinearCrossEntropyOptions") and not wl.is_patched():
        fns["chunked"] = _chunked
    if use_compile:
        torch._dynamo.reset()
        fns["compiled"] = torch.compile(_native)
    out = {"case": name, "loss": "linear", "N": n, "H": hidden, "C": classes,
           "dtype": bench.dtype_name(dtype), "flops": 6 * n * hidden * classes}
    hr, lr = h.detach().requires_grad_(), lw.detach().requires_grad_()
    results = {}
    for kind, fn in list(fns.items()):
        try:
            value = fn(hr, lr, y, w)
            results[kind] = (value.detach().double(),
                             *(g.double() for g in torch.autograd.grad(value, (hr, lr))))
        except Exception as e:  # noqa: BLE001 - a compiler failure is reported, not fatal
            if kind != "compiled":
                raise
            out["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del fns[kind]
    ref = results["native"]
    for kind in results:
        if kind != "native":
            out[f"{kind}_max_loss_diff"] = (results[kind][0] - ref[0]).abs().max().item()
            out[f"{kind}_max_grad_diff"] = max((a - b).abs().max().item()
                                               for a, b in zip(results[kind][1:], ref[1:]))
    del results, ref
    forwards = {kind: (lambda fn=fn: fn(hr, lr, y, w)) for kind, fn in fns.items()}

    def backward(value):
        return torch.autograd.grad(value, (hr, lr))
    medians = bench.time_rounds(forwards, backward, device, repeat, tick)
    for kind in fns:
        for what in ("fwd", "bwd", "fwd_bwd"):
            out[f"{kind}_{what}_ms"] = medians[kind, what]
        out[f"{kind}_tflops"] = out["flops"] / (out[f"{kind}_fwd_bwd_ms"] * 1e-3) / 1e12
        out[f"peak_mem_{kind}_mb"] = bench.peak_mb(lambda f=forwards[kind]: backward(f()), device)
    out["matmuls_ms"] = _matmuls_ms(h, lw, device, repeat, bench)
    out["fused_vs_matmuls"] = out["fused_fwd_bwd_ms"] / out["matmuls_ms"]
    out["memory_vs_native"] = out["peak_mem_fused_mb"] / out["peak_mem_native_mb"]
    for kind in fns:
        if kind != "fused":
            out[f"speedup_vs_{kind}"] = out[f"{kind}_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    return out


def _t(r, kind):
    return report.ms_cell(r, kind, 0)


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("fused ms fwd / bwd / total", lambda r: _t(r, "fused")),
    ("native ms fwd / bwd / total", lambda r: _t(r, "native")),
    ("PyTorch chunked ms fwd / bwd / total", lambda r: _t(r, "chunked")),
    ("compiled ms fwd / bwd / total", lambda r: _t(r, "compiled")),
    ("speedup vs native / chunked / compiled",
     lambda r: report.speedups_cell(r, ("native", "chunked", "compiled"))),
    ("fused TFLOP/s (x the 3 matmuls' time)",
     lambda r: f"{r['fused_tflops']:.2f} ({r['fused_vs_matmuls']:.2f}x)"),
    ("peak MiB fused / native / chunked / compiled", lambda r: " / ".join(
        f"{r[f'peak_mem_{k}_mb']:.0f}" if f"peak_mem_{k}_mb" in r else "-" for k in IMPLS)),
    ("max abs diff vs native loss / grads", lambda r: f"{r['fused_max_loss_diff']:.1e} / "
     f"{r['fused_max_grad_diff']:.1e}"),
]


def markdown_table(rows):
    return report.columns_markdown(COLUMNS, rows)

"""The GPU benchmark of bench/gpu_check.sh: fused vs native eager vs torch.compile (default mode),
forward, backward (total minus forward) and total, on the cases of the CUDA issue; writes bench/results/<date>-<gpu>.json and a
markdown table beside it.

    python bench/gpu_bench.py --out bench/results [--tests-passed N --tests-failed M] [--repeat 20]

Timing: CUDA events around each call after warm-up, median of `repeat`. Bandwidth: bytes_min over
the fused time, as a fraction of the device copy bandwidth measured in the same run (a 1 GiB
device-to-device copy, read + write). Peak memory: the allocator's peak during one
forward+backward, minus what was allocated before it (inputs), in MiB.
"""
import argparse
import datetime
import json
import os
import statistics

import torch
import torch.nn.functional as F

import weighted_loss as wl

# name, loss, shape, dtype, extra keyword arguments
CASES = [
    ("ce-8192x32000-bf16", "ce", (8192, 32000), torch.bfloat16, {}),
    ("ce-8192x128256-bf16", "ce", (8192, 128256), torch.bfloat16, {}),
    ("ce-32768x32000-bf16", "ce", (32768, 32000), torch.bfloat16, {}),
    ("ce-8192x1000-f32", "ce", (8192, 1000), torch.float32, {}),
    ("ce-seg-16x19x512x512-bf16-ign255", "ce", (16, 19, 512, 512), torch.bfloat16,
     {"ignore_index": 255}),
    ("bce-8192x8192-bf16-posw", "bce", (8192, 8192), torch.bfloat16, {}),
]


def inputs(loss, shape, dtype, kwargs, device):
    g = torch.Generator(device=device).manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    kw = dict(kwargs)
    if loss == "bce":
        rate = torch.linspace(0.01, 0.3, C, device=device)
        y = (torch.rand(shape, generator=g, device=device) < rate).to(dtype)
        pos = y.float().sum(0)
        kw["pos_weight"] = (shape[0] - pos) / pos.clamp(min=1)
        return x, y, kw
    tshape = (shape[0], *shape[2:])
    y = torch.randint(0, C, tshape, generator=g, device=device)
    if "ignore_index" in kw:
        y[torch.rand(tshape, generator=g, device=device) < 0.1] = kw["ignore_index"]
    counts = torch.bincount(y[(y >= 0) & (y < C)], minlength=C).float() + 1
    kw["weight"] = (counts.max() / counts).to(dtype)
    return x, y, kw


def step(fn, x, y, kw):
    xr = x.detach().requires_grad_(True)
    loss = fn(xr, y, **kw)
    (grad,) = torch.autograd.grad(loss, xr)
    return loss, grad


def time_ms(f, repeat):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def peak_mb(f):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = f()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def copy_bandwidth_gbs(repeat=20):
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeat)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def run_case(name, loss, shape, dtype, kwargs, repeat, bw):
    x, y, kw = inputs(loss, shape, dtype, kwargs, "cuda")
    fused_fn, native_fn = {
        "ce": (wl.cross_entropy, F.cross_entropy),
        "bce": (wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    }[loss]
    torch._dynamo.reset()  # a fresh compile per case, far from the recompile limit
    compiled_fn = torch.compile(native_fn)
    out = {"loss": loss, "case": name, "N": shape[0], "C": shape[1], "shape": list(shape),
           "dtype": str(dtype).replace("torch.", "")}
    lf, gf = step(fused_fn, x, y, kw)
    ln, gn = step(native_fn, x, y, kw)
    out["max_loss_diff"] = (lf.float() - ln.float()).abs().max().item()
    out["max_grad_diff"] = (gf.float() - gn.float()).abs().max().item()
    del lf, gf, ln, gn
    for kind, fn in (("fused", fused_fn), ("native", native_fn), ("compiled", compiled_fn)):
        out[f"{kind}_fwd_bwd_ms"] = time_ms(lambda fn=fn: step(fn, x, y, kw), repeat)
        out[f"{kind}_fwd_ms"] = time_ms(lambda fn=fn: fn(x, y, **kw), repeat)
        # the backward alone, as total minus forward (both medians of the same run)
        out[f"{kind}_bwd_ms"] = out[f"{kind}_fwd_bwd_ms"] - out[f"{kind}_fwd_ms"]
        if kind != "compiled":
            out[f"peak_mem_{kind}_mb"] = peak_mb(lambda fn=fn: step(fn, x, y, kw))
    per = x.element_size() * x.numel()
    out["bytes_min"] = (3 if loss == "ce" else 5) * per
    out["bandwidth_fraction"] = out["bytes_min"] / (out["fused_fwd_bwd_ms"] * 1e-3) / 1e9 / bw
    out["speedup_vs_native"] = out["native_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    out["speedup_vs_compiled"] = out["compiled_fwd_bwd_ms"] / out["fused_fwd_bwd_ms"]
    return out


def markdown(res):
    lines = [
        f"# GPU check {res['date']}: {res['device']}",
        "",
        f"torch {res['torch']}, CUDA {res['cuda']}; tests passed {res['tests_passed']}, failed "
        f"{res['tests_failed']}; copy bandwidth {res['copy_bandwidth_gbs']:.0f} GB/s.",
        "",
        "Times in ms, forward + backward (forward / backward).",
        "",
        "| case | fused | native | compiled | bytes min | % of copy bw | vs native | "
        "vs compiled | peak MiB fused / native |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def t(c, kind):
        return (f"{c[kind + '_fwd_bwd_ms']:.3f} ({c[kind + '_fwd_ms']:.3f} / "
                f"{c[kind + '_bwd_ms']:.3f})")

    for c in res["cases"]:
        lines.append(
            f"| {c['case']} | {t(c, 'fused')} | {t(c, 'native')} | "
            f"{t(c, 'compiled')} | {c['bytes_min'] / 1e9:.2f} GB | "
            f"{100 * c['bandwidth_fraction']:.0f}% | {c['speedup_vs_native']:.2f}x | "
            f"{c['speedup_vs_compiled']:.2f}x | {c['peak_mem_fused_mb']:.0f} / "
            f"{c['peak_mem_native_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tests-passed", type=int, default=-1)
    ap.add_argument("--tests-failed", type=int, default=-1)
    ap.add_argument("--case", action="append", help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs()
    res = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
           "cuda": torch.version.cuda, "tests_passed": args.tests_passed,
           "tests_failed": args.tests_failed, "copy_bandwidth_gbs": bw, "cases": []}
    print(f"{name}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s", flush=True)
    for case in CASES:
        if args.case and not any(c in case[0] for c in args.case):
            continue
        r = run_case(*case, args.repeat, bw)
        res["cases"].append(r)
        print(f"{r['case']:34} fused {r['fused_fwd_bwd_ms']:8.3f} ms  native "
              f"{r['native_fwd_bwd_ms']:8.3f}  compiled {r['compiled_fwd_bwd_ms']:8.3f}  "
              f"{100 * r['bandwidth_fraction']:5.1f}% of copy bw", flush=True)
    os.makedirs(args.out, exist_ok=True)
    gpu = name.replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = os.path.join(args.out, f"{res['date']}-{gpu}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

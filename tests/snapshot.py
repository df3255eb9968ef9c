"""Bit-for-bit snapshots of the library's results, to show that a change of structure changes no
result: every output (losses, gradients, tangents, second-order gradients) of the fuzzer's seeds,
of the benchmark's quick cases and of the paths the fuzzer does not draw (process_group= /
total_weight= means, forward-mode AD, double backward, autocast, the modules, vocab-parallel on
one shard), or the exception class and message where a call raises.

    python tests/snapshot.py save FILE [--seeds N] [--device cpu|emulated]
    python tests/snapshot.py compare FILE [--seeds N] [--device ...]   exit 1 on any difference

Run `save` on the code before the change and `compare` after (same machine, same torch, same
thread count): a result that differs by one bit, or an error that changed, is printed.
"""
import argparse
import math
import os
import sys

import torch

import weighted_loss as wl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))


def _outputs(fn):
    """The tensors fn returns (any nesting), or its exception as (class name, message)."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the class and message are what is compared
        return ("raised", type(e).__name__, str(e).split("\n")[0])
    flat = []

    def walk(v):
        if isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
        elif torch.is_tensor(v):
            flat.append(v.detach().cpu().clone())
        elif v is not None:
            flat.append(v)
    walk(out)
    return flat


def _grad(loss, wrt, **kw):
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    return [loss] + list(torch.autograd.grad(loss, wrt, go.to(loss), allow_unused=True, **kw))


def _fuzz_cases(seeds, device):
    from fuzz import _call
    from fuzz_draw import draw
    from fuzz_references import _fns
    for seed in range(seeds):
        case = draw(seed, device)
        yield f"fuzz-{seed}", lambda case=case: _call(_fns(case["loss"])[0], case)[0]


def _bench_cases():
    import suite
    import suite_linear
    for name, loss, shape, dtype, kw in suite.QUICK:
        if shape[0] * shape[1] > 4 << 20:  # the 32000-class cases, at fewer rows
            shape = (256,) + tuple(shape[1:])
        x, y, kwargs = suite.make_inputs(loss, shape, dtype, kw, torch.device("cpu"))
        fn = suite.LOSSES[loss][0]
        auto = kw.get("autocast", False)

        def run(x=x, y=y, kwargs=kwargs, fn=fn, auto=auto):
            xr = x.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
                loss = fn(xr, y, **kwargs)
            return _grad(loss, [xr])
        yield f"bench-{name}", run
    for name, n, h, c, dtype in suite_linear.QUICK:
        hh, lw, y, w = suite_linear.make_inputs(n // 4, h, c // 4, dtype, torch.device("cpu"))

        def run(hh=hh, lw=lw, y=y, w=w):
            hr, lr = hh.detach().requires_grad_(), lw.detach().requires_grad_()
            return _grad(wl.linear_cross_entropy(hr, lr, y, weight=w), [hr, lr])
        yield f"bench-{name}", run


def _path_cases():
    """The paths beside the fuzzer's draws, each a few small calls."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 9, generator=g, dtype=torch.float64).float()
    y = torch.randint(0, 9, (12,), generator=g)
    y[3] = -100
    w = torch.rand(9, generator=g) + 0.5
    p = torch.softmax(torch.randn(12, 9, generator=g), 1)
    seg = torch.randn(2, 5, 3, 4, generator=g)
    ys = torch.randint(0, 5, (2, 3, 4), generator=g)
    b = torch.rand(12, 9, generator=g)
    h = torch.randn(12, 6, generator=g)
    lw = torch.randn(9, 6, generator=g)
    bias = torch.randn(9, generator=g)

    def req(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def grads(fn, *ts):
        """fn(*ts) and its gradients with respect to ts (fresh leaves)."""
        rs = req(*ts)
        return _grad(fn(*rs), rs)

    def ce(**kw):
        def run():
            (xr,) = req(x)
            return _grad(wl.cross_entropy(xr, y, **kw), [xr])
        return run

    for kw in ({}, {"weight": w}, {"weight": w, "label_smoothing": 0.2},
               {"weight": w, "reduction": "sum", "z_loss": 1e-3, "softcap": 3.0},
               {"weight": w, "total_weight": 17.5}, {"total_weight": torch.tensor(3.0)},
               {"reduction": "sum", "total_weight": 2.0}, {"z_loss": -1.0}, {"softcap": 0},
               {"reduction": "bogus"}, {"label_smoothing": 1.5}, {"ignore_index": 2},
               {"size_average": False}, {"reduce": False, "weight": w}):
        yield f"ce-{kw}", ce(**kw)

    def ce_prob(**kw):
        def run():
            xr, pr = req(x, p)
            return _grad(wl.cross_entropy(xr, pr, **kw), [xr, pr])
        return run
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}, {"total_weight": 5.0},
               {"reduction": "none", "z_loss": 0.01}, {"ignore_index": 1}):
        yield f"ce-prob-{kw}", ce_prob(**kw)

    def seg_ce(**kw):
        def run():
            (xr,) = req(seg)
            return _grad(wl.cross_entropy(xr, ys, **kw), [xr])
        return run
    for kw in ({"weight": w[:5]}, {"weight": w[:5], "reduction": "none", "ignore_index": 1},
               {"label_smoothing": 0.3, "total_weight": 4.0}):
        yield f"seg-{kw}", seg_ce(**kw)

    def focal(**kw):
        def run():
            (xr,) = req(x)
            return _grad(wl.focal_loss(xr, y, **kw), [xr])
        return run
    for kw in ({}, {"gamma": 0.0, "weight": w}, {"gamma": 0.5, "weight": w, "label_smoothing": 0.1},
               {"gamma": 3.0, "reduction": "none"}, {"gamma": -1.0}, {"label_smoothing": 1.5},
               {"reduction": "bogus"}):
        yield f"focal-{kw}", focal(**kw)
    yield "focal-prob", lambda: grads(lambda a: wl.focal_loss(a, p, weight=w), x)

    def bce(**kw):
        def run():
            xr, br = req(x, b)
            return _grad(wl.binary_cross_entropy_with_logits(xr, br, **kw), [xr, br])
        return run
    for kw in ({}, {"weight": w, "pos_weight": w}, {"reduction": "none"},
               {"total_weight": 30.0}, {"reduction": "sum", "total_weight": 3.0},
               {"reduction": "bogus"}):
        yield f"bce-{kw}", bce(**kw)
    yield "bce-f64-f32", lambda: grads(lambda a: wl.binary_cross_entropy_with_logits(
        a, b, total_weight=9.0), x.double())

    def sfocal(**kw):
        def run():
            xr, br = req(x, b)
            return _grad(wl.sigmoid_focal_loss(xr, br, **kw), [xr, br])
        return run
    for kw in ({}, {"alpha": -1, "gamma": 0.5, "reduction": "mean"},
               {"alpha": torch.rand(9, generator=g), "weight": w, "pos_weight": w,
                "reduction": "sum"}, {"alpha": 2.0}, {"gamma": -1.0}, {"reduction": "x"}):
        yield f"sfocal-{kw}", sfocal(**kw)

    def linear(**kw):
        def run():
            hr, lr, br = req(h, lw, bias)
            return _grad(wl.linear_cross_entropy(hr, lr, y, br, **kw), [hr, lr, br])
        return run
    for kw in ({}, {"weight": w, "chunk_size": 5}, {"reduction": "none", "chunk_size": 4},
               {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 2.0},
               {"total_weight": 8.0, "chunk_size": 7}, {"reduction": "sum", "total_weight": 1.0},
               {"reduction": "bad"}, {"z_loss": -2.0}, {"chunk_size": 0}):
        yield f"linear-{kw}", linear(**kw)
    yield "linear-prob", lambda: grads(lambda a, c: wl.linear_cross_entropy(
        a, c, p, label_smoothing=0.1, chunk_size=5), h, lw)

    def vp(**kw):
        def run():
            (xr,) = req(x)
            return _grad(wl.vocab_parallel_cross_entropy(xr, y, **kw), [xr])
        return run
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}, {"reduction": "none"},
               {"reduction": "x"}, {"weight": w[:3]}):
        yield f"vp-{kw}", vp(**kw)

    # forward-mode AD and torch.func
    def jvp(fn, *primals):
        tangents = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3),
                                dtype=t.dtype) for t in primals]
        return lambda: torch.func.jvp(fn, tuple(primals), tuple(tangents))
    yield "jvp-ce", jvp(lambda a: wl.cross_entropy(a, y, weight=w, label_smoothing=0.1), x)
    yield "jvp-ce-prob", jvp(lambda a, t: wl.cross_entropy(a, t, weight=w), x, p)
    yield "jvp-ce-grouped", jvp(lambda a: wl.cross_entropy(a, y, total_weight=3.0), x)
    yield "jvp-focal", jvp(lambda a: wl.focal_loss(a, y, weight=w), x)
    yield "jvp-bce", jvp(lambda a, t: wl.binary_cross_entropy_with_logits(
        a, t, pos_weight=w), x, b)
    yield "jvp-sfocal", jvp(lambda a: wl.sigmoid_focal_loss(a, b, reduction="sum"), x)
    yield "jvp-linear", jvp(lambda a: wl.linear_cross_entropy(a, lw, y, weight=w), h)
    yield "jvp-linear-grouped", jvp(lambda a: wl.linear_cross_entropy(a, lw, y,
                                                                      total_weight=4.0), h)
    yield "func-grad-ce", lambda: torch.func.grad(
        lambda a: wl.cross_entropy(a, y, weight=w, z_loss=0.1))(x)
    yield "hessian-bce", lambda: torch.func.hessian(
        lambda a: wl.binary_cross_entropy_with_logits(a, b[0], pos_weight=w))(x[0])

    # double backward
    def second(fn, *ts):
        def run():
            rs = req(*ts)
            loss = fn(*rs)
            gs = torch.autograd.grad(loss, rs, create_graph=True)
            pen = sum((g_ * g_).sum() for g_ in gs)
            return [loss] + list(gs) + list(torch.autograd.grad(pen, rs))
        return run
    yield "dd-ce", second(lambda a: wl.cross_entropy(a, y, weight=w, label_smoothing=0.1), x)
    yield "dd-ce-prob", second(lambda a, t: wl.cross_entropy(a, t, weight=w), x, p)
    yield "dd-focal", second(lambda a: wl.focal_loss(a, y, gamma=1.5), x)
    yield "dd-bce", second(lambda a, t: wl.binary_cross_entropy_with_logits(
        a, t, weight=w, pos_weight=w), x, b)
    yield "dd-sfocal", second(lambda a: wl.sigmoid_focal_loss(a, b, reduction="mean"), x)

    # autocast and the modules
    def auto(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run
    xb = x.bfloat16()
    yield "autocast-ce", auto(lambda: grads(lambda a: wl.cross_entropy(a, y, weight=w), xb))
    yield "autocast-bce", auto(lambda: grads(
        lambda a: wl.binary_cross_entropy_with_logits(a, b), xb))
    yield "autocast-linear", auto(lambda: grads(
        lambda a: wl.linear_cross_entropy(a, lw, y, weight=w), h))
    yield "module-ce", lambda: grads(
        lambda a: wl.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=0.01)(a, y), x)
    yield "module-ce-tw", lambda: grads(
        lambda a: wl.CrossEntropyLoss(weight=w)(a, y, total_weight=2.0), x)
    yield "module-bce", lambda: grads(lambda a: wl.BCEWithLogitsLoss(pos_weight=w)(a, b), x)
    yield "module-focal", lambda: grads(lambda a: wl.FocalLoss(gamma=1.0, weight=w)(a, y), x)
    yield "module-sfocal", lambda: grads(lambda a: wl.SigmoidFocalLoss(alpha=0.3)(a, b), x)
    yield "module-linear", lambda: grads(
        lambda a: wl.LinearCrossEntropyLoss(weight=w, chunk_size=5)(a, lw, y), h)
    yield "module-errors", lambda: wl.CrossEntropyLoss(softcap=-1.0)
    yield "total_weight", lambda: wl.total_weight([y, y[:5]], weight=w)


def collect(seeds, device):
    import emulation
    out = {}
    cases = list(_fuzz_cases(seeds, "cpu"))
    if device == "emulated":
        cases = list(_fuzz_cases(seeds, "emulated"))
    cases += list(_bench_cases()) + list(_path_cases())
    ctx = emulation.emulated_cuda() if device == "emulated" else _nothing()
    with ctx:
        for name, fn in cases:
            torch.manual_seed(0)
            out[name] = _outputs(fn)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _same(a, b):
    if isinstance(a, tuple) or isinstance(b, tuple):
        return a == b
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if torch.is_tensor(u) != torch.is_tensor(v):
            return False
        if not torch.is_tensor(u):
            if u != v:
                return False
            continue
        if u.dtype != v.dtype or u.shape != v.shape:
            return False
        if u.is_complex() or u.dtype == torch.bool or not u.is_floating_point():
            if not torch.equal(u, v):
                return False
            continue
        iu = u.reshape(-1).view(torch.uint8) if u.numel() else u
        iv = v.reshape(-1).view(torch.uint8) if v.numel() else v
        if not torch.equal(iu, iv):
            return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["save", "compare"])
    ap.add_argument("file")
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--device", choices=["cpu", "emulated"], default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    got = collect(a.seeds, a.device)
    if a.action == "save":
        torch.save(got, a.file)
        print(f"saved {len(got)} cases to {a.file}")
        return 0
    want = torch.load(a.file, weights_only=False)
    bad = [k for k in want if k not in got or not _same(want[k], got[k])]
    for k in bad:
        print(f"DIFFERS: {k}\n  before: {_short(want[k])}\n  after:  {_short(got.get(k))}\n"
              f"  by:     {_ulps(want[k], got.get(k))}")
    print(f"{len(want) - len(bad)} of {len(want)} cases bit for bit the same")
    return 1 if bad else 0


def _ulps(before, after):
    """How far each output moved: its largest difference in ulps of its dtype at its largest
    value ('=' where equal, '?' where not comparable)."""
    if not isinstance(before, list) or not isinstance(after, list) or len(before) != len(after):
        return "?"
    out = []
    for u, v in zip(before, after):
        if _same([u], [v]):
            out.append("=")
            continue
        if not (torch.is_tensor(u) and torch.is_tensor(v)) or u.shape != v.shape or \
                not u.is_floating_point() or u.dtype != v.dtype:
            out.append("?")
            continue
        ud, vd = u.double(), v.double()
        both = torch.isfinite(ud) & torch.isfinite(vd)
        if not torch.equal(ud.isnan(), vd.isnan()) or not torch.equal(ud[~both], vd[~both]):
            out.append("NaN/inf moved")
            continue
        scale = max(ud[both].abs().max().item(), torch.finfo(u.dtype).tiny)
        ulp = torch.finfo(u.dtype).eps * 2.0 ** math.floor(math.log2(scale))
        out.append(f"{(ud - vd).abs()[both].max().item() / ulp:.3g} ulp")
    return out


def _short(v):
    if isinstance(v, tuple):
        return v
    if v is None:
        return None
    return [tuple(t.shape) if torch.is_tensor(t) else t for t in v]


if __name__ == "__main__":
    sys.exit(main())

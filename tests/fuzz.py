"""A seeded differential fuzzer: random configurations of every loss against PyTorch (the
composites for the focal losses; F.cross_entropy of F.linear for linear_cross_entropy), on the
CPU kernels and the emulated CUDA kernels.

Each seed draws one case: the loss, a shape with 0- and 1-sized dimensions among the others, a
dtype, a layout (contiguous, transposed, channels-last, strided, padded rows, a storage offset),
targets of each kind (class indices with ignored ones, probabilities, 16-bit or float32 targets),
weights (none, of the logits' dtype or another, integer for BCE), label smoothing (0, random, 1),
z-loss and softcap off (PyTorch has neither), every reduction, NaN and +-inf logits, one case in
seven the gradient's gradient too (create_graph=True: the gradient of <gradients, v>, a
second-order result's floor at its first-order one's scale), and, one case in eight, an invalid
argument. A case passes when, against the same call to PyTorch:
  - both raise, with the same exception class (an out-of-range class index: PyTorch's IndexError
    on the CPU, a device-side assert, RuntimeError, in the CUDA kernels), or neither does;
  - the outputs (the loss and the gradient of every floating input) have PyTorch's dtypes and
    shapes, and its NaN and inf positions (save the differences the README documents);
  - each is within 2x of PyTorch's own error against float64 (on the same rounded inputs), or of
    an ulp of the output's largest value (a few for 16-bit dtypes, whose results two correct
    implementations round differently, and for the CUDA kernels' float32, whose exps are
    __expf's; float64: 2^12 ulp, PyTorch being the reference itself).

    python tests/fuzz.py --start 0 --count 300 [--device cpu|emulated] [--progress FILE]
        [--out FILE]     runs the seeds [start, start + count), prints each failure

--progress names a file that holds the seed under way, written before each case, and --out the
counts and failures so far, written after each: a crash (a segfault, an abort) leaves both
behind, and tests/test_fuzz.py, which runs this script in a subprocess, reports that seed, keeps
the results before it and carries on from the next.
"""
import argparse
import json
import os
import sys
import traceback

import torch

import weighted_loss as wl

import emulation
from fuzz_draw import EPS, describe, draw
from fuzz_references import _fns, _term_scales
from references import sfocal_reference


def _call(fn, case, cast=None, device="cpu"):
    """(outputs, exception): the loss and the gradients of every floating tensor input."""
    def prep(v):
        if not torch.is_tensor(v):
            return v
        v = v.to(cast) if cast is not None and v.is_floating_point() else v
        v = v.to(device) if v.device.type != device else v
        return v.detach().requires_grad_(v.is_floating_point() and v.dim() >= 0)
    args = [prep(case["x"])] + ([prep(case["lw"])] if case["loss"] == "linear" else []) + \
        [prep(case["target"])]
    # keyword tensors (weights) never carry a gradient
    kw = {k: (v.to(cast) if cast is not None and torch.is_tensor(v) and v.is_floating_point()
              else v) for k, v in case["kw"].items()}
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    if case["loss"] == "sfocal" and "reduction" not in case["kw"]:
        kw["reduction"] = "none"
    second = case.get("order") == 2
    try:
        out = fn(*args, **kw)
        wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        go = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        grads = torch.autograd.grad(out, wrt, go.to(out), allow_unused=True,
                                    create_graph=second)
        grads = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads, wrt)]
        res = [out.detach()] + [g.detach() for g in grads]
        if second:  # the gradient of <grads, v>: a Hessian-vector product, a gradient penalty's
            dot = sum((g * torch.linspace(-1, 1, g.numel(), dtype=torch.float64)
                       .reshape(g.shape).to(g)).sum() for g in grads if g.requires_grad)
            gg = torch.autograd.grad(dot, wrt, allow_unused=True) if torch.is_tensor(dot) \
                else [None] * len(wrt)
            res += [g if g is not None else torch.zeros_like(a) for g, a in zip(gg, wrt)]
        return [v.cpu() for v in res], None
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return None, e


def _documented(case, k, ours, theirs):
    """Gradient positions where a difference is documented (README: Where it differs): ours
    finite, the composite's NaN, where its (1 - p)^(gamma - 1) or 0 * log(0) has a finite limit
    the kernels give: the focal losses at gamma < 1 where p rounds to 1, and at +-inf logits
    (softmax: an item holding one; sigmoid: the element). And an ignored item whose log_softmax
    is NaN: a NaN gradient, as F.cross_entropy's (the focal reference masks those logits)."""
    none = torch.zeros(ours.shape, dtype=torch.bool)
    if k == 0 or case["loss"] not in ("focal", "sfocal") or ours.shape != case["x"].shape:
        return none
    x = case["x"].double()
    limit = theirs.isnan() & torch.isfinite(ours)
    if case["loss"] == "sfocal":  # the target's gradient at +-inf: +-inf, as PyTorch's BCE's
        at_inf = x.isinf() & theirs.isnan() & ~ours.isnan()
        return at_inf | (limit & (case["kw"].get("gamma", 2.0) < 1) & ~x.isnan())
    dim = 0 if x.dim() == 1 else 1
    item_inf = x.isinf().any(dim, keepdim=True) & ~x.isnan().any(dim, keepdim=True)
    skip = limit & (item_inf | (case["kw"].get("gamma", 2.0) < 1))
    t = case["target"]
    if not t.is_floating_point():
        ignored = (t == case["kw"].get("ignore_index", -100)).unsqueeze(dim)
        skip |= torch.log_softmax(x, dim).isnan() & ignored & ours.isnan()
    return skip


WORST = {"ratio": 0.0, "seed": None, "output": None}  # the largest error / bar of a run


def _check(case, ours, theirs, ref):
    """Problems (strings) of a case that ran on both sides."""
    probs = []
    scales = _term_scales(case)
    first = (len(ours) - 1) // 2 if case.get("order") == 2 else len(ours) - 1
    names = ["loss"] + [f"grad{k}" for k in range(1, first + 1)] + \
        [f"gradgrad{k}" for k in range(1, len(ours) - first)]
    if len(ours) != len(theirs):
        return [f"{len(ours)} outputs, PyTorch {len(theirs)}"]
    for k, (o, t, f) in enumerate(zip(ours, theirs, ref)):
        n = names[k]
        # the overlap losses of 16-bit logits are float32, from float32 sums (docs/api.md)
        wider = case["loss"] == "overlap" and k == 0 and o.dtype == torch.float32 and \
            t.dtype in (torch.bfloat16, torch.float16)
        if o.shape != t.shape or (o.dtype != t.dtype and not wider):
            probs.append(f"{n}: {tuple(o.shape)} {o.dtype}, PyTorch {tuple(t.shape)} {t.dtype}")
            continue
        skip = _documented(case, k, o, t)
        # where PyTorch's result is NaN or inf and the float64 one is not (a 16-bit sigmoid
        # rounded to 1 under gamma < 1; a float16 sum that overflowed), ours is held to the
        # float64 result instead
        better = (t.isnan() & ~f.isnan() & ~o.isnan()) | (
            t.isinf() & torch.isfinite(f) & (f.abs() <= torch.finfo(o.dtype).max) &
            torch.isfinite(o.double()))
        skip |= better
        # NaN or inf where the float64 result has it too and PyTorch's rounding does not (a
        # 16-bit 1 - p_t rounded to 0 where the exact one is below 0: torchvision's formula
        # takes targets outside [0, 1]): the exact answer
        skip |= (o.isnan() & f.isnan()) | (o.isinf() & f.isinf() & (o.double() == f))
        for what, mo, mt in (("NaN", o.isnan(), t.isnan()), ("inf", o.isinf(), t.isinf())):
            bad = (mo != mt) & ~skip
            if bad.any():
                probs.append(f"{n}: {what} at {int(bad.sum())} positions where PyTorch "
                             f"{'has none' if mo[bad].any() else 'has it'}")
        fin_o = torch.isfinite(f) & torch.isfinite(o.double()) & (~skip | better)
        fin_o &= f.abs() <= torch.finfo(o.dtype).max
        fin = fin_o & torch.isfinite(t.double()) & ~skip
        if not fin_o.any():
            continue
        fr = f[fin_o]
        e_o = (o.double()[fin_o] - fr).abs().max().item()
        e_t = (t.double()[fin] - f[fin]).abs().max().item() if fin.any() else 0.0
        # a 16-bit result is rounded once from float32; PyTorch's may be rounded several times
        # or once to the other side: 2 ulp of slack where both are that close; float32: 1 ulp
        # (a result of a few roundings); float64: PyTorch is the reference itself (its error is
        # 0), so a few thousand ulp (1e-12 relative). A gradient that is exactly 0 in float64
        # (one class: p - 1 = 0) is measured at the scale of its terms, grad_output times a
        # weight, about 1; so is one of one class (the reference's is rounding noise too).
        ulps = {torch.float64: 2.0 ** 12, torch.float32: 1.0}.get(o.dtype, 2.0)
        if case["device"] != "cpu" and o.dtype == torch.float32:
            # the CUDA kernels' __expf is exp2f(x log2 e) (within 2 ulp; the multiply rounds
            # the argument): 4 ulp, the README's assert_close-level bar for them until a GPU
            # run measures what exact exps would cost there
            ulps = 4.0
        mag = fr.abs().max().item()
        classes = case["lw"].shape[0] if case["loss"] == "linear" else \
            case["shape"][1 if len(case["shape"]) > 1 else 0]
        if k > 0 and (mag == 0 or classes == 1):
            mag = max(mag, 1.0)
        mag = max(mag, scales[k] if k <= first and k < len(scales) else 0.0)
        if k > first:  # a second-order gradient: its terms are at its first-order one's scale
            r1 = ref[k - first].double()
            r1 = r1[torch.isfinite(r1)]
            mag = max(mag, r1.abs().max().item() if r1.numel() else 0.0)
        floor = ulps * EPS[o.dtype] * 2 * mag
        ratio = e_o / max(e_t, floor, 1e-300)
        if ratio > WORST["ratio"]:
            WORST.update(ratio=ratio, seed=case["seed"], output=n)
        if e_o > 2 * max(e_t, floor) + 1e-300:
            probs.append(f"{n}: error {e_o:.3e}, PyTorch's {e_t:.3e} (floor {floor:.3e})")
    return probs


def run_case(case):
    """Problems (strings) of one case; empty when it passes."""
    ours_fn, torch_fn = _fns(case["loss"])
    device = case["device"]
    if device == "emulated":
        with emulation.emulated_cuda():
            ours, e_ours = _call(ours_fn, case)
    else:
        ours, e_ours = _call(ours_fn, case, device=device)
    if case["target"].dtype == torch.uint8 and case["kw"].get("ignore_index", -100) > 255:
        # PyTorch's label-smoothing term compares uint8 targets with ignore_index modulo 256
        # (class 0 taken for ignored beside 256); its nll term, and ours, compare the values
        pt_case = dict(case, target=case["target"].long())
    else:
        pt_case = case
    theirs, e_theirs = _call(torch_fn, pt_case, device=device if device != "emulated" else "cpu")
    case["raised"] = e_theirs is not None
    if e_theirs is not None or e_ours is not None:
        if e_theirs is None and case.get("invalid") == "int_logits" and \
                isinstance(e_ours, NotImplementedError) and case["x"].numel() == 0:
            return []  # PyTorch lets empty integer logits through; we never take integers
        if e_theirs is None:
            return [f"raised {type(e_ours).__name__}: {str(e_ours).splitlines()[0][:160]}; "
                    "PyTorch does not"]
        if e_ours is None:
            return _accepted(case, e_theirs, ours)
        if "expected target dtype to be Long or Byte, but got Int" in str(e_theirs) or \
                "expected scalar type" in str(e_theirs):
            # int32 class indices, a weight of another dtype (accepted, README): PyTorch's
            # error with int64 indices, and float32 logits and weight
            alt = dict(case, target=case["target"].long() if case["target"].dtype == torch.int32
                       else case["target"])
            w = case["kw"].get("weight")
            if w is not None and w.is_floating_point() and case["x"].is_floating_point() and \
                    w.dtype != case["x"].dtype:
                alt = dict(alt, x=case["x"].float(), kw=dict(case["kw"], weight=w.float()))
            _, e_theirs = _call(torch_fn, alt, device=device if device != "emulated" else "cpu")
            if e_theirs is None:
                return [f"raised {type(e_ours).__name__}: {str(e_ours).splitlines()[0][:160]}; "
                        "PyTorch does not (int64 targets, float32 logits and weight)"]
        if type(e_ours) is not type(e_theirs):
            if device == "emulated" and isinstance(e_theirs, IndexError) and \
                    "device-side assert" in str(e_ours):
                return []  # PyTorch's CUDA kernels assert too
            return [f"raised {type(e_ours).__name__} ({str(e_ours).splitlines()[0][:120]}), "
                    f"PyTorch {type(e_theirs).__name__} ({str(e_theirs).splitlines()[0][:120]})"]
        return []
    ref_fn = sfocal_reference if case["loss"] == "sfocal" else torch_fn
    ref, e_ref = _call(ref_fn, _adjusted_inputs(pt_case), cast=torch.float64)
    if e_ref is not None:
        return [f"the float64 reference raised {type(e_ref).__name__}: {e_ref}"]
    return _check(case, ours, theirs, ref)


def _adjusted_inputs(case):
    """A logit-adjusted case's float64 reference takes input + a rounded as any implementation
    in the accumulation dtype must round it (float32 for float32 logits, as the composite does)
    as its input: that rounding is neither implementation's error (one draw, seed 7152, put
    PyTorch's luck against it at 2.4x: against this reference ours was 3.4e-9, PyTorch's 3.3e-8).
    16-bit logits' sums are exact in float32, where the composite rounds them to 16 bits."""
    a, x = case["kw"].get("logit_adjustment"), case["x"]
    if a is None or case["loss"] == "linear" or x.dim() == 0 or not x.is_floating_point() or \
            x.shape[0 if x.dim() == 1 else 1] != a.shape[0]:
        return case
    # the sum rounded as the kernels form it, in the accumulation dtype (float32 beside 16-bit
    # and float32 logits: the composite's own rounding for float32; for 16-bit logits it is
    # exact where the composite rounds it to 16 bits)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc) + a.to(acc).view((a.shape[0],) + (1,) * (x.dim() - (1 if x.dim() == 1 else 2)))
    return dict(case, x=z, kw={k: v for k, v in case["kw"].items() if k != "logit_adjustment"})


def _accepted(case, e_theirs, ours):
    """PyTorch raised and we did not: fine where the README says we accept more, and then held
    to the bar against PyTorch on what it accepts: int32 class indices (against int64 ones), a
    class weight of another floating dtype than the logits' (against PyTorch on float32 logits
    and that weight, as its autocast would run it)."""
    msg = str(e_theirs)
    torch_fn = _fns(case["loss"])[1]
    dev = case["device"] if case["device"] != "emulated" else "cpu"
    # int32 indices: "expected target dtype to be Long or Byte, but got Int" (torch 2.13), or
    # "expected scalar type Long but found Int" (torch 2.11, a 0-d target); uint8 indices beside
    # spatial dims: "expected scalar type Long but found Byte" (nll_loss2d's)
    # and uint8 ones beside label smoothing and a weight: "gather(): Expected dtype int32/int64
    # for index" (PyTorch's smoothing term gathers the weight with them)
    if case["target"].dtype in (torch.int32, torch.uint8) and \
            any(m in msg for m in ("but got Int", "but found Int", "but found Byte",
                                   "gather(): Expected dtype int32/int64 for index")):
        case = dict(case, target=case["target"].long())
        theirs, e = _call(torch_fn, case, device=dev)
        ref, e_ref = _call(torch_fn, case, cast=torch.float64)
        if e is None and e_ref is None:
            return _check(case, ours, theirs, ref)
        msg = str(e)
    if "expected scalar type" in msg and case["target"].dtype == torch.uint8:
        case = dict(case, target=case["target"].long())  # (the weight's dtype next)
    if "expected scalar type" in msg and "weight" in case["kw"] and \
            case["kw"]["weight"].is_floating_point():
        out_dtype = case["x"].dtype
        up = dict(case, x=case["x"].float(), kw=dict(case["kw"], **{
            k: case["kw"][k].float() for k in ("weight", "logit_adjustment", "sample_weight")
            if k in case["kw"]}))
        theirs, e = _call(torch_fn, up, device=dev)
        ref, e_ref = _call(torch_fn, case, cast=torch.float64)
        if e is None and e_ref is None:
            theirs = [v.to(out_dtype) if v.dtype == torch.float32 else v for v in theirs]
            if case.get("order") == 2:
                # PyTorch's float32 run differentiates float32 gradients a second time, ours
                # the 16-bit ones a user gets: the loss and the gradients are compared
                n = 1 + (len(ours) - 1) // 2
                case, ours, theirs, ref = dict(case, order=1), ours[:n], theirs[:n], ref[:n]
            return _check(case, ours, theirs, ref)
    x = case["x"]
    if "size mismatch (got input: [" in msg and x.dim() > 2 and x.shape[1] == 0:
        # PyTorch's (N, 0, d...) cross-entropy fails in its reshape; as (N d, 0) rows it runs
        n = case["target"].numel()
        rows = dict(case, x=x.movedim(1, -1).reshape(n, 0), target=case["target"].reshape(n))
        theirs, e = _call(torch_fn, rows, device=dev)
        if e is None:
            shaped = [theirs[0].reshape(ours[0].shape)] + [
                g.reshape(x.shape[0], *x.shape[2:], 0).movedim(-1, 1) for g in theirs[1:]]
            return _check(case, ours, shaped, [v.double() for v in shaped])
    return [f"did not raise; PyTorch raised {type(e_theirs).__name__}: "
            f"{msg.splitlines()[0][:160]}"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--device", default="cpu", choices=["cpu", "emulated", "cuda"])
    ap.add_argument("--progress", help="file that holds the seed under way")
    ap.add_argument("--out", help="JSON of the counts and failures")
    a = ap.parse_args(argv)
    failures, counts = [], {"cases": 0, "raised": 0, "invalid": 0}
    for seed in range(a.start, a.start + a.count):
        if a.progress:
            with open(a.progress, "w") as f:
                f.write(str(seed))
        if os.environ.get("WL_FUZZ_ABORT_AT") == str(seed):
            os.abort()  # tests/test_fuzz.py's check that a crash names its seed
        case = draw(seed, a.device)
        try:
            probs = run_case(case)
        except Exception:  # noqa: BLE001 - the harness itself failed: a failure of the case
            probs = ["harness error: " + traceback.format_exc().splitlines()[-1]]
        counts["cases"] += 1
        counts["invalid"] += "invalid" in case
        counts["raised"] += bool(case.get("raised"))
        if probs:
            failures.append({"seed": seed, "case": describe(case), "problems": probs})
            print(describe(case), "\n   ", "\n    ".join(probs), flush=True)
        if a.out:  # after every case: a crash in the next one keeps these
            with open(a.out, "w") as f:
                json.dump({"counts": counts, "failures": failures, "worst": WORST}, f)
    if a.progress:
        with open(a.progress, "w") as f:
            f.write("done")
    print(f"{counts['cases']} cases ({counts['invalid']} with an invalid argument, "
          f"{counts['raised']} raising in PyTorch) on {a.device}: {len(failures)} failed; the "
          f"largest error, {WORST['ratio']:.2f}x the larger of PyTorch's error and the floor "
          f"(seed {WORST['seed']}, {WORST['output']})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Drawing the differential fuzzer's cases (tests/fuzz.py): one per seed, every loss, a shape
with 0- and 1-sized dimensions among the others, a dtype, a layout, targets (uint8 class indices
beside an ignore_index of 256 or 2^40, BCE targets outside [0, 1]), weights (all zero at times),
smoothing (strong, over a few rows of 4,097 classes), a reduction, NaN and +-inf logits, one case
in seven the gradient's gradient too, and one case in eight an invalid argument; a logit
adjustment and per-item sample weights for the cross-entropy losses (a quarter of the cases
each), and BCE of probabilities (F.binary_cross_entropy: 0 and 1 among them, now and then one
outside [0, 1]); the overlap losses (Dice, Tversky, generalized Dice, with the cross-entropy or
focal term or without) over (N, C, d...) logits, class indices or probabilities."""
import random

import torch

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9,
       torch.float16: 2.0 ** -11}
LOSSES = ["ce", "ce", "ce-prob", "bce", "bce", "focal", "sfocal", "linear", "bce-prob",
          "overlap"]


# ------------------------------------------------------------------------------ drawing a case

def _shape(r, loss):
    """(N, C, d...) with 0s and 1s among the sizes; (C,) sometimes for cross-entropy."""
    def size(lo=0, hi=9):
        u = r.random()
        return 0 if u < 0.06 else 1 if u < 0.2 else r.randint(max(lo, 2), hi)
    if loss == "linear":
        return (size(1, 40), r.choice([1, 3, 7, 64, 301]))
    if loss == "overlap":  # (N, C, d1, ..., dk), k >= 1
        return (size(1, 5), r.choice([1, 2, 3, 5, 14]),
                *[size(1, 9) for _ in range(r.choice([1, 1, 2, 3]))])
    if loss in ("ce", "ce-prob", "focal") and r.random() < 0.1:
        return (size(),)
    C = r.choice([size(), 1, 5, 19, 64, 65, 300, 1000, 4097])
    spatial = [size(1, 7) for _ in range(r.choice([0, 0, 1, 2]))]
    N = size(1, 12 if spatial else 40)
    if C >= 1000:
        N = min(N, 4)
        spatial = []
    return (N, C, *spatial)


def _layout(r, x):
    """The logits as the user may hold them: contiguous, or another layout of the same values."""
    kind = r.choice(["contig"] * 4 + ["transposed", "channels_last", "strided", "padded",
                                      "offset"])
    if kind == "transposed" and x.dim() == 2:
        return kind, x.t().contiguous().t()
    if kind == "channels_last" and x.dim() == 4:
        return kind, x.contiguous(memory_format=torch.channels_last)
    if kind == "strided" and x.dim() >= 1:
        buf = torch.zeros(*x.shape, 2, dtype=x.dtype)
        buf[..., 0] = x
        return kind, buf[..., 0]
    if kind == "padded" and x.dim() == 2:
        buf = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype)
        buf[:, :x.shape[1]] = x
        return kind, buf[:, :x.shape[1]]
    if kind == "offset":
        buf = torch.zeros(x.numel() + 1, dtype=x.dtype)
        out = buf[1:].view(x.shape)
        out.copy_(x)
        return kind, out
    return "contig", x


def _logits(r, g, shape, dtype):
    scale = r.choice([0.5, 3.0, 3.0, 30.0])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if x.numel() and r.random() < 0.15:  # non-finite logits
        flat = x.view(-1)
        for _ in range(r.randint(1, 3)):
            flat[r.randrange(flat.numel())] = r.choice([float("nan"), float("inf"),
                                                        float("-inf")])
    return x.to(dtype)


def draw(seed, device="cpu"):
    """The case of a seed: a dict of what to call and with what (tensors on the CPU)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    loss = r.choice(LOSSES)
    dtype = r.choice(DTYPES)
    shape = _shape(r, loss)
    case = {"seed": seed, "loss": loss, "dtype": dtype, "shape": shape, "kw": {},
            "device": device}
    kw = case["kw"]
    kw["reduction"] = r.choice(["none", "mean", "sum"])
    if loss == "linear":
        H = shape[1]
        C = r.choice([1, 5, 33, 300])
        case["x"] = (torch.randn(shape[0], H, generator=g, dtype=torch.float64)).to(dtype)
        case["lw"] = (torch.randn(C, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
        case["target"] = torch.randint(0, C, (shape[0],), generator=g)
        if shape[0] and r.random() < 0.3:
            case["target"][torch.rand(shape[0], generator=g) < 0.3] = -100
        if r.random() < 0.5:
            kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.1).to(dtype)
        if r.random() < 0.4:
            kw["label_smoothing"] = r.choice([0.1, 0.5, 1.0])
        kw["chunk_size"] = r.choice([None, 1, 3, 16])
        case["layout"] = "contig"
        _reweight(r, g, case, C, (shape[0],))
        _maybe_invalid(r, case)
        return case
    C = shape[0] if len(shape) == 1 else shape[1]
    x = _logits(r, g, shape, dtype)
    case["layout"], case["x"] = _layout(r, x)
    if loss == "overlap":
        _overlap(r, g, case, C)
        return case
    if loss == "bce-prob":  # probabilities: exact 0 and 1 among them (saturated sigmoids)
        p = torch.sigmoid(x.double().nan_to_num(0.5, 40, -40))
        if p.numel() and r.random() < 0.05:
            p.view(-1)[r.randrange(p.numel())] = r.choice([1.5, -0.25, float("nan")])
        case["layout"], case["x"] = _layout(r, p.to(dtype))
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        case["target"] = (t.round() if r.random() < 0.6 else t).to(dtype)
        if r.random() < 0.4:
            wshape = r.choice([shape[-1:] if shape else (), (1,) * len(shape), shape])
            kw["weight"] = (torch.rand(wshape, generator=g, dtype=torch.float64) * 4 + 0.1).to(
                r.choice([dtype, torch.float32]))
        _maybe_invalid(r, case)
        return case
    if loss in ("bce", "sfocal"):
        tdt = r.choice([dtype, dtype, torch.float32])
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        if r.random() < 0.6:
            t = t.round()
        if r.random() < 0.1:  # outside [0, 1]: PyTorch's formula (and torchvision's) takes them
            t = t * 3 - 1
        case["target"] = t.to(tdt)
        if loss == "bce":
            for name in ("weight", "pos_weight"):
                if r.random() < 0.4:
                    wshape = r.choice([shape[-1:] if shape else (), (1,) * len(shape), shape])
                    wd = r.choice([dtype, dtype, torch.float32, torch.int64])
                    w = torch.rand(wshape, generator=g, dtype=torch.float64) * 4 + 0.1
                    kw[name] = (w * 3).round().to(wd) if wd == torch.int64 else w.to(wd)
        else:
            kw["alpha"] = r.choice([0.25, -1, 0.9923888, 0.5])
            kw["gamma"] = r.choice([0.0, 0.5, 2.0, 3.0])
    else:
        prob = loss == "ce-prob" or (loss == "focal" and r.random() < 0.3)
        wide = prob and r.random() < 0.15  # a few rows of 4,097 classes, strongly smoothed
        if wide:
            shape = case["shape"] = (r.choice([1, 2]), 4097)
            C = 4097
            case["layout"], case["x"] = "contig", _logits(r, g, shape, dtype)
            kw["label_smoothing"] = r.choice([0.96, 0.5, 1.0])
        if prob:
            t = torch.rand(shape, generator=g, dtype=torch.float64)
            if C:
                t = t / t.sum(0 if len(shape) == 1 else 1, keepdim=True)
            case["target"] = t.to(r.choice([dtype, dtype, torch.float32]))
        else:
            tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
            t = torch.randint(0, max(C, 1), tshape, generator=g)
            tdt = r.choice([torch.int64, torch.int64, torch.int32] +
                           [torch.uint8] * (0 < C <= 256))
            # uint8 targets: an ignore_index of 256 or 2^40 matches no class (0 modulo 256)
            ignore = r.choice([-100, -100, 255, 0, 1] if tdt != torch.uint8 else
                              [255, 0, 1, 256, 2 ** 40])
            if t.numel() and (r.random() < 0.4 or C == 0) and ignore < 256:
                t[torch.rand(tshape, generator=g) < (1.0 if C == 0 else 0.3)] = ignore
            if ignore != -100:
                kw["ignore_index"] = ignore
            case["target"] = t.to(tdt)
        if r.random() < (0.7 if len(shape) == 1 else 0.5):
            wd = r.choice([dtype, dtype, dtype, torch.float32])
            w = torch.rand(C, generator=g, dtype=torch.float64) * 3 + 0.1
            if r.random() < (0.3 if len(shape) == 1 else 0.05):
                w.zero_()  # all-zero weights (an unbatched ignored item: 0 / 0)
            kw["weight"] = w.to(wd)
        if not wide and r.random() < 0.5:
            kw["label_smoothing"] = r.choice([0.05, 0.3, 1.0])
        if loss == "focal":
            kw["gamma"] = r.choice([0.5, 1.0, 2.0])
        items = tuple(shape[:1]) + tuple(shape[2:]) if len(shape) > 1 else ()
        _reweight(r, g, case, C, items)
    if r.random() < 0.15:  # the gradient's gradient too (create_graph=True)
        case["order"] = 2
    _near_maximum(seed, case)
    _maybe_invalid(r, case)
    return case


def _near_maximum(seed, case):
    """Now and then, smoothed logits whose spread reaches the dtype's maximum (the smoothing sum
    overflowed there where the loss is finite), drawn from a stream of their own so that every
    other draw stays the seed's. Not beside a logit adjustment, whose sum with them overflows."""
    big = random.Random(seed * 7919 + 17)
    kw, x = case["kw"], case["x"]
    if big.random() >= 0.1 or not kw.get("label_smoothing") or "logit_adjustment" in kw or \
            not x.numel():
        return
    finite = x[torch.isfinite(x)]
    top = finite.abs().max().item() if finite.numel() else 0.0
    if top > 0:
        x.mul_(torch.finfo(x.dtype).max * big.choice([0.5, 0.3]) / top)


def _overlap(r, g, case, C):
    """An overlap loss's target and options (tests/references.py: overlap_reference's names)."""
    kw, shape, dtype = case["kw"], case["shape"], case["dtype"]
    kind = kw["kind"] = r.choice(["dice", "dice", "tversky", "generalized"])
    if r.random() < 0.35:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, 1)
        case["target"] = t.to(r.choice([dtype, torch.float32]))
    else:
        tshape = (shape[0], *shape[2:])
        t = torch.randint(0, C, tshape, generator=g)
        if t.numel() and r.random() < 0.4:
            kw["ignore_index"] = r.choice([-100, 0, C - 1])
            t[torch.rand(tshape, generator=g) < 0.3] = kw["ignore_index"]
        case["target"] = t
    if r.random() < 0.5:
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) * 3 + 0.1).to(
            r.choice([dtype, torch.float32]))
    kw["include_background"] = r.random() < 0.7
    kw["batch"] = r.random() < 0.4
    if kind == "dice":
        kw["squared_pred"] = r.random() < 0.3
        kw["jaccard"] = r.random() < 0.3
    elif kind == "tversky":
        kw["alpha"], kw["beta"] = r.choice([(0.3, 0.7), (0.5, 0.5), (0.9, 0.1)])
        kw["focal_exponent"] = r.choice([1.0, 1.0, 0.75, 2.0])
    else:
        kw["w_type"] = r.choice(["square", "simple", "uniform"])
    if r.random() < 0.6:
        kw["lambda_ce"] = r.choice([1.0, 0.5])
        if r.random() < 0.4:
            kw["label_smoothing"] = r.choice([0.05, 0.3])
        if r.random() < 0.3:
            kw["gamma"] = r.choice([1.0, 2.0])
    if kw["reduction"] == "none" and "lambda_ce" in kw:
        kw["reduction"] = "mean"  # the sum of two terms has no per-item form
    if r.random() < 0.15:
        case["order"] = 2


def _reweight(r, g, case, C, items):
    """A logit adjustment (C,) and sample weights of the items' shape (or one that broadcasts to
    it), a quarter of the cases each, in the logits' dtype."""
    kw, dtype = case["kw"], case["dtype"]
    if r.random() < 0.25:
        kw["logit_adjustment"] = (torch.randn(C, generator=g, dtype=torch.float64) *
                                  r.choice([1.0, 3.0])).to(dtype)
    if r.random() < 0.25:
        vshape = items if not items or r.random() < 0.7 else items[:1] + (1,) * (len(items) - 1)
        v = torch.rand(vshape, generator=g, dtype=torch.float64) * 2
        if v.numel() and r.random() < 0.2:
            v.view(-1)[0] = 0.0
        kw["sample_weight"] = v.to(dtype)


def _maybe_invalid(r, case):
    """One case in eight gets an argument PyTorch rejects."""
    if r.random() >= 0.125 or case["loss"] in ("focal", "sfocal"):
        return
    kw, t = case["kw"], case["target"]
    what = r.choice(["reduction", "smoothing", "target_range", "target_shape", "weight_len",
                     "int_logits", "float_index"])
    if what == "reduction":
        kw["reduction"] = "avg"
    elif what == "smoothing" and case["loss"] != "bce":
        kw["label_smoothing"] = 1.5
    elif what == "target_range" and not t.is_floating_point() and t.numel() and \
            t.dtype != torch.uint8:
        t.view(-1)[0] = 10 ** 4
    elif what == "target_shape" and t.dim() >= 1 and t.shape[0] > 0:
        case["target"] = t[:-1]
    elif what == "weight_len" and "weight" in kw and kw["weight"].dim() == 1 and \
            kw["weight"].numel() > 1:
        kw["weight"] = kw["weight"][:-1]
    elif what == "int_logits" and case["loss"] != "linear":
        case["x"] = case["x"].nan_to_num(0, 0, 0).round().long()
    elif what == "float_index" and case["loss"] in ("ce", "linear") and \
            not t.is_floating_point() and t.numel() and t.dim() != case["x"].dim():
        case["target"] = t.double().to(torch.float32)
    case["invalid"] = what


def describe(case):
    kw = {k: (f"{tuple(v.shape)} {str(v.dtype)[6:]}" if torch.is_tensor(v) else v)
          for k, v in case["kw"].items()}
    t = case["target"]
    return (f"seed {case['seed']}: {case['loss']} {tuple(case['shape'])} "
            f"{str(case['dtype'])[6:]} {case['layout']} target {tuple(t.shape)} "
            f"{str(t.dtype)[6:]} {kw}{' invalid=' + case['invalid'] if 'invalid' in case else ''}"
            f"{' double backward' if case.get('order') == 2 else ''}"
            f" on {case['device']}")

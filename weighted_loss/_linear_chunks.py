"""Linear + cross-entropy over row chunks on one device: what weighted_loss/linear.py's entry
point computes once it has checked the arguments and planned the dtypes and the chunk.

Each chunk's logits come from one matmul; the fused cross-entropy kernels take the chunk's loss
and, the loss being the last node of the graph, its logits' gradient right away (for a reduced
loss: the upstream gradient is a scalar, applied later); matmuls turn that into the chunk's share
of the gradients of ``input``, ``linear_weight`` and ``bias``, and the chunk's logits are dropped.
Peak extra memory is a chunk of logits and its gradient, plus the gradients themselves; the
backward only scales those by the upstream gradient (divided by the mean's divisor). With
``reduction="none"`` the upstream gradient is per row and unknown in the forward: the forward
keeps each row's log-sum-exp, and the backward computes every chunk's logits once more. The
inputs are kept (not copied) for a second derivative, formed again through the composite.
"""
import torch
from torch import Tensor

from . import _composite, _forward_ad, _named, _reweight
from . import distributed as _dist
from ._options import CrossEntropyOptions

_ops = torch.ops.weighted_loss
_OP = "linear_cross_entropy"
# bytes of one chunk's logits when chunk_size is not given: large enough for the matmuls to run
# at full speed, small against the N x C logits of a language model (the chunk's gradient is
# written over its logits)
_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
# and at most a quarter of the rows, where that leaves at least _MIN_CHUNK_ROWS: a small batch
# holds a quarter of its logits, not all of them (each chunk adds the weight's gradient once)
_MIN_CHUNK_ROWS = 256


def chunk_rows(n: int, classes: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, 256 << 20)
    per_row = max(1, classes) * torch.empty((), dtype=dtype).element_size()
    quarter = max(_MIN_CHUNK_ROWS, -(-n // 4))
    return max(1, min(n, budget // per_row, quarter))


def _grad_buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """A zeroed accumulator for a gradient summed over chunks: float32 for bfloat16/float16."""
    acc = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return torch.zeros(shape, dtype=acc, device=device)


def _add_weight_grad(gw: Tensor, g: Tensor, xc: Tensor) -> None:
    """gw += g^T xc. A float32 sum of bfloat16/float16 products goes by blocks of gw's rows (16 MiB
    of float32 each): one product of all of them, and the float32 copy the mixed-dtype sum makes
    of it, would hold 1.5 x gw more."""
    if gw.dtype == g.dtype:
        gw.addmm_(g.t(), xc)
        return
    step = max(1, (16 << 20) // (4 * max(1, xc.shape[1])))
    for c in range(0, gw.shape[0], step):
        gw[c:c + step] += torch.mm(g[:, c:c + step].t(), xc)


def _add_chunk_grads(g: Tensor, xc: Tensor, lw: Tensor, gx, gw, gb) -> None:
    """A chunk's share of the gradients from its logits' gradient g: gx (the chunk's rows of the
    input's gradient) = g lw, gw += g^T xc, gb += the column sums of g; None: not wanted."""
    if gx is not None:
        torch.mm(g, lw, out=gx)
    if gw is not None:
        _add_weight_grad(gw, g, xc)
    if gb is not None:
        gb += g.sum(0, dtype=gb.dtype)


class Plan:
    """What one call computes in: the matmuls in `compute` (autocast's dtype under autocast, else
    the input's), each chunk's logits handed to the kernels in `logits` (compute, or the dtype
    probability targets promote it to: 16-bit logits beside float32 targets stay 16-bit), the
    per-chunk losses in `acc` (float32 for 16-bit logits: a chunk's sum is not rounded to 16 bits)
    and the loss returned in `out`."""

    def __init__(self, compute, logits, out, chunk, grads, grouped=False):
        self.compute, self.logits, self.out, self.chunk, self.grads = \
            compute, logits, out, chunk, grads
        self.adjust = None  # the logit adjustment in the logits' dtype, added to each chunk's
        # a sum for the group's mean (process_group= / total_weight=): returned in float64, so
        # that it is rounded once, after the division
        self.grouped = grouped
        # the call's loss through the composite, of (input, linear_weight, bias, adjustment): what
        # a second derivative differentiates (set by linear_cross_entropy)
        self.composite = None
        self.acc = torch.float32 if logits in (torch.bfloat16, torch.float16) else logits

    def with_out(self, out):
        """The same plan returning ``out`` (per-row losses in acc for sample weights)."""
        plan = Plan(self.compute, self.logits, out, self.chunk, self.grads, self.grouped)
        plan.adjust = self.adjust
        return plan

    def cast(self, x, lw, bias):
        return (x.to(self.compute), lw.to(self.compute),
                None if bias is None else bias.to(self.compute))

    def chunk_logits(self, xc, lw, bias):
        logits = torch.nn.functional.linear(xc, lw, bias)
        logits = logits if logits.dtype == self.logits else logits.to(self.logits)
        return logits if self.adjust is None else logits.add_(self.adjust)

    def chunk_grad(self, g):
        return g if g.dtype == self.compute else g.to(self.compute)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, bias, logit_adjustment, sample_weight, target, weight,
                options, plan):
        """The loss, and the mean's local divisor (sum of weight[target] over the rows kept, or the
        number of rows for probabilities; not differentiable). ``options``: the cross-entropy
        ops' arguments by name (CrossEntropyOptions.op_kwargs), the reduction the loss's."""
        # the plan's dtypes stand for autocast's: none of this runs under it (autocast would
        # recast, and refuses mm's out=)
        with torch.autocast(input.device.type, enabled=False):
            loss, divisor = _forward(ctx, input, linear_weight, bias, logit_adjustment,
                                     sample_weight, target, weight, options, plan)
        ctx.mark_non_differentiable(divisor)
        return loss, divisor

    @staticmethod
    def backward(ctx, grad_loss, _grad_divisor):
        if torch.is_grad_enabled():
            return _second_order(ctx, grad_loss)
        if ctx.reduction == "none":
            with torch.autocast(grad_loss.device.type, enabled=False):
                return _backward_rows(ctx, grad_loss)
        s = _named.saved(ctx)
        scale = grad_loss.double()
        if ctx.reduction == "mean":
            # every target ignored (or an empty batch): the loss is NaN (0 / 0) and the
            # gradients 0, as PyTorch's; with sample weights also where the kept rows all weigh
            # 0 (the composite's gradient is NaN there: docs/semantics.md)
            scale = torch.where(s.divisor == 0, torch.zeros_like(scale), scale / s.divisor)
        grads = {}
        for name, dtype in ctx.dtypes.items():
            g = s[name]
            if g is None:
                continue
            out = torch.empty(g.shape, dtype=dtype, device=g.device)  # one rounding, no temp
            try:
                grads[name] = torch.mul(g, scale.to(g.dtype), out=out)
            except RuntimeError as e:  # a vmap batch (batched gradients): no out= there
                if "Batching rule not implemented" not in str(e):
                    raise
                grads[name] = (g * scale.to(g.dtype)).to(dtype)
        return _ARGS.grads(**grads)


_ARGS = _named.Signature.of_forward(_LinearCrossEntropy)
_DIFFERENTIABLE = ("input", "linear_weight", "bias", "logit_adjustment")


def _second_order(ctx, grad_loss):
    """A backward with create_graph=True: the gradients formed in the forward hold no graph, so
    the loss is formed again through the composite (its logits held, as F.linear's would be) from
    the inputs the forward kept, and differentiated with its graph."""
    s = _named.saved(ctx)
    held = {n: s[f"held_{n}"] for n in _DIFFERENTIABLE}
    wrt = [n for n in _DIFFERENTIABLE if held[n] is not None and _ARGS.needs(ctx, n)]
    if not wrt:
        return _ARGS.grads()
    with torch.enable_grad():
        loss = ctx.plan.composite(*held.values())
        grads = torch.autograd.grad(loss, [held[n] for n in wrt], grad_loss.to(loss.dtype),
                                    create_graph=True, allow_unused=True)
    return _ARGS.grads(**{n: g for n, g in zip(wrt, grads) if g is not None})



def _needs(ctx, x, lw, bias, adjust):
    """Which gradients autograd asks for: (input, linear_weight, bias, logit_adjustment)."""
    return (_ARGS.needs(ctx, "input"), _ARGS.needs(ctx, "linear_weight"),
            bias is not None and _ARGS.needs(ctx, "bias"),
            adjust is not None and _ARGS.needs(ctx, "logit_adjustment"))


def _forward(ctx, x, lw, bias, adjust, v, target, weight, options, plan):
    n, prob = x.shape[0], target.is_floating_point()
    need_x, need_w, need_b, need_a = _needs(ctx, x, lw, bias, adjust)
    reduction = options["reduction"]
    red_none = reduction == "none"
    # under no_grad / inference_mode (an eval loop) the forward only: no gradient work
    grads_now = plan.grads and (need_x or need_w or need_b or need_a) and not red_none
    xq, lwq, bq = plan.cast(x, lw, bias)
    dev = x.device
    gx = torch.empty(x.shape, dtype=plan.compute, device=dev) if grads_now and need_x else None
    gw = _grad_buffer(lw.shape, plan.compute, dev) if grads_now and need_w else None
    gb = _grad_buffer(bias.shape, plan.compute, dev) if grads_now and need_b else None
    # the adjustment's gradient: the column sums of the logits' (in their dtype, not compute's)
    ga = _grad_buffer(adjust.shape, plan.logits, dev) if grads_now and need_a else None
    one = torch.ones((), dtype=plan.acc, device=dev)
    # with sample weights v, each chunk's rows (in acc) weighted here, and its gradient with v as
    # the rows' upstream gradient
    rows_v = v is not None and not red_none
    kw = dict(options, reduction="none" if red_none or rows_v else "sum")
    if prob:
        kw.pop("ignore_index", None)
    # per-row losses in the returned dtype; sums in acc
    out_dtype = plan.out if red_none else plan.acc
    rows_loss, lse_parts, tsum_parts = [], [], []
    total = torch.zeros((), dtype=torch.float64, device=dev)
    divisor = torch.zeros((), dtype=torch.float64, device=dev)
    for a in range(0, n, plan.chunk):
        xc, tc = xq[a:a + plan.chunk], target[a:a + plan.chunk]
        logits = plan.chunk_logits(xc, lwq, bq)
        if prob:
            loss, lse, tsum = _ops.cross_entropy_prob_forward(logits, tc, weight, **kw,
                                                              out_dtype=out_dtype)
            if not rows_v:
                divisor += tc.shape[0]
        else:
            loss, lse, tw = _ops.cross_entropy_forward(logits, tc, weight, **kw,
                                                       out_dtype=out_dtype)
        gl = one
        if rows_v:
            vc = v[a:a + plan.chunk]
            loss = (loss.double() * vc.double()).sum()
            part = _reweight.divisor(vc, tc, weight, options["ignore_index"], prob)
            if prob:
                divisor += part
            else:
                tw = part
            gl = vc.to(plan.acc).contiguous()
        if red_none:
            rows_loss.append(loss)
            lse_parts.append(lse)
            if prob:
                tsum_parts.append(tsum)
            continue
        total += loss.double()
        if not prob:
            divisor += tw.double()
        if grads_now:
            if prob:
                g = _ops.cross_entropy_prob_backward(gl, logits, tc, weight, lse, tsum, **kw)
            else:  # over the logits: a chunk holds one N x C buffer, not two
                _ops.cross_entropy_backward_(gl, logits, tc, weight, lse, tw.to(lse.dtype), **kw)
                g = logits
            del logits
            if ga is not None:
                ga += g.sum(0, dtype=ga.dtype)
            g = plan.chunk_grad(g)
            _add_chunk_grads(g, xc, lwq, None if gx is None else gx[a:a + plan.chunk], gw, gb)
            del g  # before the next chunk's logits: one chunk buffer at a time
    ctx.reduction, ctx.prob, ctx.plan, ctx.weighted = reduction, prob, plan, rows_v
    if red_none:
        ctx.options = kw
        acc = torch.float64 if plan.logits == torch.float64 else torch.float32
        lse_all = torch.cat(lse_parts, 1) if lse_parts else torch.empty((2, 0), dtype=acc,
                                                                         device=dev)
        tsum_all = torch.cat(tsum_parts) if tsum_parts else torch.empty((0,), dtype=acc,
                                                                        device=dev)
        _named.save(ctx, input=x, linear_weight=lw, bias=bias, target=target, weight=weight,
                    lse=lse_all, tsum=tsum_all, logit_adjustment=adjust, **_held(x, lw, bias,
                                                                                  adjust))
        rows = torch.cat(rows_loss) if rows_loss else x.new_empty((0,), dtype=plan.out)
        return rows, divisor
    # the gradients, named as the arguments they belong to, and their dtypes
    _named.save(ctx, input=gx, linear_weight=gw, bias=gb, logit_adjustment=ga, divisor=divisor,
                **_held(x, lw, bias, adjust))
    ctx.dtypes = {"input": x.dtype, "linear_weight": lw.dtype}
    if bias is not None:
        ctx.dtypes["bias"] = bias.dtype
    if adjust is not None:
        ctx.dtypes["logit_adjustment"] = adjust.dtype
    out = total / divisor if reduction == "mean" else total
    return (out if plan.grouped else out.to(plan.out)), divisor.clone()


def _held(x, lw, bias, adjust) -> dict:
    """The inputs a second derivative forms the loss again from (_second_order). They are the
    caller's tensors, held as F.linear holds its input: nothing is copied."""
    return dict(zip((f"held_{n}" for n in _DIFFERENTIABLE), (x, lw, bias, adjust)))


def _backward_rows(ctx, grad_rows):
    """reduction="none": the upstream gradient per row, each chunk's logits once more."""
    s = _named.saved(ctx)
    x, lw, bias, target, weight, lse, tsum, adjust = (
        s.input, s.linear_weight, s.bias, s.target, s.weight, s.lse, s.tsum, s.logit_adjustment)
    plan = ctx.plan
    need_x, need_w, need_b, need_a = _needs(ctx, x, lw, bias, adjust)
    ga = _grad_buffer(adjust.shape, plan.logits, x.device) if need_a else None
    xq, lwq, bq = plan.cast(x, lw, bias)
    gx = torch.empty(x.shape, dtype=plan.compute, device=x.device) if need_x else None
    gw = _grad_buffer(lw.shape, plan.compute, x.device) if need_w else None
    gb = _grad_buffer(bias.shape, plan.compute, x.device) if need_b else None
    kw = ctx.options  # (reduction "none")
    grad_rows = grad_rows.to(plan.out).contiguous()  # the loss's dtype, as the kernels read it
    for a in range(0, x.shape[0], plan.chunk):
        xc, tc = xq[a:a + plan.chunk], target[a:a + plan.chunk]
        logits = plan.chunk_logits(xc, lwq, bq)
        lc = lse[:, a:a + plan.chunk].contiguous()
        if ctx.prob:
            g = _ops.cross_entropy_prob_backward(grad_rows[a:a + plan.chunk], logits, tc, weight,
                                                 lc, tsum[a:a + plan.chunk].contiguous(), **kw)
        else:
            _ops.cross_entropy_backward_(grad_rows[a:a + plan.chunk], logits, tc, weight, lc,
                                         torch.ones((), dtype=lse.dtype, device=x.device), **kw)
            g = logits
        del logits
        if ga is not None:
            ga += g.sum(0, dtype=ga.dtype)
        g = plan.chunk_grad(g)
        _add_chunk_grads(g, xc, lwq, None if gx is None else gx[a:a + plan.chunk], gw, gb)
        del g
    return _ARGS.grads(input=None if gx is None else gx.to(x.dtype),
                       linear_weight=None if gw is None else gw.to(lw.dtype),
                       bias=None if gb is None else gb.to(bias.dtype),
                       logit_adjustment=None if ga is None else ga.to(adjust.dtype))


def _composite_loss(x, lw, bias, t, o: CrossEntropyOptions, plan, mean, adjust, v):
    """Forward-mode AD or a torch.func transform: the logits, held, through the composite loss
    (differentiable to any order); a custom jvp would not trace under torch.compile."""
    prob = t.is_floating_point()
    red = "none" if v is not None else None
    rows_dtype = plan.acc if v is not None else plan.out
    with torch.autocast(x.device.type, enabled=False):
        lg = torch.nn.functional.linear(x.to(plan.compute), lw.to(plan.compute),
                                        None if bias is None else bias.to(plan.compute))
        lg = lg.to(plan.logits)
        if adjust is not None:
            lg = lg + adjust
        composite = _composite.cross_entropy_prob if prob else _composite.cross_entropy
        loss = composite(lg, t, o.weight, **o.op_kwargs(prob, red), out_dtype=rows_dtype)
    if v is not None:
        divisor = _reweight.divisor(v, t, o.weight, o.ignore_index, prob)
        return _reweight.reduce(loss, v, divisor, o.reduction, plan.out, mean)
    if mean is None:
        return loss
    local = (torch.tensor(float(t.shape[0]), dtype=torch.float64, device=x.device) if prob
             else _dist._local_weight(t, o.weight, o.ignore_index))
    return mean(loss, local)


def linear_cross_entropy(x: Tensor, lw: Tensor, bias, t: Tensor, o: CrossEntropyOptions, mean,
                         plan) -> Tensor:
    """The loss of ``F.cross_entropy(F.linear(x, lw, bias), t, ...)`` for 2-D ``x`` and the
    options ``o`` (``o.reduction`` "sum" where ``mean``, the process-group layer's hook, is
    given), planned by ``plan``; per-row losses flat for reduction "none"."""
    adjust, v = plan.adjust, o.sample_weight  # (v: flat, the ignored items' 0)
    if _forward_ad.active():
        return _composite_loss(x, lw, bias, t, o, plan, mean, adjust, v)
    if v is not None and (o.reduction == "none" or (v.requires_grad and torch.is_grad_enabled())):
        # the items' losses weighted around the op, v's gradient the product's
        rows = linear_cross_entropy(x, lw, bias, t, o.but(sample_weight=None, reduction="none"),
                                    None, plan.with_out(plan.acc))
        divisor = _reweight.divisor(v, t, o.weight, o.ignore_index, t.is_floating_point())
        return _reweight.reduce(rows, v, divisor, o.reduction, plan.out, mean)
    # what a second derivative differentiates: the Function's loss through the composite
    plan.composite = lambda x_, lw_, bias_, adjust_: _composite_loss(x_, lw_, bias_, t, o, plan,
                                                                     None, adjust_, v)
    loss, divisor = _LinearCrossEntropy.apply(x, lw, bias, adjust, v, t, o.weight,
                                              o.op_kwargs(prob=False), plan)
    return loss if mean is None else mean(loss, divisor).to(plan.out)

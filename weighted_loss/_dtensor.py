"""DTensor arguments (torch.distributed.tensor, tensor parallelism): the input's placement read,
the fused op run on each rank's piece, the result handed back as a DTensor.

- Classes sharded (``Shard(1)``, ``Shard(0)`` of ``(C,)`` logits; a ``ColwiseParallel`` LM head's
  output): the vocab-parallel kernels over the mesh's group (weighted_loss/vocab_parallel.py),
  as ``torch.distributed.tensor.parallel.loss_parallel()`` does for PyTorch's loss, with class
  weights, ignore_index and label smoothing. The loss is replicated.
- Replicated: the op on the local tensor (the same on every rank); a replicated result.
- Sharded on another dim (the batch, a spatial dim): the op on the local rows and the exact mean
  of the whole tensor (its sum and denominator all-reduced over the mesh, the gradient this
  shard's own); a reduced loss is replicated, ``reduction="none"`` sharded as the target.
The other arguments: a DTensor target, weight or pos_weight is read whole (or cut as the input
is); a plain target is the whole target, the same on every rank. One-dimensional meshes (or
replicated on every mesh dim); ``Partial`` inputs are refused.

``gathered_weight``: a linear head's weight sharded on its rows (FSDP2's ``fully_shard``) read
whole for ``linear_cross_entropy``: all-gathered in the forward, its gradient reduce-scattered
and averaged over the group in the backward, as FSDP2 treats the parameters it gathers itself.
"""
import torch
from torch import Tensor

from . import _grouped, _local, _named, _reweight, _sharded
from . import distributed as _dist

_DTensor = None


def _dtensor_type():
    global _DTensor
    if _DTensor is None:
        if not torch.distributed.is_available():
            return None
        from torch.distributed.tensor import DTensor
        _DTensor = DTensor
    return _DTensor


def any_dtensor(*tensors) -> bool:
    D = _dtensor_type()
    return D is not None and any(isinstance(t, D) for t in tensors)


def _placements():
    from torch.distributed.tensor import Replicate, Shard
    return Replicate, Shard


def _layout(x, op: str):
    """(mesh, shard dim or None for replicated) of a DTensor input."""
    mesh, placements = x.device_mesh, tuple(x.placements)
    if all(p.is_replicate() for p in placements):
        return mesh, None
    if mesh.ndim != 1 or not placements[0].is_shard():
        raise NotImplementedError(
            f"{op}: DTensor input with placements {placements} over a {mesh.ndim}-D mesh: "
            "supported are Replicate() and Shard(d) over a 1-D mesh (redistribute the input, or "
            "pass its local tensor)")
    return mesh, placements[0].dim % max(1, x.dim())


def whole(t):
    """A DTensor argument read whole on every rank (a plain tensor as it is)."""
    D = _dtensor_type()
    return t.full_tensor() if isinstance(t, D) else t


def _piece(t: Tensor, mesh, dim: int) -> Tensor:
    """This rank's piece of ``t`` (whole on every rank, or a DTensor) along ``dim``, cut as
    ``Shard(dim)`` cuts (torch.chunk's sizes), without communication when ``t`` is whole."""
    Replicate, Shard = _placements()
    D = _dtensor_type()
    if not isinstance(t, D):
        t = D.from_local(t, mesh, [Replicate()], run_check=False)
    elif t.device_mesh != mesh:
        raise ValueError(f"a DTensor argument is on mesh {t.device_mesh}, the input on {mesh}")
    return t.redistribute(mesh, [Shard(dim)]).to_local()


def _wrap(out: Tensor, mesh, shard_dim=None, shape=None):
    """A replicated result, or per-item losses sharded on ``shard_dim`` of the whole ``shape``
    (given: the shards may be uneven)."""
    Replicate, Shard = _placements()
    if shard_dim is None:
        return _dtensor_type().from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)
    stride = torch.empty(shape, device="meta").stride()
    return _dtensor_type().from_local(out, mesh, [Shard(shard_dim)], run_check=False,
                                      shape=torch.Size(shape), stride=stride)


def _layout_of(input, op: str, o):
    """(mesh, shard dim or None) of the DTensor input, the options checked against it."""
    if not isinstance(input, _dtensor_type()):
        raise TypeError(f"{op}: an argument is a DTensor but input is a {type(input).__name__}: "
                        "pass the input as a DTensor too, or every argument as a plain tensor")
    if o.process_group is not None:
        raise ValueError(f"{op}: process_group= does not apply to DTensor input (the input's "
                         "device mesh gives the group)")
    return _layout(input, op)


def _over_shards(local, denominator, o, mesh, dim, shape):
    """A loss whose items are split over the mesh (input sharded off the class dim):
    ``local(reduction)`` is the op on this rank's items, ``denominator()`` their share of the
    mean's divisor, ``o`` the loss's options (reduction, total_weight). mean: the whole tensor's
    (sum and divisor all-reduced, in float64; the gradient this shard's own), sum: the whole sum,
    none: the items, sharded on ``dim`` of the loss's whole ``shape``."""
    if o.reduction == "none":
        return _wrap(local("none"), mesh, dim, shape)
    group = mesh.get_group()
    s = local("sum")
    if o.reduction == "sum":  # the group's sum: a mean over 1, the gradient the shard's own
        return _wrap(_dist._global_mean(s, None, group, 1, replicas_average=False), mesh)
    return _wrap(_dist._global_mean(s, denominator(), group, o.total_weight,
                                    replicas_average=False), mesh)


def _cut(w, mesh, dim: int, ndim: int):
    """A broadcast weight's piece along the input's sharded dim (as is where it broadcasts)."""
    if w is None or not isinstance(w, Tensor):
        return w
    k = dim - (ndim - w.dim())
    return w if k < 0 or w.shape[k] == 1 else _piece(w, mesh, k)


def cross_entropy(input, target, o):
    """cross_entropy (or, with ``o.gamma``, focal_loss) of a DTensor input."""
    op = o.loss
    mesh, dim = _layout_of(input, op, o)
    o = o.but(weight=whole(o.weight), logit_adjustment=whole(o.logit_adjustment),
              sample_weight=whole(o.sample_weight))
    if dim is None:
        return _wrap(_grouped.cross_entropy(input.to_local(), whole(target), o), mesh)
    cdim = 0 if input.dim() == 1 else 1
    prob = target.is_floating_point()
    if dim == cdim:
        if prob or o.z_loss or o.softcap or o.gamma:
            raise NotImplementedError(
                f"{op}: with the classes sharded (input placement Shard({dim})): cross-entropy "
                "of class-index targets, without z_loss and softcap (gather the logits for the "
                "others)")
        t = whole(target)
        if t.is_floating_point() or tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{op}: target must be class indices of shape "
                             f"{tuple(target.shape)}, got {t.dtype} {tuple(t.shape)}")
        classes, ranks = input.shape[cdim], mesh.size()
        per = -(-classes // ranks)  # Shard's split: torch.chunk's sizes, padded with empty shards
        sizes = tuple(max(0, min(per, classes - r * per)) for r in range(ranks))
        local, hook = _grouped.mean(o)  # total_weight=: every rank holds the whole sum
        out = _sharded.cross_entropy(input.to_local(), t, local, mesh.get_group(), sizes,
                                     mesh.get_local_rank())
        return _wrap(out if hook is None else hook(out, None), mesh)
    ldim = dim if dim < cdim else dim - 1  # the sharded dim of the per-item losses
    x, t = input.to_local(), _piece(target, mesh, dim if prob else ldim)
    v = o.sample_weight
    if v is not None:  # the items' weights, cut as the items are
        items = tuple(input.shape[:cdim]) + tuple(input.shape[cdim + 1:])
        v = _piece(_reweight.check_sample_weight(v, items, v.device, op).contiguous(), mesh,
                   ldim)
        o = o.but(sample_weight=v)

    def denominator():
        if v is not None:
            return _reweight.divisor(v, t, o.weight, o.ignore_index, prob)
        if prob:
            return _local.count(t.numel() // max(1, t.shape[cdim]), t.device)
        return _dist._local_weight(t, o.weight, o.ignore_index)
    shape = input.shape[:cdim] + input.shape[cdim + 1:]
    return _over_shards(lambda red: _local.cross_entropy(x, t, o.local(red)), denominator, o,
                        mesh, ldim, shape)


def elementwise(input, target, o):
    """The elementwise loss ``o.loss`` names of a DTensor input: any shard is the local elements
    and the mean's."""
    mesh, dim = _layout_of(input, o.loss, o)
    o = o.but(weight=whole(o.weight), pos_weight=whole(o.pos_weight), alpha=whole(o.alpha))
    if dim is None:
        return _wrap(_grouped.elementwise(input.to_local(), whole(target), o), mesh)
    n = input.dim()
    x, t = input.to_local(), _piece(target, mesh, dim)
    o = o.but(**{k: _cut(getattr(o, k), mesh, dim, n) for k in ("weight", "pos_weight", "alpha")})
    return _over_shards(lambda red: _local.elementwise(x, t, o.local(red)),
                        lambda: _local.count(x.numel(), x.device), o, mesh, dim, input.shape)


class _GatherRows(torch.autograd.Function):
    """Rows sharded over a group (torch.chunk's sizes), whole: all-gather forward, reduce-scatter
    and the group's average backward."""

    @staticmethod
    def forward(ctx, local, rows, group, size):
        per = -(-rows // size)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[:local.shape[0]] = local
        ctx.rows, ctx.group, ctx.size, ctx.per, ctx.mine = rows, group, size, per, local.shape[0]
        return _dist._all_gather(padded, group)[:rows].clone()

    @staticmethod
    def backward(ctx, grad):
        padded = torch.zeros((ctx.per * ctx.size, *grad.shape[1:]), dtype=grad.dtype,
                             device=grad.device)
        padded[:ctx.rows] = grad
        local = _dist._reduce_scatter(padded, ctx.group)[:ctx.mine] / ctx.size
        return _GATHER_ARGS.grads(local=local)


_GATHER_ARGS = _named.Signature.of_forward(_GatherRows)


def gathered_weight(t, op: str):
    """A linear head's weight or bias for the fused loss: a DTensor sharded on dim 0 over a 1-D
    mesh (FSDP2) gathered whole (see the module's docstring); replicated, its local tensor."""
    if not isinstance(t, _dtensor_type()):
        return t
    mesh, dim = _layout(t, op)
    if dim is None:
        return t.to_local()
    if dim != 0:
        raise NotImplementedError(
            f"{op}: a DTensor linear_weight sharded on dim {dim}: supported are Shard(0) "
            "(FSDP2's fully_shard) and Replicate()")
    return _GatherRows.apply(t.to_local(), t.shape[0], mesh.get_group(), mesh.size())

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


def _whole(t):
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


def _check_input(input, op: str, process_group):
    if not isinstance(input, _dtensor_type()):
        raise TypeError(f"{op}: an argument is a DTensor but input is a {type(input).__name__}: "
                        "pass the input as a DTensor too, or every argument as a plain tensor")
    if process_group is not None:
        raise ValueError(f"{op}: process_group= does not apply to DTensor input (the input's "
                         "device mesh gives the group)")


def _sharded_reduction(local_fn, reduction, mesh, total_weight, target_dim, shape):
    """A loss over shards of the rows: ``local_fn(reduction, group, total_weight)`` runs the op
    on this rank's rows; ``shape``: the whole loss's for reduction="none"."""
    group = mesh.get_group()
    if reduction == "mean":
        return _wrap(local_fn("mean", group, total_weight), mesh)
    if total_weight is not None:
        raise ValueError(f"total_weight= applies to reduction='mean', got reduction={reduction!r}")
    out = local_fn(reduction, None, None)
    if reduction == "sum":
        return _wrap(_dist._global_sum(out, group), mesh)
    return _wrap(out, mesh, target_dim, shape)


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, process_group, total_weight):
    from .functional import _cross_entropy
    from .vocab_parallel import vocab_parallel_cross_entropy
    op = "cross_entropy"
    _check_input(input, op, process_group)
    mesh, dim = _layout(input, op)
    weight = _whole(weight)
    if dim is None:
        out = _cross_entropy(input.to_local(), _whole(target), weight, ignore_index, reduction,
                             label_smoothing, z_loss, softcap, None, total_weight)
        return _wrap(out, mesh)
    cdim = 0 if input.dim() == 1 else 1
    prob = tuple(input.shape) == tuple(target.shape)
    if dim == cdim:
        if prob or z_loss or softcap is not None:
            raise NotImplementedError(
                f"{op}: with the classes sharded (input placement Shard({dim})): class-index "
                "targets only, without z_loss and softcap (gather the logits for those)")
        red = "sum" if total_weight is not None else reduction
        if total_weight is not None and reduction != "mean":
            raise ValueError(f"total_weight= applies to reduction='mean', got {reduction!r}")
        out = vocab_parallel_cross_entropy(input.to_local(), _whole(target), weight, ignore_index,
                                           red, label_smoothing, mesh.get_group())
        if total_weight is not None:
            out = (out.double() / _dist._as_denominator(total_weight, out)).to(out.dtype)
        return _wrap(out, mesh)
    tdim = dim if prob or dim < cdim else dim - 1
    x, t = input.to_local(), _piece(target, mesh, tdim)

    def local(red, group, tw):
        return _cross_entropy(x, t, weight, ignore_index, red, label_smoothing, z_loss, softcap,
                              group, tw, replicas_average=False)
    return _sharded_reduction(local, reduction, mesh, total_weight, tdim, target.shape)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,
                                     process_group, total_weight):
    from .functional import _binary_cross_entropy_with_logits
    op = "binary_cross_entropy_with_logits"
    _check_input(input, op, process_group)
    mesh, dim = _layout(input, op)
    weight, pos_weight = _whole(weight), _whole(pos_weight)
    if dim is None:
        out = _binary_cross_entropy_with_logits(input.to_local(), _whole(target), weight,
                                                pos_weight, reduction, None, total_weight)
        return _wrap(out, mesh)

    def cut(w):  # a broadcast weight's piece along the input's sharded dim
        if w is None:
            return None
        k = dim - (input.dim() - w.dim())
        return w if k < 0 or w.shape[k] == 1 else _piece(w, mesh, k)
    x, t, w, pw = input.to_local(), _piece(target, mesh, dim), cut(weight), cut(pos_weight)

    def local(red, group, tw):
        return _binary_cross_entropy_with_logits(x, t, w, pw, red, group, tw,
                                                 replicas_average=False)
    return _sharded_reduction(local, reduction, mesh, total_weight, dim, input.shape)


class _GatherRows(torch.autograd.Function):
    """Rows sharded over a group (torch.chunk's sizes), whole: all-gather forward, reduce-scatter
    and the group's average backward."""

    @staticmethod
    def forward(ctx, local, rows, group, size):
        import torch.distributed._functional_collectives as funcol
        per = -(-rows // size)
        padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[:local.shape[0]] = local
        whole = funcol.all_gather_tensor(padded, 0, group)
        whole = funcol.wait_tensor(whole) if hasattr(funcol, "wait_tensor") else whole
        ctx.args = (rows, group, size, per, local.shape[0])
        return whole[:rows].clone()

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed._functional_collectives as funcol
        rows, group, size, per, mine = ctx.args
        padded = torch.zeros((per * size, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        padded[:rows] = grad
        part = funcol.reduce_scatter_tensor(padded, "sum", 0, group)
        part = funcol.wait_tensor(part) if hasattr(funcol, "wait_tensor") else part
        return part[:mine] / size, None, None, None


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

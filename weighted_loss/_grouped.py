"""process_group= and total_weight=: the exact weighted mean over a group's ranks or a step's
micro-batches (weighted_loss/distributed.py), above the single-device losses (_local, and the
chunks of linear cross-entropy), which compute the sum and their share of its divisor."""
from . import _local
from . import distributed as _dist


def mean(o):
    """(options of the local sum, the hook that makes it the mean) for grouped options; (o, None)
    for the others."""
    if not o.grouped:
        return o, None

    def hook(local_sum, local_divisor):
        return _dist._global_mean(local_sum, local_divisor, o.process_group, o.total_weight)
    return o.but(reduction="sum"), hook


def cross_entropy(input, target, o):
    return _local.cross_entropy(input, target, *mean(o))


def elementwise(input, target, o):
    """The elementwise loss ``o.loss`` names (_local.elementwise)."""
    return _local.elementwise(input, target, *mean(o))

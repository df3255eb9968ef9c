"""Arguments and gradients by name across the autograd boundary.

Autograd hands a rule its inputs, ``needs_input_grad`` and tangents as tuples in the order of the
op's schema (or of an autograd.Function's forward), and takes its gradients back in that order.
Counting positions by hand breaks silently when an argument is added, so every rule of the package
reads and returns them through a ``Signature``: the argument names, taken from the schema
(csrc/ops.cpp) or from the forward's parameters, and nothing else.

A leaf of the package: it imports nothing of it.
"""
import inspect
from typing import Sequence

from torch import Tensor


class Named(dict):
    """Values by name, read as attributes (``a.input``); a dict, which torch.compile traces
    through an autograd.Function's backward."""
    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Signature:
    """The argument names of one op or autograd.Function, in order."""

    def __init__(self, names: Sequence[str], owner: str):
        self.names = tuple(names)
        self.owner = owner
        self._index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def of_op(cls, op) -> "Signature":
        """From an op's schema (``torch.ops.weighted_loss.<op>``)."""
        schema = op.default._schema
        return cls([a.name for a in schema.arguments], schema.name)

    @classmethod
    def of_forward(cls, function) -> "Signature":
        """From an autograd.Function's ``forward(ctx, ...)`` (its parameters after ctx)."""
        first, *rest = inspect.signature(function.forward).parameters
        return cls(rest if first == "ctx" else [first, *rest], function.__name__)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.owner} has no argument {name!r} (it has "
                           f"{', '.join(self.names)})") from None

    def bind(self, values: Sequence) -> Named:
        """The values (inputs, or tangents) by argument name; missing trailing ones are None
        (the dispatcher drops arguments equal to their defaults; a jvp gets no tangent for
        them)."""
        if len(values) > len(self.names):
            raise ValueError(f"{self.owner} takes {len(self.names)} arguments, got {len(values)}")
        padded = list(values) + [None] * (len(self.names) - len(values))
        return Named(zip(self.names, padded))

    def needs(self, ctx, name: str) -> bool:
        """Whether autograd asks for the gradient of argument ``name``."""
        i = self.index(name)
        return i < len(ctx.needs_input_grad) and bool(ctx.needs_input_grad[i])

    def grads(self, **by_name) -> tuple:
        """The gradients by argument name as the tuple autograd takes (None for the others)."""
        out = [None] * len(self.names)
        for name, g in by_name.items():
            out[self.index(name)] = g
        return tuple(out)


def save(ctx, **tensors) -> None:
    """ctx.save_for_backward by name (None allowed); ``saved(ctx)`` reads them back. Where
    ``ctx.for_forward`` is set (an autograd.Function with a jvp) they are saved for it too."""
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())
    if getattr(ctx, "for_forward", False):
        ctx.save_for_forward(*tensors.values())


def saved(ctx) -> Named:
    """The tensors ``save`` kept, by name."""
    return Named(zip(ctx.saved_names, ctx.saved_tensors))


def tensors_of(named: Named, names: Sequence[str]) -> dict:
    """{name: value} of ``names`` (tensors or None), for ``save``."""
    out = {}
    for n in names:
        v = named[n]
        if v is not None and not isinstance(v, Tensor):
            raise TypeError(f"{n} is not a tensor: {type(v).__name__}")
        out[n] = v
    return out

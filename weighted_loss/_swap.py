"""Swapping another library's names for ours, undoably: what patch_torch, patch_monai and
patch_nnunet share. A leaf: it imports nothing of the package."""
import importlib
import threading
from typing import Dict, Iterable, List, Tuple


class Swaps:
    """One library's swaps: ``apply`` sets each (module, name) to ours and returns a context
    manager that restores what that call replaced; ``restore_originals`` puts back what each
    name held before the first swap. A lock serializes concurrent calls."""

    def __init__(self):
        self._lock = threading.RLock()
        self._originals: Dict[Tuple[str, str], object] = {}

    def apply(self, targets: Iterable[Tuple[str, str, object]]) -> "Restore":
        with self._lock:
            before = []
            for module, name, ours in targets:
                mod = importlib.import_module(module)
                current = getattr(mod, name)
                if current is not ours:
                    self._originals.setdefault((module, name), current)
                before.append((module, name, current))
                setattr(mod, name, ours)
            return Restore(self._lock, before)

    def original(self, module: str, name: str):
        """What (module, name) held before the first swap, or None if never swapped."""
        with self._lock:
            return self._originals.get((module, name))

    def restore_originals(self) -> None:
        with self._lock:
            for (module, name), value in self._originals.items():
                setattr(importlib.import_module(module), name, value)


class Restore:
    """The handle a patch returns: on exit, what each name held before that call."""

    def __init__(self, lock, before: List[Tuple[str, str, object]]):
        self._lock = lock
        self._before = before

    def __enter__(self) -> "Restore":
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            for module, name, value in reversed(self._before):
                setattr(importlib.import_module(module), name, value)

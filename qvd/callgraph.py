"""A model call's graph as it runs: which modules each tensor was computed from.

``Provenance`` tags the tensors a module gives (a weighted layer's output, a norm's output, the model's input) and
``Following`` carries the tags through every other torch operation (an attention, a reshape, a concatenation, a host
patch's arithmetic). Calibration reads it to find the layers that read the model's input and give its output; a
loaded file's SCRI folds are proven with it (``verify.FoldWiring``): the norm a layer's input comes from is what the
call shows, not what names or shapes suggest.
"""
from __future__ import annotations

import weakref

import torch
from torch.overrides import TorchFunctionMode

INPUT = "<model input>"
# Reads of a tensor's description (``__get__``: .shape, .dtype, ...), not of its values.
METADATA = {"size", "dim", "numel", "stride", "is_contiguous", "element_size", "get_device", "is_floating_point",
            "__len__", "__get__"}


def tensors_in(values):
    """The tensors among ``values`` and in the lists / tuples among them (one level)."""
    for a in values:
        if torch.is_tensor(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if torch.is_tensor(t))


def flat_tensors(value):
    """Every tensor in a model's output (tensors, lists / tuples / dicts of them, nested)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from flat_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from flat_tensors(v)


class Provenance:
    """Which tagged modules (or the model's input, ``INPUT``) each tensor of one model call was computed from."""

    def __init__(self):
        self.active = False
        self._of: dict[int, tuple] = {}  # id(tensor) -> (weakref to it, frozenset of sources)

    def start(self, inputs) -> None:
        self.active, self._of = True, {}
        for t in inputs:
            self.set(t, frozenset((INPUT,)))

    def stop(self) -> None:
        self.active, self._of = False, {}

    def get(self, t) -> frozenset:
        entry = self._of.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else frozenset()

    def set(self, t, sources: frozenset) -> None:
        try:
            self._of[id(t)] = (weakref.ref(t), sources)
        except TypeError:  # a tensor subclass without weak references: not followed
            pass

    def flow(self, args, kwargs, out) -> None:
        """``out`` was computed from ``args`` / ``kwargs``: it comes from all of their sources."""
        sources = frozenset().union(*(self.get(t) for t in tensors_in((*args, *kwargs.values()))))
        if sources:
            for t in tensors_in(out if isinstance(out, (list, tuple)) else (out,)):
                self.set(t, sources)


class Following(TorchFunctionMode):
    """Carries ``provenance`` through every torch operation (but those named in ``skip``) while ``paused()`` is false
    (inside a tagged module's own forward it is true: its output gets the module's tag). An in-place write
    (``t[i] = v``, ``t.add_(v)``) adds what it writes to the written tensor's sources."""

    def __init__(self, provenance: Provenance, paused, skip=frozenset()):
        super().__init__()
        self.provenance, self.paused, self.skip = provenance, paused, skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.provenance.active and not self.paused() and name not in self.skip:
            if name == "__setitem__" and args and torch.is_tensor(args[0]):
                self.provenance.flow(args, kwargs, args[0])
            else:
                self.provenance.flow(args, kwargs, out)
            self.followed(name, args, kwargs, out)
        return out

    def followed(self, name: str, args, kwargs, out) -> None:
        """Called after each followed operation (for subclasses)."""

"""An explicit recorder of intermediate tensors, passed down the forward functions.

No hooks and no global state: a forward function that is given a :class:`Trace` records the
arrays it computes under documented names; given ``None`` it records nothing. ``trace.scope("x")``
is a child recorder that writes ``x.<name>`` into the same ordered dict, so the names read like the
tree paths of the parameters (``layers.0.attention.probs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trace:
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> array, in forward order
    prefix: str = ""

    def __call__(self, name: str, value: Any) -> Any:
        self.tensors[self.prefix + name] = value
        return value

    def scope(self, name: str) -> "Trace":
        return Trace(self.tensors, f"{self.prefix}{name}.")


def record(trace: Trace | None, name: str, value: Any) -> Any:
    """Record ``value`` as ``name`` if tracing; returns ``value`` either way."""
    if trace is not None:
        trace(name, value)
    return value


def scope(trace: Trace | None, name: str) -> Trace | None:
    return None if trace is None else trace.scope(name)

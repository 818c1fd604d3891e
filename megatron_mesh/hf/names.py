"""State-dict names: the entries of one submodule."""

from __future__ import annotations

from typing import Dict, TypeVar

V = TypeVar("V")


def under(state: Dict[str, V], prefix: str) -> Dict[str, V]:
    """The entries of ``state`` whose names start with ``prefix``, named without it
    (``under(sd, "decoder.coda.0.")`` -> {"mlp.linear_fc1.weight": ..., ...})."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

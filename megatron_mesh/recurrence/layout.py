"""Prelude-Recurrent-Coda layouts: parsing and the layer counts that follow from them.

Notation (paper, Appendix B): ``P+CRK+D`` is a P-layer prelude, a C-layer core applied K times
with shared weights, and a D-layer coda. A plain number ``N`` is the non-recursive (vanilla)
model. ``P+C1+C2+...+D`` (three or more parts) is the untied ablation of Appendix E.5: each
loop step has its own core, e.g. ``4+8+8+4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple

LAYOUT_FORMS = "'N' (vanilla), 'P+CRK+D' (tied core looped K times) or 'P+C1+...+CK+D' (untied)"

_TIED = re.compile(r"^(\d+)\+(\d+)[Rr](\d+)\+(\d+)$")
_UNTIED = re.compile(r"^\d+(\+\d+){2,}$")


@dataclass(frozen=True)
class Layout:
    """A parsed layout string."""

    prelude: int
    """Prelude layers (for vanilla layouts: all layers)."""
    core: Tuple[int, ...]
    """Layers of the core applied at each loop step; len(core) == num_loops."""
    coda: int
    """Coda layers."""
    tied: bool
    """Whether every loop step applies the same core weights."""

    @property
    def num_loops(self) -> int:
        """K: how many times the core is applied (0 for vanilla)."""
        return len(self.core)

    @property
    def recursive(self) -> bool:
        return self.num_loops > 0

    @property
    def n_compute(self) -> int:
        """Depth of the unrolled graph: P + sum of core applications + D."""
        return self.prelude + sum(self.core) + self.coda

    @property
    def core_modules(self) -> Tuple[int, ...]:
        """Layers of each distinct core module that holds weights (one when tied)."""
        if not self.recursive:
            return ()
        return self.core[:1] if self.tied else self.core

    @property
    def unique_layers(self) -> int:
        """Layers that own parameters."""
        return self.prelude + sum(self.core_modules) + self.coda

    def __str__(self) -> str:
        if not self.recursive:
            return str(self.prelude)
        if self.tied:
            return f"{self.prelude}+{self.core[0]}R{self.num_loops}+{self.coda}"
        return "+".join(str(n) for n in (self.prelude, *self.core, self.coda))


def parse_layout(text) -> Layout:
    """Parse a layout string; raise ValueError naming the field and the allowed forms."""
    spec = str(text).replace(" ", "")
    if spec.isdigit():
        layers = int(spec)
        if layers < 1:
            raise ValueError(f"layout={text!r}: a vanilla model needs at least 1 layer")
        return Layout(prelude=layers, core=(), coda=0, tied=True)
    tied = _TIED.match(spec)
    if tied:
        prelude, core, loops, coda = (int(g) for g in tied.groups())
        if loops < 1:
            raise ValueError(f"layout={text!r}: loop count K={loops} is invalid, K must be >= 1")
        if core < 1:
            raise ValueError(f"layout={text!r}: the core needs at least 1 layer, got {core}")
        return Layout(prelude=prelude, core=(core,) * loops, coda=coda, tied=True)
    if _UNTIED.match(spec):
        parts = [int(p) for p in spec.split("+")]
        if min(parts[1:-1]) < 1:
            raise ValueError(f"layout={text!r}: every untied core needs at least 1 layer")
        return Layout(prelude=parts[0], core=tuple(parts[1:-1]), coda=parts[-1], tied=False)
    raise ValueError(f"layout={text!r} is not a valid layout: expected {LAYOUT_FORMS}")

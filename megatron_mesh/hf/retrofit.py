"""Retrofitted recurrence: a pretrained vanilla model's layers, chosen by index, as a
Prelude-Recurrent-Coda model (McLeish et al. 2025, "Teaching Pretrained Language Models to
Think Deeper with Retrofitted Recurrence": TinyLlama-1.1B's layers [0-3], [10-17], [18-21]
made 4+8R?+4; the layers between prelude and core are dropped).

At one loop step the retrofitted model is the pretrained one without the dropped layers,
exactly, where the state scheme can start as a plain layer stack
(``StateScheme.init_as_layer_stack``: base, additive_injection from a zero state, static_comb,
dynamic_comb); the other schemes start from their own initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import Tensor

from megatron_mesh.errors import ConfigError
from megatron_mesh.hf.names import under
from megatron_mesh.recurrence.layout import Layout

RETROFIT_SCHEME = "additive_injection"
"""The default scheme of a retrofit: Huginn's and McLeish's input injection (the prelude's
output enters every loop step), which starts as the plain layer stack and, having no
parameters per step, trains with a sampled depth."""


@dataclass(frozen=True)
class LayerSelection:
    """The source layers (0-based indices of the vanilla model) each segment takes, in order."""

    prelude: Tuple[int, ...]
    core: Tuple[int, ...]
    coda: Tuple[int, ...]

    @classmethod
    def default(cls, target: Layout, source_layers: int) -> "LayerSelection":
        """The paper's rule: the first P layers, the last D, and the C layers just before them
        (TinyLlama's 22 layers at 4+8R?+4: [0-3], [10-17], [18-21])."""
        P, C, D = target.prelude, target.core[0], target.coda
        if P + C + D > source_layers:
            raise ConfigError(f"layout={target}: {P + C + D} distinct layers, the source model has "
                              f"{source_layers}")
        end = source_layers - D
        return cls(tuple(range(P)), tuple(range(end - C, end)), tuple(range(end, source_layers)))

    @classmethod
    def parse(cls, text: str) -> "LayerSelection":
        """'0-3,10-17,18-21': the prelude's, core's and coda's layers as inclusive ranges (or
        single indices), comma-separated."""
        parts = text.replace(" ", "").split(",")
        if len(parts) != 3:
            raise ConfigError(f"--layers {text!r}: expected three ranges, prelude,core,coda, e.g. "
                              f"'0-3,10-17,18-21'")
        return cls(*(_indices(part, text) for part in parts))

    def check(self, target: Layout, source_layers: int) -> None:
        """ConfigError unless it fits the tied layout ``target`` and the source's layers."""
        want = (target.prelude, target.core[0], target.coda)
        got = (len(self.prelude), len(self.core), len(self.coda))
        if got != want:
            raise ConfigError(f"--layers {self}: {got[0]}+{got[1]}+{got[2]} layers, layout={target} "
                              f"takes {want[0]}+{want[1]}+{want[2]}")
        chosen = self.prelude + self.core + self.coda
        if len(set(chosen)) != len(chosen) or max(chosen) >= source_layers:
            raise ConfigError(f"--layers {self}: expected distinct layers of the source's "
                              f"0..{source_layers - 1}")

    def dropped(self, source_layers: int) -> Tuple[int, ...]:
        kept = set(self.prelude + self.core + self.coda)
        return tuple(i for i in range(source_layers) if i not in kept)

    def __str__(self) -> str:
        return ",".join(_range_text(part) for part in (self.prelude, self.core, self.coda))


def _indices(part: str, text: str) -> Tuple[int, ...]:
    try:
        first, _, last = part.partition("-")
        start, end = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"--layers {text!r}: {part!r} is not a layer index or range like 10-17") from None
    if end < start:
        raise ConfigError(f"--layers {text!r}: {part!r} runs backwards")
    return tuple(range(start, end + 1))


def _range_text(indices: Tuple[int, ...]) -> str:
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return "+".join(map(str, indices))


def retrofit_state(state: Dict[str, Tensor], selection: LayerSelection) -> Dict[str, Tensor]:
    """A vanilla model's state (its layers ``decoder.prelude.i``) with the selected layers as the
    prelude, the tied core and the coda; embeddings, final norm and output layer as they are."""
    out = {k: v for k, v in state.items() if not k.startswith("decoder.prelude.")}
    segments = (("decoder.prelude", selection.prelude), ("decoder.cores.0", selection.core),
                ("decoder.coda", selection.coda))
    for segment, sources in segments:
        for j, source in enumerate(sources):
            prefix = f"decoder.prelude.{source}."
            out.update({f"{segment}.{j}.{k}": v for k, v in under(state, prefix).items()})
    return out

"""The state schemes by name: ``state_scheme`` -> the StateScheme class that implements it.

The math lives with each class (mesh.py: the paper's schemes; injection.py: input injection of
the recurrent-depth models); this table is the only list of them.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

from megatron_mesh.recurrence.injection import INJECTION_SCHEMES
from megatron_mesh.recurrence.mesh import (
    SUPPLEMENTS, AdditiveScheme, DynamicCombScheme, LoopState, MeshScheme, SchemeOptions,
    SharedRouterMeshScheme, StateScheme, StaticCombScheme,
)

SCHEMES: Tuple[Type[StateScheme], ...] = (
    AdditiveScheme, MeshScheme, SharedRouterMeshScheme, StaticCombScheme, DynamicCombScheme,
    *INJECTION_SCHEMES)

SCHEME_NAMES = ("vanilla", *(name for cls in SCHEMES for name in cls.names))
"""Single scheme names ('vanilla': no loop); additive supplements also combine with '+'."""


def normalize_scheme(name: str) -> str:
    """Canonical scheme name ('anchor*' -> 'anchor_star', combos sorted); ValueError if unknown."""
    parts = [p.strip().replace("anchor*", "anchor_star") for p in str(name).split("+")]
    if len(parts) == 1 and parts[0] in SCHEME_NAMES:
        return parts[0]
    if len(parts) > 1 and all(p in SUPPLEMENTS for p in parts) and len(set(parts)) == len(parts):
        return "+".join(sorted(parts, key=SUPPLEMENTS.index))
    raise ValueError(
        f"state_scheme={name!r} is not a known scheme: expected one of {list(SCHEME_NAMES)} "
        f"or a '+'-combination of distinct {list(SUPPLEMENTS)} (e.g. 'anchor+anchor_star')"
    )


def scheme_class(name: str) -> Optional[Type[StateScheme]]:
    """The class of a canonical scheme name; None for 'vanilla'."""
    if name == "vanilla":
        return None
    first = name.split("+")[0]  # '+'-combinations are additive
    return next(cls for cls in SCHEMES if first in cls.names)


def has_per_step_parameters(name: str) -> bool:
    cls = scheme_class(name)
    return cls is not None and cls.per_step_parameters


def carried_state(name: str) -> Tuple[str, ...]:
    """The LoopState fields a pipeline boundary inside the loop carries for scheme ``name``."""
    cls = scheme_class(name)
    return cls.carried_for(name) if cls is not None else ()


def build_scheme(name: str, options: SchemeOptions) -> Optional[StateScheme]:
    """The scheme module for a canonical scheme name; None for 'vanilla' (no loop)."""
    cls = scheme_class(name)
    return cls.build(name, options) if cls is not None else None


__all__ = ["SCHEMES", "SCHEME_NAMES", "LoopState", "SchemeOptions", "StateScheme", "build_scheme",
           "carried_state", "has_per_step_parameters", "normalize_scheme", "scheme_class"]

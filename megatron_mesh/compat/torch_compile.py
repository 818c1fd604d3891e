"""``torch.compile`` of one isolated region with its own recompile limit, on every supported torch.

``fused_mesh`` compiles each half of the MeSH cycle as a region of its own: ``fullgraph`` (past
its limit dynamo raises instead of running the frame uncompiled), a recompile limit of its own,
and graphs counted apart from every other compiled function (``isolate_recompiles``). Which
torch offers what is detected, never read off a version number:

- ``torch.compile`` takes ``recompile_limit`` and ``isolate_recompiles`` (torch 2.13): passed.
  The limit must be an argument there, since dynamo's config overrides are per thread
  (ContextVars) and on CUDA the backward compiles on autograd's device thread.
- What it lacks is made up for, with one logged line saying so. No ``recompile_limit`` (torch
  2.11): each call of the region runs under ``torch._dynamo.config.patch(recompile_limit=N)``
  on the calling thread, the thread dynamo compiles on (whichever it is), so the region still
  fails loudly past exactly N graphs. No ``isolate_recompiles`` (2.11, and 2.12, which takes the
  limit but not this): the region compiles a copy of the function's code object, named after
  the region; dynamo keeps graphs and counts recompiles per code object, so no other
  ``torch.compile`` of the same function (another backend, another limit) counts against it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Callable, Union

import torch

Backend = Union[str, Callable]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileFeatures:
    """What this torch's ``torch.compile`` takes (else: emulated, see above)."""

    recompile_limit: bool
    """A ``recompile_limit=`` argument."""
    isolate_recompiles: bool
    """An ``isolate_recompiles=`` argument."""

    @classmethod
    def detect(cls) -> "CompileFeatures":
        taken = inspect.signature(torch.compile).parameters
        return cls(recompile_limit="recompile_limit" in taken,
                   isolate_recompiles="isolate_recompiles" in taken)

    def adaptations(self) -> list:
        """One line per argument this torch lacks and how a region makes up for it."""
        lines = []
        if not self.recompile_limit:
            lines.append(f"torch {torch.__version__}: torch.compile takes no recompile_limit; a "
                         "compiled region runs under torch._dynamo.config.patch(recompile_limit=N)")
        if not self.isolate_recompiles:
            lines.append(f"torch {torch.__version__}: torch.compile takes no isolate_recompiles; a "
                         "compiled region compiles its own copy of the code object")
        return lines


TORCH_COMPILE = CompileFeatures.detect()
"""The installed torch's (read once at import; nothing is compiled then)."""


def compile_region(fn: Callable, name: str, backend: Backend, recompile_limit: int,
                   features: CompileFeatures) -> Callable:
    """``torch.compile(fn, backend, dynamic=None, fullgraph=True)`` as a region of its own that
    raises (dynamo's FailOnRecompileLimitHit) when it would need graph ``recompile_limit + 1``."""
    _log_adaptations(features)
    options = {}
    if features.isolate_recompiles:
        options["isolate_recompiles"] = True
    else:
        fn = _own_copy(fn, name)
    if features.recompile_limit:
        return torch.compile(fn, backend=backend, dynamic=None, fullgraph=True,
                             recompile_limit=recompile_limit, **options)
    compiled = torch.compile(fn, backend=backend, dynamic=None, fullgraph=True, **options)

    @functools.wraps(fn)
    def run_with_own_limit(*args):
        with torch._dynamo.config.patch(recompile_limit=recompile_limit):
            return compiled(*args)

    return run_with_own_limit


def _own_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own (an equal code object would share dynamo's cache)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{name}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@functools.lru_cache(maxsize=None)
def _log_adaptations(features: CompileFeatures) -> None:
    for line in features.adaptations():  # once per process (lru_cache)
        log.warning("megatron-mesh adapted to %s", line)

"""``torch.compile`` of one isolated region with its own recompile limit, on every supported torch.

``fused_mesh`` compiles each half of the MeSH cycle as a region of its own: ``fullgraph`` (past
its limit dynamo raises instead of running the frame uncompiled), a recompile limit of its own,
and graphs counted apart from every other compiled function (``isolate_recompiles``). Which
torch offers what is detected, never read off a version number:

- ``torch.compile`` takes ``recompile_limit`` and ``isolate_recompiles`` (torch 2.13): passed.
  They must be arguments there, since dynamo's config overrides are per thread (ContextVars)
  and on CUDA the backward compiles on autograd's device thread.
- It takes neither (torch 2.11, the lent GPU image's): the same behaviour by other means, and
  one logged line saying so. The limit: each call of the region runs under
  ``torch._dynamo.config.patch(recompile_limit=N)`` on the calling thread, the thread dynamo
  compiles on (whichever it is), so the region still fails loudly past exactly N graphs.
  Isolation: the region compiles a copy of the function's code object, named after the
  region; dynamo keeps graphs and counts recompiles per code object, so no other
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
    """What this torch's ``torch.compile`` takes."""

    recompile_limit: bool
    """``recompile_limit=`` and ``isolate_recompiles=`` arguments (else: emulated, see above)."""

    @classmethod
    def detect(cls) -> "CompileFeatures":
        taken = inspect.signature(torch.compile).parameters
        return cls(recompile_limit={"recompile_limit", "isolate_recompiles"} <= taken.keys())

    def adaptations(self) -> list:
        """One line per feature this torch lacks and how the region makes up for it."""
        if self.recompile_limit:
            return []
        return [f"torch {torch.__version__}: torch.compile takes no recompile_limit/"
                "isolate_recompiles; a compiled region runs under "
                "torch._dynamo.config.patch(recompile_limit=N) from its own copy of the code"]


TORCH_COMPILE = CompileFeatures.detect()
"""The installed torch's (read once at import; nothing is compiled then)."""


def compile_region(fn: Callable, name: str, backend: Backend, recompile_limit: int,
                   features: CompileFeatures) -> Callable:
    """``torch.compile(fn, backend, dynamic=None, fullgraph=True)`` as a region of its own that
    raises (dynamo's FailOnRecompileLimitHit) when it would need graph ``recompile_limit + 1``."""
    if features.recompile_limit:
        return torch.compile(fn, backend=backend, dynamic=None, fullgraph=True,
                             recompile_limit=recompile_limit, isolate_recompiles=True)
    _log_adaptation(features)
    compiled = torch.compile(_own_copy(fn, name), backend=backend, dynamic=None, fullgraph=True)

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
def _log_adaptation(features: CompileFeatures) -> None:
    for line in features.adaptations():  # once per process (lru_cache)
        log.warning("megatron-mesh adapted to %s", line)

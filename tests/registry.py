"""The registered state schemes as tests parametrize over them: a scheme added to
megatron_mesh/recurrence/schemes.py is in every such test without a test edit."""

import itertools

from megatron_mesh.recurrence.schemes import SCHEME_NAMES, SUPPLEMENTS, has_per_step_parameters, scheme_class

LOOPED = [name for name in SCHEME_NAMES if scheme_class(name) is not None]
"""Every scheme of a recursive layout (all but vanilla)."""
SUMS = ["+".join(c) for r in range(2, len(SUPPLEMENTS) + 1) for c in itertools.combinations(SUPPLEMENTS, r)]
"""Every '+'-sum of the summable schemes (residual, anchor, anchor_star)."""
ANY_DEPTH = [name for name in LOOPED if not has_per_step_parameters(name)]
"""The schemes that run any number of loop steps (no per-step parameters)."""
PER_STEP = [name for name in LOOPED if has_per_step_parameters(name)]
"""The schemes with parameters per loop step: they run the trained depth only."""

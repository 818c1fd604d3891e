"""megatron-mesh: recursive (looped) transformers with the MeSH state buffer on megatron-core.

Importing the package installs the CPU shims for megatron-core when CUDA is absent (they are
no-ops on a GPU machine), so ``import megatron_mesh`` must come before ``import megatron.core``
in entry points that may run without a GPU.
"""

from megatron_mesh.compat import cpu as _cpu

_cpu.apply()

__version__ = "0.1.0"

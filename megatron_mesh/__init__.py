"""megatron-mesh: recursive (looped) transformers with the MeSH state buffer on megatron-core.

Importing the package installs the CPU shims for megatron-core when CUDA is absent (they are
no-ops on a GPU machine) and the shims for the packaged wheel (Python 3.11, prebuilt dataset
helpers), so ``import megatron_mesh`` must come before ``import megatron.core``
in entry points that may run without a GPU. It refuses any megatron-core but the one the shims
were written for (``compat.MEGATRON_CORE``).
"""

from megatron_mesh.compat import check_megatron_core as _check_megatron_core
from megatron_mesh.compat import known_megatron_warnings_silenced as _quiet

_check_megatron_core()  # the shims below patch one megatron-core version
with _quiet():  # the shims import megatron.core (CPU): not its notes about absent kernels
    from megatron_mesh.compat import cpu as _cpu
    from megatron_mesh.compat import wheel as _wheel

    _cpu.apply()
    _wheel.apply()

__version__ = "0.1.0"

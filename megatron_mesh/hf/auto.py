"""Loading a Hugging Face model directory with transformers, running no code from the directory.

A megatron-mesh export carries ``modeling_megatron_mesh.py`` and ``configuration_megatron_mesh.py``
(its config's ``auto_map``) so that it loads where megatron-mesh is not installed, with
``trust_remote_code=True``. Exports are shared and downloaded: whoever replaced those files would
run their code in every evaluation that trusted them. So an export (config ``model_type``
``megatron_mesh``) loads with the installed package's own classes, the folder's Python files
never imported; any other directory goes through ``AutoModelForCausalLM``, which runs a folder's
code only with ``trust_remote_code=True``: the user's explicit choice (``--trust-remote-code``).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mesh.errors import CheckpointError
from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig


def is_megatron_mesh_export(path) -> bool:
    """Whether ``path``'s config.json names megatron-mesh's model type."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MegatronMeshConfig.model_type


def load_causal_lm(path, trust_remote_code: bool = False, **kwargs):
    """The causal LM in ``path``: megatron-mesh's MegatronMeshForCausalLM for its exports (the
    folder's code is never run, whatever ``trust_remote_code``), else transformers' class for
    the config's model type, the folder's own code only with ``trust_remote_code``. ``kwargs``
    go to ``from_pretrained``."""
    if is_megatron_mesh_export(path):
        from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

        return MegatronMeshForCausalLM.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise CheckpointError(f"{path}: its model loads only by running the Python files in that folder "
                         f"(its config's auto_map); pass --trust-remote-code if you trust them") from None

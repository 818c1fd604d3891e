"""Default labels of models in tables, figure titles and legends.

A directory's own name often says only what kind of directory it is: a run saves into
``runs/demo/checkpoints`` and exports to ``runs/demo/hf``, and two runs' tables would both say
'checkpoints'. ``model_name`` names such a directory after the run that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIRS = ("checkpoints", "checkpoint", "ckpt", "ckpts", "save")
"""Names of save directories: such a checkpoint is named after its parent, the run."""

EXPORT_DIRS = ("hf", "export", "hf_export", "hf-export", "huggingface")
"""Names of export directories: named 'RUN/hf', the run and what it is."""


def model_name(path) -> str:
    """``runs/demo/checkpoints`` -> 'demo', its iteration ``iter_0000300`` -> 'demo@300',
    ``runs/demo/hf`` -> 'demo/hf', any other directory -> its own name."""
    path = Path(path).resolve()
    leaf, parent = path.name, path.parent.name
    iteration = re.fullmatch(r"iter_(\d+)", leaf)
    if iteration and parent:
        return f"{model_name(path.parent)}@{int(iteration[1])}"
    if leaf.lower() in CHECKPOINT_DIRS and parent:
        return parent
    if leaf.lower() in EXPORT_DIRS and parent:
        return f"{parent}/{leaf}"
    return leaf

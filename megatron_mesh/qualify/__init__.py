"""Qualifying a GPU machine for megatron-mesh: the checks behind ``tools/gpu_check.py``.

One command either passes or names what broke: versions, TransformerEngine vs local spec,
the attention kernel, the compiled MeSH cycle, the real trainer (bf16, distributed optimizer:
train, save, resume, export), throughput through the trainer's own ``[mesh]`` line, and
multi-GPU parity. Every check takes a ``Profile`` (``profiles.py``): ``GPU`` (the paper's model
sizes, one GPU, a time budget) or ``TINY`` (the same code on the CPU with tiny models, run in
CI), so no code path of the check runs first on a GPU.

Modules: ``report`` (results, JSON and markdown), ``profiles``, ``runner`` (order, budget,
errors), ``launch`` (trainer subprocesses), and one module per check.
"""

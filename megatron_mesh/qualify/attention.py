"""Check ``attention``: which scaled-dot-product-attention kernel the local spec runs.

The local spec's core attention is ``megatron_mesh.model.attention.SDPAttention``; torch picks the
kernel at run time (flash, cuDNN, memory-efficient or the unfused math fallback) from dtype,
head size, mask and hardware. One bf16 training-mode forward of the model is profiled and the
aten kernel it dispatched to is read from the profile. A GPU must run a fused kernel (flash,
cuDNN or memory-efficient: which one torch prefers depends on its version and the GPU, e.g.
torch 2.11 may take cuDNN on Hopper), never the math fallback, which materialises the score
matrix; the check names the kernel that ran. The CPU stand-in reports what ran. (The
TransformerEngine spec runs TE's own attention instead.)
"""

from __future__ import annotations

import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult
from megatron_mesh.qualify.specs import build

KERNELS = {  # aten op name fragment -> kernel
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_attention_math": "math",
}
UNFUSED = "math"


def kernels_run(ctx: Context) -> dict:
    """{kernel: calls} over one forward of the small model (local spec, SDPA) in bf16."""
    from megatron_mesh.model.layers import local_block_spec

    section = dict(ctx.profile.small_model, state_scheme="mesh")
    model = build(section, local_block_spec, ctx.device).bfloat16()
    batch, seq = ctx.profile.small_batch
    tokens = torch.randint(0, section["vocab_size"], (batch, seq), device=ctx.device)
    positions = torch.arange(seq, device=ctx.device).unsqueeze(0).expand(batch, seq)
    with warnings.catch_warnings():  # torch 2.11's note on profiling cycles: one cycle here
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens, positions)
            ctx.sync()
    calls: dict = {}
    for event in prof.key_averages():
        for fragment, kernel in KERNELS.items():
            if fragment in event.key:
                calls[kernel] = calls.get(kernel, 0) + event.count
    return calls


def check(ctx: Context) -> CheckResult:
    return verdict(kernels_run(ctx), ctx.profile.attention_must_be_fused)


def verdict(calls: dict, must_be_fused: bool) -> CheckResult:
    """Pass unless no SDPA kernel ran or, where required, the math fallback ran at all."""
    ran = ", ".join(f"{k} x{n}" for k, n in sorted(calls.items())) or "no SDPA kernel"
    details = {"calls": calls, "kernels": sorted(calls)}
    if not calls:
        return CheckResult("attention", FAIL, f"SDPAttention ran {ran}", details=details)
    if must_be_fused and UNFUSED in calls:
        return CheckResult("attention", FAIL, f"SDPA ran {ran}: the unfused math fallback (the "
                                              "[b, heads, s, s] score matrix) where a fused kernel "
                                              "(flash, cudnn, memory-efficient) must run",
                           details=details)
    note = " (a fused kernel)" if must_be_fused else " (CPU: reported; a GPU must run a fused kernel)"
    return CheckResult("attention", PASS, f"SDPA ran {ran}{note}", details=details)

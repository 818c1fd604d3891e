"""Check ``cycle``: the compiled MeSH cycle equals the eager one in bf16, and is faster.

"Equal" in bf16 means within worst-case rounding bounds of an fp32 evaluation of the same
numbers. bf16 keeps 8 significant bits: one round-to-nearest moves a value v by at most u|v|,
u = 2^-8. Inputs are bf16 numbers, so fp32 evaluates the cycle exactly to ~1e-7, and each bf16
output is off by at most the roundings on its path times the magnitudes they round:

    N  = M + W x          one rounding                          |dN|  <= u |N|
    y  = sum_k N_k R_k    from rounded N, one rounding           |dy|  <= 2u sum_k R_k |N_k|
    dM = gN + R gy        fused: one rounding; eager autograd:   |ddM| <= u (|gN| + 2 |R gy|)
                          rounds R gy, then its sum with gN
    dx = sum_k dM_k W_k   from rounded dM, one rounding          <= sum_k W_k (bound_dM_k + u |dM_k|)
    dW = <dM_k, x>_h      from rounded dM, one rounding          <= <bound_dM_k + u |dM_k|, |x|>_h
    dR = <N_k, gy>_h      from rounded N, one rounding           <= 2u <|N_k|, |gy|>_h

(the precision policy these follow: ``megatron_mesh/recurrence/mesh.py``, Precision). A compile failure
(``fused_mesh.CompileFailure``, or any failure ``fused_mesh.compile_failures`` lists) fails the
check.
"""

from __future__ import annotations

import functools

import statistics
import time
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult
from megatron_mesh.recurrence import fused_mesh
from megatron_mesh.recurrence.mesh import buffer_read, buffer_write

U = 2.0 ** -8  # bf16 unit roundoff
SLACK = 1e-6  # of each bound's largest value: the fp32 reference's own rounding
NAMES = ("read", "new_buffer", "d_buffer", "d_h", "d_w_write", "d_w_read")


def eager_cycle(buffer: Tensor, h: Tensor, w_write: Tensor, w_read: Tensor):
    new_buffer = buffer_write(buffer, h, w_write)
    return buffer_read(new_buffer, w_read), new_buffer


def cycle_inputs(shape: Tuple[int, int, int, int], device="cpu", seed: int = 0):
    """((buffer, h, w_write, w_read), (g_read, g_buffer)): bf16 numbers of model-like size
    (states O(1), routing weights a softmax) for a (B, s, b, h) cycle."""
    slots, s, b, hidden = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g).bfloat16().to(device)

    buffer, h = randn(slots, s, b, hidden), randn(s, b, hidden)
    w_write, w_read = (torch.softmax(2 * torch.randn(s, b, slots, generator=g), -1).bfloat16().to(device)
                       for _ in range(2))
    return (buffer, h, w_write, w_read), (randn(s, b, hidden), randn(slots, s, b, hidden))


def outputs(cycle: Callable, inputs, upstream, dtype: torch.dtype) -> Dict[str, Tensor]:
    """The cycle's outputs and input gradients, computed in ``dtype`` from the same numbers."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs]  # fresh leaves: no .grad
    read, new_buffer = cycle(*inputs)
    torch.autograd.backward([read, new_buffer], [g.to(dtype) for g in upstream])
    grads = [t.grad for t in inputs]
    return dict(zip(NAMES, (read.detach(), new_buffer.detach(), *grads)))


def rounding_bounds(inputs, upstream, reference: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The module docstring's bound for every output, from the fp32 reference's magnitudes."""
    _, h, w_write, w_read = (t.float() for t in inputs)
    g_read, g_buffer = (g.float() for g in upstream)
    W, R = (w.permute(2, 0, 1).unsqueeze(-1) for w in (w_write, w_read))  # [B, s, b, 1]
    N, dM = reference["new_buffer"].abs(), reference["d_buffer"].abs()
    bound_dM = U * (g_buffer.abs() + 2 * (R * g_read).abs())
    dM_in = bound_dM + U * dM  # how far the reductions' dM may be off, per element
    return {"read": 2 * U * (R * N).sum(0), "new_buffer": U * N, "d_buffer": bound_dM,
            "d_h": (W * dM_in).sum(0),
            "d_w_write": (dM_in * h.abs()).sum(-1).permute(1, 2, 0),
            "d_w_read": 2 * U * (N * g_read.abs()).sum(-1).permute(1, 2, 0)}


def bound_ratios(got: Dict[str, Tensor], reference, bounds) -> Dict[str, float]:
    """max |got - reference| / bound per output (<= 1: within the rounding bound)."""
    ratios = {}
    for name, value in got.items():
        allowed = bounds[name] + SLACK * bounds[name].max()
        ratios[name] = ((value.float() - reference[name]).abs() / allowed).max().item()
    return ratios


def median_step_s(ctx: Context, cycle: Callable, inputs, upstream, reps: int) -> float:
    """Median forward + backward time of one bf16 cycle (two warm-up steps first)."""
    times = []
    for i in range(reps + 2):
        ctx.sync()
        start = time.perf_counter()
        outputs(cycle, inputs, upstream, torch.bfloat16)
        ctx.sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(ctx: Context) -> CheckResult:
    profile = ctx.profile
    inputs, upstream = cycle_inputs(profile.cycle_shape, ctx.device)
    reference = outputs(eager_cycle, inputs, upstream, torch.float32)
    bounds = rounding_bounds(inputs, upstream, reference)
    # compiled on every device: the CPU stand-in checks the same graphs
    cycle = functools.partial(fused_mesh.mesh_cycle,
                              options=fused_mesh.CycleCompile(devices="all", backend=profile.cycle_backend))
    compiled = outputs(cycle, inputs, upstream, torch.bfloat16)
    reps = 20 if ctx.device.type == "cuda" else 5
    compiled_s = median_step_s(ctx, cycle, inputs, upstream, reps)
    failures = fused_mesh.compile_failures()
    if failures:
        return CheckResult("cycle", FAIL, f"torch.compile ({profile.cycle_backend}) failed: {failures}",
                           details={"failures": failures})
    eager = outputs(eager_cycle, inputs, upstream, torch.bfloat16)
    eager_s = median_step_s(ctx, eager_cycle, inputs, upstream, reps)
    ratios = {"compiled": bound_ratios(compiled, reference, bounds),
              "eager": bound_ratios(eager, reference, bounds)}
    worst = max(max(r.values()) for r in ratios.values())
    speedup = eager_s / compiled_s
    details = {"shape_B_s_b_h": list(profile.cycle_shape), "backend": profile.cycle_backend,
               "eager_ms": eager_s * 1e3, "compiled_ms": compiled_s * 1e3, "speedup": speedup,
               "worst_error_over_bound": worst, "error_over_bound": ratios}
    summary = (f"B,s,b,h={profile.cycle_shape} bf16 fwd+bwd: eager {eager_s * 1e3:.2f} ms, "
               f"compiled ({profile.cycle_backend}) {compiled_s * 1e3:.2f} ms (x{speedup:.2f}); "
               f"worst error {worst:.3f} of its rounding bound")
    ok = worst <= 1.0 and (speedup > 1.0 or not profile.cycle_must_be_faster)
    if profile.cycle_must_be_faster and speedup <= 1.0:
        summary += "; compiled is NOT faster"
    elif not profile.cycle_must_be_faster:
        summary += " (speed reported, required on a GPU)"
    return CheckResult("cycle", PASS if ok else FAIL, summary, details=details)

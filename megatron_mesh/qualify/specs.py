"""Check ``specs``: the TransformerEngine spec computes what the local spec computes.

Both specs save under the same checkpoint names, so one model's weights go into the other by
name (what a checkpoint load does; no mapping). Every weight is perturbed first (biases and
norms away from their 0 / 1 initialisation), so a misplaced bias or norm shows. Logits and
every gradient are compared in fp32, where two correct implementations differ by rounding
(~1e-6 relative) and a wiring error (sequential residual, a missing norm or bias) by percents.

On the CPU (no TransformerEngine) the same code compares the local spec's two core attentions
(torch SDPA vs megatron-core's DotProductAttention) as the stand-in. Schemes without per-step
parameters run a sampled per-token depth with truncated backprop (SAMPLED_DEPTH).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult, markdown_table
from megatron_mesh.recurrence.loop_depth import LoopDepth

TOLERANCE = 5e-3
"""Max |logit difference| over max |logit|, and each gradient's relative L2 difference."""
SCHEMES = ("mesh", "anchor", "mesh_shared", "linear_injection", "diagonal_injection")
SAMPLED_DEPTH = LoopDepth("poisson", 2.0, trained=2, max=4, backprop=1, per="token")
"""How the schemes without per-step parameters run: a per-token depth of up to 4 steps, the
first ones without gradients (the step mask and the frozen steps' bias detach under each spec)."""


def spec_pair(cpu: bool) -> Tuple[str, Callable, str, Callable]:
    from megatron_mesh.model.layers import local_block_spec, te_block_spec, transformer_engine_available

    if not cpu and transformer_engine_available():
        return "transformer_engine", te_block_spec, "local", local_block_spec
    return ("local (megatron attention)", lambda: local_block_spec("megatron"),
            "local (SDPA)", local_block_spec)


def build(section: dict, spec: Callable, device: torch.device):
    """A model of the profile's model ``section`` (a YAML model section) under ``spec``."""
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.parallel.process_groups import initialize_single_process

    initialize_single_process()
    model = MeshGPTModel(MeshConfig.from_section(section), spec=spec()).to(device)
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.to(device)
    return model


def checkpoint_tensors(model) -> Dict[str, torch.Tensor]:
    """Checkpoint key -> the parameter itself (TP = 1), as a torch_dist save would name it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {item.key: item.data for item in model.sharded_state_dict().values()
            if isinstance(item, ShardedTensor)}


@torch.no_grad()
def load_by_name(source, target) -> None:
    src, dst = checkpoint_tensors(source), checkpoint_tensors(target)
    if src.keys() != dst.keys():
        raise AssertionError(f"checkpoint names differ: only in the first "
                             f"{sorted(set(src) - set(dst))[:4]}, only in the second "
                             f"{sorted(set(dst) - set(src))[:4]}")
    for key, tensor in dst.items():
        tensor.copy_(src[key])


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=g).to(param.device, param.dtype)
        param.add_(noise * (0.1 if param.dim() == 1 else 0.02))


def depth_kwargs(scheme: str, batch: int, seq: int, device: torch.device) -> dict:
    """The model's depth arguments: the layout's K for per-step schemes, else SAMPLED_DEPTH."""
    from megatron_mesh.recurrence.schemes import has_per_step_parameters

    if has_per_step_parameters(scheme):
        return {}
    draw = SAMPLED_DEPTH.draw(0, 0, range(batch), seq)
    return {"num_loops": draw.num_loops, "backprop_loops": draw.backprop_loops,
            "step_mask": torch.from_numpy(draw.active).to(device)}


def logits_and_grads(model, tokens, positions, labels, **depth):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, **depth)  # [b, s, V]
    F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
    grads = {k: p.grad.float() for k, p in checkpoint_tensors(model).items() if p.grad is not None}
    return logits.detach().float(), grads


def compare(ctx: Context, scheme: str, first: Callable, second: Callable) -> dict:
    section = dict(ctx.profile.small_model, state_scheme=scheme)
    torch.manual_seed(1)
    a, b = build(section, first, ctx.device), build(section, second, ctx.device)
    perturb(a)
    load_by_name(a, b)
    batch, seq = ctx.profile.small_batch
    g = torch.Generator().manual_seed(2)
    tokens, labels = (torch.randint(0, section["vocab_size"], (batch, seq), generator=g).to(ctx.device)
                      for _ in range(2))
    positions = torch.arange(seq, device=ctx.device).unsqueeze(0).expand(batch, seq)
    depth = depth_kwargs(scheme, batch, seq, ctx.device)
    (la, ga), (lb, gb) = (logits_and_grads(m, tokens, positions, labels, **depth) for m in (a, b))
    if ga.keys() != gb.keys():
        raise AssertionError(f"{scheme}: different parameters got gradients")
    grad_errors = {k: ((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-30)).item() for k in gb}
    worst = max(grad_errors, key=grad_errors.get)
    return {"logits": ((la - lb).abs().max() / lb.abs().max()).item(),
            "worst_grad": worst, "grad": grad_errors[worst]}


def check(ctx: Context) -> CheckResult:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    name_a, spec_a, name_b, spec_b = spec_pair(ctx.profile.cpu)
    errors = {scheme: compare(ctx, scheme, spec_a, spec_b) for scheme in SCHEMES}
    ok = all(e["logits"] <= TOLERANCE and e["grad"] <= TOLERANCE for e in errors.values())
    stand_in = "" if name_a == "transformer_engine" else " (CPU stand-in: no TransformerEngine)"
    summary = f"{name_a} vs {name_b}{stand_in}: " + "; ".join(
        f"{s} logits {e['logits']:.1e}, grads {e['grad']:.1e} ({e['worst_grad']})"
        for s, e in errors.items()) + f"; allowed {TOLERANCE:g}"
    rows = [[s, f"{e['logits']:.2e}", f"{e['grad']:.2e}", e["worst_grad"]] for s, e in errors.items()]
    table = markdown_table(["scheme", "max logit diff / max logit", "worst grad rel. L2", "tensor"], rows)
    return CheckResult("specs", PASS if ok else FAIL, summary, details={"pair": [name_a, name_b],
                       "errors": errors, "tolerance": TOLERANCE}, table=table)

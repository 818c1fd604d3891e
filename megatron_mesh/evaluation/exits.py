"""Test-time compute: held-out loss against the loop steps a token spends.

One report per model and dataset, scored like ``perplexity`` (one document at a time, disjoint
windows of at most L tokens, NLL summed in float64), through the self-contained Hugging Face
model (``hf/modeling_megatron_mesh.py``), whose forward runs an ``ExitPolicy``:
- fixed depth t = 1..T: every token runs t loop steps (``num_loops=t``): the frontier a policy
  has to beat;
- KL exit (Huginn): a token stops once KL(p(t) || p(t-1)) of its next-token distributions at
  successive steps falls below a threshold; entropy exit likewise on H(p(t));
- the learned gate (Ouro; ``exit_gate: true`` models): a token stops once its exit CDF reaches q.

Each point reports the mean NLL and the mean loop steps per predicted token. Compute is not
steps alone: an adaptive policy reads out (coda, final norm, output layer) after every step to
decide, so each point also reports layer applications per token (prelude + steps x core, plus
the coda once for fixed depth or once per step for a policy) for comparing like with like.
Every forward starts from the same random state where the scheme draws x(0) (FORWARD_SEED).

``generation`` times greedy decoding with the KV cache per policy: tokens/s and mean steps of
the generated tokens (at batch 1, where an exit skips the rest of the loop).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron_mesh.errors import ConfigError, DataError
from megatron_mesh.evaluation.perplexity import Counted, check_ids, expected_documents, nll_sum, window_batches
from megatron_mesh.evaluation.tables import text_table
from megatron_mesh.progress import SILENT, Progress

FORWARD_SEED = 0
"""The torch seed each forward runs under (schemes with a random x(0))."""

DEFAULT_KL = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
"""KL thresholds (nats) of the default frontier."""
DEFAULT_GATE = (0.3, 0.5, 0.7, 0.9)
"""Exit-CDF thresholds q of the default frontier (models with exit gates)."""


@dataclass(frozen=True)
class Point:
    """One way of spending loop steps: fixed depth (``value`` steps) or an exit criterion
    ('kl', 'entropy', 'gate') at threshold ``value``."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        return f"fixed {int(self.value)}" if self.kind == "fixed" else f"{self.kind} {self.value:g}"


def twin_model(path, device: str = "cpu", verify_hashes: bool = True) -> Tuple[Any, Optional[str]]:
    """(the HF recursive model, ``MegatronMeshForCausalLM`` in fp32 and eval mode; its
    tokenizer, if it names one) of an export directory or, converted in memory, of a Megatron
    checkpoint (``verify_hashes``: against its manifest); ConfigError for a model without a loop."""
    from megatron_mesh.evaluation.loading import checkpoint_tokenizer, directory_tokenizer, is_megatron_checkpoint
    from megatron_mesh.hf.auto import load_causal_lm
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

    path = Path(path)
    if is_megatron_checkpoint(path):
        from megatron_mesh.checkpoint.reader import load_checkpoint, saved_model_config
        from megatron_mesh.hf.export import build_hf_model

        state, common = load_checkpoint(str(path), verify_hashes=verify_hashes)
        args = common.get("args")
        model, tokenizer = build_hf_model(state, saved_model_config(args)), checkpoint_tokenizer(args)
    else:
        model, tokenizer = load_causal_lm(path), directory_tokenizer(path)
    if not isinstance(model, MegatronMeshForCausalLM) or not model.model.loops:
        raise ConfigError(f"{path}: not a recursive model (its layout has no loop): exits need "
                          f"a layout such as 1+2R3+1")
    return model.float().to(device).eval(), tokenizer


def default_points(model, max_steps: Optional[int] = None, kl: Sequence[float] = DEFAULT_KL,
                   entropy: Sequence[float] = (), gate: Optional[Sequence[float]] = None
                   ) -> List[Point]:
    """Fixed depths 1..T (T = ``max_steps``, default the trained K), the KL and entropy
    thresholds, and the gate's (default DEFAULT_GATE where the model has gates)."""
    T = max_steps or model.model.loops
    points = [Point("fixed", t) for t in range(1, T + 1)]
    points += [Point("kl", v) for v in kl] + [Point("entropy", v) for v in entropy]
    gated = getattr(model.config, "exit_gate", False)
    if gate is None:
        gate = DEFAULT_GATE if gated else ()
    if gate and not gated:
        raise ConfigError(f"gate thresholds {list(gate)}: the model has no exit gates (trained "
                          f"without model.exit_gate: true); use KL or entropy exit")
    return points + [Point("gate", v) for v in gate]


def check_points(model, points: Sequence[Point], max_steps: Optional[int]) -> None:
    """ConfigError naming the first point the model cannot run (a depth past its loop's
    limit, a threshold out of range), before anything is scored."""
    for point in points:
        try:
            if point.kind == "fixed":
                model.model.depth(num_loops=int(point.value))
            else:
                model.model.depth(exit_policy=_policy(point, max_steps))
        except ValueError as err:
            raise ConfigError(f"{point.label}: {err}") from None


def _policy(point: Point, max_steps: Optional[int]):
    from megatron_mesh.hf.modeling_megatron_mesh import ExitPolicy

    return ExitPolicy(criterion=point.kind, threshold=point.value, max_steps=max_steps)


def _forward(model, inputs: Tensor, point: Point, max_steps: Optional[int]):
    """(logits [b, s, V], loop steps per token [b, s]) of one uncached forward."""
    torch.manual_seed(FORWARD_SEED)
    if point.kind == "fixed":
        out = model(input_ids=inputs, use_cache=False, num_loops=int(point.value))
        return out.logits, torch.full(inputs.shape, int(point.value), device=inputs.device)
    out = model(input_ids=inputs, use_cache=False, exit_policy=_policy(point, max_steps))
    return out.logits, out.exit_steps


def layer_applications(model, point: Point, mean_steps: float) -> float:
    """Layer applications per token: prelude + steps x core + the coda once (fixed depth) or
    after every step (a policy reads out to decide)."""
    m = model.model
    core = sum(len(c) for c in m.cores) / len(m.cores)
    codas = 1 if point.kind == "fixed" else mean_steps
    return len(m.prelude) + mean_steps * core + codas * len(m.coda)


def output_layer_applications(point: Point, mean_steps: float) -> float:
    """Output layers (h x V) per token: once, or for 'kl' and 'entropy' at most once more per
    step (their criteria need the next-token distribution; the gate reads z(t) itself)."""
    return 1 + mean_steps if point.kind in ("kl", "entropy") else 1


@torch.no_grad()
def frontier(model, documents: Iterable[List[int]], seq_length: int, points: Sequence[Point], *,
             max_steps: Optional[int] = None, batch_size: int = 8,
             max_documents: Optional[int] = None, source: str = "data",
             progress: Progress = SILENT, total_documents: Optional[int] = None) -> dict:
    """Mean NLL and mean loop steps per token of every point on ``documents``, and how many
    tokens ran 1, 2, .., T steps (``tokens_per_steps``)."""
    device = model.embed_out.weight.device
    nll, steps = [0.0] * len(points), [0.0] * len(points)
    T = max_steps or model.model.loops
    histograms = [torch.zeros(T + 1, dtype=torch.long) for _ in points]  # tokens per step count
    tokens, docs = 0, Counted(itertools.islice(documents, max_documents))
    progress.start(f"exits on {Path(source).name}, {len(points)} policies",
                   expected_documents(total_documents, max_documents))
    for inputs, labels in window_batches(docs, seq_length, batch_size):
        check_ids(torch.cat([inputs, labels[:, -1:]], 1), model.config.vocab_size, source)
        inputs, labels = inputs.to(device), labels.to(device)
        for i, point in enumerate(points):
            logits, used = _forward(model, inputs, point, max_steps)
            nll[i] += nll_sum(logits, labels)
            steps[i] += used.double().sum().item()
            histograms[i] += torch.bincount(used.flatten().cpu(), minlength=T + 1)[:T + 1]
        tokens += labels.numel()
        progress.update(docs.count, tokens)
    if not tokens:
        raise DataError(f"{source}: no document with at least 2 tokens to score")
    progress.finish(docs.count, tokens)
    rows = []
    for point, total, spent, histogram in zip(points, nll, steps, histograms):
        mean_steps = spent / tokens
        rows.append({**asdict(point), "label": point.label, "mean_nll": total / tokens,
                     "perplexity": math.exp(total / tokens), "mean_steps": mean_steps,
                     "layer_applications": layer_applications(model, point, mean_steps),
                     "output_layer_applications": output_layer_applications(point, mean_steps),
                     "tokens_per_steps": histogram[1:].tolist()})
    return {"data": str(source), "documents": docs.count, "tokens": tokens,
            "seq_length": seq_length, "trained_loops": model.model.loops, "rows": rows}


def savings(report: dict) -> List[str]:
    """Plain sentences: for each adaptive point, the fixed depth of no lower loss and the steps
    saved against it (or that no fixed depth reaches its loss)."""
    fixed = sorted((r for r in report["rows"] if r["kind"] == "fixed"), key=lambda r: r["mean_steps"])
    lines = []
    for row in (r for r in report["rows"] if r["kind"] != "fixed"):
        match = next((f for f in fixed if f["mean_nll"] <= row["mean_nll"]), None)
        if match is None:
            lines.append(f"{row['label']}: loss {row['mean_nll']:.4f} at {row['mean_steps']:.2f} "
                         f"steps/token, lower than every fixed depth")
            continue
        saved = 1 - row["mean_steps"] / match["mean_steps"]
        verdict = f"{saved:.1%} fewer steps" if saved >= 0 else f"{-saved:.1%} more steps"
        lines.append(f"{row['label']}: loss {row['mean_nll']:.4f} at {row['mean_steps']:.2f} "
                     f"steps/token; {match['label']} (loss {match['mean_nll']:.4f}) is the "
                     f"cheapest fixed depth as good: {verdict}")
    return lines


@torch.no_grad()
def generation(model, prompts: List[Tensor], points: Sequence[Point], new_tokens: int,
               max_steps: Optional[int] = None) -> List[dict]:
    """Greedy decoding with the per-step KV cache, one prompt at a time (batch 1): tokens/s of
    the decoding after each prompt's prefill (which is not timed) and mean loop steps of the
    generated tokens, per point."""
    if not prompts or new_tokens < 1:
        raise DataError("generation needs at least one prompt and one new token")
    rows = []
    for point in points:
        elapsed, steps = 0.0, []
        for prompt in prompts:
            torch.manual_seed(FORWARD_SEED)
            seconds, new = _decode(model, prompt, point, new_tokens, max_steps)
            elapsed, steps = elapsed + seconds, steps + new
        rows.append({**asdict(point), "label": point.label, "tokens": len(steps),
                     "tokens_per_s": len(steps) / elapsed, "mean_steps": sum(steps) / len(steps)})
    return rows


def _decode(model, prompt: Tensor, point: Point, new_tokens: int, max_steps: Optional[int]
            ) -> Tuple[float, List[int]]:
    """Greedy decode ``new_tokens`` after ``prompt`` [1, n]: (seconds the decoding took, the
    loop steps of each new token)."""
    kwargs = ({"num_loops": int(point.value)} if point.kind == "fixed"
              else {"exit_policy": _policy(point, max_steps)})
    out = model(input_ids=prompt, use_cache=True, **kwargs)
    _synchronize(prompt.device)
    start, steps = time.perf_counter(), []
    for _ in range(new_tokens):
        token = out.logits[:, -1:].argmax(-1)  # [1, 1]
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, **kwargs)
        steps.append(int(point.value) if point.kind == "fixed" else int(out.exit_steps[0, -1]))
    _synchronize(prompt.device)
    return time.perf_counter() - start, steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts_of(documents: Iterable[List[int]], count: int, length: int) -> List[Tensor]:
    """The first ``length`` tokens of the first ``count`` documents with at least 2 tokens,
    each [1, n]."""
    out = []
    for doc in documents:
        if len(doc) >= 2:
            out.append(torch.tensor([doc[:length]], dtype=torch.long))
        if len(out) == count:
            break
    return out


def table(report: dict) -> str:
    """Policy | mean NLL | perplexity | steps/token | layer and output-layer applications per
    token | the percent of tokens that ran 1, 2, .., T steps."""
    header = ["policy", "mean NLL", "ppl", "steps/token", "layers/token", "output layers/token",
              "% of tokens at 1..T steps"]
    rows = [[r["label"], f"{r['mean_nll']:.4f}", f"{r['perplexity']:.3f}", f"{r['mean_steps']:.3f}",
             f"{r['layer_applications']:.2f}", f"{r['output_layer_applications']:.2f}",
             _percents(r["tokens_per_steps"])] for r in report["rows"]]
    return text_table(header, rows)


def _percents(counts: List[int]) -> str:
    total = sum(counts) or 1
    return "/".join(f"{100 * n / total:.0f}" for n in counts)


def generation_table(rows: List[dict]) -> str:
    return text_table(["policy", "tokens", "tokens/s", "steps/token"],
                 [[r["label"], str(r["tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['mean_steps']:.3f}"]
                  for r in rows])


def plot(report: dict, path: Path, title: str = "") -> None:
    """Mean NLL against mean loop steps per token, one line per policy family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, style in (("fixed", "o-"), ("kl", "s--"), ("entropy", "^--"), ("gate", "D-.")):
        rows = sorted((r for r in report["rows"] if r["kind"] == kind), key=lambda r: r["mean_steps"])
        if rows:
            ax.plot([r["mean_steps"] for r in rows], [r["mean_nll"] for r in rows], style,
                    label={"fixed": "fixed depth"}.get(kind, f"{kind} exit"))
    ax.set_xlabel("mean loop steps per token")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or f"loss vs test-time compute ({Path(report['data']).name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Running models over samples and aggregating the paper's probes (Sec. 4.1, Figures 3, 4, 5).

One forward pass per batch of samples records the block's states (``forward(states=[...])``);
per sample we compute
- the relative update magnitude of each block (Fig. 3): the prelude (h_emb -> prelude output),
  each core application t (h(t) -> f_core(h(t))) and the coda (h(K) -> coda output); a vanilla
  layout is one block, 'stack' (h_emb -> its output);
- CKA (Fig. 4), RBF (the paper's) and linear, between h_emb, h(0) .. h(K) and h_out;
- the top-k normalised singular values (Fig. 5) of the same states;
then their mean and population std (ddof 0) over samples. h_out is the coda output *before* the
final layer norm (the block's last recorded state). MeSH models also get router and buffer
statistics (``megatron_mesh.probing.routers``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron_mesh.config.model import MeshConfig
from megatron_mesh.errors import ConfigError, DataError
from megatron_mesh.model.block import Recorded
from megatron_mesh.probing import metrics
from megatron_mesh.probing.routers import RouterStats, mesh_scheme, state_dict_of
from megatron_mesh.progress import SILENT, Progress

SPECTRUM_K = 50
"""Singular values per state in Fig. 5."""

H_OUT_NOTE = "h_out is the coda output before the final layer norm"


# ---------------------------------------------------------------------------------------------
# what is compared: labels and the recorded tensors behind them


def state_labels(num_loops: int) -> List[str]:
    """Fig. 4/5 states: ['h_emb', 'h(0)', .., 'h(K)', 'h_out'] (['h_emb', 'h_out'] if K = 0)."""
    loop = [f"h({t})" for t in range(num_loops + 1)] if num_loops else []
    return ["h_emb", *loop, "h_out"]


def block_labels(num_loops: int) -> List[str]:
    """Fig. 3 blocks: ['prelude', 'core 1', .., 'core K', 'coda'] (['stack'] if K = 0)."""
    if not num_loops:
        return ["stack"]
    return ["prelude", *(f"core {t + 1}" for t in range(num_loops)), "coda"]


def first_state(config: MeshConfig) -> Optional[Dict[str, str]]:
    """What h(0), the loop's first state, is under the model's scheme, as a short legend label
    and a figure caption; None without a loop (vanilla)."""
    from megatron_mesh.recurrence.injection import InjectionScheme
    from megatron_mesh.recurrence.mesh import MeshScheme
    from megatron_mesh.recurrence.schemes import scheme_class

    cls = scheme_class(config.state_scheme)
    if cls is None:
        return None
    if issubclass(cls, InjectionScheme):
        start = config.initial_state
        kind = "random start x(0), drawn afresh per forward" if start == "random" else "zero start x(0)"
        return {"short": kind.split(",")[0],
                "caption": f"h(0) = the {kind}, not the prelude output (the prelude output is injected)"}
    if issubclass(cls, MeshScheme):
        return {"short": "transitional read", "caption": "h(0) = the transitional step's read of the "
                "MeSH buffer (prelude output written), the core's first input"}
    return {"short": "prelude output", "caption": "h(0) = the prelude output, the core's first input"}


def state_tensors(recorded: Dict[str, Tensor], num_loops: int) -> List[Tensor]:
    """The recorded [s, b, h] tensors in ``state_labels`` order."""
    loop = [recorded[Recorded.loop_state(t)] for t in range(num_loops + 1)] if num_loops else []
    return [recorded[Recorded.EMBEDDINGS], *loop, recorded[Recorded.CODA]]


def block_pairs(recorded: Dict[str, Tensor], num_loops: int) -> List[Tuple[Tensor, Tensor]]:
    """(input, output) [s, b, h] of each block in ``block_labels`` order."""
    emb, prelude, coda = (recorded[n] for n in (Recorded.EMBEDDINGS, Recorded.PRELUDE, Recorded.CODA))
    if not num_loops:
        return [(emb, coda)]
    cores = [(recorded[Recorded.core_input(t)], recorded[Recorded.core_output(t)]) for t in range(num_loops)]
    return [(emb, prelude), *cores, (recorded[Recorded.CODA_INPUT], coda)]


# ---------------------------------------------------------------------------------------------
# per-sample metrics


def sample_metrics(recorded: Dict[str, Tensor], num_loops: int, threshold: float = 1.0,
                   k: int = SPECTRUM_K) -> Dict[str, Tensor]:
    """Every probe of each sample of one recorded forward pass (states [s, b, h]).

    Returns float64 tensors with the batch first: 'update_magnitude' [b, n_blocks],
    'cka_rbf' / 'cka_linear' [b, n, n] and 'spectrum' [b, n, r] (n states, r = min(k, s, h))."""
    def per_sample(h: Tensor) -> Tensor:
        return h.detach().transpose(0, 1)  # [s, b, h] -> [b, s, h]

    magnitude = torch.stack([metrics.update_magnitude(per_sample(x), per_sample(y))
                             for x, y in block_pairs(recorded, num_loops)], dim=-1)  # [b, n_blocks]
    states = [per_sample(h) for h in state_tensors(recorded, num_loops)]  # n x [b, s, h]
    spectrum = torch.stack([metrics.normalized_spectrum(h, k) for h in states], dim=1)  # [b, n, r]
    cka = {kind: torch.stack([metrics.cka_matrix([h[i] for h in states], kind, threshold)
                              for i in range(states[0].shape[0])])  # [b, n, n]
           for kind in ("rbf", "linear")}
    return {"update_magnitude": magnitude, "cka_rbf": cka["rbf"], "cka_linear": cka["linear"],
            "spectrum": spectrum}


# ---------------------------------------------------------------------------------------------
# one model over all samples


@dataclass
class ModelProbe:
    """The probes of one model: per-sample values (first dim = sample) and router statistics."""

    name: str
    path: str
    config: MeshConfig
    seq_length: int
    threshold: float
    per_sample: Dict[str, Tensor] = field(default_factory=dict)
    routers: Optional[dict] = None

    @property
    def num_loops(self) -> int:
        return self.config.num_loops

    def summary(self) -> dict:
        """The JSON record of this model (see ``write_report``)."""
        def stats(key: str) -> dict:
            values = self.per_sample[key]
            return {"mean": values.mean(0).tolist(), "std": values.std(0, correction=0).tolist()}

        states = state_labels(self.num_loops)
        return {
            "name": self.name, "path": self.path, "layout": self.config.layout,
            "state_scheme": self.config.state_scheme, "h0": first_state(self.config),
            "samples": int(self.per_sample["update_magnitude"].shape[0]),
            "seq_length": self.seq_length,
            "update_magnitude": {"blocks": block_labels(self.num_loops),
                                 **stats("update_magnitude")},
            "cka": {"states": states, "threshold": self.threshold, "note": H_OUT_NOTE,
                    "rbf": stats("cka_rbf"), "linear": stats("cka_linear")},
            "spectrum": {"states": states, "k": int(self.per_sample["spectrum"].shape[-1]),
                         **stats("spectrum")},
            "routers": self.routers,
        }


def batches(samples: Sequence[Sequence[int]], batch_size: int,
            device) -> List[Tuple[Tensor, Tensor]]:
    """(input_ids [b, s], position_ids [b, s]) batches of equal-length samples."""
    out = []
    for start in range(0, len(samples), batch_size):
        tokens = torch.tensor(samples[start:start + batch_size], dtype=torch.long, device=device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        out.append((tokens, positions))
    return out


@torch.no_grad()
def probe_model(loaded, samples: Sequence[Sequence[int]], *, threshold: float = 1.0,
                batch_size: int = 1, progress: Progress = SILENT, path: str = "") -> ModelProbe:
    """Run ``loaded`` (a ``LoadedModel``) over ``samples`` (equal-length token lists) and keep
    every sample's probes, plus router statistics for MeSH models; ``progress`` hears of every
    batch."""
    model = loaded.model
    device = next(model.parameters()).device
    result = ModelProbe(loaded.name, path, loaded.config, len(samples[0]), threshold)
    num_loops = result.num_loops
    scheme = mesh_scheme(model)
    router_stats = RouterStats(scheme) if scheme is not None else None
    parts: Dict[str, List[Tensor]] = {}
    done = 0
    progress.start(f"probe {loaded.name}", len(samples), "samples")
    for first, (input_ids, position_ids) in enumerate(batches(samples, batch_size, device)):
        states: List[Tuple[str, Tensor]] = []
        model(input_ids, position_ids, states=states)
        recorded = state_dict_of(states)
        try:
            values = sample_metrics(recorded, num_loops, threshold)
        except ValueError as err:  # e.g. a sample of one repeated token: constant states
            span = f"{first * batch_size}..{first * batch_size + input_ids.shape[0] - 1}"
            raise DataError(f"{loaded.name}: samples {span}: {err}") from None
        for key, value in values.items():
            parts.setdefault(key, []).append(value.cpu())
        if router_stats is not None:
            router_stats.add(recorded)
        done += input_ids.shape[0]
        progress.update(done, done * input_ids.shape[1])
    progress.finish(done, done * result.seq_length)
    result.per_sample = {key: torch.cat(values) for key, values in parts.items()}
    result.routers = router_stats.summary() if router_stats is not None else None
    return result


# ---------------------------------------------------------------------------------------------
# models and data as the command line names them


DEFAULT_SEQ_LENGTH = 512


def seq_length_for(limit: int, requested: Optional[int], path: str) -> int:
    """--seq-length, or 512 capped by the model's max_sequence_length ``limit``; ConfigError if
    the requested length does not fit the model."""
    if requested is None:
        return min(DEFAULT_SEQ_LENGTH, limit)
    if requested > limit:
        raise ConfigError(f"--seq-length {requested} exceeds the max_sequence_length {limit} of "
                          f"{path}")
    return requested


def load_samples(data: str, tokenizer: Optional[str], seq_length: int, num_samples: int):
    """The first ``seq_length`` tokens of the first ``num_samples`` long-enough documents."""
    from megatron_mesh.data.documents import fixed_length_samples, read_documents

    return fixed_length_samples(read_documents(data, tokenizer), seq_length, num_samples, data)


def probe_paths(paths: Sequence[str], data: str, num_samples: int, *,
                seq_length: Optional[int] = None, tokenizer: Optional[str] = None,
                names: Optional[Sequence[str]] = None, threshold: float = 1.0,
                batch_size: int = 1, device: str = "cpu",
                progress: Progress = SILENT, verify_hashes: bool = True) -> List[ModelProbe]:
    """Load each model in turn (``load_model``: Megatron checkpoint or HF directory), probe it on
    the same documents and free it. A jsonl ``data`` is tokenized with ``tokenizer`` or else the
    tokenizer the model's checkpoint names."""
    from megatron_mesh.evaluation.loading import load_model
    from megatron_mesh.evaluation.perplexity import check_ids

    cache: Dict[Tuple[int, Optional[str]], list] = {}
    probes = []
    for i, path in enumerate(paths):
        progress.note(f"loading {path}")
        loaded = load_model(path, device=device, verify_hashes=verify_hashes)
        if names:
            loaded.name = names[i]
        config = loaded.config
        length = seq_length_for(config.max_sequence_length, seq_length, path)
        key = (length, tokenizer or loaded.tokenizer)
        if key not in cache:
            cache[key] = load_samples(data, key[1], length, num_samples)
        check_ids(torch.tensor(cache[key]), config.vocab_size, f"{data} (for {path})")
        probes.append(probe_model(loaded, cache[key], threshold=threshold, batch_size=batch_size,
                                  progress=progress, path=str(path)))
        del loaded
    return probes


# ---------------------------------------------------------------------------------------------
# the report


def report(probes: Sequence[ModelProbe], settings: dict) -> dict:
    """probe.json::

        {"settings": {data, samples, cka_threshold, device, std, h_out},
         "models": [{"name", "path", "layout", "state_scheme", "h0": null | {"short", "caption"},
                     "samples", "seq_length",
                     "update_magnitude": {"blocks": [n_blocks], "mean": [..], "std": [..]},
                     "cka": {"states": [n], "threshold", "note",
                             "rbf": {"mean": [n][n], "std": [n][n]}, "linear": {same}},
                     "spectrum": {"states": [n], "k": r, "mean": [n][r], "std": [n][r]},
                     "routers": null | RouterStats.summary()}, ...]}

    RouterStats.summary() = {"buffer_slots": B, "tokens", "histogram_edges": [bins + 1],
    "steps": [{"step": -1 | t, "label": "transition" | "step{t}", "reads": "h(t+1)",
    "read" / "write": {"mean": [B], "std": [B], "usage": [B] (argmax fractions),
    "histogram": [B][bins] (token fractions), "entropy": {"mean", "std", "normalized_mean",
    "normalized_std"}}, "coefficients": {"sources": ["emb", "prelude", "core0", ..],
    "mean": [..], "std": [..]}}, ...]}."""
    return {"settings": {**settings, "std": "population std over samples (ddof 0)",
                         "h_out": H_OUT_NOTE},
            "models": [p.summary() for p in probes]}


def write_report(data: dict, out, force: bool = False) -> Path:
    """probe.json and the three figures into ``out``, which appears only when all are written
    (``megatron_mesh.fs.atomic_directory``; a non-empty ``out`` needs ``force``)."""
    from megatron_mesh.fs import atomic_directory
    from megatron_mesh.probing import figures

    with atomic_directory(out, force) as tmp:
        (tmp / "probe.json").write_text(json.dumps(data, indent=1) + "\n")
        figures.save_all(data["models"], tmp)
    return Path(out)

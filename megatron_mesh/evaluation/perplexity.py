"""Perplexity of a causal LM on held-out documents (Megatron checkpoint or HF directory).

Context handling, the convention behind every number here:
- each document is scored on its own: no context crosses a document boundary;
- a document of n tokens gives n - 1 predictions (every token but its first). Its inputs
  doc[:-1] are cut into consecutive, non-overlapping windows of at most L tokens; the window
  [s, e) predicts doc[s+1 : e+1] from doc[s:e] alone, at positions 0 .. e-s-1. The first
  prediction of a later window therefore sees only its own window (one token of context), not
  the tokens before it: disjoint windows, like lm-eval's rolling loglikelihood without overlap
  (minus the prefix token lm-eval uses to score a document's first token);
- per dataset: mean NLL = (sum of -log p over every prediction, in float64) / token count, in
  nats per token; perplexity = exp(mean NLL); bits per token = mean NLL / ln 2.

The two backends are independent implementations of the model: a Megatron checkpoint runs as
megatron-mesh's ``MeshGPTModel``, an HF directory (export or GPT-NeoX) through transformers
(``megatron_mesh.hf.auto.load_causal_lm``: an export as the exported HF model class); both give
logits [b, s, V] and share only the scoring below, so their agreement checks the export.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mesh.errors import CheckpointError, ConfigError, DataError
from megatron_mesh.evaluation.names import model_name
from megatron_mesh.evaluation.tables import text_table
from megatron_mesh.progress import SILENT, Progress

Window = Tuple[List[int], List[int]]
"""(inputs, labels) of one window: labels[i] is the token after inputs[i]."""


@dataclass
class Scorer:
    """A causal LM as ``logits(tokens [b, s]) -> [b, s, V]`` and what scoring needs to know."""

    name: str
    backend: str
    """'megatron' (MeshGPTModel) or 'hf' (transformers)."""
    logits: Callable[[Tensor], Tensor]
    max_length: int
    vocab_size: int
    tokenizer: Optional[str]
    """What the model says tokenizes its text, if it says."""
    device: str


def load_scorer(path, device: str = "cpu", verify_hashes: bool = True,
                name: Optional[str] = None, trust_remote_code: bool = False) -> Scorer:
    """The model in ``path``: a Megatron checkpoint directory (``verify_hashes``: against its
    integrity manifest) or an HF model directory (megatron_mesh.hf.auto: the folder's code runs
    only with ``trust_remote_code``, never for megatron-mesh exports); ``name`` labels it
    (default ``names.model_name``)."""
    from megatron_mesh.evaluation.loading import is_hf_directory, is_megatron_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if is_megatron_checkpoint(path):
        from megatron_mesh.evaluation.loading import load_model

        return megatron_scorer(load_model(path, device=device, verify_hashes=verify_hashes), device,
                               name)
    if is_hf_directory(path):
        return _hf_scorer(path, device, name, trust_remote_code)
    raise CheckpointError(f"{path}: neither a Megatron checkpoint nor a Hugging Face model directory")


def megatron_scorer(loaded, device: str, name: Optional[str] = None) -> Scorer:
    """A Scorer over a Megatron model already loaded by ``evaluation.loading.load_model``."""

    def logits(tokens: Tensor) -> Tensor:  # [b, s] -> [b, s, V]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return loaded.model(tokens, positions)

    config = loaded.config
    return Scorer(name or loaded.name, "megatron", logits, config.max_sequence_length,
                  config.vocab_size, loaded.tokenizer, device)


def _hf_scorer(path: Path, device: str, name: Optional[str] = None,
               trust_remote_code: bool = False) -> Scorer:
    from megatron_mesh.hf.auto import load_causal_lm

    model = load_causal_lm(path, trust_remote_code)
    model = model.float().to(device).eval()  # fp32 whatever the export's dtype

    def logits(tokens: Tensor) -> Tensor:  # [b, s] -> [b, s, V]
        return model(input_ids=tokens, use_cache=False).logits

    from megatron_mesh.evaluation.loading import directory_tokenizer

    tokenizer = directory_tokenizer(path)
    return Scorer(name or model_name(path), "hf", logits, model.config.max_position_embeddings,
                  model.config.vocab_size, tokenizer, device)


def check_seq_length(seq_length: Optional[int], max_length: int, name: str) -> int:
    """The window length L: ``seq_length``, default the model's maximum, never beyond it."""
    if seq_length is None:
        return max_length
    if not 1 <= seq_length <= max_length:
        raise ConfigError(f"--seq-length {seq_length}: model {name} takes 1..{max_length} tokens "
                          f"(its max_sequence_length)")
    return seq_length


def windows(doc: List[int], length: int) -> Iterator[Window]:
    """The disjoint windows of one document (module docstring): n - 1 predictions in all."""
    for start in range(0, len(doc) - 1, length):
        end = min(start + length, len(doc) - 1)
        yield doc[start:end], doc[start + 1:end + 1]


def window_batches(documents: Iterable[List[int]], length: int, batch_size: int
                   ) -> Iterator[Tuple[Tensor, Tensor]]:
    """(inputs [b, s], labels [b, s]) of every window, windows of equal length batched together
    (full windows as they come, the shorter ones when the documents run out)."""
    buckets: Dict[int, List[Window]] = defaultdict(list)
    for doc in documents:
        for window in windows(doc, length):
            bucket = buckets[len(window[0])]
            bucket.append(window)
            if len(bucket) == batch_size:
                yield _stack(bucket)
                bucket.clear()
    for size in sorted(buckets, reverse=True):
        if buckets[size]:
            yield _stack(buckets[size])


def _stack(bucket: List[Window]) -> Tuple[Tensor, Tensor]:
    inputs = torch.tensor([w[0] for w in bucket], dtype=torch.long)  # [b, s]
    labels = torch.tensor([w[1] for w in bucket], dtype=torch.long)  # [b, s]
    return inputs, labels


def nll_sum(logits: Tensor, labels: Tensor) -> float:
    """Sum of -log p(label) over every position, accumulated in float64."""
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                            reduction="none")  # [b*s]
    return nll.double().sum().item()


@dataclass
class Result:
    """One model on one dataset."""

    documents: int = 0
    tokens: int = 0
    """Predicted tokens (n - 1 per document)."""
    nll: float = 0.0
    """Summed NLL in nats (float64)."""

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    def as_dict(self) -> dict:
        mean = self.mean_nll
        return {"documents": self.documents, "tokens": self.tokens, "nll_sum": self.nll,
                "mean_nll": mean, "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2)}


class Counted:
    """Iterates ``items``, counting how many it has handed out."""

    def __init__(self, items: Iterable):
        self.items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.count += 1
        return item


def check_ids(tokens: Tensor, vocab_size: int, source: str) -> None:
    """Token ids the model has no embedding for: the data was tokenized for another model."""
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"{source}: token id {top} >= the model's vocabulary size {vocab_size} "
                         f"(data tokenized for another model?)")


def expected_documents(total: Optional[int], max_documents: Optional[int]) -> Optional[int]:
    """The documents a run will score, for progress lines: ``total`` (the data's count, if
    known) capped by ``max_documents``."""
    if total is None or max_documents is None:
        return max_documents if total is None else total
    return min(total, max_documents)


@torch.no_grad()
def evaluate(scorer: Scorer, documents: Iterable[List[int]], seq_length: int, *, batch_size: int = 8,
             max_documents: Optional[int] = None, source: str = "data", progress: Progress = SILENT,
             total_documents: Optional[int] = None) -> Result:
    """Score ``documents`` (lists of token ids) with ``scorer`` in windows of ``seq_length``;
    ``progress`` hears of every batch (``total_documents``: how many ``documents`` holds)."""
    result, docs = Result(), Counted(itertools.islice(documents, max_documents))
    progress.start(f"{scorer.name} on {Path(source).name}",
                   expected_documents(total_documents, max_documents))
    for inputs, labels in window_batches(docs, seq_length, batch_size):
        check_ids(torch.cat([inputs, labels[:, -1:]], 1), scorer.vocab_size, source)
        logits = scorer.logits(inputs.to(scorer.device))  # [b, s, V]
        result.nll += nll_sum(logits, labels.to(scorer.device))
        result.tokens += labels.numel()
        progress.update(docs.count, result.tokens)
    result.documents = docs.count
    if not result.tokens:
        raise DataError(f"{source}: no document with at least 2 tokens to score")
    progress.finish(result.documents, result.tokens)
    return result


def table(records: List[dict]) -> str:
    """Perplexity per model (rows) and dataset (columns)."""
    data = list(dict.fromkeys(r["data"] for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    cell = {(r["model"], r["data"]): f"{r['perplexity']:.3f}" for r in records}
    names = {r["model"]: r["name"] for r in records}
    header = ["model", *(Path(d).name for d in data)]
    rows = [[names[m], *(cell.get((m, d), "-") for d in data)] for m in models]
    return text_table(header, rows)

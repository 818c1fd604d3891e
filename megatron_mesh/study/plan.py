"""A study file (YAML) -> the list of training runs it asks for.

A study file names one experiment config and what every run changes in it::

    base: ../tiny-cpu.yml              # experiment YAML, relative to this file
    set:                               # `--set` overrides shared by every run (dotted keys)
      training.train_iters: 8
      data.valid_path: [data/corpus/valid_text_document]
    variants:                          # name -> its own overrides, in table/figure order
      vanilla: {model.layout: "8", model.state_scheme: vanilla}
      mesh: {model.layout: "2+2R2+2", model.state_scheme: mesh}
    seeds: [1234, 1235]                # each variant runs once per seed (init and data order)
    baseline: vanilla                  # the variant deltas are taken against
    launch: {nproc_per_node: 1}        # torchrun processes per run
    heldout: {max_documents: 200, seq_length: null, batch_size: 8}
    probes: {samples: 8, seq_length: 64}   # null: no probes

Relative data paths are read from the directory the study is started in, as for
tools/pretrain_mesh.py. Every variant of one seed sees the same data in the same order: the
data order depends only on `training.seed` and the data settings, which variants leave alone.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_mesh.config.yaml_file import load_config_tree, parse_value
from megatron_mesh.errors import ConfigError, MeshError

KEYS = ("description", "base", "set", "variants", "seeds", "baseline", "launch", "heldout", "probes")
HELDOUT_DEFAULTS = {"max_documents": 500, "seq_length": None, "batch_size": 8}
PROBE_DEFAULTS = {"samples": 8, "seq_length": None, "batch_size": 4}


class StudyError(MeshError, ValueError):
    """An invalid study file, or a study directory that disagrees with it."""


@dataclass
class Study:
    path: Path
    base: Path
    shared: Dict[str, Any]
    variants: Dict[str, Dict[str, Any]]
    seeds: List[int]
    baseline: Optional[str]
    launch: Dict[str, Any] = field(default_factory=dict)
    heldout: Dict[str, Any] = field(default_factory=dict)
    probes: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class Run:
    name: str
    """'<variant>-s<seed>': its directory under the study's runs/."""
    variant: str
    seed: int
    overrides: tuple
    """`--set` strings for tools/pretrain_mesh.py: shared, then the variant's, then the seed
    (the runner adds the run's own save/TensorBoard directories)."""

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:16]


def set_item(key: str, value: Any) -> str:
    """KEY=VALUE with the value as JSON, which the config loader reads back as the same YAML."""
    return f"{key}={json.dumps(value if not isinstance(value, Path) else str(value))}"


def _mapping(data: dict, key: str, path: Path) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise StudyError(f"{path}: '{key}' must be a mapping")
    return value


def load_study(path, sets: Sequence[str] = (), seeds: Optional[Sequence[int]] = None) -> Study:
    """Read a study file; ``sets`` (KEY=VALUE) add to its shared overrides, ``seeds`` replace
    its seed list."""
    path = Path(path)
    try:
        data = parse_value(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; valid: {list(KEYS)}")
    if "base" not in data or not data.get("variants"):
        raise StudyError(f"{path}: a study needs 'base' (experiment config) and 'variants'")
    shared = dict(_mapping(data, "set", path))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise StudyError(f"--set {item!r}: expected KEY=VALUE")
        shared[key.strip()] = parse_value(value)
    variants = _mapping(data, "variants", path)
    if not all(isinstance(v, dict) for v in variants.values()):
        raise StudyError(f"{path}: each variant must map config keys to values")
    baseline = data.get("baseline", "vanilla" if "vanilla" in variants else None)
    if baseline is not None and baseline not in variants:
        raise StudyError(f"{path}: baseline {baseline!r} is not a variant ({list(variants)})")
    seeds = list(seeds if seeds is not None else data.get("seeds") or [1234])
    no_probes = "probes" in data and data["probes"] is None
    return Study(path, (path.parent / data["base"]).resolve(), shared,
                 {str(k): dict(v) for k, v in variants.items()}, [int(s) for s in seeds], baseline,
                 _mapping(data, "launch", path), {**HELDOUT_DEFAULTS, **_mapping(data, "heldout", path)},
                 None if no_probes else {**PROBE_DEFAULTS, **_mapping(data, "probes", path)})


def plan_runs(study: Study, only: Sequence[str] = ()) -> List[Run]:
    """Every (variant, seed) run, seed by seed, variants in file order within a seed (so a study
    stopped early has whole seeds to compare); ``only`` keeps the named variants."""
    missing = [v for v in only if v not in study.variants]
    if missing:
        raise StudyError(f"--only {missing}: not variants of {study.path} ({list(study.variants)})")
    runs = []
    for seed in study.seeds:
        for variant, own in study.variants.items():
            if only and variant not in only:
                continue
            items = {**study.shared, **own, "training.seed": seed}
            overrides = tuple(set_item(k, v) for k, v in items.items())
            runs.append(Run(f"{variant}-s{seed}", variant, seed, overrides))
    for run in runs:  # every key and value is checked before anything trains
        config_tree(study, run)
    return runs


def config_tree(study: Study, run: Run) -> dict:
    """The run's merged experiment tree (keys checked; StudyError naming the run if not)."""
    from megatron_mesh.training.arguments import megatron_argv

    try:
        tree, origins = load_config_tree(study.base, run.overrides)
        with warnings.catch_warnings():  # megatron-core's deprecation notes, once per run
            warnings.simplefilter("ignore", UserWarning)
            megatron_argv(tree, origins)  # the same checks the trainer makes
    except ConfigError as err:
        raise StudyError(f"{study.path}: run {run.name}: {err}") from None
    return tree


def data_prefixes(value) -> List[str]:
    """The dataset prefixes of a data.path-style value (a prefix, or a list with blend weights)."""
    items = [value] if isinstance(value, str) else list(value or [])
    return [str(p) for p in items if not isinstance(p, (int, float))
            and not str(p).replace(".", "", 1).isdigit()]

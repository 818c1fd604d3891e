"""The package's imports point down its layers and never in a circle (CONTRIBUTING.md draws it).

Read from the source (every import statement, those inside functions too), so a lazy import
that climbs is caught as surely as a module-level one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mesh"

LAYERS = (
    ("errors",),  # MeshError and the user errors no single module owns; plain Python
    ("fs", "progress", "compat"),  # plain Python, torch and the CPU shims
    ("recurrence",),  # the MeSH math: layout, unrolled graph, schemes, loop depth; no megatron
    ("parallel",),  # pipeline stages, the carry across them, replicated parameters
    ("config",),  # MeshConfig (a megatron TransformerConfig), the experiment, the YAML reader
    ("model", "data"),  # the megatron-core model; the datasets and tokenizer
    ("checkpoint",),  # finding, verifying, reading and writing Megatron checkpoints
    ("hf",),  # Hugging Face export, import and the HF twin of the model
    ("evaluation",),
    ("probing",),
    ("training",),  # what tools/pretrain_mesh.py runs around megatron's trainer
    ("qualify", "study", "corpora", "cli"),  # device checks, studies, the demo corpora, the tools' shell
)
"""Bottom first. A module imports its own sub-package and the layers below, never a sibling of
its layer or anything above."""


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(module: str, path: Path):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


MODULES = dict(_modules())
GRAPH = {m: sorted({i for i in _imports(m, p) if i in MODULES and i != m}) for m, p in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _layer(module: str) -> int:
    top = _top(module)
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    raise AssertionError(f"{module}: its sub-package {top!r} is in no layer of LAYERS: add it there")


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "megatron_mesh":  # the package's face: it installs the shims of compat
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "megatron_mesh"))
def test_imports_point_down(module):
    climbs = [f"{module} -> {target}" for target in GRAPH[module]
              if _top(target) != _top(module) and _top(target) and _layer(target) >= _layer(module)]
    assert not climbs, f"imports that point up or sideways (LAYERS in {Path(__file__).name}): {climbs}"


def test_no_import_cycles():
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for target in GRAPH[module]:
            if target != "megatron_mesh":
                visit(target)
        on_path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)

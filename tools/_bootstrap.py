"""Every tool's first import: ``from _bootstrap import cli`` (``python tools/X.py`` puts tools/ first
on sys.path, so this file is found).

It puts the repository root on sys.path, once, so ``megatron_mesh`` imports from this checkout
without an install, and hands the tool ``megatron_mesh.cli`` (the error shell and the standard
flags). That module is read from its file without running the package's ``__init__``, which
imports torch and megatron-core (seconds): a tool's ``--help`` imports neither
(tests/tools/test_startup.py). It is registered under its own name, so the package, imported
after parsing, uses this same module.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_cli():
    name = "megatron_mesh.cli"
    if name in sys.modules or "megatron_mesh" in sys.modules:  # e.g. a test running a tool in-process
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, ROOT / "megatron_mesh" / "cli.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cli = _load_cli()

"""An English corpus that exists on every machine with Python: its own documentation.

Documents are the pydoc topics (the language reference text that ships in ``pydoc_data``) and,
per standard-library source file, the module/class/function docstrings (read with ``ast``,
nothing imported or executed). Nothing is fetched; the order is deterministic.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator, List


def pydoc_topics() -> List[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 40)


def stdlib_docstrings(max_chars: int) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        text = _docstrings(path)
        if len(text) < 200:
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            return


def python_docs_corpus(max_chars: int = 3_000_000) -> List[str]:
    """About ``max_chars`` characters of documents (pydoc topics first, then docstrings)."""
    docs = pydoc_topics()
    return docs + list(stdlib_docstrings(max_chars - sum(len(d) for d in docs)))

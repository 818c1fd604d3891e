"""Plain-text tables for the evaluation tools' stdout."""

from __future__ import annotations

from typing import List, Sequence


def text_table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    """Columns padded to their widest cell, ' | ' between them, a dashed line under the header."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)

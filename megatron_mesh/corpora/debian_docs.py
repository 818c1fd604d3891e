"""An offline English corpus: Debian's documentation packages, extracted to plain text.

The packages (Debian 12 "bookworm"; ``tools/build_corpus.py`` installs them itself unless
``--no-install``, which needs root and a reachable Debian mirror, nothing else)::

    apt-get install -y --no-install-recommends linux-doc-6.1    # kernel docs: reST (.rst.gz)
    apt-get install -y --no-install-recommends python3.11-doc   # Python docs: Sphinx HTML

Files come from ``dpkg-query -L`` (no assumption about where a package puts them). A package
that ships reST is read from its reST (linux-doc-6.1 also ships the Sphinx HTML of the same
pages, which would be every page twice); otherwise from its HTML. Plain ``.txt`` files are
taken as they are. Translations, Sphinx sources/static files and index pages are skipped.

Pipeline, standard library only: markup -> plain text (``rest_to_text`` / ``html_to_text``),
whitespace normalised, one document per file with long files cut at paragraph boundaries into
~``max_chars`` pieces, documents under ``min_chars`` dropped, exact duplicates (same text up to
case and whitespace) dropped after their first occurrence, and a train/held-out split by a hash
of the source path (so every piece of one file lands on the same side, stable across runs and
machines). The result is ``train.jsonl`` and ``valid.jsonl`` (``text``, ``package``,
``source``), ready for ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_mesh.errors import MeshError

DEFAULT_PACKAGES = ("linux-doc-6.1", "python3.11-doc")
SKIP_DIRS = {"_sources", "_static", "_images", "_downloads", "translations"}
SKIP_PAGES = {"search", "py-modindex", "contents"}  # navigation, not prose (and genindex*)
SPLITS = ("train", "valid")


class PackageError(MeshError, RuntimeError):
    """A documentation package is missing and could not be installed; names the package."""


# ---- packages -------------------------------------------------------------------------------

def installed_version(package: str) -> Optional[str]:
    """The installed version, or None (not installed, or no dpkg on this machine)."""
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
                          capture_output=True, text=True)
    status, _, version = done.stdout.partition(" ")
    return version if done.returncode == 0 and status == "installed" else None


def install_packages(packages: Sequence[str]) -> None:
    """apt-get install the packages not yet installed (none missing: apt is never called, so
    an already provisioned machine needs neither root nor a mirror)."""
    missing = [p for p in packages if installed_version(p) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise PackageError(f"apt-get not found: cannot install {' '.join(missing)} "
                           "(install them by other means and pass --no-install)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise PackageError(f"apt-get install {' '.join(missing)} failed "
                           f"(exit {done.returncode}; root and a Debian mirror are needed):\n{tail}")


def package_files(package: str) -> List[str]:
    """Every path the package installed, from dpkg's own list."""
    if installed_version(package) is None:
        raise PackageError(f"{package} is not installed (apt-get install -y "
                           f"--no-install-recommends {package}, or drop --no-install)")
    done = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _kind(path: Path) -> Optional[str]:
    name = path.name
    if name.endswith((".rst", ".rst.gz")):
        return "rst"
    if name.endswith((".txt", ".txt.gz")):
        return "text"
    stem = name.rsplit(".", 1)[0]
    if name.endswith(".html") and stem not in SKIP_PAGES and not stem.startswith("genindex"):
        return "html"
    return None


def select_sources(paths: Iterable[str]) -> List[Tuple[Path, str]]:
    """(path, kind) of the text-bearing files, sorted; HTML dropped when reST is there."""
    found = []
    for path in map(Path, paths):
        kind = _kind(path)
        if kind and not SKIP_DIRS & set(path.parts) and path.is_file() and not path.is_symlink():
            found.append((path, kind))
    if any(kind == "rst" for _, kind in found):
        found = [(p, k) for p, k in found if k != "html"]
    return sorted(found)


def read_source(path: Path) -> str:
    """Text of a (possibly gzipped, as Debian ships docs) file; bad bytes never stop a build."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


# ---- markup -> text -------------------------------------------------------------------------

# directives whose body is not prose (code to run, tables of contents, figures, raw LaTeX/HTML)
DROP_BODY = {"toctree", "kernel-doc", "include", "kernel-include", "literalinclude", "raw",
             "image", "figure", "kernel-figure", "kernel-render", "kernel-abi", "kernel-feat",
             "tabularcolumns", "cssclass", "contents", "sectnum", "index", "highlight", "math"}
# directives whose argument is prose (a title, a C declaration), unlike a language or a path
PROSE_ARGUMENTS = {"note", "warning", "attention", "caution", "danger", "error", "hint",
                   "important", "tip", "admonition", "seealso", "topic", "sidebar", "rubric",
                   "table", "list-table", "flat-table", "csv-table", "deprecated",
                   "versionadded", "versionchanged", "glossary"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.+-]+)::(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s|$)")       # comments, targets, substitution definitions
_FOOTNOTE = re.compile(r"^(\s*)\.\.\s+(\[[^\]]+\].*)$")
_OPTION = re.compile(r"^\s+:[\w -]+:(\s.*)?$")
_ADORNMENT = re.compile(r"^\s*([!-/:-@\[-`{-~])\1{2,}\s*$")  # ====, ----, ~~~~ title lines
_INLINE = [
    (re.compile(r"``(.+?)``"), r"\1"),                                   # ``literal``
    (re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <t>`
    (re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`[~!]?([^`]*)`"), r"\1"),       # :c:func:`name`
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),                  # `text <url>`_
    (re.compile(r"`([^`]+)`__?"), r"\1"),                               # `name`_
    (re.compile(r"`([^`]+)`"), r"\1"),                                  # `default role`
    (re.compile(r"\*\*(\S[^*\n]*?)\*\*"), r"\1"),                       # **strong**
    (re.compile(r"(?<![\w*])\*(\S[^*\n]*?)\*(?![\w*])"), r"\1"),        # *emphasis*
]


def _indent(line: str) -> int:
    """Columns of leading whitespace (tabs to 8, as docutils reads them; the text keeps them)."""
    line = line.expandtabs(8)
    return len(line) - len(line.lstrip())


def _block_end(lines: List[str], start: int, indent: int) -> int:
    """Index after the block opened at ``start``: blank or more deeply indented lines."""
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    return end


def _is_adornment(lines: List[str], i: int) -> bool:
    """A title's underline (text right above) or overline (same line two below); a rule line
    elsewhere (a one-column table border, a separator in code) is kept."""
    if not _ADORNMENT.match(lines[i]):
        return False
    above = i > 0 and lines[i - 1].strip() and not _ADORNMENT.match(lines[i - 1])
    overline = i + 2 < len(lines) and lines[i + 2].strip() == lines[i].strip()
    return bool(above or overline)


def _prose_argument(name: str) -> bool:
    return name in PROSE_ARGUMENTS or (":" in name and "namespace" not in name)  # c:function


def _literal_marker(line: str) -> Optional[str]:
    """'Text::' -> 'Text:', 'Text ::' -> 'Text', a lone '::' -> None (dropped)."""
    if not line.rstrip().endswith("::"):
        return line
    body = line.rstrip()[:-2]
    if not body.strip():
        return None
    return body.rstrip() if body.endswith((" ", "\t")) else body + ":"


def rest_to_text(text: str) -> str:
    """reST -> readable text: directive and comment lines, non-prose directive bodies, options,
    title adornments and literal-block markers go; roles and inline markup keep their text;
    prose directive bodies (notes, code blocks) and tables stay as they are."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        directive, footnote = _DIRECTIVE.match(line), _FOOTNOTE.match(line)
        if footnote:
            out.append(footnote.group(1) + footnote.group(2))
        elif directive and directive.group(2).lower() not in DROP_BODY:
            if _prose_argument(directive.group(2).lower()) and directive.group(3).strip():
                out.append(directive.group(1) + directive.group(3).strip())
            i += 1
            while i < len(lines) and _OPTION.match(lines[i]):
                i += 1
            continue  # the body goes through this loop: nested directives are handled too
        elif directive or _EXPLICIT.match(line):
            i = _block_end(lines, i, _indent(line))
            continue
        elif not _is_adornment(lines, i):
            kept = _literal_marker(line)
            if kept is not None:
                out.append(kept)
        i += 1
    text = "\n".join(out)
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


class _HTMLText(HTMLParser):
    """Text of an HTML page: the Sphinx main body (``role="main"``) when there is one, blocks
    on their own lines, <pre> verbatim, scripts/styles/permalink marks left out."""

    PARAGRAPHS = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
                  "blockquote", "table", "ul", "ol", "dl", "hr"}
    LINES = {"li", "dt", "dd", "tr", "br", "caption", "figcaption"}
    HIDDEN = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.all, self.main = [], []
        self.hidden = self.pre = self.cell = 0
        self.main_depth = 0  # open <div>s since the main body began (0: outside it)
        self.first_cell = True
        self.after_marker = False  # just wrote "- ": a <p> here stays on the item's line

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and (self.main_depth or attrs.get("role") == "main"):
            self.main_depth += 1
        if tag in self.HIDDEN or "headerlink" in (attrs.get("class") or ""):
            self.hidden += 1
        self.pre += tag == "pre"
        if tag in ("td", "th"):
            self._emit("" if self.first_cell else " | ")
            self.first_cell, self.cell = False, self.cell + 1
        self._break(tag, start=True)
        if tag == "tr":
            self.first_cell = True
        elif tag == "li":
            self._emit("- ")
            self.after_marker = True

    def handle_endtag(self, tag):
        self._break(tag, start=False)
        if tag in ("td", "th") and self.cell:
            self.cell -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if (tag in self.HIDDEN or tag == "a") and self.hidden:
            self.hidden -= 1  # permalinks are <a>s holding only their mark, never nested
        if tag == "div" and self.main_depth:
            self.main_depth -= 1

    def handle_data(self, data):
        if self.hidden:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self._at_line_start() or self.after_marker:
                data = data.lstrip()
        self._emit(data)
        self.after_marker = self.after_marker and not data

    def _break(self, tag: str, start: bool) -> None:
        """A new line before/after line-level blocks, a blank line around paragraphs; only a
        space before a paragraph in a table cell or right after a list marker."""
        if tag == "p" and (self.cell or self.after_marker):
            parts = self.main if self.main_depth else self.all
            if start and parts and not parts[-1][-1:].isspace():
                self._emit(" ")
        elif tag in self.LINES or tag in self.PARAGRAPHS:
            if not self._at_line_start():
                self._emit("\n")
            if tag in self.PARAGRAPHS:
                self._emit("\n")

    def _at_line_start(self) -> bool:
        parts = self.main if self.main_depth else self.all
        return not parts or parts[-1].endswith("\n")

    def _emit(self, text: str) -> None:
        if text:
            self.all.append(text)
            if self.main_depth:
                self.main.append(text)


def html_to_text(html: str) -> str:
    """Main body text of a Sphinx page (the whole page when it has no main body)."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "".join(parser.main or parser.all).replace("\u00b6", "")


def normalise(text: str) -> str:
    """Unix newlines, no control characters or trailing spaces, at most one blank line in a
    row, no blank lines at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def to_text(raw: str, kind: str) -> str:
    """Plain text of a file's contents; ``kind`` from ``select_sources``."""
    if kind == "rst":
        raw = rest_to_text(raw)
    elif kind == "html":
        raw = html_to_text(raw)
    return normalise(raw)


# ---- documents ------------------------------------------------------------------------------

def split_long(text: str, max_chars: int) -> List[str]:
    """Pieces of about ``max_chars`` cut between paragraphs (a longer paragraph stays whole);
    joined with a blank line they give ``text`` back."""
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        if current and size + len(para) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    pieces.append("\n\n".join(current))
    return pieces


def dedup_key(text: str) -> bytes:
    """Equal for texts that differ only in case and whitespace."""
    return hashlib.sha1(" ".join(text.split()).casefold().encode()).digest()


def is_held_out(source: str, fraction: float) -> bool:
    """sha256(source)'s first 8 bytes as a fraction of 2**64 below ``fraction``. By path, not
    text: all pieces of a file go to one side, and a change to the extraction moves nothing."""
    value = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
    return value < fraction * 2**64


@dataclass
class Counts:
    """Documents and characters written to one split."""

    documents: int = 0
    characters: int = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.characters += len(text)


@dataclass
class PackageStats:
    """What became of one package's files: read, dropped (short, duplicate), kept per split."""

    files: int = 0
    duplicates: int = 0
    short: int = 0
    splits: Dict[str, Counts] = field(default_factory=lambda: {s: Counts() for s in SPLITS})


def package_documents(sources: Sequence[Tuple[Path, str]], max_chars: int
                      ) -> Iterator[Tuple[str, str]]:
    """(source path, document text) for every piece of every file, in order."""
    for path, kind in sources:
        for piece in split_long(to_text(read_source(path), kind), max_chars):
            yield str(path), piece


def write_splits(sources: Dict[str, Sequence[Tuple[Path, str]]], out_dir: Path, *,
                 valid_fraction: float, max_documents: Optional[int] = None,
                 min_chars: int = 200, max_chars: int = 20_000) -> Dict[str, PackageStats]:
    """``train.jsonl`` / ``valid.jsonl`` in ``out_dir`` from each package's sources (in the
    given order); at most ``max_documents`` kept documents per package. Stats per package."""
    seen, stats = set(), {}
    files = {split: open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        for package, package_sources in sources.items():
            stats[package] = _write_package(package, package_sources, files, seen,
                                            valid_fraction=valid_fraction, max_documents=max_documents,
                                            min_chars=min_chars, max_chars=max_chars)
    finally:
        for handle in files.values():
            handle.close()
    return stats


def _write_package(package, sources, files, seen, *, valid_fraction, max_documents, min_chars,
                   max_chars) -> PackageStats:
    """One package's documents into the open split files; ``seen`` (dedup keys) is shared, so
    a text already written for an earlier package is a duplicate too."""
    stats, kept, last = PackageStats(), 0, None
    for source, text in package_documents(sources, max_chars):
        if max_documents is not None and kept >= max_documents:
            break
        stats.files += source != last
        last = source
        key = dedup_key(text)
        if len(text) < min_chars:
            stats.short += 1
        elif key in seen:
            stats.duplicates += 1
        else:
            seen.add(key)
            split = "valid" if is_held_out(source, valid_fraction) else "train"
            record = {"text": text, "package": package, "source": source}
            files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            stats.splits[split].add(text)
            kept += 1
    return stats

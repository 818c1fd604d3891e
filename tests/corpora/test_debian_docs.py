"""The Debian-docs corpus: reST/HTML to text, documents, dedup and split on inline strings
(always run), and tools/build_corpus.py on a sample of the installed packages (skipped where
they are not installed; the test never installs anything)."""

import importlib.util
import json
import sys

import numpy
import pytest

from conftest import REPO, SHARED
from megatron_mesh.corpora import debian_docs as dd

NEOX = SHARED / "data" / "20B_tokenizer.json"
INSTALLED = all(dd.installed_version(p) for p in dd.DEFAULT_PACKAGES)

REST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _kref_doc:

=================
Adding references
=================

:Author: Someone

See :ref:`the rules <kref_rules>` and :c:func:`kref_get`, or ``kref_put()``;
*really* **do** read `the paper <http://example.org>`_.

.. toctree::
   :maxdepth: 2

   hidden-page

.. note::
   :class: small

   Notes stay.

To use a kref, write::

\tstruct kref refcount;

Table
-----

=====  =====
A      B
=====  =====
"""

HTML = """<html><head><title>T</title><style>p {}</style><script>var x = 1;</script></head>
<body><div class="related">Navigation noise</div>
<div class="document"><div class="body" role="main">
<h1>json &mdash; JSON<a class="headerlink" href="#json">\u00b6</a></h1>
<p>Some   <em>emphasised</em>
text &amp; more.</p>
<div class="highlight"><pre>&gt;&gt;&gt; import json
    indented = True</pre></div>
<ul><li>one</li><li><p>two</p></li></ul>
<table><tr><th>Key</th><th>Value</th></tr><tr><td>a</td><td><p>1</p><p>or 2</p></td></tr></table>
</div></div><div class="sphinxsidebar">Sidebar noise</div></body></html>"""


def load_tool():
    if str(REPO / "tools") not in sys.path:  # as `python tools/X.py` has it: for `import _bootstrap`
        sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("tool_build_corpus", REPO / "tools" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_markup_is_stripped_and_prose_kept():
    text = dd.to_text(REST, "rst")
    assert text.startswith("Adding references\n\n:Author: Someone\n\n")
    assert ("See the rules and kref_get, or kref_put();\n"
            "really do read the paper.") in text
    for gone in ("SPDX", "_kref_doc", "toctree", "maxdepth", "hidden-page", ":class:", "=======",
                 "----", ":ref:", "``", "::"):
        assert gone not in text, gone
    assert "\n   Notes stay.\n" in text
    assert "To use a kref, write:\n\n\tstruct kref refcount;" in text  # code keeps its tab
    assert "=====  =====\nA      B\n=====  =====" in text                 # tables stay text


def test_html_main_body_only_with_blocks_and_preformatted_text():
    text = dd.to_text(HTML, "html")
    assert text == ("json \u2014 JSON\n\nSome emphasised text & more.\n\n"
                    ">>> import json\n    indented = True\n\n- one\n- two\n\n"
                    "Key | Value\na | 1 or 2")
    assert "noise" not in dd.to_text(HTML, "html")
    assert "Body without a main div" in dd.html_to_text("<p>Body without a main div</p>")


def test_normalise_and_split_long():
    assert dd.normalise("\n\n a \t\r\nb\x00\n\n\n\nc\u00a0d  \n\n") == " a\nb\n\nc d"
    text = "\n\n".join(f"paragraph {i} " + "x" * 90 for i in range(30))
    pieces = dd.split_long(text, 1000)
    assert "\n\n".join(pieces) == text
    assert len(pieces) > 2 and all(len(p) <= 1000 for p in pieces)
    assert dd.split_long("one paragraph " * 100, 50) == ["one paragraph " * 100]


def test_dedup_key_and_deterministic_held_out_split():
    assert dd.dedup_key("Hello  World\n") == dd.dedup_key("hello world")
    assert dd.dedup_key("hello world") != dd.dedup_key("hello, world")
    names = [f"/usr/share/doc/pkg/file{i}.rst.gz" for i in range(20000)]
    held = [n for n in names if dd.is_held_out(n, 0.02)]
    assert 300 < len(held) < 500                                         # ~2% of 20000
    assert held == [n for n in names if dd.is_held_out(n, 0.02)]
    assert set(held) <= {n for n in names if dd.is_held_out(n, 0.1)}     # nested fractions


def test_sources_prefer_rest_and_skip_translations(tmp_path):
    files = ["Documentation/a.rst", "Documentation/b.txt.gz", "html/a.html", "html/_sources/a.rst.txt",
             "Documentation/translations/zh_CN/a.rst", "Documentation/c.yaml"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = dd.select_sources(str(tmp_path / n) for n in files)
    assert [(p.relative_to(tmp_path).as_posix(), k) for p, k in got] == [
        ("Documentation/a.rst", "rst"), ("Documentation/b.txt.gz", "text")]
    pages = ["index.html", "genindex-A.html", "py-modindex.html", "search.html", "library/json.html",
             "_static/x.html"]
    for name in pages:
        (tmp_path / "py" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "py" / name).write_text("x")
    got = dd.select_sources(str(tmp_path / "py" / n) for n in pages)
    assert [p.name for p, _ in got] == ["index.html", "json.html"]


def test_write_splits_dedups_filters_and_keeps_files_together(tmp_path):
    body = "\n\n".join(f"Paragraph {i} of a long file. " * 8 for i in range(40))
    docs = {"a.rst": "Title\n=====\n\n" + body, "copy.rst": "title\n=====\n\n" + body.upper(),
            "short.rst": "Too short.", "b.html": f"<p>{'HTML prose. ' * 30}</p>"}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    sources = {"pkg": [(tmp_path / "a.rst", "rst"), (tmp_path / "copy.rst", "rst"),
                       (tmp_path / "short.rst", "rst")], "web": [(tmp_path / "b.html", "html")]}
    stats = dd.write_splits(sources, tmp_path, valid_fraction=0.5, max_chars=2000)
    records = [json.loads(line) for s in dd.SPLITS for line in open(tmp_path / f"{s}.jsonl")]
    pieces_of_a = [r for r in records if r["source"].endswith("a.rst")]
    assert len(pieces_of_a) > 3 and not any(r["source"].endswith("copy.rst") for r in records)
    assert stats["pkg"].short == 1 and stats["web"].splits["train"].documents + \
        stats["web"].splits["valid"].documents == 1
    # the first piece of copy.rst differs only in case: a duplicate; each later piece too
    assert stats["pkg"].duplicates == len(pieces_of_a)
    side = {s: [json.loads(line)["source"] for line in open(tmp_path / f"{s}.jsonl")] for s in dd.SPLITS}
    assert not set(side["train"]) & set(side["valid"])                  # a file is on one side
    limited = dd.write_splits(sources, tmp_path, valid_fraction=0.5, max_documents=2, max_chars=2000)
    assert sum(c.documents for c in limited["pkg"].splits.values()) == 2


def test_apt_errors_name_the_package(monkeypatch):
    monkeypatch.setattr(dd, "installed_version", lambda package: None)
    monkeypatch.setattr(dd.shutil, "which", lambda name: None)
    with pytest.raises(dd.PackageError, match="apt-get not found: cannot install no-such-doc"):
        dd.install_packages(["no-such-doc"])
    with pytest.raises(dd.PackageError, match="no-such-doc is not installed"):
        dd.package_files("no-such-doc")


@pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer not beside the repo")
def test_failed_build_leaves_no_output(tmp_path):
    tool = load_tool()
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit, match="no-such-doc-package is not installed"):
        tool.main(["--out", str(out), "--tokenizer", str(NEOX), "--no-install",
                   "--packages", "no-such-doc-package"])
    assert not out.exists() and not list(tmp_path.iterdir())
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        tool.main(["--out", str(out), "--tokenizer", str(NEOX), "--no-install"])


@pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer not beside the repo")
@pytest.mark.skipif(not INSTALLED, reason="linux-doc-6.1 / python3.11-doc not installed (apt-get "
                    "install -y --no-install-recommends linux-doc-6.1 python3.11-doc)")
def test_build_corpus_on_a_sample_of_the_installed_docs(tmp_path, capsys):
    from megatron_mesh.data.tokenizer import load_tokenizer

    out = tmp_path / "corpus"
    load_tool().main(["--out", str(out), "--tokenizer", str(NEOX), "--no-install",
                      "--max-documents", "12", "--valid-fraction", "0.3", "--workers", "1", "--keep-text"])
    report = json.loads((out / "corpus.json").read_text())
    assert report == json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert sorted(report["packages"]) == sorted(dd.DEFAULT_PACKAGES)
    for name, package in report["packages"].items():
        assert package["version"] == dd.installed_version(name)
        assert package["train"]["documents"] + package["valid"]["documents"] == 12
    tokenizer = load_tokenizer(str(NEOX))
    for split in dd.SPLITS:
        lengths = numpy.fromfile(out / f"{split}_text_document.idx", dtype=numpy.int32,
                                 count=report["splits"][split]["documents"], offset=34)
        assert int(lengths.sum()) == report["splits"][split]["tokens"] > 0
        records = [json.loads(line) for line in open(out / f"{split}.jsonl")]
        first = records[0]["text"]
        assert lengths[0] == len(tokenizer.encode(first)) + 1          # + EOD
        for record in records:
            for markup in (":ref:`", ".. toctree::", "<div", "</p>", "\u00b6"):
                assert markup not in record["text"], (record["source"], markup)
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus.json", "train.jsonl", "train_text_document.bin", "train_text_document.idx",
        "valid.jsonl", "valid_text_document.bin", "valid_text_document.idx"]

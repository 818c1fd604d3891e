"""The one megatron-core version the package's shims target, and what they touch in it."""

import importlib
from importlib import metadata

import pytest

from megatron_mesh import compat


def resolve(dotted: str):
    """The object ``a.b.c.Attr.attr`` names: the longest importable module prefix, then getattr."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", compat.MEGATRON_INTERNALS)
def test_every_patched_or_private_megatron_attribute_exists(dotted):
    resolve(dotted)


def test_the_pin_and_the_check_agree():
    from conftest import REPO

    assert (REPO / "requirements" / "megatron.txt").read_text().strip() == f"megatron-core=={compat.MEGATRON_CORE}"
    compat.check_megatron_core()  # what is installed here


def test_another_megatron_core_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(metadata, "version", lambda name: "0.20.0")
    with pytest.raises(compat.MegatronVersionError, match=r"megatron-core 0\.20\.0 is installed, but "
                                                          r".*written for 0\.19\.2 exactly"):
        compat.check_megatron_core()


def test_known_import_warnings_are_silenced_and_others_kept():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.silence_known_megatron_warnings()
        for message, module in (("Apex is not installed. Falling back to Torch Norm", "megatron.core.models"),
                                ("Apex is not installed. Falling back to Torch Norm", "mine"),
                                ("something megatron wants said", "megatron.core.models")):
            warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
    assert [(str(w.message), w.filename) for w in caught] == [
        ("Apex is not installed. Falling back to Torch Norm", "x.py"),
        ("something megatron wants said", "x.py")]

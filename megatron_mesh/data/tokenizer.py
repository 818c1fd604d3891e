"""The one tokenizer rule of every tool (trainer, preprocess_data.py, convert.py, evaluate.py).

A tokenizer is named by
  - a ``tokenizer.json`` file (Hugging Face ``tokenizers``; GPT-NeoX-20B's ``20B_tokenizer.json``),
  - a directory: a Hugging Face tokenizer directory when its ``tokenizer_config.json`` names a
    ``tokenizer_class`` (``AutoTokenizer`` loads it), else its ``tokenizer.json`` (with or
    without a ``tokenizer_config.json`` or ``config.json`` beside it),
  - a SentencePiece ``.model`` file (preprocessing and evaluation; the trainer needs
    ``tokenizer.type: SentencePieceTokenizer`` for one),
  - or a hub name (``EleutherAI/gpt-neox-20b``; only where the hub is reachable or cached).
``tokenizer_source`` applies the rule without loading anything (a config check);
``hf_tokenizer`` builds the transformers tokenizer (the trainer, through megatron's
HuggingFaceTokenizer, and every export); ``load_tokenizer`` the small interface preprocessing
needs. A missing path, or one holding nothing usable, is a ``TokenizerSpecError`` naming it and
what was expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from megatron_mesh.errors import MeshError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")
"""What a causal LM's tokenizer returns: GPT-NeoX's (no token_type_ids, which generate refuses)."""
EXPECTED = ("a tokenizer.json file, a directory holding tokenizer.json, a Hugging Face tokenizer "
            "directory (tokenizer_config.json naming its tokenizer_class), a SentencePiece .model "
            "file or a hub name such as EleutherAI/gpt-neox-20b")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class TokenizerSpecError(MeshError, ValueError):
    """A tokenizer path or name that the rule (module docstring) cannot use."""


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer spec leads: ``kind`` is 'tokenizer_json' (``path`` the file),
    'sentencepiece' (``path`` the .model), 'hf_directory' or 'hub_name' (``AutoTokenizer``)."""

    spec: str
    kind: str
    path: Optional[Path] = None
    eos_token: Optional[str] = None
    """A tokenizer_config.json's eos_token beside a tokenizer.json (else looked up in it)."""


def tokenizer_source(spec: str, what: str = "tokenizer") -> TokenizerSource:
    """Apply the rule to ``spec`` (cheap: reads small JSON files, loads no tokenizer). ``what``
    names the setting in errors, e.g. 'tokenizer.model' or '--tokenizer'."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return _file_source(spec, path, what)
    if path.is_dir():
        return _directory_source(spec, path, what)
    if _hub_name(str(spec), path):
        return TokenizerSource(str(spec), "hub_name")
    raise TokenizerSpecError(f"{_named(what, spec)}: no such file or directory; expected {EXPECTED}")


def _hub_name(spec: str, path: Path) -> bool:
    """A name of the hub's form ('name' or 'org/name') not meant as a local path: no .json or
    .model suffix and, for 'org/name', no local directory 'org'."""
    if not _HUB_NAME.fullmatch(spec) or path.suffix in (".json", ".model"):
        return False
    return "/" not in spec or not path.parent.is_dir()


def _file_source(spec: str, path: Path, what: str) -> TokenizerSource:
    if path.suffix == ".model":
        return TokenizerSource(str(spec), "sentencepiece", path)
    _check_tokenizer_json(path, what)
    return TokenizerSource(str(spec), "tokenizer_json", path)


def _check_tokenizer_json(path: Path, what: str) -> None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerSpecError(f"{what}: {path}: not a tokenizer.json (invalid JSON: {err}); "
                                 f"expected {EXPECTED}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise TokenizerSpecError(f"{what}: {path}: a JSON file but not a Hugging Face tokenizers "
                                 f"file (no 'model' entry); expected {EXPECTED}")


def _directory_source(spec: str, path: Path, what: str) -> TokenizerSource:
    config_file = path / "tokenizer_config.json"
    config = _read_json_object(config_file, what) if config_file.is_file() else {}
    if config.get("tokenizer_class"):
        return TokenizerSource(str(spec), "hf_directory", path)
    if (path / "tokenizer.json").is_file():
        _check_tokenizer_json(path / "tokenizer.json", what)
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        return TokenizerSource(str(spec), "tokenizer_json", path / "tokenizer.json",
                               eos if isinstance(eos, str) else None)
    found = sorted(p.name for p in path.iterdir())
    files = [name for name in found if name.endswith("tokenizer.json")]
    hint = f"; did you mean {path / files[0]}?" if files else f"; expected {EXPECTED}"
    raise TokenizerSpecError(f"{_named(what, spec)}: a directory without tokenizer.json or a "
                             f"tokenizer_config.json naming its tokenizer_class (it holds "
                             f"{found[:8] or 'nothing'}){hint}")


def _named(what: str, spec: str) -> str:
    return f"{what}={spec!r}"


def _read_json_object(file: Path, what: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerSpecError(f"{what}: {file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerSpecError(f"{what}: {file}: expected a JSON object, got {type(data).__name__}")
    return data


def _eod_token(source: TokenizerSource, vocab: dict) -> str:
    """The end-of-document token of a tokenizer.json: its tokenizer_config.json's eos_token, else
    the first of EOD_CANDIDATES in its vocabulary."""
    if source.eos_token in vocab:
        return source.eos_token
    eod = next((t for t in EOD_CANDIDATES if t in vocab), None)
    if eod is None:
        raise TokenizerSpecError(f"{source.path}: no end-of-document token (looked for "
                                 f"{list(EOD_CANDIDATES)})")
    return eod


def hf_tokenizer(spec: str, what: str = "tokenizer"):
    """The transformers tokenizer of ``spec`` by the rule: a tokenizer.json becomes a
    PreTrainedTokenizerFast with its end-of-document token as eos and GPT-NeoX's input names,
    directories naming a class and hub names go to ``AutoTokenizer``."""
    source = tokenizer_source(spec, what)
    if source.kind == "sentencepiece":
        raise TokenizerSpecError(f"{_named(what, spec)}: a SentencePiece model, which a Hugging Face "
                                 f"tokenizer does not load as it is; expected a tokenizer.json, a "
                                 f"directory holding one, a Hugging Face tokenizer directory or a "
                                 f"hub name")
    if source.kind != "tokenizer_json":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.spec)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(source.path))
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=list(MODEL_INPUT_NAMES),
                                   eos_token=_eod_token(source, backend.get_vocab(with_added_tokens=True)))


@dataclass
class TextTokenizer:
    """The small interface preprocessing needs; picklable for worker processes."""

    spec: str
    vocab_size: int
    eod_id: int
    _encode: Callable[[str], List[int]]

    def encode(self, text: str) -> List[int]:
        return self._encode(text)

    def __reduce__(self):  # workers rebuild it from the spec
        return load_tokenizer, (self.spec,)


def _from_tokenizers_file(source: TokenizerSource) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source.path))
    eod = tok.token_to_id(_eod_token(source, tok.get_vocab(with_added_tokens=True)))
    return TextTokenizer(source.spec, tok.get_vocab_size(with_added_tokens=True), eod,
                         lambda text: tok.encode(text, add_special_tokens=False).ids)


def _from_sentencepiece(source: TokenizerSource) -> TextTokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(source.path))
    if sp.eos_id() < 0:
        raise TokenizerSpecError(f"{source.path}: the SentencePiece model has no eos id to use as "
                                 f"end-of-document")
    return TextTokenizer(source.spec, sp.get_piece_size(), sp.eos_id(), lambda text: sp.encode(text))


def _from_transformers(source: TokenizerSource, what: str) -> TextTokenizer:
    try:
        tok = hf_tokenizer(source.spec, what)
    except TokenizerSpecError:
        raise
    except (OSError, ValueError) as err:
        raise TokenizerSpecError(f"{_named(what, source.spec)}: transformers cannot load it "
                                 f"({err.__class__.__name__}: {str(err)[:160]}); expected "
                                 f"{EXPECTED}") from None
    eod = tok.eos_token_id
    if eod is None:
        eod = next((tok.convert_tokens_to_ids(t) for t in EOD_CANDIDATES if t in tok.get_vocab()), None)
    if eod is None:
        raise TokenizerSpecError(f"{_named(what, source.spec)}: no eos / end-of-document token")
    return TextTokenizer(source.spec, len(tok), eod, lambda text: tok.encode(text, add_special_tokens=False))


def load_tokenizer(spec: str, what: str = "tokenizer") -> TextTokenizer:
    """``spec`` by the rule (module docstring) as the interface preprocessing needs."""
    source = tokenizer_source(spec, what)
    if source.kind == "sentencepiece":
        return _from_sentencepiece(source)
    if source.kind == "tokenizer_json":
        return _from_tokenizers_file(source)
    return _from_transformers(source, what)

"""Tokenizers for preprocessing: any Hugging Face tokenizer or a SentencePiece model.

``load_tokenizer(spec)`` accepts a ``tokenizer.json`` file, a local Hugging Face directory, a
SentencePiece ``.model`` file, or a hub name (only where the hub is reachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


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


def _from_tokenizers_file(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    eod = next((tok.token_to_id(t) for t in EOD_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eod is None:
        raise ValueError(f"{path}: no end-of-document token (looked for {list(EOD_CANDIDATES)})")
    return TextTokenizer(str(path), tok.get_vocab_size(with_added_tokens=True), eod,
                         lambda text: tok.encode(text, add_special_tokens=False).ids)


def _from_sentencepiece(path: Path) -> TextTokenizer:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.eos_id() < 0:
        raise ValueError(f"{path}: the SentencePiece model has no eos id to use as end-of-document")
    return TextTokenizer(str(path), sp.get_piece_size(), sp.eos_id(), lambda text: sp.encode(text))


def _from_transformers(name: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer {name!r}: expected a tokenizer.json file, a Hugging Face "
                         f"tokenizer directory, a SentencePiece .model or a reachable hub name "
                         f"({err.__class__.__name__}: {str(err)[:160]})") from None
    eod = tok.eos_token_id
    if eod is None:
        eod = next((tok.convert_tokens_to_ids(t) for t in EOD_CANDIDATES if t in tok.get_vocab()), None)
    if eod is None:
        raise ValueError(f"tokenizer {name!r}: no eos / end-of-document token")
    return TextTokenizer(name, len(tok), eod, lambda text: tok.encode(text, add_special_tokens=False))


def load_tokenizer(spec: str) -> TextTokenizer:
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return _from_sentencepiece(path)
    if path.is_file():
        return _from_tokenizers_file(path)
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return _from_tokenizers_file(path / "tokenizer.json")
    return _from_transformers(spec)

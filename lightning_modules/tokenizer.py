"""Tokenizers: byte-level by default, or a BPE trained locally with ``tokenizers``.

Both map text to ids and back and carry two specials: ``<|endoftext|>`` (the document separator,
also the end-of-sequence id for generation) and ``<|pad|>``. A tokenizer is identified by a
``fingerprint`` (kind, vocabulary size, hash of its definition) that is stored in shard metadata
and in checkpoints, so data or a checkpoint made with another tokenizer is refused at start-up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
PAD = "<|pad|>"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<|endoftext|>`` = 256 and ``<|pad|>`` = 257 (vocab 258)."""

    kind = "byte"

    def __init__(self) -> None:
        self.eos_id = 256
        self.pad_id = 257
        self.vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        """Text -> ids ``[n]`` (uint16), no specials added."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; specials are dropped, invalid UTF-8 (a cut multi-byte char) is replaced."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte"}

    @property
    def fingerprint(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "sha": "byte-v1"}


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library (``tokenizer.json``), trained by
    :func:`train_bpe` / ``attnres tokenizer train``. Its specials must include ``<|endoftext|>``."""

    kind = "bpe"

    def __init__(self, definition: str) -> None:
        from tokenizers import Tokenizer

        self._json = definition
        self._tok = Tokenizer.from_str(definition)
        eos = self._tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"the BPE tokenizer has no {EOS} token; train it with `attnres tokenizer train`")
        self.eos_id = eos
        pad = self._tok.token_to_id(PAD)
        self.pad_id = eos if pad is None else pad
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": "bpe", "json": self._json}

    @property
    def fingerprint(self) -> dict:
        sha = hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]
        return {"kind": "bpe", "vocab_size": self.vocab_size, "sha": sha}


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a ``tokenizer.json`` written by ``attnres tokenizer train``."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json; "
            "train one with `attnres tokenizer train --vocab_size 4096` and pass the path it prints"
        )
    return BPETokenizer.from_file(path)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of ``to_dict`` (how a checkpoint carries its tokenizer)."""
    if d["kind"] == "byte":
        return ByteTokenizer()
    return BPETokenizer(d["json"])


def check_same_tokenizer(expected: dict, found: dict, what: str) -> None:
    """Raise if two fingerprints differ; ``what`` names where ``found`` came from."""
    if expected != found:
        raise ValueError(
            f"tokenizer/vocabulary mismatch: {what} was made with {found['kind']} "
            f"(vocab {found['vocab_size']}, {found['sha']}) but this run uses {expected['kind']} "
            f"(vocab {expected['vocab_size']}, {expected['sha']}); "
            "set data.tokenizer to the tokenizer it was "
            "made with (or re-run `attnres prepare` / start from a compatible checkpoint)"
        )


MIN_BPE_VOCAB = 258 + 2  # the 256 bytes and the 2 specials, plus room for merges


def train_bpe(texts: Iterator[str], vocab_size: int, output: str | Path) -> Path:
    """Train a byte-level BPE of ``vocab_size`` ids (specials included) on ``texts``; write its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE (need >= {MIN_BPE_VOCAB})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(tok.to_str(), encoding="utf-8")
    tmp.replace(output)
    return output

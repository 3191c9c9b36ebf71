"""Corpora and pre-tokenised shards: which files make a corpus, how they split into train/val/test, and
the on-disk format the DataModule reads.

Documents (the standard library's ``.py`` files by default, or user files by glob) are split into
train/val (and test, when ``test_fraction > 0``) by a hash of their relative path, encoded, joined with
the ``<|endoftext|>`` separator and written as shards: flat ``uint16``/``uint32`` token files plus
``meta.json`` (``SHARD_FORMAT``). ``attnres prepare`` writes them where you say; the DataModule
(:mod:`lightning_modules.data`) writes them once into a cache directory for ``stdlib``/``files``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np

from attnres.errors import UsageError
from lightning_modules.tokenizer import Tokenizer

SHARD_FORMAT = "attnres-shards/1"
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- corpora


def stdlib_files() -> tuple[Path, list[Path]]:
    """The root of the Python standard library and its ``.py`` files (third-party
    ``site-packages`` and caches excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def glob_files(patterns: list[str], arg: str = "--data.files") -> tuple[Path, list[Path]]:
    """Text files matching the glob patterns (``**`` recurses), sorted; the root is their common parent.
    Binary files (:func:`is_text` false) are skipped, with their count on stderr. ``arg`` is the
    option the patterns came from, for the messages."""
    corpus_arg = arg.replace("files", "corpus")
    if not patterns:
        raise ValueError(
            f"{arg} is empty: give one or more glob patterns, e.g. {arg} 'texts/**/*.txt'"
        )
    files: set[Path] = set()
    for pattern in patterns:
        matched = [Path(p).resolve() for p in glob(os.path.expanduser(pattern), recursive=True)]
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise FileNotFoundError(
                f"{arg}: no file matches {pattern!r} (relative to {os.getcwd()}); "
                f"fix the pattern or use {corpus_arg} stdlib"
            )
        files.update(matched)
    ordered = sorted(files)
    is_text_file = {p: is_text(p) for p in ordered}
    binary = [p for p in ordered if not is_text_file[p]]
    if binary:
        if len(binary) == len(ordered):
            raise ValueError(
                f"{arg}: the {len(ordered)} file(s) matched by {patterns} are all binary (NUL bytes or not "
                f"UTF-8 in their first {TEXT_PROBE_BYTES // 1024} KB); match text files, e.g. '**/*.txt'"
            )
        names = ", ".join(p.name for p in binary[:3]) + (", ..." if len(binary) > 3 else "")
        print(
            f"{arg}: skipped {len(binary)} binary file(s) of {len(ordered)} ({names}): NUL bytes or not "
            f"UTF-8 in their first {TEXT_PROBE_BYTES // 1024} KB",
            file=sys.stderr,
        )
        ordered = [p for p in ordered if is_text_file[p]]
    if all(p.stat().st_size == 0 for p in ordered):
        raise ValueError(f"{arg}: the {len(ordered)} file(s) matched by {patterns} are all empty")
    root = Path(os.path.commonpath([str(p.parent) for p in ordered]))
    return root, ordered


TEXT_PROBE_BYTES = 8192


def is_text(path: Path, probe: int = TEXT_PROBE_BYTES) -> bool:
    """Whether ``path`` looks like text: its first ``probe`` bytes hold no NUL byte and decode as UTF-8
    (a character cut by the end of the probe is fine)."""
    with open(path, "rb") as fh:
        head = fh.read(probe)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def check_fractions(val_fraction: float, test_fraction: float, prefix: str = "") -> None:
    """``val_fraction`` in (0, 1) and ``test_fraction`` in [0, 1 - val_fraction); the messages name the
    options as ``--<prefix>val_fraction`` (``data.`` for the DataModule's)."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--{prefix}val_fraction {val_fraction}: must be in (0, 1), e.g. 0.02")
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise UsageError(
            f"--{prefix}test_fraction {test_fraction}: must be in "
            f"[0, 1 - {prefix}val_fraction = {1 - val_fraction:g})"
        )


def split_of(relpath: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """The split of a document by the SHA-1 of its relative path, read as a number ``u`` in [0, 1):
    ``"val"`` for ``u < val_fraction``, ``"test"`` for ``u >= 1 - test_fraction``, else ``"train"``.
    The two held-out bands sit at opposite ends, so they are disjoint, a test split takes its
    documents from train only (val is the same with or without one), and without one
    (``test_fraction = 0``) the split is what it always was."""
    u = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    return "test" if u >= 1.0 - test_fraction else "train"


def split_files(
    root: Path, files: list[Path], val_fraction: float, test_fraction: float = 0.0
) -> dict[str, list[Path]]:
    """Split files by the hash of their path relative to ``root`` (:func:`split_of`); a ``"test"`` key
    only when ``test_fraction > 0``. A split that would be empty (too few files) takes the files with
    the lowest hashes (val) or the highest (test) so every split exists: val and train from the files
    outside the test band, then test from train's highest.

    A single document goes to train (:func:`write_shards` cuts it by tokens). With ``test_fraction > 0``
    and fewer than 3 documents there is none left for test: that raises, naming the corpus and the fix.
    """
    if len(files) == 1:
        return {"train": list(files), "val": []} | ({"test": []} if test_fraction > 0 else {})
    if test_fraction > 0 and len(files) < 3:
        raise ValueError(
            f"the corpus under {root} has {len(files)} document(s), too few for train, val and test "
            f"splits (test_fraction {test_fraction:g}); add documents or set test_fraction 0"
        )
    out: dict[str, list[Path]] = {"train": [], "val": []}
    if test_fraction > 0:
        out["test"] = []
    for f in files:
        out[split_of(f.relative_to(root).as_posix(), val_fraction, test_fraction)].append(f)

    def ranked(fs: list[Path]) -> list[Path]:
        return sorted(fs, key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).digest())

    rest = out["train"] + out["val"]
    if len(rest) >= 2 and not (out["train"] and out["val"]):
        n_val = max(1, min(len(rest) - 1, round(len(rest) * val_fraction)))
        order = ranked(rest)
        out["val"], out["train"] = sorted(order[:n_val]), sorted(order[n_val:])
    if test_fraction > 0 and not out["test"] and len(out["train"]) >= 2:
        n_test = max(1, min(len(out["train"]) - 1, round(len(files) * test_fraction)))
        order = ranked(out["train"])
        out["train"], out["test"] = sorted(order[:-n_test]), sorted(order[-n_test:])
    return out


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shards(
    out_dir: str | Path,
    splits: dict[str, list[Path]],
    tokenizer: Tokenizer,
    source: str,
    shard_tokens: int = 1 << 27,
    batch_docs: int = 64,
    val_fraction: float | None = None,
    test_fraction: float = 0.0,
) -> dict:
    """Encode each split's documents (each followed by ``<|endoftext|>``) into flat token files of
    at most ``shard_tokens`` tokens and write ``meta.json``. The directory appears atomically
    (written under a temporary name, then renamed). A corpus of a single file (nothing left for the
    other splits) is cut by tokens instead: the last ``val_fraction`` share of the stream (when given)
    is val, and with ``test_fraction > 0`` the ``test_fraction`` share before it is test."""
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp-"))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700; the shards are for everyone who can read the parent
    meta: dict[str, Any] = {
        "format": SHARD_FORMAT,
        "dtype": dtype.name,
        "tokenizer": tokenizer.fingerprint,
        "eos_id": tokenizer.eos_id,
        "source": source,
        "splits": {},
    }
    all_files = [f for files in splits.values() for f in files]
    try:
        if val_fraction is not None and len(all_files) == 1:
            print(
                f"data: {all_files[0]} is the only document, so the splits are cut from its tokens "
                f"(the last {val_fraction:g} of them for val); add documents to split by document",
                file=sys.stderr,
            )
            ids = np.concatenate(
                [np.asarray(tokenizer.encode_batch([read_text(all_files[0])])[0]).astype(dtype),
                 np.asarray([tokenizer.eos_id], dtype=dtype)]
            )
            n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
            n_test = 0
            if test_fraction:
                n_test = min(len(ids) - n_val - 1, max(1, round(len(ids) * test_fraction)))
            cut_val, cut_test = len(ids) - n_val, len(ids) - n_val - n_test
            parts = [("train", ids[:cut_test]), ("val", ids[cut_val:])]
            if test_fraction:
                parts.insert(1, ("test", ids[cut_test:cut_val]))
            for split, part in parts:
                meta["splits"][split] = {"files": [], "tokens": [], "documents": 1}
                writer = _ShardWriter(tmp, split, dtype, shard_tokens, meta["splits"][split])
                writer.add(part)
                writer.close()
            splits = {}
        for split, files in splits.items():
            meta["splits"][split] = {"files": [], "tokens": [], "documents": len(files)}
            writer = _ShardWriter(tmp, split, dtype, shard_tokens, meta["splits"][split])
            for i in range(0, len(files), batch_docs):
                texts = [read_text(f) for f in files[i : i + batch_docs]]
                for ids in tokenizer.encode_batch(texts):
                    writer.add(ids)
                    writer.add(np.asarray([tokenizer.eos_id], dtype=dtype))
            writer.close()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class _ShardWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, meta: dict) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens, self.meta = (
            directory,
            split,
            dtype,
            shard_tokens,
            meta,
        )
        self.buf: list[np.ndarray] = []
        self.n = 0

    def add(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.n)
            self.buf.append(ids[:take])
            self.n += take
            ids = ids[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        name = f"{self.split}-{len(self.meta['files']):05d}.bin"
        np.concatenate(self.buf).tofile(self.directory / name)
        self.meta["files"].append(name)
        self.meta["tokens"].append(self.n)
        self.buf, self.n = [], 0

    def close(self) -> None:
        self.flush()


class ShardSet:
    """A shard directory opened read-only: ``meta`` and one memmap ``[n]`` per shard file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"data.shards_dir: {self.directory} has no meta.json; write shards with "
                f"`attnres prepare --output {self.directory}` (or fix the path)"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {SHARD_FORMAT!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.shards: dict[str, list[np.memmap]] = {}
        for split, info in self.meta["splits"].items():
            self.shards[split] = [
                np.memmap(self.directory / f, dtype=dtype, mode="r", shape=(n,))
                for f, n in zip(info["files"], info["tokens"])
            ]

    def tokens(self, split: str) -> int:
        return int(sum(self.meta["splits"].get(split, {}).get("tokens", [])))

"""Data: corpora, pre-tokenised memmap shards, a resumable sampler and the ``TextDataModule``.

Every corpus goes through the same path. Documents (the standard library's ``.py`` files by
default, or user files by glob) are split into train/val (and test, when ``test_fraction > 0``) by
a hash of their relative path, encoded,
joined with the ``<|endoftext|>`` separator and written as shards: flat ``uint16``/``uint32`` token
files plus ``meta.json``. ``attnres prepare`` writes them where you say; for ``stdlib``/``files``
the DataModule writes them once into a cache directory keyed by the file list and the tokenizer.

A training sample is a window of ``seq_len + 1`` tokens (``input_ids = w[:-1]``,
``labels = w[1:]``); windows tile each shard without overlap. With ``packing: documents`` the same
windows also carry ``segment_ids`` (a new id at each separator), and the model mixes the documents of
a window apart (:mod:`attnres.model.documents`). The sampler shuffles windows with
``seed + epoch``, splits them over ranks and can start mid-epoch, so a run resumed from
``last.ckpt`` sees exactly the batches the uninterrupted run would have seen.
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
import warnings
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from attnres.errors import UsageError
from attnres.model.documents import segment_ids_from_separators
from lightning_modules.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer

# Lightning warns on a mid-epoch resume unless the DataLoader object itself is stateful; here the
# DataModule's state_dict carries the position (batches consumed this epoch) and restores it.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)

SHARD_FORMAT = "attnres-shards/1"
SPLITS = ("train", "val", "test")
PACKINGS = ("concat", "documents")


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


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens over a list of 1-D token arrays.
    Item ``i`` is ``{"input_ids": [T], "labels": [T]}`` (int64; labels are the inputs shifted by one).
    ``sep_id`` (``packing: documents``): items also carry ``"segment_ids" [T]`` (int64), a new id at
    every separator in ``input_ids`` (the separator opens the next document:
    :func:`attnres.model.documents.segment_ids_from_separators`); the tokens are the same."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, sep_id: int | None = None) -> None:
        self.shards = [s for s in shards if (len(s) - 1) // seq_len > 0]
        self.seq_len = seq_len
        self.sep_id = sep_id
        counts = [(len(s) - 1) // seq_len for s in self.shards]
        self.offsets = np.cumsum([0] + counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[s])) * self.seq_len
        w = torch.from_numpy(self.shards[s][start : start + self.seq_len + 1].astype(np.int64))
        if self.sep_id is None:
            return {"input_ids": w[:-1], "labels": w[1:]}
        segments = segment_ids_from_separators(w[:-1], self.sep_id)
        return {"input_ids": w[:-1], "labels": w[1:], "segment_ids": segments}


class ResumableSampler(DistributedSampler):
    """Window indices for one rank: a permutation drawn from ``seed + epoch`` (or the identity),
    every ``world_size``-th from ``rank``, the tail dropped so ranks get equal counts.

    ``skip(n, epoch)`` makes the next iteration of that epoch start after ``n`` samples (how a run
    resumes mid-epoch). It subclasses ``DistributedSampler`` so Lightning uses it as it is."""

    def __init__(
        self, dataset: Dataset, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self._skip = 0
        self._skip_epoch = -1

    def skip(self, n: int, epoch: int) -> None:
        self._skip, self._skip_epoch = n, epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        mine = order[: self.total_size][self.rank : self.total_size : self.num_replicas]
        start = self._skip if self._skip_epoch == self.epoch else 0
        self._skip, self._skip_epoch = 0, -1
        return iter(mine[start:].tolist())


class FixedOrderSampler(ResumableSampler):
    """A :class:`ResumableSampler` whose order ignores ``set_epoch`` (Lightning calls it on the
    validation loaders' samplers too): the validation order, and so the sample that
    ``limit_val_batches`` takes, stays the same at every evaluation."""

    def set_epoch(self, epoch: int) -> None:
        pass


# ----------------------------------------------------------------------------- the DataModule


def _files_key(root: Path, files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class TextDataModule(L.LightningDataModule):
    """Token windows from the embedded corpus, your text files, or prepared shards.

    Args:
        corpus: ``stdlib`` (the Python standard library's ``.py`` files; exists on every machine),
            ``files`` (``files`` globs) or ``shards`` (a directory written by ``attnres prepare``).
        files: glob patterns for ``corpus: files`` (``**`` recurses), e.g. ``["books/*.txt"]``.
        shards_dir: the directory of ``meta.json`` and ``*.bin`` for ``corpus: shards``.
        tokenizer: ``byte`` (256 bytes + specials) or the path of a ``tokenizer.json`` from
            ``attnres tokenizer train``. The model's vocabulary is set from it.
        seq_len: tokens per training sequence (must not exceed the model's ``max_seq_len``).
        batch_size: sequences per batch per device.
        val_batch_size: sequences per validation batch (default: ``batch_size``).
        val_fraction: share of documents (by a hash of their path) held out for validation.
        test_fraction: share of documents held out for ``attnres test``: the other end of the hash
            range, disjoint from val's and taken from train (val stays the same). 0 (the default, so
            that existing runs keep their training data): no test split, and ``attnres test``
            evaluates the validation split, with a warning. For ``corpus: shards`` the split is the
            one ``attnres prepare --test_fraction`` wrote; leave this at 0.
        predict_split: the windows ``attnres predict`` scores (per-sequence NLL): ``val`` or ``test``
            (which must exist).
        shuffle: shuffle training windows each epoch (validation order is fixed).
        seed: seed of the shuffle (epoch ``e`` uses ``seed + e``) and of the fixed validation order.
        num_workers: DataLoader worker processes.
        cache_dir: where the shards of ``stdlib``/``files`` corpora are cached.
        packing: ``concat`` (documents joined by ``<|endoftext|>`` and cut into windows; the token
            mixers see the whole window) or ``documents`` (the same windows, and no token mixer reads
            across a separator: each document is modelled as if alone; the batch carries
            ``segment_ids``). Applies to every split. Not with the pipeline strategy.
    """

    def __init__(
        self,
        corpus: Literal["stdlib", "files", "shards"] = "stdlib",
        files: list[str] | None = None,
        shards_dir: str | None = None,
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.02,
        test_fraction: float = 0.0,
        predict_split: Literal["val", "test"] = "val",
        shuffle: bool = True,
        seed: int = 1234,
        num_workers: int = 0,
        cache_dir: str = ".cache/attnres",
        packing: Literal["concat", "documents"] = "concat",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if packing not in PACKINGS:
            raise ValueError(f"data.packing={packing!r} is invalid; valid: {' | '.join(PACKINGS)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"data.seq_len ({seq_len}) and data.batch_size ({batch_size}) must be >= 1")
        check_fractions(val_fraction, test_fraction, "data.")
        if predict_split not in ("val", "test"):
            raise ValueError(f"data.predict_split must be 'val' or 'test', got {predict_split!r}")
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.tokenizer = load_tokenizer(tokenizer)
        # resolve (and check) the inputs now, so a bad path fails at start-up, not after set-up
        if corpus == "shards":
            if not shards_dir:
                raise ValueError(
                    "data.corpus is 'shards' but data.shards_dir is not set; give the prepared directory"
                )
            if not Path(shards_dir).is_dir():
                raise FileNotFoundError(
                    f"data.shards_dir: {shards_dir} does not exist; "
                    f"write it with `attnres prepare --output {shards_dir}`"
                )
            if test_fraction:
                raise ValueError(
                    "data.test_fraction applies to the stdlib/files corpora; prepared shards have the test "
                    f"split `attnres prepare --test_fraction` wrote (if any): leave it at 0 for {shards_dir}"
                )
            self.shard_path = Path(shards_dir)
            meta = ShardSet(self.shard_path).meta
            check_same_tokenizer(self.tokenizer.fingerprint, meta["tokenizer"], f"the shards in {shards_dir}")
        else:
            root, found = stdlib_files() if corpus == "stdlib" else glob_files(files or [])
            if not found:
                raise FileNotFoundError(f"data: the {corpus} corpus has no files under {root}")
            self.source = f"{corpus}:{root}"
            self.splits = split_files(root, found, val_fraction, test_fraction)
            key = _files_key(root, found)
            fp = self.tokenizer.fingerprint
            held_out = f"v{val_fraction:g}" + (f"t{test_fraction:g}" if test_fraction else "")
            tag = f"{corpus}-{fp['kind']}{fp['vocab_size']}-{fp['sha'][:8]}-{held_out}-{key}"
            self.shard_path = Path(cache_dir).expanduser() / "shards" / tag
        self.shard_set: ShardSet | None = None
        self.train_sampler: ResumableSampler | None = None
        self._consumed = 0  # training batches taken this epoch (for mid-epoch resume)
        self._epoch = 0
        self._resume: dict | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Write the cached shards of a ``stdlib``/``files`` corpus if they are not there yet."""
        if self.corpus != "shards" and not (self.shard_path / "meta.json").is_file():
            write_shards(self.shard_path, self.splits, self.tokenizer, self.source,
                         val_fraction=self.hparams.val_fraction, test_fraction=self.hparams.test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.shard_set is not None:
            return
        if self.corpus != "shards":
            self.prepare_data()  # no-op when present; covers use without a Trainer
        self.shard_set = ShardSet(self.shard_path)
        check_same_tokenizer(
            self.tokenizer.fingerprint, self.shard_set.meta["tokenizer"], str(self.shard_path)
        )
        sep = self.tokenizer.eos_id if self.hparams.packing == "documents" else None
        self.train_set = TokenWindows(self.shard_set.shards.get("train", []), self.seq_len, sep)
        self.val_set = TokenWindows(self.shard_set.shards.get("val", []), self.seq_len, sep)
        # None: the data has no test split (test_fraction 0, or shards prepared without one)
        test = self.shard_set.shards.get("test")
        self.test_set = None if test is None else TokenWindows(test, self.seq_len, sep)
        named = [("train", self.train_set), ("val", self.val_set)]
        for name, ds in named + ([("test", self.test_set)] if self.test_set is not None else []):
            if len(ds) == 0:
                raise ValueError(
                    f"data: the {name} split of {self.shard_path} has {self.shard_set.tokens(name)} "
                    "tokens, fewer "
                    f"than one sequence of seq_len + 1 = {self.seq_len + 1}; lower data.seq_len or add data"
                )

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        if t is None:
            return 0, 1
        # the strategy's data-parallel shard (pipeline ranks of one replica must read the same batches)
        kw = getattr(t.strategy, "distributed_sampler_kwargs", None) or {}
        return kw.get("rank", t.global_rank), kw.get("num_replicas", t.world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        self.train_sampler = ResumableSampler(
            self.train_set, self.hparams.shuffle, self.hparams.seed, rank, world
        )
        if self._resume is not None:
            self.train_sampler.skip(self._resume["consumed"] * self.batch_size, self._resume["epoch"])
            self._epoch, self._consumed = self._resume["epoch"], self._resume["consumed"]
            self._resume = None
        return self._loader(self.train_set, self.train_sampler, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The test split; without one (``test_fraction`` 0), the validation split, with a warning."""
        if self.test_set is None:
            rank_zero_warn(
                f"data: {self.shard_path} has no test split, so `test` evaluates the validation split; "
                "set data.test_fraction (e.g. 0.02; it takes its documents from train, so train a new "
                "run with it) or prepare shards with `attnres prepare --test_fraction`"
            )
            return self.val_dataloader()
        return self._held_out_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The windows of ``predict_split`` (``val`` by default), in the fixed evaluation order."""
        if self.hparams.predict_split == "val":
            return self.val_dataloader()
        if self.test_set is None:
            raise ValueError(
                f"data.predict_split is 'test' but {self.shard_path} has no test split; set "
                "data.test_fraction (the run must have trained with it) or predict on 'val'"
            )
        return self._held_out_loader(self.test_set)

    def _held_out_loader(self, ds: TokenWindows) -> DataLoader:
        rank, world = self._rank_world()
        # a fixed shuffle, so `limit_val_batches` (`limit_test_batches`) takes a sample of the whole split
        sampler = FixedOrderSampler(ds, True, self.hparams.seed, rank, world)
        return self._loader(ds, sampler, self.val_batch_size)

    def _loader(self, ds: Dataset, sampler: ResumableSampler, batch_size: int) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator(),  # the loader's base seed must not draw from the global RNG
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called right before a batch reaches training_step (after any prefetching), so this
        # counts what the model has consumed, which is what a checkpoint must record
        t = self.trainer
        if t is not None and t.training:
            epoch = t.current_epoch
            if epoch != self._epoch:
                self._epoch, self._consumed = epoch, 0
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed": self._consumed, "tokenizer": self.tokenizer.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_tokenizer(self.tokenizer.fingerprint, state["tokenizer"], "the checkpoint")
        self._resume = {"epoch": state["epoch"], "consumed": state["consumed"]}


def checkpoint_val_batch(raw: dict, num_windows: int) -> dict[str, torch.Tensor]:
    """The first ``num_windows`` validation windows of the data a checkpoint (``torch.load``-ed dict)
    was trained on, stacked into a batch ``{"input_ids", "labels"}`` (and ``"segment_ids"`` with
    ``packing: documents``) of ``[n, seq_len]``."""
    import inspect

    accepted = inspect.signature(TextDataModule.__init__).parameters
    hp = {k: v for k, v in raw.get("datamodule_hyper_parameters", {}).items() if k in accepted}
    dm = TextDataModule(**hp)
    dm.setup("validate")
    items = [dm.val_set[i] for i in range(min(num_windows, len(dm.val_set)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}

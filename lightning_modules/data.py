"""Data: token windows over the shards, a resumable sampler and the ``TextDataModule``.

Every corpus goes through the same path (:mod:`lightning_modules.shards`): documents are split into
train/val/test by a hash of their path, encoded and written as pre-tokenised memmap shards;
``attnres prepare`` writes them where you say; for ``stdlib``/``files`` the DataModule writes them once
into a cache directory keyed by the file list and the tokenizer.

A training sample is a window of ``seq_len + 1`` tokens (``input_ids = w[:-1]``,
``labels = w[1:]``); windows tile each shard without overlap. With ``packing: documents`` the same
windows also carry ``segment_ids`` (a new id at each separator), and the model mixes the documents of
a window apart (:mod:`attnres.model.documents`). The sampler shuffles windows with
``seed + epoch``, splits them over ranks and can start mid-epoch, so a run resumed from
``last.ckpt`` sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from attnres.model.documents import segment_ids_from_separators
from lightning_modules.shards import (
    ShardSet,
    check_fractions,
    glob_files,
    split_files,
    stdlib_files,
    write_shards,
)
from lightning_modules.tokenizer import check_same_tokenizer, load_tokenizer

# Lightning warns on a mid-epoch resume unless the DataLoader object itself is stateful; here the
# DataModule's state_dict carries the position (batches consumed this epoch) and restores it.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)

PACKINGS = ("concat", "documents")




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

"""Data pipeline: tokenizers, file split, shards, windows, the resumable sampler, the DataModule's
start-up checks and mid-epoch resume, ``attnres prepare`` and ``attnres tokenizer train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules import commands
from lightning_modules.data import ResumableSampler, TextDataModule, TokenWindows
from lightning_modules.shards import ShardSet, split_files, split_of, stdlib_files, write_shards
from lightning_modules.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x * 2  # é ünïcödé\n"


def make_files(root: Path, n: int = 12, size: int = 400) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"doc{i:02d}.txt"
        p.write_text((f"document {i}: " + TEXT) * (size // len(TEXT) + 1))
        out.append(p)
    return out


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert tok.decode(ids.tolist()) == TEXT
    assert tok.decode([*ids.tolist(), tok.eos_id, tok.pad_id]) == TEXT  # specials are dropped
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)


def test_bpe_tokenizer_train_roundtrip_and_cache(tmp_path):
    make_files(tmp_path / "txt")
    path = commands.tokenizer_train(
        vocab_size=300, corpus="files", files=[str(tmp_path / "txt/*.txt")], cache_dir=str(tmp_path / "cache")
    )
    tok = load_tokenizer(path)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges learned
    assert tok.decode(ids.tolist()) == TEXT
    assert tok.fingerprint["kind"] == "bpe"
    mtime = Path(path).stat().st_mtime_ns
    again = commands.tokenizer_train(
        vocab_size=300, corpus="files", files=[str(tmp_path / "txt/*.txt")], cache_dir=str(tmp_path / "cache")
    )
    assert again == path and Path(path).stat().st_mtime_ns == mtime  # reused, not retrained


def test_unknown_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnres tokenizer train"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_split_is_deterministic_and_covers_every_file(tmp_path):
    files = make_files(tmp_path, n=40, size=10)
    a = split_files(tmp_path, files, 0.2)
    b = split_files(tmp_path, list(reversed(files)), 0.2)
    assert sorted(a["train"]) == sorted(b["train"]) and sorted(a["val"]) == sorted(b["val"])
    assert sorted(a["train"] + a["val"]) == sorted(files) and a["val"] and a["train"]
    assert split_of("x/y.py", 0.3) == split_of("x/y.py", 0.3)
    # two files still give both splits
    two = split_files(tmp_path, files[:2], 0.01)
    assert len(two["train"]) == 1 and len(two["val"]) == 1


def test_stdlib_corpus_is_found():
    root, files = stdlib_files()
    names = {f.relative_to(root).as_posix() for f in files}
    assert "os.py" in names and len(files) > 200
    assert not any("site-packages" in n for n in names)


def test_shards_roundtrip(tmp_path):
    files = make_files(tmp_path / "txt", n=6, size=300)
    tok = ByteTokenizer()
    meta = write_shards(
        tmp_path / "shards", {"train": files[:4], "val": files[4:]}, tok, "test", shard_tokens=500
    )
    s = ShardSet(tmp_path / "shards")
    assert s.meta == meta and meta["dtype"] == "uint16"
    assert len(meta["splits"]["train"]["files"]) > 1  # split over several shard files
    expected = np.concatenate([np.append(tok.encode(f.read_text()), tok.eos_id) for f in files[:4]])
    got = np.concatenate([np.asarray(m) for m in s.shards["train"]])
    np.testing.assert_array_equal(got, expected)
    assert not list(tmp_path.glob("shards.tmp-*"))  # the temporary directory is gone


def test_token_windows_align_labels():
    data = np.arange(100, dtype=np.uint16)
    ds = TokenWindows([data[:50], data[50:]], seq_len=8)
    assert len(ds) == 2 * ((50 - 1) // 8)
    item = ds[7]  # second shard, second window
    assert torch.equal(item["input_ids"], torch.arange(58, 66))
    assert torch.equal(item["labels"], torch.arange(59, 67))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sampler_ranks_partition_and_epochs_reshuffle():
    ds = list(range(103))
    ranks = [list(ResumableSampler(ds, True, 7, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 34 for r in ranks)
    flat = sum(ranks, [])
    assert len(set(flat)) == len(flat)  # disjoint
    s = ResumableSampler(ds, True, 7)
    e0 = list(s)
    assert e0 == list(ResumableSampler(ds, True, 7))  # deterministic
    s.set_epoch(1)
    assert list(s) != e0 and sorted(list(s)) == sorted(e0)


def test_sampler_skip_resumes_mid_epoch_once():
    ds = list(range(50))
    s = ResumableSampler(ds, True, 3)
    full = list(s)
    s.skip(12, epoch=0)
    assert list(s) == full[12:]
    assert list(s) == full  # only the first iteration skips
    s.skip(12, epoch=0)
    s.set_epoch(1)
    assert len(list(s)) == 50  # a skip of another epoch does not apply


def test_datamodule_state_dict_resumes_at_the_next_batch(tmp_path):
    make_files(tmp_path / "txt", n=8, size=2000)
    kw = dict(
        corpus="files",
        files=[str(tmp_path / "txt/*.txt")],
        seq_len=16,
        batch_size=3,
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.25,
    )
    dm = TextDataModule(**kw)
    dm.setup("fit")
    batches = [b["input_ids"] for b in dm.train_dataloader()]
    dm2 = TextDataModule(**kw)
    dm2.setup("fit")
    dm2.load_state_dict({"epoch": 0, "consumed": 5, "tokenizer": ByteTokenizer().fingerprint})
    resumed = [b["input_ids"] for b in dm2.train_dataloader()]
    assert len(resumed) == len(batches) - 5
    assert all(torch.equal(a, b) for a, b in zip(batches[5:], resumed))
    assert dm2.state_dict()["consumed"] == 5


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        TextDataModule(corpus="files", files=[str(tmp_path / "missing/*.txt")])


def test_empty_files_name_the_fix(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match="are all empty"):
        TextDataModule(corpus="files", files=[str(tmp_path / "*.txt")])


def test_missing_shards_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnres prepare"):
        TextDataModule(corpus="shards", shards_dir=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TextDataModule(corpus="shards", shards_dir=str(tmp_path / "empty"))


def test_prepare_then_train_from_shards(tmp_path, capsys):
    make_files(tmp_path / "txt", n=10, size=1500)
    meta = commands.prepare(
        output=str(tmp_path / "shards"), corpus="files", files=[str(tmp_path / "txt/*.txt")], val_fraction=0.2
    )
    assert "wrote" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "shards/meta.json").read_text())
    assert on_disk == meta and on_disk["tokenizer"]["kind"] == "byte"
    dm = TextDataModule(corpus="shards", shards_dir=str(tmp_path / "shards"), seq_len=32, batch_size=2)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (2, 32) and b["input_ids"].dtype == torch.long


def test_shards_with_another_tokenizer_are_refused(tmp_path):
    make_files(tmp_path / "txt", n=10, size=800)
    commands.prepare(output=str(tmp_path / "shards"), corpus="files", files=[str(tmp_path / "txt/*.txt")])
    bpe = commands.tokenizer_train(
        vocab_size=280, corpus="files", files=[str(tmp_path / "txt/*.txt")], cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(ValueError, match="tokenizer/vocabulary mismatch"):
        TextDataModule(corpus="shards", shards_dir=str(tmp_path / "shards"), tokenizer=bpe)


def test_too_short_split_names_the_fix(tmp_path):
    make_files(tmp_path / "txt", n=4, size=60)
    dm = TextDataModule(
        corpus="files", files=[str(tmp_path / "txt/*.txt")], seq_len=512, cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(ValueError, match="lower data.seq_len"):
        dm.setup("fit")


def test_validation_order_is_fixed_across_epochs(tmp_path):
    # Lightning calls set_epoch on every DistributedSampler of the validation loader (evaluation_loop
    # `_set_sampler_epoch`); the validation order (and so the sample `limit_val_batches` takes) must not
    # change with the training epoch, or val losses of different epochs are on different data.
    make_files(tmp_path / "txt", n=8, size=2000)
    dm = TextDataModule(
        corpus="files", files=[str(tmp_path / "txt/*.txt")], seq_len=16, batch_size=3,
        cache_dir=str(tmp_path / "cache"), val_fraction=0.25,
    )
    dm.setup("fit")
    loader = dm.val_dataloader()
    first = [b["input_ids"] for b in loader]
    loader.sampler.set_epoch(3)
    later = [b["input_ids"] for b in loader]
    assert len(first) == len(later) > 1
    assert all(torch.equal(a, b) for a, b in zip(first, later))


ONE_DOC = "the only document of this corpus. " * 300


def _single_file_module(tmp_path, **kw) -> TextDataModule:
    """A files corpus of one document (``ONE_DOC``) under ``tmp_path/one``, 10 % held out for val."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "one.txt").write_text(ONE_DOC)
    return TextDataModule(
        corpus="files", files=[str(tmp_path / "one/*.txt")], seq_len=16, batch_size=2,
        cache_dir=str(tmp_path / "cache"), val_fraction=0.1, **kw,
    )


def test_a_single_file_corpus_is_cut_by_tokens_into_train_and_val(tmp_path):
    # write_shards documents it: one file (nothing for the other split) is cut by tokens, the last
    # val_fraction share going to val; both splits exist and together are the file's token stream.
    dm = _single_file_module(tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    train = np.concatenate(dm.shard_set.shards["train"])
    val = np.concatenate(dm.shard_set.shards["val"])
    stream = np.concatenate([ByteTokenizer().encode_batch([ONE_DOC])[0], [ByteTokenizer().eos_id]])
    assert np.array_equal(np.concatenate([train, val]), stream)
    assert len(val) == round(len(stream) * 0.1)


def _old_split_of(relpath: str, val_fraction: float) -> str:
    # the rule before the test split existed, frozen here: defaults must keep reproducing it
    import hashlib

    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def test_default_split_is_unchanged_and_a_test_split_is_disjoint_from_train_and_val():
    root, files = stdlib_files()
    rel = {f: f.relative_to(root).as_posix() for f in files}
    default = split_files(root, files, 0.02)
    assert set(default) == {"train", "val"}  # no test split unless asked for
    for name in ("train", "val"):
        assert default[name] == [f for f in files if _old_split_of(rel[f], 0.02) == name]
    with_test = split_files(root, files, 0.02, test_fraction=0.05)
    train, val, test = (set(with_test[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and train | val | test == set(files)
    assert with_test["val"] == default["val"]  # the test band is taken from train only
    assert train | test == set(default["train"]) and 0.03 < len(test) / len(files) < 0.07
    again = split_files(root, list(reversed(files)), 0.02, test_fraction=0.05)  # deterministic
    assert {k: sorted(v) for k, v in again.items()} == {k: sorted(v) for k, v in with_test.items()}
    assert split_of(rel[next(iter(test))], 0.02, 0.05) == "test"
    # a corpus too small for the bands still gets every split, one file each at least
    three = split_files(root, files[:3], 0.01, test_fraction=0.01)
    assert sorted(len(v) for v in three.values()) == [1, 1, 1]


def test_test_dataloader_reads_the_held_out_test_split(tmp_path):
    import random
    import string

    (tmp_path / "txt").mkdir()
    for i in range(30):  # random letters: no window of one document repeats in another
        text = "".join(random.Random(i).choices(string.ascii_letters, k=600))
        (tmp_path / "txt" / f"doc{i:02d}.txt").write_text(text)
    kw = dict(corpus="files", files=[str(tmp_path / "txt/*.txt")], seq_len=16, batch_size=2,
              cache_dir=str(tmp_path / "cache"), val_fraction=0.2)  # fmt: skip
    dm = TextDataModule(**kw, test_fraction=0.2)
    dm.setup("test")
    assert len(dm.test_set) > 0 and dm.shard_set.meta["splits"]["test"]["documents"] == len(dm.splits["test"])
    test_windows = {tuple(dm.test_set[i]["input_ids"].tolist()) for i in range(len(dm.test_set))}
    other = [dm.val_set, dm.train_set]
    other_windows = {tuple(ds[i]["input_ids"].tolist()) for ds in other for i in range(len(ds))}
    assert not test_windows & other_windows
    batches = list(dm.test_dataloader())
    assert batches and all(tuple(row.tolist()) in test_windows for b in batches for row in b["input_ids"])
    assert len(dm.predict_dataloader().dataset) == len(dm.val_set)  # predict: val by default
    dm_p = TextDataModule(**kw, test_fraction=0.2, predict_split="test")
    dm_p.setup("predict")
    assert dm_p.predict_dataloader().dataset is dm_p.test_set

    default = TextDataModule(**kw)  # no test split: its shards (cache key) are the ones written before
    assert "-v0.2-" in default.shard_path.name and "t0.2" in dm.shard_path.name
    default.setup("test")
    assert default.test_set is None and "test" not in default.shard_set.meta["splits"]
    with pytest.warns(UserWarning, match="no test split"):
        assert default.test_dataloader().dataset is default.val_set
    no_test = TextDataModule(**kw, predict_split="test")
    no_test.setup("predict")
    with pytest.raises(ValueError, match="predict_split is 'test'"):
        no_test.predict_dataloader()
    fraction = r"--data\.test_fraction 0\.8: must be in \[0, 1 - data\.val_fraction"
    with pytest.raises(ValueError, match=fraction):
        TextDataModule(**kw, test_fraction=0.8)


def test_single_file_and_prepared_shards_carry_a_test_split(tmp_path):
    dm = _single_file_module(tmp_path, test_fraction=0.1)
    dm.setup("test")
    parts = [np.concatenate(dm.shard_set.shards[k]) for k in ("train", "test", "val")]
    stream = np.concatenate([ByteTokenizer().encode_batch([ONE_DOC])[0], [ByteTokenizer().eos_id]])
    assert np.array_equal(np.concatenate(parts), stream)  # cut train | test | val: val as without test
    assert len(parts[2]) == len(parts[1]) == round(len(stream) * 0.1)

    make_files(tmp_path / "txt", n=20, size=600)
    meta = commands.prepare(
        output=str(tmp_path / "shards"), corpus="files", files=[str(tmp_path / "txt/*.txt")],
        val_fraction=0.2, test_fraction=0.2,
    )  # fmt: skip
    assert set(meta["splits"]) == {"train", "val", "test"}
    dm = TextDataModule(corpus="shards", shards_dir=str(tmp_path / "shards"), seq_len=16, batch_size=2)
    dm.setup("test")
    assert dm.test_dataloader().dataset is dm.test_set and len(dm.test_set) > 0
    with pytest.raises(ValueError, match="attnres prepare --test_fraction"):
        TextDataModule(corpus="shards", shards_dir=str(tmp_path / "shards"), test_fraction=0.1)

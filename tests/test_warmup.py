"""The first step's long waits: shipped autotune results seeded into Triton's cache, and the notices."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from attnres.model import Decoder, get_config
from lightning_modules import warmup

SHIPPED = Path(warmup.__file__).with_name("autotune") / "kda_sm90.tgz"


def _archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_seeding_copies_autotune_results_keeps_existing_ones_and_nothing_else(tmp_path, monkeypatch):
    archive = _archive(tmp_path / "a.tgz", {
        "triton/KEY1/chunk_kda_fwd.autotune.json": b'{"new": 1}',
        "triton/KEY2/chunk_kda_bwd.autotune.json": b'{"new": 2}',
        "triton/KEY3/kernel.cubin": b"binary",          # not an autotune result: skipped
        "triton/../../escape.autotune.json": b"x",      # not triton/<key>/<file>: skipped
    })
    monkeypatch.setattr(warmup, "_kda_archive", lambda device: archive)
    cache = tmp_path / "cache"
    (cache / "KEY2").mkdir(parents=True)
    (cache / "KEY2" / "chunk_kda_bwd.autotune.json").write_text('{"mine": 1}')
    assert warmup.seed_autotune(torch.device("cuda"), cache) == 1
    assert (cache / "KEY1" / "chunk_kda_fwd.autotune.json").read_bytes() == b'{"new": 1}'
    assert (cache / "KEY2" / "chunk_kda_bwd.autotune.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["chunk_kda_bwd.autotune.json",
                                                                      "chunk_kda_fwd.autotune.json"]
    assert not (tmp_path / "escape.autotune.json").exists()
    assert warmup.seed_autotune(torch.device("cpu"), cache) == 0


def test_the_shipped_archive_holds_only_kda_autotune_results():
    with tarfile.open(SHIPPED) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert names and all(len(Path(n).parts) == 3 and n.endswith(".autotune.json") for n in names)
    assert any("kda" in n for n in names)


def test_the_shipped_archive_covers_the_small_and_medium_presets_and_the_study_sizes(tmp_path):
    with tarfile.open(SHIPPED) as tar:
        tar.extractall(tmp_path, filter="data")
    tuned = warmup.tuned_kda_shapes(tmp_path / "triton")
    for preset in ("small", "medium"):  # 6 and 8 heads x 128
        config = get_config(preset)
        assert (config.dim // config.kda_head_dim, config.kda_head_dim) in tuned, preset
    assert {(4, 64), (6, 64), (8, 64)} <= tuned  # the study's s, m, l (KDA heads of 64)


def test_notices_name_the_autotuning_only_while_the_cache_lacks_kda_results(tmp_path, monkeypatch):
    import attnres.model.kda as kda

    monkeypatch.setattr(kda, "fla_available", lambda: True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    model = Decoder(get_config("tiny", dim=64, kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16,
                               mla_qk_shared_dim=8, mla_kv_rank=32, expert_dim=32, mlp_dim=128))
    cuda = torch.device("cuda")
    (note,) = warmup.first_step_notices(model, cuda, compiled=False)
    assert "autotunes" in note and "4 heads x 16" in note and "~150-245 s" in note and str(tmp_path) in note
    # a result for another shape (the study's 4 x 64) leaves this one untuned; a damaged file is passed over
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / warmup._SHAPE_KERNEL).write_text(json.dumps({"key": [4, 4, 64, 64, 16, 4]}))
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / warmup._SHAPE_KERNEL).write_text("{")
    assert warmup.tuned_kda_shapes(tmp_path) == {(4, 64)}
    assert "4 heads x 16" in warmup.first_step_notices(model, cuda, compiled=False)[0]
    (tmp_path / "K").mkdir()
    key = [4, 4, 16, 16, 16, 4, "torch.float32"]
    (tmp_path / "K" / warmup._SHAPE_KERNEL).write_text(json.dumps({"key": key}))
    assert warmup.first_step_notices(model, cuda, compiled=False) == []
    assert "3 shipped" in warmup.first_step_notices(model, cuda, compiled=False, seeded=3)[0]
    compiled = warmup.first_step_notices(model, torch.device("cpu"), compiled=True)
    assert len(compiled) == 1 and compiled[0].startswith("torch.compile compiles the model")
    monkeypatch.setattr(kda, "fla_available", lambda: False)
    assert warmup.first_step_notices(model, cuda, compiled=False) == []  # the torch KDA does not autotune

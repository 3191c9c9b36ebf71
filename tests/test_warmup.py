"""The first step's long waits: shipped autotune results seeded into Triton's cache, and the notices."""

from __future__ import annotations

import io
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


def test_notices_name_the_autotuning_only_while_the_cache_lacks_kda_results(tmp_path, monkeypatch):
    import attnres.model.kda as kda

    monkeypatch.setattr(kda, "fla_available", lambda: True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    model = Decoder(get_config("tiny", dim=64, kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16,
                               mla_qk_shared_dim=8, mla_kv_rank=32, expert_dim=32, mlp_dim=128))
    cuda = torch.device("cuda")
    (note,) = warmup.first_step_notices(model, cuda, compiled=False)
    assert "autotunes" in note and "1 KDA shape(s)" in note and str(tmp_path) in note
    (tmp_path / "K").mkdir()
    (tmp_path / "K" / "chunk_kda_fwd_kernel.autotune.json").write_text("{}")
    assert warmup.first_step_notices(model, cuda, compiled=False) == []
    assert "3 shipped" in warmup.first_step_notices(model, cuda, compiled=False, seeded=3)[0]
    compiled = warmup.first_step_notices(model, torch.device("cpu"), compiled=True)
    assert len(compiled) == 1 and compiled[0].startswith("torch.compile compiles the model")
    monkeypatch.setattr(kda, "fla_available", lambda: False)
    assert warmup.first_step_notices(model, cuda, compiled=False) == []  # the torch KDA does not autotune

"""The first step's long waits: shipped autotune results seeded into Triton's cache, and the notices."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
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
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    assert "ATTNRES_KDA_AUTOTUNE=0 skips the tuning" in note
    assert "nearest shipped shape" in warmup.first_step_notices(model, cuda, compiled=False, pinned=True)[0]
    monkeypatch.setenv("ATTNRES_KDA_AUTOTUNE", "0")  # never tune: said so, with its cost
    (never,) = warmup.first_step_notices(model, cuda, compiled=False, pinned=True)
    assert "no autotuning" in never and "else its own first one" in never and "slower" in never
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE")
    (tmp_path / "K").mkdir()
    key = [4, 4, 16, 16, 16, 4, "torch.float32"]
    (tmp_path / "K" / warmup._SHAPE_KERNEL).write_text(json.dumps({"key": key}))
    assert warmup.first_step_notices(model, cuda, compiled=False) == []
    assert "3 shipped" in warmup.first_step_notices(model, cuda, compiled=False, seeded=3)[0]
    compiled = warmup.first_step_notices(model, torch.device("cpu"), compiled=True)
    assert len(compiled) == 1 and compiled[0].startswith("torch.compile compiles the model")
    (regional,) = warmup.first_step_notices(model, torch.device("cpu"), compiled="regional")
    kinds = "KimiDeltaAttention, MoE, MultiHeadLatentAttention, SwiGLU"
    assert f"each kind of sublayer ({kinds}) once" in regional
    (nested,) = warmup.first_step_notices(model, torch.device("cpu"), compiled="nested")
    cpu_kinds = "KimiDeltaAttention, MultiHeadLatentAttention, SwiGLU"  # the MoE's experts: regions on a GPU
    assert f"each kind of sublayer ({cpu_kinds}) once and the model around them" in nested
    # on a GPU the MoE's experts are a region only where they run as grouped GEMMs: sm90+, bf16
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    with_moe = f"({kinds}) once and the model around them"
    assert with_moe in warmup.first_step_notices(model, cuda, compiled="nested", dtype=torch.bfloat16)[-1]
    assert cpu_kinds in warmup.first_step_notices(model, cuda, compiled="nested", dtype=torch.float32)[-1]
    capability[0] = (8, 0)
    assert cpu_kinds in warmup.first_step_notices(model, cuda, compiled="nested", dtype=torch.bfloat16)[-1]
    capability[0] = (9, 0)
    # torch 2.11's regions cannot hold the MoE's autograd functions (the gates read the release parsed
    # at import: attnres.hardware.TORCH_RELEASE)
    from attnres import hardware

    release = hardware.TORCH_RELEASE
    monkeypatch.setattr(hardware, "TORCH_RELEASE", (2, 11))
    assert cpu_kinds in warmup.first_step_notices(model, cuda, compiled="nested", dtype=torch.bfloat16)[-1]
    monkeypatch.setattr(hardware, "TORCH_RELEASE", release)
    monkeypatch.setattr(kda, "fla_available", lambda: False)
    assert warmup.first_step_notices(model, cuda, compiled=False) == []  # the torch KDA does not autotune
    (graphed,) = warmup.first_step_notices(model, cuda, compiled="reduce-overhead")
    assert graphed.startswith("torch.compile compiles the model") and "records its CUDA graphs" in graphed
    (on_cpu,) = warmup.first_step_notices(model, torch.device("cpu"), compiled="reduce-overhead")
    assert "CUDA graphs" not in on_cpu


def _result(key: list, timings: list) -> str:
    """A Triton autotune result as Triton writes it (the key and the timings as Python reprs)."""
    return json.dumps({"key": repr(key), "configs_timings": repr(timings)})


def _cfg(bk: int, warps: int) -> dict:
    return {"kwargs": {"BK": bk}, "num_warps": warps, "num_ctas": 1, "num_stages": 2, "maxnreg": None,
            "pre_hook": None, "ir_override": None}


def test_best_configs_and_the_nearest_key(tmp_path):
    bf = "torch.bfloat16"
    for i, (key, timings) in enumerate([
        ([6, 6, 128, bf], [[_cfg(32, 4), [0.5, 0.4, 0.6]], [_cfg(64, 8), [0.3, 0.2, 0.4]]]),  # fastest: 64/8
        ([8, 8, 64, bf], [[_cfg(16, 2), [0.1, 0.1, 0.1]]]),
        ([9, 9, 128, "torch.float32"], [[_cfg(128, 4), [0.1, 0.1, 0.1]]]),
    ]):
        (tmp_path / f"K{i}").mkdir()
        (tmp_path / f"K{i}" / "kern.autotune.json").write_text(_result(key, timings))
    (tmp_path / "K9").mkdir()
    (tmp_path / "K9" / "kern.autotune.json").write_text("not json")  # skipped
    entries = warmup.best_configs(tmp_path)["kern"]
    assert len(entries) == 3
    nearest = warmup.nearest_config
    assert nearest(entries, (7, 7, 128, bf)) == _cfg(64, 8)  # the same head dim beats a closer head count
    assert nearest(entries, (8, 8, 64, bf)) == _cfg(16, 2)  # an exact key: its own result
    assert nearest(entries, (7, 7, 128, "torch.float16")) is None  # no result for that dtype
    assert nearest(entries, (7, 128, bf)) is None  # another key layout
    # several dtypes in the key (fla's gated norm: x, gate, weight): one that differs (an fp32 weight under
    # autocast) borrows the nearest such result, after every exact-dtype one; two that differ do not
    f32 = "torch.float32"
    norm = [((128, 2, True, bf, bf, bf), _cfg(16, 4)), ((128, 2, True, bf, bf, f32), _cfg(32, 8)),
            ((64, 2, True, bf, bf, bf), _cfg(8, 2))]
    assert nearest(norm[:1], (128, 2, True, bf, bf, f32)) == _cfg(16, 4)
    assert nearest(norm, (128, 2, True, bf, bf, f32)) == _cfg(32, 8)  # its own dtypes first
    assert nearest(norm[1:], (128, 2, True, bf, bf, bf)) == _cfg(8, 2)  # same dtypes beat a closer shape
    assert nearest(norm[:1], (128, 2, True, bf, f32, f32)) is None
    assert nearest(norm[:1], (128, 2, False, bf, bf, bf)) is None  # a flag (another code path) must match


def test_pinned_kernel_takes_the_nearest_tuned_config_instead_of_benchmarking(tmp_path, monkeypatch):
    import types

    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BK": 16}), triton.Config({"BK": 32})], key=["H", "K"])
    @triton.jit
    def kern(x, H, K, BK: tl.constexpr):
        pass

    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "kern.autotune.json").write_text(
        _result([6, 128, "torch.bfloat16"], [[_cfg(32, 4), [0.2]], [_cfg(16, 4), [0.3]]]))
    launched = []
    kern.run = lambda *args, **kwargs: launched.append(kwargs)  # Triton's run, which would benchmark
    module = types.SimpleNamespace(kern=kern)
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    assert warmup.pin_untuned_kda(tmp_path, modules=[module]) == ["kern"]
    x = torch.zeros(4, dtype=torch.bfloat16)
    kern[(1,)](x, 8, 128)
    config = kern.cache[(8, 128, "torch.bfloat16")]
    assert config.kwargs == {"BK": 32} and config.num_warps == 4 and config.num_stages == 2
    assert len(launched) == 1
    assert warmup.pin_untuned_kda(tmp_path, modules=[module]) == []  # pinned once
    monkeypatch.setenv("ATTNRES_KDA_AUTOTUNE", "1")
    assert warmup.pin_untuned_kda(tmp_path, modules=[module]) == []


def test_an_autotuner_above_a_heuristics_wrapper_is_pinned_by_its_kernels_name(tmp_path, monkeypatch):
    import types

    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BK": 16}), triton.Config({"BK": 32})], key=["K"])
    @triton.heuristics({"EVEN": lambda args: args["K"] % 2 == 0})  # the order some fla 0.6 kernels use
    @triton.jit
    def kern3(x, K, BK: tl.constexpr, EVEN: tl.constexpr):
        pass

    (tmp_path / "A").mkdir()
    result = _result([64, "torch.float32"], [[_cfg(32, 4), [0.2]]])
    (tmp_path / "A" / "kern3.autotune.json").write_text(result)
    kern3.run = lambda *args, **kwargs: "ran"
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    assert warmup.pin_untuned_kda(tmp_path, modules=[types.SimpleNamespace(kern3=kern3)]) == ["kern3"]
    assert kern3[(1,)](torch.zeros(2), 128) == "ran"
    assert kern3.cache[(128, "torch.float32")].kwargs == {"BK": 32}


def test_the_shipped_results_give_an_untuned_preset_shape_a_config_of_its_head_dim(tmp_path):
    with tarfile.open(SHIPPED) as tar:
        tar.extractall(tmp_path, filter="data")
    entries = warmup.best_configs(tmp_path / "triton")["chunk_kda_fwd_kernel_inter_solve_fused"]
    key = next(k for k, _ in entries if k[0] == 8 and k[2] == 128)  # medium's: 8 heads x 128
    wanted = (7, 7, *key[2:])  # 7 heads x 128: shipped for no preset
    chosen = warmup.nearest_config(entries, wanted)
    assert chosen is not None and any(c == chosen for k, c in entries if k[2] == 128)


@pytest.mark.parametrize("untuned,tried,outcome", [
    ("tune", [32, None], "tuned"),  # the borrowed config once, then Triton's own tuning
    ("first", [32, 16], "ran"),     # the borrowed config, then the kernel's own in order: no tuning
])
def test_a_borrowed_config_that_fails_to_launch_falls_back(tmp_path, monkeypatch, untuned, tried, outcome):
    import types

    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BK": 16}), triton.Config({"BK": 32})], key=["K"])
    @triton.jit
    def kern2(x, K, BK: tl.constexpr):
        pass

    (tmp_path / "A").mkdir()
    result = _result([64, "torch.float32"], [[_cfg(32, 4), [0.2]]])
    (tmp_path / "A" / "kern2.autotune.json").write_text(result)
    seen = []

    def run(*args, **kwargs):  # Triton's run: BK 32 is out of resources at K 128; None: Triton tunes
        config = kern2.cache.get((128, "torch.float32"))
        seen.append(None if config is None else config.kwargs["BK"])
        if config is not None and config.kwargs["BK"] == 32:
            raise RuntimeError("out of resources: shared memory")
        return "tuned" if config is None else "ran"

    kern2.run = run
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    module = types.SimpleNamespace(kern2=kern2)
    assert warmup.pin_untuned_kda(tmp_path, modules=[module], untuned=untuned) == ["kern2"]
    assert kern2[(1,)](torch.zeros(2), 128) == outcome
    assert seen == tried
    if untuned == "tune":  # not borrowed again
        assert kern2[(1,)](torch.zeros(2), 128) == "tuned" and seen[-1] is None



def test_untuned_first_takes_the_first_config_that_launches_without_benchmarking(tmp_path, monkeypatch):
    import types

    import triton
    import triton.language as tl

    def keep_wide(configs, nargs, **kwargs):  # the kernel's own pruning: BK below 16 is not allowed here
        return [c for c in configs if c.kwargs["BK"] >= 16]

    configs = [triton.Config({"BK": bk}) for bk in (8, 16, 32, 64)]

    @triton.autotune(configs=configs, key=["K"], prune_configs_by={"early_config_prune": keep_wide})
    @triton.jit
    def kern4(x, K, BK: tl.constexpr):
        pass

    seen = []

    def run(*args, **kwargs):  # Triton's run: BK 16 is out of resources at this shape; no tuning allowed
        config = kern4.cache.get((128, "torch.float32"))
        assert config is not None, "Triton would benchmark every configuration here"
        seen.append(config.kwargs["BK"])
        if config.kwargs["BK"] == 16:
            raise RuntimeError("out of resources: shared memory")
        return "ran"

    kern4.run = run
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    module = types.SimpleNamespace(kern4=kern4)
    # no tuned result for kern4 at all: "tune" leaves it alone, "first" pins it
    assert warmup.pin_untuned_kda(tmp_path, modules=[module]) == []
    assert warmup.pin_untuned_kda(tmp_path, modules=[module], untuned="first") == ["kern4"]
    assert kern4[(1,)](torch.zeros(2), 128) == "ran"
    assert seen == [16, 32]  # pruned BK 8 skipped, BK 16 refused, BK 32 kept
    assert kern4[(1,)](torch.zeros(2), 128) == "ran" and seen[-1] == 32  # cached: not tried again
    with pytest.raises(ValueError, match="untuned='fastest'"):
        warmup.pin_untuned_kda(tmp_path, modules=[module], untuned="fastest")


def _fit_start_setup(tmp_path, monkeypatch, module: str, untuned: list):
    """A stand-in fla whose ``module`` holds one autotuned kernel (``kern6``), Triton's cache at ``tmp_path``,
    and the tiny LanguageModel on a pretend GPU whose untuned KDA shapes are ``untuned``: (model, kernel)."""
    import sys
    import types

    import triton
    import triton.language as tl

    from lightning_modules.module import LanguageModel

    @triton.autotune(configs=[triton.Config({"BK": 16}), triton.Config({"BK": 32})], key=["K"])
    @triton.jit
    def kern6(x, K, BK: tl.constexpr):
        pass

    for name in ("fla", "fla.ops", "fla.ops.kda", "fla.modules"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[module].kern6 = kern6
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(warmup, "_version_ok", lambda: True)
    monkeypatch.setattr(warmup, "seed_autotune", lambda device: 0)
    monkeypatch.setattr(warmup, "untuned_kda_shapes", lambda model, device: untuned)
    monkeypatch.delenv("ATTNRES_KDA_AUTOTUNE", raising=False)
    lm = LanguageModel(get_config("tiny", dim=64, kda_head_dim=16, mla_v_head_dim=16, mla_qk_nope_dim=16,
                                  mla_qk_shared_dim=8, mla_kv_rank=32, expert_dim=32, mlp_dim=128))
    monkeypatch.setattr(LanguageModel, "device", property(lambda self: torch.device("cuda")))
    return lm, kern6


def test_fit_start_pins_with_first_configs_only_when_told_never_to_tune(tmp_path, monkeypatch):
    # the real pinning at fit start, over a stand-in fla.ops.kda holding one autotuned kernel that has no
    # tuned result (an empty cache): left to Triton by default, pinned (first configuration) under
    # ATTNRES_KDA_AUTOTUNE=0
    lm, kern6 = _fit_start_setup(tmp_path, monkeypatch, "fla.ops.kda", untuned=[(4, 16)])
    lm.on_fit_start()
    assert not getattr(kern6, "_attnres_pinned", False)  # "tune": Triton benchmarks it
    monkeypatch.setenv("ATTNRES_KDA_AUTOTUNE", "0")
    lm.on_fit_start()
    assert kern6._attnres_pinned  # "first": no benchmarking


def test_fit_start_pins_fla_kernels_also_when_the_models_kda_shape_is_tuned(tmp_path, monkeypatch):
    # session 20: the study's m runs (a KDA shape the shipped results hold) benchmarked 27 fla kernels in
    # `attnres fit` (the fused norms, gates, SwiGLU at m's width had no result), because fit start pinned
    # only when the KDA shape itself was untuned
    lm, kern6 = _fit_start_setup(tmp_path, monkeypatch, "fla.modules", untuned=[])
    launched = []
    kern6.run = lambda *args, **kwargs: launched.append(kwargs)  # Triton's run, which would benchmark
    (tmp_path / "A").mkdir()  # this kernel's result at another width: the nearest one to borrow
    (tmp_path / "A" / "kern6.autotune.json").write_text(
        _result([256, "torch.bfloat16"], [[_cfg(32, 4), [0.2]], [_cfg(16, 4), [0.3]]]))
    lm.on_fit_start()
    assert kern6._attnres_pinned
    kern6[(1,)](torch.zeros(4, dtype=torch.bfloat16), 384)  # a new width: the borrowed config, no benchmark
    assert kern6.cache[(384, "torch.bfloat16")].kwargs == {"BK": 32} and len(launched) == 1
    assert warmup.prepare_kda_autotune(torch.device("cpu")) is None

"""The decoder: shapes, causality, cached decoding, parameter counts, training signal, depth weights,
config validation."""

from __future__ import annotations

import math

import pytest
import torch

from attnres.model import PRESETS, Config, Decoder, DecoderCache, ModelOutput, describe, get_config
from tests.helpers import nested_region_calls

MODES = ("standard", "full", "block")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(get_config("tiny", **overrides))


def _ids(cfg: Config, B: int = 2, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- shapes


# small and medium at their real width but two layers (one KDA + dense, one MLA + MoE) and a small
# vocabulary: a full-depth CPU forward of 250M / 1B parameters would not fit the test budget; their
# full shapes are checked on the meta device below.
SHAPE_CASES = {
    "tiny": {},
    "small": dict(num_layers=2, num_blocks=2, mla_layers=[1], vocab_size=512),
    "medium": dict(num_layers=2, num_blocks=2, mla_layers=[1], vocab_size=512),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_preset_forward_backward_shapes(name):
    torch.manual_seed(0)
    cfg = get_config(name, **SHAPE_CASES[name])
    model = Decoder(cfg)
    ids = _ids(cfg, B=2, T=20)
    out = model(ids, labels=ids, return_stats=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 20, cfg.vocab_size)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # pseudo-queries get gradients too (zero-init queries still have a nonzero gradient)
    assert not missing, f"parameters without gradient: {missing}"
    assert out.stats["output_rms"].shape == (cfg.num_sublayers,)
    assert out.stats["hidden_rms"].shape == (cfg.num_sublayers + 1,)
    assert set(out.stats["router_load"]) == {i for i in range(cfg.num_layers) if cfg.is_moe(i)}


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "kimi-linear-48b-a3b"])
def test_preset_full_shape_on_meta_matches_config_counts(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    assert model.num_parameters() == cfg.num_params()
    assert model.num_parameters(active=True) == cfg.num_params(active=True)
    assert len(model.layers) == cfg.num_layers
    assert model.residual.num_sublayers == cfg.num_sublayers


def test_meta_built_model_materialised_with_init_weights_equals_a_cpu_built_one():
    cfg = get_config("tiny", residual="block")
    cpu = Decoder(cfg)
    with torch.device("meta"):
        meta = Decoder(cfg)
    meta.to_empty(device="cpu")
    for model in (cpu, meta):
        torch.manual_seed(3)
        model.init_weights()
    a, b = cpu.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    # buffers too (not in the state dict): the router's load counts start at zero
    assert all(m.tokens_per_expert.sum() == 0 for m in meta.moe_layers().values())
    ids = _ids(cfg)
    torch.testing.assert_close(meta(ids).logits, cpu(ids).logits)


def test_preset_sizes_are_in_their_ranges():
    assert get_config("tiny").num_params() < 5e6
    assert 100e6 <= get_config("small").num_params() <= 300e6
    assert 0.8e9 <= get_config("medium").num_params() <= 1.3e9


def test_kimi_48b_on_meta_has_48b_total_and_3b_active():
    cfg = get_config("kimi-linear-48b-a3b")
    with torch.device("meta"):
        model = Decoder(cfg)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert abs(total / 48e9 - 1) < 0.05, total
    assert abs(active / 3e9 - 1) < 0.05, active
    assert (total, active) == (cfg.num_params(), cfg.num_params(active=True))
    kinds = cfg.layer_kinds()
    # the released checkpoint lists MLA layers 1-based as 4, 8, 12, 16, 20, 24, 27; layer 1 is dense
    assert [i + 1 for i, (m, _) in enumerate(kinds) if m == "mla"] == [4, 8, 12, 16, 20, 24, 27]
    assert [m for _, m in kinds].count("dense") == 1 and kinds[0][1] == "dense"


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = get_config("small")
    f1, f2 = cfg.flops_per_token(1024), cfg.flops_per_token(2048)
    assert f1 > 6 * cfg.num_params(active=True)
    mla_layers = sum(m == "mla" for m, _ in cfg.layer_kinds())
    per_token_per_pos = 6 * cfg.mla_heads * (cfg.mla_qk_nope_dim + cfg.mla_qk_shared_dim + cfg.mla_v_head_dim)
    assert f2 - f1 == pytest.approx(mla_layers * per_token_per_pos * 1024)


def test_describe_prints_counts_and_layer_plan():
    text = describe("tiny")
    cfg = get_config("tiny")
    assert f"{cfg.num_params():,}" in text and f"{cfg.num_params(active=True):,}" in text
    assert text.count("\n    ") >= cfg.num_layers - 1 and "mla" in text and "kda" in text


# ---------------------------------------------------------------------------- causality and decoding


@pytest.mark.parametrize("mixer", ["kda", "mla", "hybrid"])
def test_changing_token_t_never_changes_earlier_logits(mixer):
    model = _tiny(token_mixer=mixer).eval()
    ids = _ids(model.config, T=40)
    t = 21  # inside the second KDA chunk (chunk 16)
    other = ids.clone()
    other[:, t] = (other[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    # not bitwise: SDPA's blocking may differ with the other positions' values
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # ... and the token does matter from t on


@pytest.mark.parametrize("mode", MODES)
def test_cached_decoding_equals_full_forward(mode):
    model = _tiny(residual=mode).eval()
    ids = _ids(model.config, T=30)
    with torch.no_grad():
        full = model(ids).logits
        cache = DecoderCache()
        # prefill, a multi-token chunk on top of a cache (MLA offset mask, KDA initial state), then steps
        parts = [model(ids[:, :13], cache=cache).logits, model(ids[:, 13:20], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(20, 30)]
    assert cache.seq_len == 30
    assert bool(cache.residual_queries) == (mode != "standard")  # depth queries computed once, then reused
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_greedy_generate_follows_the_full_forward_argmax():
    model = _tiny().eval()
    prompt = _ids(model.config, B=2, T=6)
    out = model.generate(prompt, max_new_tokens=8, greedy=True)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_generate_samples_and_stops_at_eos():
    model = _tiny()
    prompt = _ids(model.config, B=3, T=4)
    torch.manual_seed(1)
    out = model.generate(prompt, max_new_tokens=5, temperature=0.8, top_k=10, top_p=0.9)
    assert out.shape == (3, 9) and model.training  # mode restored
    assert ((out >= 0) & (out < model.config.vocab_size)).all()
    # make a token certain: after the first eos every position of that row stays eos
    eos = 7
    head = torch.nn.Linear(model.config.dim, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 100.0
    model.lm_head = head
    out = model.generate(prompt, max_new_tokens=20, eos_id=eos, top_k=1)
    assert out.shape[1] == 5 and (out[:, 4:] == eos).all()  # all rows done after one step: early stop


# ---------------------------------------------------------------------------- training signal


@pytest.mark.parametrize("mode", MODES)
def test_each_residual_mode_lowers_tiny_loss_on_a_fixed_batch(mode):
    # from ln(264) = 5.6 at init to below 1.0 nat (memorising 128 random tokens) within 50 steps
    model = _tiny(residual=mode)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(model.config, B=4, T=33)
    losses = []
    for _ in range(50):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        losses.append(out.loss.item())
        if losses[-1] < 1.0:
            break
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
    assert losses[0] > 5.0 and losses[-1] < 1.0, (mode, losses)


@pytest.mark.parametrize("mode", ["full", "block"])
def test_zero_pseudo_queries_give_uniform_depth_weights(mode):
    model = _tiny(residual=mode)
    with torch.no_grad():
        out = model(_ids(model.config), return_stats=True)
    w = out.stats["depth_weights"]
    assert w.shape[1] == model.config.num_sublayers + 1
    for col in w.t():
        seen = col[~col.isnan()]
        torch.testing.assert_close(seen, torch.full_like(seen, 1 / len(seen)))


def test_trained_pseudo_queries_give_non_uniform_depth_weights():
    model = _tiny(residual="full")
    with torch.no_grad():
        for q in model.residual.queries.values():
            q.weight.normal_(std=1.0)
        w = model(_ids(model.config), return_stats=True).stats["depth_weights"]
    col = w[:, -1]
    assert col.std() > 1e-3


def test_parameter_names_follow_the_training_contract():
    model = _tiny(residual="block")
    names = dict(model.named_parameters())
    queries = [n for n in names if n.startswith("residual.queries.")]
    assert len(queries) == 2 * (model.config.num_sublayers + 1)
    for n, p in names.items():
        if p.ndim < 2 and not n.startswith("residual.queries."):
            # 1-D parameters are norm weights, biases, or KDA's per-head A_log
            assert "norm" in n or n.endswith("bias") or n.endswith("A_log"), n
    assert set(model.layers) == {str(i) for i in range(model.config.num_layers)}


def test_standard_residual_has_no_depth_parameters():
    model = _tiny(residual="standard")
    assert not any(n.startswith("residual.") for n, _ in model.named_parameters())
    assert model(_ids(model.config), return_stats=True).stats["depth_weights"] is None


def test_dense_baseline_has_no_experts_and_zero_aux_loss():
    model = _tiny(moe=False, aux_loss_coef=0.1)
    assert not model.moe_layers()
    out = model(_ids(model.config))
    assert out.aux_loss.item() == 0.0
    model.update_router_bias()  # a no-op without MoE
    assert model.num_parameters(active=True) == model.num_parameters() - model.embed.weight.numel()


def test_aux_loss_is_reported_when_enabled():
    model = _tiny(aux_loss_coef=0.01)
    out = model(_ids(model.config))
    moe = len(model.moe_layers())
    assert moe > 0 and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.layers["1"].mlp.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides,field,valid",
    [
        (dict(residual="block", num_blocks=3), "num_blocks", "[1, 2, 4]"),
        (dict(residual="rezero"), "residual", "standard | full | block"),
        (dict(token_mixer="mamba"), "token_mixer", "hybrid | kda | mla"),
        (dict(top_k=9), "top_k", "1 .. num_experts=8"),
        (dict(kda_head_dim=48), "kda_head_dim", "a divisor of dim=128"),
        (dict(mla_v_head_dim=48), "mla_v_head_dim", "a divisor of dim=128"),
        (dict(mla_layers=[4]), "mla_layers", "[0, 4)"),
        (dict(first_dense_layers=5), "first_dense_layers", "0 .. num_layers=4"),
        (dict(kda_chunk_size=8), "kda_chunk_size", "16 | 32 | 64"),
        (dict(kda_backend="triton"), "kda_backend", "auto | torch | fla"),
        (dict(full_group=0), "full_group", "an integer >= 1"),
        (dict(dim=0), "dim", ">= 1"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps", "> 0"),
        (dict(embed_init_std=-1.0), "embed_init_std", "> 0 or null"),
        (dict(init_std=0.0), "init_std", "> 0 or null"),
    ],
)
def test_bad_config_raises_naming_the_field_and_valid_values(overrides, field, valid):
    with pytest.raises(ValueError) as err:
        get_config("tiny", **overrides)
    msg = str(err.value)
    assert f"Config.{field}=" in msg and valid in msg, msg


def test_embed_init_std_sets_only_the_input_embedding():
    torch.manual_seed(0)
    model = Decoder(get_config("tiny", vocab_size=4096, embed_init_std=1.0))
    std = math.sqrt(2 / (5 * 128))  # the default init std at tiny's width
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.05)  # the init std, untied
    assert _tiny(vocab_size=4096).embed.weight.std().item() == pytest.approx(std, rel=0.05)


def _read_gains_and_writer_stds(model: Decoder) -> tuple[list[float], list[float]]:
    """``std(W) * sqrt(dim)`` of every projection that reads the (normalised) residual stream (fan-in
    ``dim``: attention / KDA input projections, MLP gate and up), and the std of each projection that
    writes into it (attention ``o_proj``, MLP ``down_proj``)."""
    writers = [m for layer in model.layers.values() for m in (layer.attn.o_proj, layer.mlp.down_proj)]
    ids, d = {id(m) for m in writers}, model.config.dim
    reads = [m.weight.std().item() * math.sqrt(d) for m in model.modules()
             if isinstance(m, torch.nn.Linear) and m.in_features == d and id(m) not in ids
             and m is not model.lm_head]
    return reads, [m.weight.std().item() for m in writers]


def test_default_init_keeps_every_projections_gain_at_every_width():
    """The default init (``init_std: null``) is ``sqrt(2 / (5 dim))``: each projection that reads the
    residual stream has the same gain ``std * sqrt(dim)`` ~ 0.63 at any width; the residual writers are
    that std / sqrt(2 L). A fixed std (the old 0.02) makes the gain grow with the width (0.23 at 128,
    0.64 at 1024): the standard residual of the study's s (dim 256) then trained 0.10 nats worse (GPU
    audit, benchmarks/results/audit). This test fails for any width-independent default."""
    for dim in (128, 256, 1024):
        torch.manual_seed(0)
        cfg = get_config("tiny", dim=dim, vocab_size=512, moe=False)
        reads, writers = _read_gains_and_writer_stds(Decoder(cfg))
        assert len(reads) >= 5 * cfg.num_layers and len(writers) == 2 * cfg.num_layers
        for gain in reads:
            assert gain == pytest.approx(math.sqrt(0.4), rel=0.1), (dim, gain)
        for std in writers:
            assert std == pytest.approx(math.sqrt(2 / (5 * dim)) / math.sqrt(2 * cfg.num_layers), rel=0.1)
    # an explicit init_std is kept as given
    assert get_config("tiny", init_std=0.02).weight_init_std == 0.02


def test_kda_backend_reaches_every_kda_layer():
    model = Decoder(get_config("tiny", kda_backend="torch"))
    backends = {m.backend for m in model.modules() if type(m).__name__ == "KimiDeltaAttention"}
    assert backends == {"torch"}


def test_default_num_blocks_is_8_or_the_largest_valid_below():
    assert Config(num_layers=16).num_blocks == 8
    assert Config(num_layers=4).num_blocks == 4  # 8 sublayers: 1, 2, 4 valid
    assert Config(num_layers=6).num_blocks == 6  # 12 sublayers: 1, 2, 3, 6 valid
    assert Config(num_layers=27).num_blocks == 3  # 54 sublayers: 1, 3, 9, 27 valid
    assert get_config("kimi-linear-48b-a3b").num_blocks == 9  # set explicitly: nearest to 8


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="tiny, small, medium, kimi-linear-48b-a3b"):
        get_config("huge")


def test_hybrid_pattern_is_configurable():
    assert [m for m, _ in get_config("tiny", num_layers=8, num_blocks=8).layer_kinds()] == ["kda"] * 3 + [
        "mla"] + ["kda"] * 3 + ["mla"]
    cfg = get_config("tiny", num_layers=8, num_blocks=8, full_attn_every=2)
    assert [m for m, _ in cfg.layer_kinds()] == ["kda", "mla"] * 4
    cfg = get_config("tiny", mla_layers=[0, 2])
    assert [m for m, _ in cfg.layer_kinds()] == ["mla", "kda", "mla", "kda"]
    assert {m for m, _ in get_config("tiny", token_mixer="kda").layer_kinds()} == {"kda"}


def test_sampling_respects_top_k_and_top_p():
    from attnres.model.decoder import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    assert set(sample(logits, top_k=2).tolist()) == {0, 1}
    assert set(sample(logits, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(sample(logits, greedy=True).tolist()) == {0}
    freq = torch.bincount(sample(logits), minlength=4) / 2000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_two_stage_split_by_deleting_layers_equals_the_full_model(mode):
    import copy

    model = _tiny(residual=mode).eval()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    for key in ("2", "3"):
        del first.layers[key]
    for key in ("0", "1"):
        del second.layers[key]
    # names stay those of the full model
    full_names = dict(model.named_parameters())
    for stage in (first, second):
        for name, p in stage.named_parameters():
            assert torch.equal(p, full_names[name]), name
    ids = _ids(model.config)
    with torch.no_grad():
        state = first.begin(ids)
        aux = first.run_layers(state)
        aux = aux + second.run_layers(state)
        logits = second.finish(second.residual.readout(state))
        ref = model(ids)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(aux, ref.aux_loss)


@pytest.mark.parametrize("mode", ["standard", "full", "block"])
def test_bf16_autocast_runs_every_residual_mode_close_to_fp32(mode):
    """bf16-mixed training (the GPU trainer config) runs the model under autocast: fp32 embedding and
    summaries, bf16 sublayer outputs. Forward and backward must work and stay close to fp32."""
    torch.manual_seed(0)
    model = Decoder(get_config("tiny", residual=mode))
    x = torch.randint(0, 256, (2, 32))
    ref = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.02
    assert all(p.grad is not None for n, p in model.named_parameters() if "residual.queries" in n)


def _saved_activation_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward (parameters excluded)."""
    torch.manual_seed(0)
    model = Decoder(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_recompute_keeps_no_more_than_the_standard_residual_plus_the_sources(dtype):
    """Issue 8's memory target, on the tensors autograd saves: Block AttnRes may keep at most the
    standard residual's activations + 1.1 x its sources (embedding + block summaries). The plain path
    keeps each sublayer's input and partial summary (it misses); ``residual_recompute`` meets it."""
    base = dict(num_layers=4, dim=128)
    standard = _saved_activation_bytes(get_config("tiny", residual="standard", **base), dtype)
    block = get_config("tiny", residual="block", num_blocks=4, **base)
    plain = _saved_activation_bytes(block, dtype)
    lean = _saved_activation_bytes(block.replace(residual_recompute=True), dtype)
    sources = (block.num_blocks + 1) * 2 * 16 * 128 * dtype.itemsize
    assert plain > standard + 1.1 * sources
    assert lean <= standard + 1.1 * sources


@pytest.mark.parametrize("precision", ["32", "bf16", "bf16-mixed"])
def test_residual_recompute_trains_with_the_same_loss_and_gradients(precision):
    """The whole decoder (KDA, MLA, MoE) with ``residual_recompute``: loss and every gradient equal to the
    plain Block path's, bit for bit (fp32, bf16 weights, and fp32 weights under bf16 autocast)."""
    cfg = get_config("tiny", residual="block", num_blocks=4)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    def step(c):
        torch.manual_seed(0)
        model = Decoder(c).to(torch.bfloat16 if precision == "bf16" else torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(cfg)
    loss_r, grads_r = step(cfg.replace(residual_recompute=True))
    assert torch.equal(loss, loss_r)
    assert grads.keys() == grads_r.keys() and len(grads) > 50
    for n in grads:
        assert torch.equal(grads[n], grads_r[n]), n


@pytest.mark.parametrize("backend", ["counter", "aot_eager"])
def test_regional_compilation_reuses_one_graph_per_kind_of_sublayer_and_equals_eager(backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    # a dense MLP: on a CPU the MoE experts loop over a host-side split (a graph break per layer)
    cfg = get_config("tiny", residual="block", moe=False)
    model, ref = _tiny(residual="block", moe=False), _tiny(residual="block", moe=False)
    counter = CompileCounter()
    model.compile_regions(backend=counter if backend == "counter" else backend)
    assert model.regions_compiled and not ref.regions_compiled
    assert list(model.state_dict()) == list(ref.state_dict())  # checkpoints keep the eager names
    ids = _ids(cfg)
    losses = []
    for m in (model, ref):
        out = m(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    if backend == "counter":
        kinds = {(layer.mixer_kind, layer.mlp_kind) for layer in model.layers.values()}
        assert kinds == {("kda", "dense"), ("mla", "dense")} and len(model.layers) == 4
        assert counter.frame_count == 3  # KDA, MLA, dense MLP: the layers of one kind share a graph
        # decoding runs eagerly: no new graph for the changing cache shapes
        prompt = ids[:, :5]
        assert torch.equal(model.generate(prompt, 3, greedy=True), ref.generate(prompt, 3, greedy=True))
        assert counter.frame_count == 3
    torch._dynamo.reset()


def test_nested_compilation_is_one_graph_calling_one_region_per_kind_of_sublayer():
    """compile: nested: Dynamo makes one graph of the whole model in which the 3 KDA layers call one
    subgraph and the 4 dense MLPs another (the one MLA layer's region, used once, is inlined); the
    gradients equal eager's."""
    cfg = get_config("tiny", residual="block", moe=False)
    model, ref = _tiny(residual="block", moe=False), _tiny(residual="block", moe=False)
    ids = _ids(cfg)
    out_n, calls = nested_region_calls(model, ids, labels=ids)
    out_n.loss.backward()
    torch._dynamo.reset()
    assert sorted(calls.values()) == [3, 4]
    out = ref(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out_n.loss, out.loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(layer.nested for layer in model.layers.values())
    assert not any(layer.nested for layer in ref.layers.values())


def test_nested_compilation_takes_a_mode_as_its_inductor_options_and_refuses_fsdp():
    from lightning_modules.strategies import shard_data_parallel

    model = _tiny(moe=False)
    compiled = model.compile_nested(mode="reduce-overhead")  # torch.compile refuses mode and options both
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="compile: nested does not combine with FSDP2"):
        shard_data_parallel(model, mesh=None)
    torch._dynamo.reset()


@pytest.mark.slow
def test_nested_compilation_with_inductor_trains_like_eager():
    """The same through Inductor (~70 s on two cores). With Inductor's buffer reuse on, the regions'
    gradients come out wrong for every layer but the last (relative error ~1 here, torch 2.13 CPU):
    compile_nested turns it off (NESTED_INDUCTOR_OPTIONS), and this test fails without that."""
    cfg = get_config("tiny", residual="block", moe=False)
    model, ref = _tiny(residual="block", moe=False), _tiny(residual="block", moe=False)
    ids = _ids(cfg, T=cfg.kda_chunk_size)  # one KDA chunk: the smallest graph to compile
    torch._dynamo.reset()
    out_n = model.compile_nested(fullgraph=True)(ids, labels=ids)
    out_n.loss.backward()
    torch._dynamo.reset()
    out = ref(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out_n.loss, out.loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        err = ((p.grad - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item()
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("moe,residual", [(False, "block"), (True, "block"), (True, "standard")])
def test_decoder_on_fla_eager_fused_paths_equals_the_torch_backend(monkeypatch, moe, residual):
    # where fla runs, the eager forward takes fla's fused kernels: KDA's in-kernel norms and gates, the
    # SwiGLU MLPs' swiglu_linear, the PreNorms and final norm (standard residual; Block's take our fused
    # phase-2 norm), the loss's cross_entropy_loss (stand-ins with fla's documented math,
    # tests/helpers.fake_fla); the same loss and gradients as the torch backend, with ignored labels
    from tests.helpers import fake_fla

    fake_fla(monkeypatch, calls := [])
    import fla.modules.norm.layernorm as ln

    normed = []
    norm = ln.rms_norm
    monkeypatch.setattr(ln, "rms_norm", lambda x, *a, **k: normed.append(x.shape) or norm(x, *a, **k))
    models = {b: _tiny(kda_backend=b, moe=moe, residual=residual).double() for b in ("fla", "torch")}
    models["torch"].load_state_dict(models["fla"].state_dict())
    cfg = models["fla"].config
    ids, labels = _ids(cfg), _ids(cfg, seed=1)
    labels[0, :5] = -100
    out, grads = {}, {}
    for b, model in models.items():
        out[b] = model(ids, labels=labels).loss
        out[b].backward()
        grads[b] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert calls  # the KDA layers went through the stand-in
    # standard: two PreNorms per layer and the final norm (Block: where no fused phase-2 norm finishes it)
    layers = models["fla"].config.num_layers
    assert len(normed) == 2 * layers + 1 if residual == "standard" else normed
    # fp32 rounding only: the torch path computes KDA's decay and gates in fp32, fla's L2 norm adds its
    # epsilon under the square root
    assert abs(out["fla"].item() - out["torch"].item()) < 1e-6
    assert grads["fla"].keys() == grads["torch"].keys()
    for n, g in grads["torch"].items():
        assert (grads["fla"][n] - g).norm() <= 1e-5 * g.norm() + 1e-12, n


def test_fla_fused_false_keeps_the_plain_code_around_flas_kda_kernel(monkeypatch):
    # Config.fla_fused = false: fla's chunk_kda with precomputed q/k norms, decay and beta (no in-kernel
    # options), and none of fla's fused norm, SwiGLU or loss kernels
    from tests.helpers import fake_fla

    fake_fla(monkeypatch, [])
    import fla.modules.activations as act
    import fla.modules.fused_cross_entropy as ce
    import fla.modules.fused_norm_gate as gated
    import fla.modules.norm.layernorm as ln
    import fla.ops.kda as kda_ops

    def refuse(*a, **k):
        raise AssertionError("a fused fla kernel ran with fla_fused false")

    for mod, name in ((act, "swiglu_linear"), (ce, "cross_entropy_loss"), (gated, "rms_norm_gated"),
                      (ln, "rms_norm")):
        monkeypatch.setattr(mod, name, refuse)
    flags = []
    chunk = kda_ops.chunk_kda
    in_kernel = ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel")
    monkeypatch.setattr(kda_ops, "chunk_kda",
                        lambda *a, **k: flags.append(any(k.get(f) for f in in_kernel)) or chunk(*a, **k))
    model = _tiny(kda_backend="fla", fla_fused=False, residual="standard")
    ids = _ids(model.config)
    model(ids, labels=ids).loss.backward()
    assert flags and not any(flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_native_backend_is_torchs_rms_norm_and_equals_ours(dtype):
    # backend "native" (the benchmark's torch-standard baseline): torch's F.rms_norm, the same function as
    # ours and as the formula, forward and backward, also with an fp32 weight on bf16 input (autocast)
    from attnres.model.norm import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(dtype).requires_grad_()
    ours, native = RMSNorm(64, 1e-5), RMSNorm(64, 1e-5, backend="native")
    with torch.no_grad():
        ours.weight.copy_(torch.rand(64) + 0.5)
        native.weight.copy_(ours.weight)
    xd = x.detach().double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5) * ours.weight.detach().double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    outs = []
    for norm in (ours, native):
        y = norm(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
        (g,) = torch.autograd.grad(y.float().square().sum(), x)
        outs.append(g)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=tol, atol=tol * 10)

"""A pipeline stage is the pruned decoder (one process, no torch.distributed): ``keep_layers`` prunes a
deep copy or a shared view with the full model's parameter names, and pruned decoders chained through the
state a stage boundary carries (the sources and the partial, or the hidden state) give the full model's
logits, loss and MoE balance loss. Also: LanguageModel.configure_model hands the model to the strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnres.model import Decoder, get_config
from attnres.parallel import keep_layers, split_layers
from attnres.residual import ResidualState

MODES = ["standard", "full", "block"]


def _model(residual: str) -> Decoder:
    torch.manual_seed(0)
    cfg = get_config(
        "tiny", residual=residual, num_layers=4, num_blocks=2, dim=32, vocab_size=64, kda_head_dim=16,
        mla_v_head_dim=16, mla_qk_nope_dim=16, mla_qk_shared_dim=8, mla_kv_rank=16, mlp_dim=64,
        expert_dim=32, num_experts=4, aux_loss_coef=0.01,
    )  # fmt: skip
    return Decoder(cfg).eval()


def _boundary(state: ResidualState) -> ResidualState:
    """What crosses a stage boundary: the sources and the partial summary, or the hidden state."""
    if state.hidden is not None:
        return ResidualState(hidden=state.hidden)
    return ResidualState(sources=list(state.sources), partial=state.partial)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_stage", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]])
def test_pruned_decoders_chained_equal_the_full_model(mode, per_stage):
    model = _model(mode)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    last = len(per_stage) - 1
    stages = [
        keep_layers(model, ls, first=k == 0, last=k == last, copy=False) for k, ls in enumerate(per_stage)
    ]
    with torch.no_grad():
        ref = model(ids, labels=labels)
        out = stages[0](ids)
        aux = out.aux_loss
        for stage in stages[1:]:
            assert out.logits is None and out.state is not None  # no head: the state is handed on
            out = stage(_boundary(out.state), labels=labels)
            aux = aux + out.aux_loss
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(aux, ref.aux_loss)


@pytest.mark.parametrize("copy", [True, False])
def test_keep_layers_keeps_the_names_and_shares_only_as_a_view(copy):
    model = _model("block")
    full = dict(model.named_parameters())
    part = keep_layers(model, [2, 3], first=False, last=True, copy=copy)
    names = dict(part.named_parameters())
    assert part.embed is None and part.lm_head is not None and list(part.layers) == ["2", "3"]
    assert set(part.residual.queries) == {"4", "5", "6", "7", "out"}
    assert names and set(names) < set(full)
    for n, p in names.items():
        assert torch.equal(p, full[n]) and (p is full[n]) == (not copy), n
    # the model it was cut from stays whole
    assert dict(model.named_parameters()).keys() == full.keys() and model.embed is not None


def test_keep_layers_refuses_unknown_layers_and_a_tied_head_across_stages():
    model = _model("block")
    with pytest.raises(ValueError, match=r"layers \[7\] are not in the model"):
        keep_layers(model, [3, 7], first=False, last=True, copy=False)
    tied = Decoder(get_config("tiny", tie_embeddings=True))
    with pytest.raises(ValueError, match="tie_embeddings"):
        keep_layers(tied, [0], first=True, last=False, copy=True)


def test_a_decoder_takes_ids_with_its_embedding_and_a_state_without():
    model = _model("block")
    ids = torch.zeros(1, 4, dtype=torch.long)
    later = keep_layers(model, [1], first=False, last=False, copy=False)
    with pytest.raises(ValueError, match="ResidualState of the previous pipeline stage"):
        later(ids)
    state = model.begin(ids)
    with pytest.raises(ValueError, match="ResidualState of the previous pipeline stage"):
        model(_boundary(state))


def test_split_layers_is_contiguous_and_even():
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        split_layers(2, 3)


def test_configure_model_hands_the_model_to_the_strategys_parallelize():
    from lightning_modules.module import LanguageModel

    module = LanguageModel(get_config("tiny"))
    seen: list = []
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(parallelize=seen.append))
    module.configure_model()
    assert seen == [module.model]

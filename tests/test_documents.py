"""Document-aware packing (``data.packing: documents``): a window of several documents through the model
equals each document run alone (logits and gradients, every residual mode, KDA and MLA layers); the
KDA kernels and the short conv reset at each document start; the windows carry the right boundaries
and the default data path is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnres.model import Decoder, get_config
from attnres.model.documents import DocumentMask, segment_ids_from_separators
from attnres.model.kda import KimiDeltaAttention, ShortConv, kda_chunked, kda_recurrent
from attnres.model.mla import MultiHeadLatentAttention
from lightning_modules.data import TextDataModule, TokenWindows
from tests.helpers import documents_of, fake_fla, packed_and_alone

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEP = 256  # the byte tokenizer's <|endoftext|>
# document lengths per row of a T = 40 window: a boundary inside a chunk (16), one on a chunk edge,
# a one-token document, a document longer than a chunk; row 1 opens with a separator
LENGTHS = ([7, 9, 1, 23], [16, 17, 7])
T = 40


def _segments(lengths: tuple[list[int], ...] = LENGTHS) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths])


def _packed_ids(vocab: int = SEP, seed: int = 0) -> torch.Tensor:
    """Token windows ``[2, T]`` whose documents are delimited by SEP at the starts of ``LENGTHS``
    (except row 0's first: that window opens mid-document)."""
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    for b, lengths in enumerate(LENGTHS):
        starts = np.cumsum([0] + lengths[:-1])
        for s in starts:
            if b == 0 and s == 0:
                continue
            ids[b, s] = SEP
    return ids


def _kda_inputs(B=2, H=2, K=8, V=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gate = -torch.rand(B, T, H, K, generator=g, dtype=dtype) * 2
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    return q, k, v, gate, beta


# ---------------------------------------------------------------------------- boundaries


def test_segment_ids_start_a_document_at_each_separator():
    ids = torch.tensor([[5, 6, SEP, 7, SEP, SEP, 8], [SEP, 1, 2, 3, SEP, 4, 5]])
    expected = torch.tensor([[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2]])
    assert torch.equal(segment_ids_from_separators(ids, SEP), expected)
    seg = segment_ids_from_separators(_packed_ids(), SEP)  # the windows of the model tests below
    assert torch.equal(seg - seg[:, :1], _segments())


def test_document_mask_forms():
    seg = _segments()
    dm = DocumentMask.build(seg, attention=True, varlen=True)
    # cu_seqlens of the batch flattened to [1, 2T]: every row starts a document
    assert dm.cu_seqlens.tolist() == [0, 7, 16, 17, 40, 56, 73, 80]
    assert dm.cu_seqlens_cpu.device.type == "cpu"
    m = dm.attn_mask[0, 0]
    assert m.shape == (T, T) and m[16, 16] and not m[16, 15] and m[20, 17] and not m[20, 16] and not m[17, 20]
    expected = torch.block_diag(*[torch.ones(n, n) for n in LENGTHS[1]]).bool().tril()
    assert torch.equal(dm.attn_mask[1, 0], expected)
    with pytest.raises(ValueError, match="segment_ids must be an integer tensor"):
        DocumentMask.build(seg.float())


# ---------------------------------------------------------------------------- KDA kernels and conv


@pytest.mark.parametrize("chunk", [16, 32])
def test_kda_with_segments_equals_each_document_alone(chunk):
    leaves = [t.requires_grad_() for t in _kda_inputs()]
    seg = _segments()
    o_chunk, _ = kda_chunked(*leaves, chunk_size=chunk, segment_ids=seg)
    o_rec, _ = kda_recurrent(*leaves, segment_ids=seg)
    parts = []
    for b, sl in documents_of(seg):
        o, _ = kda_recurrent(*(t[b:b + 1, sl] for t in leaves))
        parts.append((b, sl, o[0]))
    o_alone = torch.zeros_like(o_rec)
    for b, sl, o in parts:
        o_alone = o_alone.index_put((torch.tensor([b]), torch.arange(sl.start, sl.stop)), o)
    torch.testing.assert_close(o_rec, o_alone, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(o_chunk, o_alone, atol=1e-12, rtol=1e-10)
    w = torch.randn(o_alone.shape, generator=torch.Generator().manual_seed(3), dtype=o_alone.dtype)
    ref = torch.autograd.grad((o_alone * w).sum(), leaves)
    got = torch.autograd.grad((o_chunk * w).sum(), leaves)
    for name, a, b in zip(("q", "k", "v", "g", "beta"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")


def test_kda_segments_change_the_result():
    # the reference is not vacuous: without the segment ids the later documents read the earlier ones
    q, k, v, g, beta = _kda_inputs()
    a, _ = kda_chunked(q, k, v, g, beta, segment_ids=_segments())
    b, _ = kda_chunked(q, k, v, g, beta)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # row 0's first document starts the window
    assert (a[0, 7:] - b[0, 7:]).abs().max() > 1e-3


def test_short_conv_with_segments_equals_each_document_alone():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, T, 6, dtype=torch.float64)
    seg = _segments()
    y, _ = conv(x, segment_ids=seg)
    for b, sl in documents_of(seg):
        torch.testing.assert_close(y[b, sl], conv(x[b:b + 1, sl])[0][0], atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="state=None"):
        conv(x, state=torch.zeros(2, 6, 3, dtype=torch.float64), segment_ids=seg)


def test_mixers_refuse_documents_with_a_decoding_cache():
    seg = _segments()
    x = torch.randn(2, T, 32)
    with pytest.raises(ValueError, match="cache"):
        KimiDeltaAttention(32, 2, 16)(x, {}, DocumentMask.build(seg))
    with pytest.raises(ValueError, match="attention=True"):
        MultiHeadLatentAttention(32, 2, 16, 8, 16, 16)(x, None, DocumentMask.build(seg, attention=False))


# ---------------------------------------------------------------------------- the decoder


def err_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``: the decoder runs fp64 here, but KDA normalises q, k and computes its decay
    in fp32 (``attnres.model.kda``) as does the MoE router, so packed and alone (other chunk alignment,
    other GEMM shapes) agree to fp32 rounding (measured: logits 1.7e-7, worst parameter gradient 5.2e-7);
    a document that reads another is off by order 1e-2 or more."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # both 0: a query with one source


def _decoder(mode: str, **overrides) -> Decoder:
    torch.manual_seed(0)
    # hybrid: KDA, KDA, KDA, MLA; the first layer dense, the others MoE
    return Decoder(get_config("tiny", residual=mode, **overrides)).double()


@pytest.mark.parametrize("mode", ["standard", "full", "block"])
def test_packed_window_equals_each_document_run_alone(mode):
    model = _decoder(mode)
    ids = _packed_ids()
    seg = segment_ids_from_separators(ids, SEP)
    w = torch.randn(2, T, model.config.vocab_size, generator=torch.Generator().manual_seed(1)).double()

    packed, alone, grads = packed_and_alone(model, ids, seg, w)
    assert err_ratio(packed, alone) < 2e-6
    for n, p in model.named_parameters():
        assert err_ratio(grads[n], p.grad) < 2e-6, n
    # without the segment ids the documents after the first do see their predecessors
    mixed = model(ids).logits.detach()
    assert err_ratio(mixed[0, 7:], alone[0, 7:]) > 1e-2


@pytest.mark.parametrize("mixer", ["kda", "mla"])
def test_packed_window_equals_documents_alone_with_one_mixer_kind(mixer):
    model = _decoder("block", token_mixer=mixer, moe=False)
    ids = _packed_ids(seed=1)
    seg = segment_ids_from_separators(ids, SEP)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg).logits
        for b, sl in documents_of(seg):
            assert err_ratio(packed[b, sl], model(ids[b:b + 1, sl]).logits[0]) < 2e-6


def test_loss_keeps_every_label_and_none_reads_across_documents():
    # the separator opens the next document, so the last token of a document predicts it from its own
    # document and the separator predicts the next document's first token from the separator alone: the
    # packed loss is the mean of the per-document token losses, over all T labels of the window
    model = _decoder("block", moe=False)
    ids = _packed_ids(seed=2)
    labels = torch.cat([ids[:, 1:], torch.randint(0, SEP, (2, 1))], dim=1)
    seg = segment_ids_from_separators(ids, SEP)
    with torch.no_grad():
        loss = model(ids, labels, segment_ids=seg).loss
        nll = torch.cat([F.cross_entropy(model(ids[b:b + 1, sl]).logits[0], labels[b, sl], reduction="none")
                         for b, sl in documents_of(seg)])
    assert nll.numel() == 2 * T
    torch.testing.assert_close(loss, nll.mean().float(), atol=1e-6, rtol=1e-6)  # the loss is fp32


def test_decoder_refuses_segment_ids_with_a_cache_or_another_shape():
    from attnres.model import DecoderCache

    model = _decoder("block", moe=False)
    ids = _packed_ids()
    with pytest.raises(ValueError, match="decoding cache"):
        model(ids, segment_ids=_segments(), cache=DecoderCache())
    with pytest.raises(ValueError, match="input_ids' shape"):
        model(ids, segment_ids=_segments()[:, :10])


def test_documents_trace_without_graph_breaks():
    # the segment ids have the tokens' static shape: the CPU path (chunked KDA, masked conv, SDPA mask)
    # compiles in one graph (dense MLPs: the CPU expert loop has a data-dependent split of its own)
    model = _decoder("block", moe=False).float()
    ids = _packed_ids()
    seg = segment_ids_from_separators(ids, SEP)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, segment_ids=seg).logits, model(ids, segment_ids=seg).logits)


# ---------------------------------------------------------------------------- data


def test_token_windows_with_separator_carry_segment_ids_and_the_same_tokens():
    data = np.array([1, 2, SEP, 3, 4, 5, SEP, 6, SEP, 7, 8, 9, 10, SEP, 11, 12, 13], dtype=np.uint16)
    plain = TokenWindows([data], seq_len=8)
    packed = TokenWindows([data], seq_len=8, sep_id=SEP)
    assert len(plain) == len(packed) == 2
    assert set(plain[0]) == {"input_ids", "labels"}
    for i in range(2):
        assert torch.equal(plain[i]["input_ids"], packed[i]["input_ids"])
        assert torch.equal(plain[i]["labels"], packed[i]["labels"])
    assert packed[0]["segment_ids"].tolist() == [0, 0, 1, 1, 1, 1, 2, 2]  # [1 2 | S 3 4 5 | S 6]
    assert packed[1]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]  # [S 7 8 9 10 | S 11 12]
    assert packed[0]["segment_ids"].dtype == torch.int64


def test_datamodule_packing_documents_marks_every_separator(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"doc {i} " * (3 + 5 * i))  # 24 to 452 bytes
    kw = dict(corpus="files", files=[str(tmp_path / "*.txt")], seq_len=64, batch_size=4,
              cache_dir=str(tmp_path / "cache"), shuffle=False)
    plain, packed = TextDataModule(**kw), TextDataModule(packing="documents", **kw)
    for dm in (plain, packed):
        dm.setup("fit")
    a, b = next(iter(plain.train_dataloader())), next(iter(packed.train_dataloader()))
    assert set(a) == {"input_ids", "labels"}  # the default batch is what it always was
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    seg, ids = b["segment_ids"], b["input_ids"]
    assert seg.shape == ids.shape
    changes = seg[:, 1:] != seg[:, :-1]
    assert torch.equal(changes, ids[:, 1:] == SEP)  # a new document exactly at each separator
    assert changes.any() and ((seg[:, 1:] - seg[:, :-1]) >= 0).all()
    with pytest.raises(ValueError, match="data.packing='rows' is invalid; valid: concat | documents"):
        TextDataModule(packing="rows", **kw)


def test_language_model_steps_hand_the_segment_ids_to_the_model(monkeypatch):
    from types import SimpleNamespace

    from lightning_modules.module import LanguageModel

    torch.manual_seed(0)
    lm = LanguageModel(get_config("tiny", moe=False))
    monkeypatch.setattr(lm, "log", lambda *a, **k: None)
    opt = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    monkeypatch.setattr(LanguageModel, "trainer", SimpleNamespace(optimizers=[opt]))
    ids = _packed_ids(seed=3)
    seg = segment_ids_from_separators(ids, SEP)
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "segment_ids": seg}
    with torch.no_grad():
        packed = lm.model(ids, batch["labels"], segment_ids=batch["segment_ids"]).loss
        mixed = lm.model(ids, batch["labels"]).loss
        assert abs(packed - mixed) > 1e-4  # the two differ, so the step below shows which one it ran
        torch.testing.assert_close(lm.training_step(batch, 0), packed)
        nll = lm.predict_step(batch, 0)["nll"]
    torch.testing.assert_close(nll.mean(), packed, atol=1e-6, rtol=1e-6)  # equal-length rows: mean of means


@pytest.mark.parametrize("packed", [False, True])
def test_fla_eager_path_with_in_kernel_norms_and_gates_equals_the_torch_path(monkeypatch, packed):
    # eager on fla the layer hands chunk_kda the raw q/k, the decay's pre-activation and beta's logits
    # (fla's in-kernel L2 norm, gate and sigmoid, as fla's own KDA layer does) and rms_norm_gated the raw
    # output gate: with fla's documented semantics the same outputs and gradients as our torch path
    calls: list = []
    fake_fla(monkeypatch, calls)
    torch.manual_seed(0)
    layers = {b: KimiDeltaAttention(32, 2, 16, backend=b).double() for b in ("fla", "torch")}
    layers["torch"].load_state_dict(layers["fla"].state_dict())
    with torch.no_grad():  # not the init's ones, so the head norm's weight is checked
        for lay in layers.values():
            lay.o_norm.weight.copy_(torch.linspace(0.5, 1.5, 16, dtype=torch.float64))
    x = 8 * torch.randn(2, T, 32, dtype=torch.float64)  # |q|, |k| ~ 1 >> the L2 norms' epsilons
    docs = DocumentMask.build(_segments(), varlen=True) if packed else None
    out, grads = {}, {}
    for b, lay in layers.items():
        xb = x.clone().requires_grad_(True)
        out[b] = lay(xb, documents=docs)
        out[b].pow(2).sum().backward()
        grads[b] = [xb.grad] + [p.grad for p in lay.parameters()]
    assert len(calls) == 4  # three convs and one chunk_kda through the stand-in: the fla path ran
    # the torch path takes the decay and the gates in fp32 (fp32 rounding: ~1e-7 of each tensor's scale), and
    # fla's L2 norm divides by sqrt(|q|^2 + 1e-6) where F.normalize takes max(|q|, 1e-6) (~1e-6 here); a
    # wrong argument (no dt_bias, the gate's sigmoid twice, the head norm's weight left out) is off by 1e-2
    assert err_ratio(out["fla"], out["torch"]) < 1e-5
    for a, b in zip(grads["fla"], grads["torch"], strict=True):
        assert err_ratio(a, b) < 1e-5


def test_fla_varlen_call_gets_the_flattened_batch_and_its_document_boundaries(monkeypatch):
    calls: list = []
    fake_fla(monkeypatch, calls)
    model = _decoder("block", moe=False, kda_backend="fla")
    ids = _packed_ids(seed=4)
    seg = segment_ids_from_separators(ids, SEP)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg).logits
        n_packed = len(calls)
        for b, sl in documents_of(seg):
            assert err_ratio(packed[b, sl], model(ids[b:b + 1, sl]).logits[0]) < 2e-6
    # the three KDA layers, each three varlen convs and one varlen chunk_kda, all on the batch's boundaries;
    # each document alone: fla's dense conv and chunk_kda
    cu = [0, 7, 16, 17, 40, 56, 73, 80]
    assert calls[:n_packed] == ([("conv", cu)] * 3 + [cu]) * 3
    assert calls[n_packed:n_packed + 4] == [("conv", None)] * 3 + [None]


def test_pipeline_strategy_refuses_packed_documents():
    from types import SimpleNamespace

    from lightning_modules.strategies.pipeline import PipelineParallelStrategy

    batch = {"input_ids": _packed_ids(), "labels": _packed_ids(), "segment_ids": _segments()}
    with pytest.raises(ValueError, match="packing='documents' is not supported by the pipeline"):
        PipelineParallelStrategy._run(SimpleNamespace(pipeline=object()), batch, train=True)

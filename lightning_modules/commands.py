"""The typed functions behind ``attnres generate | plot | export | compare | tokenizer train | prepare``.

Heavy imports (torch, Lightning) happen inside the functions so ``attnres info`` stays fast.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any, Literal

from attnres.errors import UsageError

DEFAULT_CONFIG = "configs/default.yaml"
# LanguageModel's model arguments before the whole Config became one argument (model.config): what an
# old checkpoint's hyperparameters hold instead of "config"
OLD_MODEL_KNOBS = ("preset", "residual", "num_blocks", "num_layers", "dim", "token_mixer", "moe",
                   "num_experts", "top_k", "max_seq_len", "vocab_size", "overrides")


def _load_checkpoint(ckpt: str, device: str = "cpu") -> tuple[Any, Any, dict]:
    """(LanguageModel in eval mode, tokenizer, raw checkpoint dict) from a Lightning checkpoint, read
    once and checked against its checksums (:func:`lightning_modules.checkpoint.load_checkpoint`)."""
    from lightning_modules.checkpoint import CheckpointError, load_checkpoint
    from lightning_modules.module import LanguageModel
    from lightning_modules.tokenizer import ByteTokenizer, tokenizer_from_dict

    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"--ckpt {ckpt}: no such checkpoint (training writes <run dir>/checkpoints/last.ckpt)"
        )
    check_device(device)
    raw = load_checkpoint(ckpt, map_location="cpu")  # checked on the host; the module moves below
    if "state_dict" not in raw or "hyper_parameters" not in raw:
        raise CheckpointError(
            f"checkpoint {ckpt} has no model weights and hyperparameters (keys: {sorted(raw)[:6]}); "
            "give a checkpoint written by attnres fit"
        )
    hparams = raw["hyper_parameters"]
    if "config" not in hparams:  # hyperparameters of the layout before model.config (preset, overrides)
        raise CheckpointError(
            f"checkpoint {ckpt} predates model.config: its hyperparameters name a preset and knobs "
            f"({', '.join(sorted(k for k in hparams if k in OLD_MODEL_KNOBS)) or 'no config'}) instead of "
            "the model's whole Config; this version cannot rebuild its model: train it again (or load it "
            "with the attnres release that wrote it)"
        )
    # what LanguageModel.load_from_checkpoint does, from the dict already loaded and checked
    init_args = inspect.signature(LanguageModel.__init__).parameters  # not LightningCLI's _instantiator
    module = LanguageModel(**{k: v for k, v in hparams.items() if k in init_args})
    module.on_load_checkpoint(raw)
    module.load_state_dict(raw["state_dict"])
    module.to(device).eval()
    extra = raw.get("attnres", {})
    tok = tokenizer_from_dict(extra["tokenizer"]) if "tokenizer" in extra else ByteTokenizer()
    if tok.vocab_size > module.config.vocab_size:
        raise ValueError(
            f"tokenizer/vocabulary mismatch: the checkpoint's tokenizer has {tok.vocab_size} ids "
            "but its model "
            f"only {module.config.vocab_size}"
        )
    return module, tok, raw


def check_device(device: str) -> None:
    """``--device``: a torch device string, and CUDA only where there is a CUDA device."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: not a device ({exc}); use cpu or cuda") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
    num_samples: int,
) -> None:
    """The sampling arguments of :func:`generate`, checked before the checkpoint is loaded."""
    rules = [
        (max_new_tokens >= 1, "max_new_tokens", max_new_tokens, ">= 1"),
        (num_samples >= 1, "num_samples", num_samples, ">= 1"),
        (greedy or (temperature >= 0 and math.isfinite(temperature)), "temperature", temperature,
         ">= 0 (0 or --greedy true: argmax)"),
        (top_k is None or top_k >= 1, "top_k", top_k, ">= 1 (or null: all tokens)"),
        (top_p is None or 0 < top_p <= 1, "top_p", top_p, "in (0, 1] (or null: off)"),
    ]
    for ok, name, value, rule in rules:
        if not ok:
            raise UsageError(f"--{name} {value}: must be {rule}")


def generate(
    ckpt: str,
    prompt: str = "def ",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    greedy: bool = False,
    num_samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
) -> list[str]:
    """Continue a prompt with a trained model (cached decoding: one prefill, then a token per step).

    Args:
        ckpt: a checkpoint written by ``attnres fit`` (e.g. ``runs/default/version_0/checkpoints/last.ckpt``).
        prompt: the text to continue.
        max_new_tokens: tokens to generate (fewer if every sample reaches ``<|endoftext|>``).
        temperature: softmax temperature (0 or ``greedy``: argmax).
        top_k: sample among the ``top_k`` most likely tokens (None: all).
        top_p: nucleus sampling: the smallest set of probability ``>= top_p`` (None: off).
        greedy: argmax decoding.
        num_samples: independent continuations of the prompt.
        seed: sampling seed.
        device: ``cpu`` or ``cuda`` (a checkpoint written on either loads on either).

    A prompt longer than the model's context (``max_seq_len``, the longest sequence it was trained on)
    is cut to its last ``max_seq_len`` tokens, with a notice on stderr: the continuation depends most
    on the end of the prompt, and refusing would make "continue this file" fail on long files.
    """
    import sys

    import torch

    check_sampling(max_new_tokens, temperature, top_k, top_p, greedy, num_samples)
    module, tok, _ = _load_checkpoint(ckpt, device)
    ids = list(tok.encode(prompt))
    if len(ids) == 0:
        ids = [tok.eos_id]  # an empty prompt starts a new document
    context = module.config.max_seq_len
    if len(ids) > context:
        print(
            f"attnres generate: the prompt has {len(ids)} tokens, more than the model's context "
            f"(max_seq_len {context}); using its last {context}",
            file=sys.stderr,
        )
        ids = ids[-context:]
    x = torch.tensor([list(map(int, ids))] * num_samples, dtype=torch.long, device=device)
    torch.manual_seed(seed)
    out = module.model.generate(
        x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, eos_id=tok.eos_id
    )
    texts = [prompt + tok.decode(row[x.shape[1] :].tolist()) for row in out]
    for i, text in enumerate(texts):
        if num_samples > 1:
            print(f"--- sample {i}")
        print(text)
    return texts


def plot(
    ckpt: str, output_dir: str | None = None, batch_size: int = 8, text_file: str | None = None
) -> list[str]:
    """Write the depth-attention, magnitude and gradient-norm plots of a checkpoint.

    Runs one batch with ``return_stats`` (and one backward for the gradient norms) and writes the
    depth-attention heatmap, magnitude-vs-depth and gradient-norm-vs-depth PNGs.

    Args:
        ckpt: a checkpoint written by ``attnres fit``.
        output_dir: where to write (default: ``plot_<checkpoint>_step<N>/`` beside the run's own
            ``plots/`` folder, i.e. next to the checkpoint's ``checkpoints/`` folder; the training's
            plots are left as they are).
        batch_size: sequences in the batch.
        text_file: take the batch from this text file instead of the checkpoint's validation data.
    """
    import torch

    from lightning_modules.callbacks import summary_scalars, write_plots

    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size}: must be >= 1")
    if text_file is not None and not Path(text_file).is_file():
        raise FileNotFoundError(f"--text_file {text_file}: no such file")
    module, tok, raw = _load_checkpoint(ckpt)
    seq_len = raw.get("attnres", {}).get("seq_len") or min(module.config.max_seq_len, 256)
    if text_file is not None:
        ids = torch.from_numpy(
            tok.encode(Path(text_file).read_text(encoding="utf-8", errors="replace"))
        ).long()
        n = min(batch_size, (len(ids) - 1) // seq_len)
        if n < 1:
            raise ValueError(
                f"--text_file {text_file} has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        w = ids[: n * seq_len + 1]
        batch = {"input_ids": w[:-1].view(n, seq_len), "labels": w[1:].view(n, seq_len)}
    else:
        from lightning_modules.data import checkpoint_val_batch

        batch = checkpoint_val_batch(raw, batch_size)
    stats, grads = module.depth_diagnostics(batch)
    step = raw.get("global_step", 0)
    run_dir = Path(ckpt).resolve().parent.parent
    out_dir = Path(output_dir) if output_dir else run_dir / f"plot_{Path(ckpt).stem}_step{step:06d}"
    written = write_plots(stats, grads, out_dir, f"{Path(ckpt).name} (step {step})")
    for k, v in summary_scalars(stats).items():
        print(f"{k}: {v:.4f}")
    print(f"loss on the batch: {stats['loss']:.4f}")
    for p in written:
        print(p)
    return [str(p) for p in written]


def export(ckpt: str, output: str) -> str:
    """Take the weights out of a checkpoint: ``model.safetensors`` and ``config.json`` (the model's
    ``Config`` fields and its tokenizer; a BPE tokenizer also as ``tokenizer.json``) in ``output``,
    loadable without Lightning: ``attnres.model.Decoder.from_pretrained(output)``.

    Args:
        ckpt: a checkpoint written by ``attnres fit`` (checked against its checksums).
        output: the folder to write (created; files of the same names are replaced).
    """
    import attnres

    module, tok, raw = _load_checkpoint(ckpt)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder to write the weights into")
    extra: dict[str, Any] = {"attnres_version": attnres.__version__, "global_step": raw.get("global_step", 0),
                             "source_checkpoint": str(Path(ckpt).resolve())}
    spec = raw.get("attnres", {}).get("tokenizer") or {"kind": "byte"}
    if spec["kind"] == "bpe":  # the tokenizers library's own file: tokenizers.Tokenizer.from_file
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(spec["json"], encoding="utf-8")
        extra["tokenizer"] = {"kind": "bpe", "file": "tokenizer.json", "vocab_size": tok.vocab_size}
    else:
        extra["tokenizer"] = {"kind": spec["kind"], "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    module.model.save_pretrained(out, extra)
    params = module.model.num_parameters()
    print(f"exported {params:,} parameters (step {extra['global_step']}) to {out}: model.safetensors, "
          f"config.json{', tokenizer.json' if spec['kind'] == 'bpe' else ''}")
    print(f"load it without Lightning: attnres.model.Decoder.from_pretrained({str(out)!r})")
    return str(out)


def tokenizer_train(
    vocab_size: int = 4096,
    corpus: Literal["stdlib", "files"] = "stdlib",
    files: list[str] | None = None,
    val_fraction: float = 0.02,
    test_fraction: float = 0.0,
    output: str | None = None,
    cache_dir: str = ".cache/attnres",
) -> str:
    """Train a byte-level BPE tokenizer on the training split of a corpus.

    Cached: an existing one for the same corpus and size is reused. Use it with
    ``--data.tokenizer <printed path>``.

    Args:
        vocab_size: ids in total (specials ``<|endoftext|>``, ``<|pad|>`` included).
        corpus: ``stdlib`` or ``files``.
        files: glob patterns for ``corpus: files``.
        val_fraction: the share of files held out (as in the DataModule; they are not trained on).
        test_fraction: the share held out for testing (as in the DataModule; not trained on either).
        output: where to write the ``tokenizer.json`` (default: under ``cache_dir/tokenizers``).
        cache_dir: the cache directory of the DataModule.
    """
    from lightning_modules.data import _files_key
    from lightning_modules.shards import check_fractions, glob_files, read_text, split_files, stdlib_files
    from lightning_modules.tokenizer import MIN_BPE_VOCAB, train_bpe

    check_fractions(val_fraction, test_fraction)
    if vocab_size < MIN_BPE_VOCAB:
        raise UsageError(
            f"--vocab_size {vocab_size}: must be >= {MIN_BPE_VOCAB} (256 bytes, 2 specials, merges), "
            "e.g. 4096"
        )
    root, found = stdlib_files() if corpus == "stdlib" else glob_files(files or [], "--files")
    train = split_files(root, found, val_fraction, test_fraction)["train"]
    key = _files_key(root, train)
    path = (
        Path(output)
        if output
        else Path(cache_dir).expanduser() / "tokenizers" / f"bpe{vocab_size}-{corpus}-{key}.json"
    )
    if output is None and path.is_file():
        print(f"cached: {path}")
    else:
        t0 = time.perf_counter()
        train_bpe((read_text(f) for f in train), vocab_size, path)
        print(
            f"trained a {vocab_size}-id BPE on {len(train)} files in {time.perf_counter() - t0:.0f} s: {path}"
        )
    print(f"use it with: --data.tokenizer {path}")
    return str(path)


def prepare(
    output: str,
    corpus: Literal["stdlib", "files"] = "stdlib",
    files: list[str] | None = None,
    tokenizer: str = "byte",
    val_fraction: float = 0.02,
    test_fraction: float = 0.0,
    shard_tokens: int = 1 << 27,
) -> dict:
    """Pre-tokenise a corpus into memmap shards for ``--data.corpus shards``.

    Writes ``{train,val,test}-NNNNN.bin`` (uint16/uint32 tokens) and ``meta.json``; train on them with
    ``--data.corpus shards --data.shards_dir <output>``.

    Args:
        output: the shard directory to write (replaced if it is one already; any other existing
            path is refused).
        corpus: ``stdlib`` or ``files``.
        files: glob patterns for ``corpus: files`` (``**`` recurses).
        tokenizer: ``byte`` or a ``tokenizer.json`` from ``attnres tokenizer train``.
        val_fraction: share of files (by a hash of their path) held out for validation.
        test_fraction: share of files held out for ``attnres test`` (0: no test split), disjoint from
            val's (the other end of the hash range; see ``shards.split_of``).
        shard_tokens: tokens per shard file at most.
    """
    from lightning_modules.shards import check_fractions, glob_files, split_files, stdlib_files, write_shards
    from lightning_modules.tokenizer import load_tokenizer

    check_fractions(val_fraction, test_fraction)
    if shard_tokens < 1:
        raise UsageError(f"--shard_tokens {shard_tokens}: must be >= 1")
    out = Path(output)
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--output {output}: exists and is not a shard directory (no meta.json), so it would be "
            "replaced; choose a new path or remove it first"
        )
    tok = load_tokenizer(tokenizer)
    root, found = stdlib_files() if corpus == "stdlib" else glob_files(files or [], "--files")
    t0 = time.perf_counter()
    splits = split_files(root, found, val_fraction, test_fraction)
    meta = write_shards(output, splits, tok, f"{corpus}:{root}", shard_tokens,
                        val_fraction=val_fraction, test_fraction=test_fraction)
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['documents']} documents, {sum(info['tokens']):,} tokens "
            f"in {len(info['files'])} shard(s)"
        )
    print(
        f"wrote {output} ({meta['dtype']}, {time.perf_counter() - t0:.1f} s); train on it with "
        f"--data.corpus shards --data.shards_dir {output} --data.tokenizer {tokenizer}"
    )
    return meta


TEMPLATE_ROOT = Path(__file__).resolve().parent.parent  # the checkout: the repository is the template


def new(
    project_name: str,
    output_dir: str = ".",
    project_slug: str | None = None,
    package_name: str | None = None,
    description: str | None = None,
    author: str | None = None,
    license: Literal["Apache-2.0", "MIT", "BSD-3-Clause", "GPL-3.0-or-later", "Proprietary"] = "Apache-2.0",
    model_preset: Literal["tiny", "small", "medium"] = "tiny",
    residual_mode: Literal["block", "full", "standard"] = "block",
    num_blocks: int | None = None,
    moe: bool = True,
    cuda_kernels: Literal["auto", "yes", "no"] = "auto",
) -> str:
    """Start a new project from this repository (a cookiecutter template), answers checked first.

    The same as ``cookiecutter <this checkout> --no-input key=value ...``, with typed answers (a wrong
    choice is one line, not a traceback) and the template's own checks (slug, package name, blocks).

    Args:
        project_name: the project's name (e.g. "My AttnRes LM").
        output_dir: where the project directory is created.
        project_slug: directory and distribution name (default: the name, slugified).
        package_name: Python package, extension, console script and op namespace (default: the slug
            with ``_``).
        description: one-line description.
        author: author.
        license: the licence; its full text is written to LICENSE.
        model_preset: the default model preset (tiny trains on CPU; small/medium get the GPU set-up).
        residual_mode: ``block`` (Block AttnRes), ``full`` or ``standard``.
        num_blocks: Block AttnRes blocks (default: the preset's).
        moe: MoE channel mixers (False: dense SwiGLU).
        cuda_kernels: build the CUDA kernels: ``auto``, ``yes`` or ``no``.
    """
    try:
        from cookiecutter.exceptions import (
            CookiecutterException,
            FailedHookException,
            OutputDirExistsException,
        )
        from cookiecutter.main import cookiecutter
    except ImportError:
        raise UsageError("attnres new needs cookiecutter: pip install 'attnres[template]'") from None
    if not (TEMPLATE_ROOT / "cookiecutter.json").is_file() or not (TEMPLATE_ROOT / "hooks").is_dir():
        raise UsageError(
            f"attnres new needs a checkout of attnres (the repository is the template; none at "
            f"{TEMPLATE_ROOT}): "
            "clone it and run `attnres new` from that checkout's environment"
        )
    out = Path(output_dir)
    if not out.is_dir():
        raise UsageError(f"--output_dir {output_dir}: no such directory")
    answers = {"project_name": project_name, "license": license, "model_preset": model_preset,
               "residual_mode": residual_mode, "moe": moe, "cuda_kernels": cuda_kernels}
    optional = {"project_slug": project_slug, "package_name": package_name, "description": description,
                "author": author, "num_blocks": num_blocks}
    answers.update({k: v for k, v in optional.items() if v is not None})
    import logging

    # cookiecutter logs a failed hook with its traceback (logger.exception); the hook's lines say it all
    logging.getLogger("cookiecutter").setLevel(logging.CRITICAL)
    try:
        path = cookiecutter(str(TEMPLATE_ROOT), no_input=True, extra_context=answers, output_dir=str(out))
    except FailedHookException:
        raise SystemExit(2) from None  # the hook printed what is wrong with the answers, one line each
    except OutputDirExistsException as exc:
        raise UsageError(f"{exc}: choose another --project_name/--project_slug or --output_dir") from None
    except CookiecutterException as exc:
        raise UsageError(f"the template could not be rendered: {exc}") from exc
    return path

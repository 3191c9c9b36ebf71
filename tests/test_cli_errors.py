"""User errors of every ``attnres`` subcommand: one line on stderr that names the argument, exit
status 2, no traceback (unless ``ATTNRES_DEBUG=1``) and nothing written. Each bad input fails
before a model is built, in-process through :func:`lightning_modules.main.main`; a few run as the real command
in a subprocess, and the template's bad answers through the real ``cookiecutter``. Also: ``attnres
--help``, the defaults without a config, ``generate``'s long prompts and the corpus checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch

from attnres.errors import parse_error_message
from attnres.model import get_config
from lightning_modules import commands
from lightning_modules.cli import DEFAULT_MAX_STEPS, AttnResCLI
from lightning_modules.main import DESCRIPTIONS, main
from lightning_modules.module import LanguageModel
from lightning_modules.shards import glob_files, is_text, split_files

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "configs/default.yaml")
GPU = str(ROOT / "configs/trainer/gpu.yaml")


@pytest.fixture(autouse=True)
def _keep_threads():
    # `attnres fit` sets torch's thread count before it instantiates anything; give other tests theirs back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with the inputs the cases point at: text and binary files, a config with a
    misspelled key, a directory that is not a shard directory, a file standing in for a checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("def f():\n    return 1\n" * 20)
    (tmp_path / "texts" / "b.txt").write_text("class A:\n    pass\n" * 20)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_stpes: 3\n")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine\n")
    (tmp_path / "fake.ckpt").write_bytes(b"not read before the arguments are checked")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def snapshot(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


NO_CUDA = not torch.cuda.is_available()

# (argv, substrings of the one-line message: the argument it names, and the fix or the valid values)
CASES: list[tuple[list[str], list[str]]] = [
    # fit: the command line and config files
    (["fit", "--trainer.max_stpes", "3"], ["--trainer.max_stpes", "did you mean '--trainer.max_steps'?"]),
    (["fit", "-c", "typo.yaml"], ["'trainer.max_stpes'", "did you mean 'trainer.max_steps'?"]),
    (["fit", "-c", "missing.yaml"], ["config", "missing.yaml", "does not exist"]),
    (["fit", "--trainer.max_steps", "-5"], ["--trainer.max_steps -5", "must be >= 1"]),
    (["fit", "--trainer.max_steps", "abc"], ["--trainer.max_steps abc", "expected int"]),
    (["fit", "--trainer.max_epochs", "0"], ["--trainer.max_epochs 0", "must be >= 1"]),
    (["fit", "--trainer.devices", "0"], ["Trainer(devices='0')", "not a valid input"]),
    (["fit", "--model.lr", "-0.001"], ["--model.lr -0.001", "must be > 0"]),
    (["fit", "--model.compile", "layers"], ["--model.compile layers: expected one of true, false, regional"]),
    (["fit", "--model.weight_decay", "-1"], ["--model.weight_decay -1.0", "must be >= 0"]),
    (["fit", "--model.betas", "[0.9, 1.5]"], ["--model.betas [0.9, 1.5]", "in [0, 1)"]),
    (
        ["fit", "--model.config.residul", "full"],
        ["--model.config.residul", "did you mean '--model.config.residual'?"],
    ),
    (
        ["fit", "--model.config.residual", "sideways"],
        ["--model.config.residual sideways", "expected one of standard, full, block"],
    ),
    (["fit", "--model.config.num_blocks", "3"], ["model.config.num_blocks=3", "valid: [1, 2, 4]"]),
    (["fit", "-c", "model/huge"], ["model/huge", "does not exist", "model/small, model/tiny"]),
    (["fit", "--optimizer", "Adam"], ["--optimizer is not supported", "--model.lr", "--model.weight_decay"]),
    (["fit", "--lr_scheduler", "StepLR"], ["--lr_scheduler is not supported", "--model.schedule"]),
    (["fit", "--data.corpus", "filez"], ["--data.corpus filez", "did you mean 'files'?"]),
    (
        ["fit", "--data.corpus", "files", "--data.files", "[nothing/*.txt]"],
        ["--data.files", "no file matches"],
    ),
    (["fit", "--data.corpus", "files", "--data.files", "[bin/*]"], ["--data.files", "all binary"]),
    (["fit", "--data.seq_len", "0"], ["data.seq_len (0)", "must be >= 1"]),
    (["fit", "--trainer.default_root_dir", "a_file/runs"], ["--trainer.default_root_dir", "not writable"]),
    (
        ["validate", "--data.tokenizer", "nothing.json"],
        ["tokenizer 'nothing.json'", "attnres tokenizer train"],
    ),
    # generate: sampling arguments and the checkpoint
    (["generate", "--ckpt", "missing.ckpt"], ["--ckpt missing.ckpt", "no such checkpoint"]),
    (["generate"], ["required", "ckpt"]),
    (["generate", "--ckpt", "fake.ckpt", "--temperature", "-1"], ["--temperature -1.0", "must be >= 0"]),
    (["generate", "--ckpt", "fake.ckpt", "--top_k", "0"], ["--top_k 0", "must be >= 1"]),
    (["generate", "--ckpt", "fake.ckpt", "--top_k", "abc"], ["--top_k abc", "expected int"]),
    (["generate", "--ckpt", "fake.ckpt", "--top_p", "1.5"], ["--top_p 1.5", "(0, 1]"]),
    (["generate", "--ckpt", "fake.ckpt", "--top_p", "0"], ["--top_p 0.0", "(0, 1]"]),
    (["generate", "--ckpt", "fake.ckpt", "--max_new_tokens", "0"], ["--max_new_tokens 0", "must be >= 1"]),
    (["generate", "--ckpt", "fake.ckpt", "--num_samples", "0"], ["--num_samples 0", "must be >= 1"]),
    (["generate", "--ckpt", "fake.ckpt", "--device", "nonsense"], ["--device 'nonsense'", "use cpu or cuda"]),
    (
        ["generate", "--ckpt", "fake.ckpt", "--temprature", "1"],
        ["--temprature", "did you mean '--temperature'?"],
    ),
    # prepare
    (["prepare", "--corpus", "files", "--files", "[bin/*]", "--output", "shards"], ["--files", "all binary"]),
    (
        ["prepare", "--corpus", "files", "--files", "[texts/*]", "--output", "keep"],
        ["--output keep", "not a shard"],
    ),
    (["prepare", "--output", "shards", "--corpus", "filez"], ["--corpus filez", "did you mean 'files'?"]),
    (["prepare", "--output", "shards", "--val_fraction", "1.5"], ["--val_fraction 1.5", "(0, 1)"]),
    (
        ["prepare", "--output", "shards", "--test_fraction", "0.99"],
        ["--test_fraction 0.99", "1 - val_fraction"],
    ),
    (["prepare", "--output", "shards", "--shard_tokens", "0"], ["--shard_tokens 0", "must be >= 1"]),
    (
        ["prepare", "--output", "shards", "--tokenizer", "nothing.json"],
        ["tokenizer 'nothing.json'", "train one"],
    ),
    (
        [
            "prepare",
            "--corpus",
            "files",
            "--files",
            "[texts/*]",
            "--output",
            "shards",
            "--test_fraction",
            "0.1",
        ],
        ["2 document(s), too few for train, val and test", "test_fraction 0"],
    ),
    (["prepare", "--corpus", "files", "--output", "shards"], ["--files is empty", "glob patterns"]),
    # tokenizer train
    (["tokenizer", "train", "--vocab_size", "10"], ["--vocab_size 10", "must be >= 260"]),
    (["tokenizer", "train", "--vocab_sise", "300"], ["--vocab_sise", "did you mean '--vocab_size'?"]),
    (["tokenizer", "train", "--corpus", "files", "--files", "[nothing/*]"], ["--files", "no file matches"]),
    (["tokenizer", "train", "--val_fraction", "0"], ["--val_fraction 0.0", "(0, 1)"]),
    (["tokenizer"], ["tokenizer.subcommand", "train"]),
    # plot, compare, info, bench, the top level
    (["plot", "--ckpt", "missing.ckpt"], ["--ckpt missing.ckpt", "no such checkpoint"]),
    (["plot", "--ckpt", "fake.ckpt", "--batch_size", "0"], ["--batch_size 0", "must be >= 1"]),
    (
        ["plot", "--ckpt", "fake.ckpt", "--text_file", "missing.txt"],
        ["--text_file missing.txt", "no such file"],
    ),
    (["compare", "--modes", "[standard, sideways]"], ["--modes", "valid: standard, full, block"]),
    (["compare", "--max_steps", "0"], ["--max_steps 0", "must be >= 1"]),
    (["compare", "--seeds", "0"], ["--seeds 0", "must be >= 1"]),
    (["compare", "-c", "missing.yaml"], ["--configs", "missing.yaml"]),
    (["compare", "-c", DEFAULT, "--output_dir", "a_file/out"], ["--output_dir", "not writable"]),
    (["info", "--model", "tinyy"], ["--model 'tinyy'", "did you mean 'tiny'?"]),
    (["fitt"], ["unknown subcommand 'fitt'", "did you mean 'fit'?"]),
]
if NO_CUDA:
    CASES += [
        (["fit", "-c", DEFAULT, "-c", GPU], ["trainer.accelerator is 'gpu'", "--trainer.accelerator cpu"]),
        (["generate", "--ckpt", "fake.ckpt", "--device", "cuda"], ["--device cuda", "use --device cpu"]),
        (["bench", "ops", "--device", "cuda"], ["--device cuda", "--device cpu"]),
    ]


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_user_error_is_one_line_naming_the_argument_exit_2_and_writes_nothing(
    argv: list[str], expected: list[str], workdir: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.delenv("ATTNRES_DEBUG", raising=False)
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = "attnres " + " ".join(
        argv[:2] if argv[0] in ("tokenizer", "bench") and len(argv) > 1 else argv[:1]
    )
    assert lines[0].startswith(command + ": ") or lines[0].startswith("attnres: "), lines[0]
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert snapshot(workdir) == before, "a failed command wrote files"


def test_the_real_command_prints_one_line_and_attnres_debug_the_traceback(workdir: Path, monkeypatch) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ATTNRES_DEBUG", None)
    argv = ["generate", "--ckpt", "missing.ckpt"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_modules", *argv],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "attnres generate: --ckpt missing.ckpt: no such checkpoint "
        "(training writes <run dir>/checkpoints/last.ckpt)\n"
    )
    monkeypatch.setenv("ATTNRES_DEBUG", "1")  # the exception itself, so Python prints its traceback
    with pytest.raises(FileNotFoundError, match="--ckpt missing.ckpt: no such checkpoint"):
        main(argv)


def test_template_bad_answers_stop_generation_with_the_hooks_message(tmp_path: Path) -> None:
    config = tmp_path / "cookiecutter-config.yaml"
    config.write_text(f"cookiecutters_dir: {tmp_path / 'cc'}\nreplay_dir: {tmp_path / 'replay'}\n")
    cases = [
        ("project_slug=bad slug!", "project_slug 'bad slug!' is not a valid directory/distribution name"),
        ("model_preset=huge", "huge provided for choice variable model_preset"),  # cookiecutter's own check
        (
            "moe=maybe",
            "maybe provided for variable moe could not be converted to a boolean",
        ),  # cookiecutter's
        ("num_blocks=3", "num_blocks=3 does not split preset 'tiny'"),
    ]
    for answer, message in cases:
        out = tmp_path / "out"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cookiecutter",
                "--no-input",
                "--config-file",
                str(config),
                "-o",
                str(out),
                str(ROOT),
                answer,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # cookiecutter exits 1 on a failed hook or answer (its own status; the hook's line is ours)
        assert proc.returncode != 0, answer
        assert message in proc.stderr, proc.stderr
        assert not out.exists() or not any(out.iterdir()), f"{answer}: a project was generated"


def test_parse_errors_become_one_line() -> None:
    union = (
        'Parser key "top_k":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
        "[<class 'int'>, <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'int'>\n    - Expected a "
        "<class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: abc"
    )
    assert parse_error_message(union, ["top_k"]) == "--top_k abc: expected int, null"
    assert parse_error_message(
        "unrecognized arguments: --optimizer Adam", ["model.lr"], {"optimizer": "use x"}
    ) == ("--optimizer is not supported: use x")


# ----------------------------------------------------------------------------- help and defaults


def test_help_lists_every_subcommand_on_one_full_line(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for name in (
        "fit",
        "validate",
        "test",
        "predict",
        "generate",
        "plot",
        "export",
        "compare",
        "tokenizer",
        "prepare",
        "info",
        "bench",
    ):
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(name + " ")]
        assert line.strip().endswith("."), line  # a whole sentence, not one cut at the terminal width
        assert DESCRIPTIONS[name] in line
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "fit" in capsys.readouterr().out


def test_without_a_config_the_run_is_bounded_and_cpu_threads_are_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    cli = AttnResCLI(
        args=["--trainer.enable_progress_bar", "false", "--data.cache_dir", str(tmp_path)], run=False
    )
    assert cli.trainer.max_steps == DEFAULT_MAX_STEPS
    assert torch.get_num_threads() == 1  # the tiny preset on CPU
    cli = AttnResCLI(args=["--trainer.max_epochs", "2", "--torch_threads", "2"], run=False)
    assert cli.trainer.max_steps == -1 and cli.trainer.max_epochs == 2  # an explicit bound is kept
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of an untrained 1-layer model with a 16-token context (no training needed)."""
    torch.manual_seed(0)
    config = get_config(
        "tiny",
        num_layers=1,
        num_blocks=1,
        dim=32,
        moe=False,
        token_mixer="mla",
        max_seq_len=16,
        vocab_size=264,
        mla_qk_nope_dim=8,
        mla_qk_shared_dim=8,
        mla_kv_rank=16,
        mlp_dim=64,
    )
    module = LanguageModel(config)
    path = tmp_path_factory.mktemp("ckpt") / "micro.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "attnres": {},
        },
        path,
    )
    return path


def test_a_prompt_longer_than_the_context_is_left_truncated_with_a_notice(micro_ckpt, capsys) -> None:
    prompt = "0123456789" * 4  # 40 byte tokens > max_seq_len 16
    (text,) = commands.generate(str(micro_ckpt), prompt=prompt, max_new_tokens=3, greedy=True)
    err = capsys.readouterr().err
    assert err == (
        "attnres generate: the prompt has 40 tokens, more than the model's context (max_seq_len 16); "
        "using its last 16\n"
    )
    assert text.startswith(prompt)
    # the continuation is the one of the last 16 tokens alone
    (short,) = commands.generate(str(micro_ckpt), prompt=prompt[-16:], max_new_tokens=3, greedy=True)
    assert text[len(prompt) :] == short[16:]


def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu_only_machine(micro_ckpt, tmp_path, monkeypatch, capsys):
    """A checkpoint whose tensors are stored as ``cuda:0`` (what ``torch.save`` writes on a GPU; the
    location tag is forced here, so the test runs without one) generates on the CPU: without
    ``map_location`` torch.load would refuse it on a machine without CUDA."""
    import torch.serialization

    raw = torch.load(micro_ckpt, weights_only=True)
    gpu_written = tmp_path / "gpu.ckpt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(raw, gpu_written)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_written, weights_only=True)
    (text,) = commands.generate(str(gpu_written), prompt="ab", max_new_tokens=3, greedy=True, device="cpu")
    (same,) = commands.generate(str(micro_ckpt), prompt="ab", max_new_tokens=3, greedy=True, device="cpu")
    assert text == same and text.startswith("ab")


# ----------------------------------------------------------------------------- corpus


def test_binary_files_are_skipped_with_a_count(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "é.txt").write_text("héllo " * 2000)  # multi-byte characters across the probe's end
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    root, files = glob_files([str(tmp_path / "*")])
    assert [f.name for f in files] == ["a.txt", "é.txt"]
    err = capsys.readouterr().err
    assert "--data.files: skipped 2 binary file(s) of 4 (image.png, latin1.txt)" in err
    assert is_text(tmp_path / "é.txt", probe=7)  # a character cut by the probe is not an error


def test_a_single_document_goes_to_train_and_a_test_split_needs_three(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("x")
    assert split_files(tmp_path, [one], 0.5) == {"train": [one], "val": []}
    two = [one, tmp_path / "two.txt"]
    splits = split_files(tmp_path, two, 0.02)
    assert len(splits["train"]) == 1 and len(splits["val"]) == 1
    with pytest.raises(
        ValueError, match=r"2 document\(s\), too few for train, val and test .*test_fraction 0"
    ):
        split_files(tmp_path, two, 0.02, 0.1)


def test_a_single_document_corpus_says_it_is_cut_by_tokens(tmp_path: Path, capsys) -> None:
    from lightning_modules.shards import ShardSet, write_shards
    from lightning_modules.tokenizer import ByteTokenizer

    doc = tmp_path / "only.txt"
    doc.write_text("one document " * 50)
    write_shards(
        tmp_path / "shards", split_files(tmp_path, [doc], 0.1), ByteTokenizer(), "t", val_fraction=0.1
    )
    err = capsys.readouterr().err
    assert f"data: {doc} is the only document, so the splits are cut from its tokens" in err
    shards = ShardSet(tmp_path / "shards")
    assert shards.tokens("train") > 0 and shards.tokens("val") > 0


def test_a_value_error_from_inside_a_library_keeps_its_traceback(monkeypatch) -> None:
    """Only this project's checks become one line: torch's own ValueError (an internal error here) is
    raised as it is, so Python prints its traceback."""
    import lightning_modules.main

    def broken(model: str | None = None) -> None:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=-1.0)  # ValueError inside torch

    monkeypatch.setattr(lightning_modules.main, "info", broken)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        main(["info"])
    from attnres.errors import UsageError, is_user_error

    with pytest.raises(UsageError) as ours:
        commands.check_sampling(0, 1.0, None, None, False, 1)
    assert is_user_error(ours.value)
    with pytest.raises(ValueError) as older:  # a check of ours that raises a plain ValueError
        split_files(Path("/r"), [Path("/r/a"), Path("/r/b")], 0.5, 0.1)
    assert is_user_error(older.value) and not isinstance(older.value, UsageError)
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=-1.0)
    assert not is_user_error(theirs.value)


def test_python_m_attnres_serves_info_and_names_the_command_for_the_rest(capsys) -> None:
    """The library's ``python -m attnres`` runs ``info`` without Lightning; the application's commands
    are refused in one line that names the command to run instead (exit status 2)."""
    from attnres.__main__ import main as library_main

    library_main(["info"])
    assert "attnres._C" in capsys.readouterr().out
    for argv, expected in (
        (["fit", "-c", "a.yaml"],
         "run `attnres fit -c a.yaml` (the console script) or `python -m lightning_modules fit -c a.yaml`"),
        (["info", "--model", "tinyy"], "--model 'tinyy': unknown preset"),
        ([], "give a subcommand: info"),
    ):
        with pytest.raises(SystemExit) as exit_:
            library_main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and expected in err, err
    proc = subprocess.run([sys.executable, "-m", "attnres", "info", "--model", "tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tiny" in proc.stdout, proc.stderr

"""``attnres new``: a project from the template with checked answers; a bad answer is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("cookiecutter")

from lightning_modules.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model_preset", "huge"], "attnres new: --model_preset huge: expected one of tiny, small, medium"),
        (["--moe", "maybe"], "attnres new: --moe"),
        (["--license", "WTFPL"], "attnres new: --license WTFPL"),
        (["--project_slug", "bad slug!", "--package_name", "ok_pkg"],
         "error: project_slug 'bad slug!' is not a valid directory"),
        (["--package_name", "9lives"], "error: package_name '9lives' is not a Python identifier"),
        (["--num_blocks", "5"], "num_blocks"),
        (["--output_dir", "missing"], "attnres new: --output_dir missing: no such directory"),
    ],
)
def test_a_bad_answer_is_one_line_exit_2_and_generates_nothing(args, expected, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["new", "--project_name", "Demo LM", *args])
    assert exc.value.code == 2
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_choices_are_the_templates(tmp_path):
    import typing

    from lightning_modules.commands import new

    hints = typing.get_type_hints(new)
    questions = json.loads((ROOT / "cookiecutter.json").read_text())
    for key in ("license", "model_preset", "residual_mode", "cuda_kernels"):
        assert list(typing.get_args(hints[key])) == questions[key], key


def test_good_answers_generate_the_project_and_a_second_time_is_refused(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    main(["new", "--project_name", "Demo LM", "--model_preset", "small", "--moe", "false",
          "--residual_mode", "full", "--license", "MIT", "--author", "Ada"])
    project = tmp_path / "demo-lm"
    assert (project / "demo_lm" / "__init__.py").is_file()
    assert (project / "LICENSE").read_text().startswith("MIT License")
    default = (project / "configs" / "default.yaml").read_text()
    assert "residual: full" in default and "moe: false" in default
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["new", "--project_name", "Demo LM"])
    assert exc.value.code == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("attnres new: ") and "already exists" in err and len(err.splitlines()) == 1

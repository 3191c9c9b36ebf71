"""Installing attnres the way PyTorch users do, and what happens when the torch does not match.

The fast tests check the import-time guard (an extension built for another torch release is an
ImportError naming both versions; only a missing build falls back to the reference) and the config
lookup of a wheel install. The slow one builds an sdist and wheels from a clean copy of the checkout
with pip's default build isolation, installs them into a fresh virtual environment and runs an op on
the compiled backend there; it runs in CI (``CI`` set) or with ``ATTNRES_TEST_PACKAGING=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from attnres import _extension
from attnres.model import get_config
from lightning_modules import configs

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the import-time guard


def test_a_build_for_another_torch_release_is_refused_naming_both_versions_and_the_fix():
    why = _extension.mismatch(
        {"torch": "2.14.1+cu130", "cuda": False}, runtime="2.13.0+cpu", runtime_cuda=None
    )
    assert why is not None
    assert "2.14.1+cu130" in why and "2.13.0+cpu" in why
    assert "pip install --no-build-isolation --force-reinstall" in why and "torch==2.14.1" in why


def test_another_patch_release_or_variant_of_the_same_torch_is_accepted():
    cpu_build = {"torch": "2.13.0+cpu", "cuda": False}
    assert _extension.mismatch(cpu_build, runtime="2.13.1", runtime_cuda="13.0") is None
    assert _extension.mismatch(cpu_build, runtime="2.13.0+cu130", runtime_cuda="13.0") is None
    assert _extension.mismatch(None, runtime="9.9.9") is None  # no record: the load itself decides


def test_cuda_kernels_under_a_cpu_torch_are_refused():
    why = _extension.mismatch(
        {"torch": "2.13.0+cu130", "torch_cuda": "13.0", "cuda": True}, runtime="2.13.0+cpu", runtime_cuda=None
    )
    assert why is not None and "CPU build" in why


def _package_copy(tmp_path: Path, with_extension: bool, build_info: str | None) -> Path:
    """attnres/ (and lightning_modules/) copied to tmp_path, with or without the built extension."""
    for name in ("attnres", "lightning_modules"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.json"),
        )
    if with_extension:
        for so in (ROOT / "attnres").glob("_C*.so"):
            shutil.copy(so, tmp_path / "attnres" / so.name)
    if build_info is not None:
        (tmp_path / "attnres" / "_build_info.json").write_text(build_info)
    return tmp_path


# an editable install's import finder would still find the checkout's attnres._C by its name
NO_EDITABLE = "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"


def _python(code: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run(
        [sys.executable, "-c", NO_EDITABLE + code],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not list((ROOT / "attnres").glob("_C*.so")), reason="attnres._C is not built in place")
def test_importing_an_extension_recorded_for_another_torch_raises_importerror(tmp_path):
    other = "2.99.0+cpu"
    path = _package_copy(tmp_path, True, f'{{"torch": "{other}", "cuda": false}}\n')
    proc = _python("import attnres", path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: attnres._C was compiled against torch 2.99.0+cpu")
    assert torch.__version__ in last and "--no-build-isolation" in last


def test_without_a_build_the_ops_fall_back_to_the_reference_with_one_warning(tmp_path):
    path = _package_copy(tmp_path, False, None)
    proc = _python(
        "import warnings\nwarnings.simplefilter('always')\nimport attnres\n"
        "print(attnres.backend('cpu'))\nfrom attnres.__main__ import info\ninfo()",
        path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "reference"
    assert "attnres._C is not built" in proc.stderr
    assert "not built: the ops run the PyTorch reference" in proc.stdout


def test_kda_backend_fla_without_fla_names_the_package_to_install(monkeypatch):
    import importlib.util

    from attnres.model import backends

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fla" else real(name, *a)
    )
    with pytest.raises(
        ModuleNotFoundError, match=r"kda_backend='fla' needs fla's KDA kernels .*pip install 'attnres\[gpu\]'"
    ):
        backends.require_fla()


# ----------------------------------------------------------------------------- configs by name


@pytest.mark.parametrize(
    "name", ["default", "default.yaml", "configs/default.yaml", "model/small", "configs/trainer/gpu.yaml"]
)
def test_a_shipped_config_is_found_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path(configs.resolve(name))
    assert path.is_file() and path.suffix == ".yaml"
    stem = Path(name.removeprefix("configs/")).with_suffix("")
    assert path.read_bytes() == (ROOT / "configs" / stem).with_suffix(".yaml").read_bytes()


def test_config_args_are_resolved_and_other_args_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    argv = configs.resolve_args(
        [
            "fit",
            "-c",
            "default",
            "--config=model/tiny",
            "-c",
            "mine.yaml",
            "--model.lr",
            "0.1",
            "-c",
            "nowhere.yaml",
        ]
    )
    assert (
        argv[0] == "fit" and argv[1] == "-c" and Path(argv[2]).is_file() and argv[2].endswith("default.yaml")
    )
    assert argv[3].startswith("--config=") and argv[3].endswith("model/tiny.yaml")
    assert argv[5] == "mine.yaml" and argv[6:8] == ["--model.lr", "0.1"]
    assert argv[-1] == "nowhere.yaml"  # not ours: left for LightningCLI to report
    assert "model/small" in configs.available() and "default" in configs.available()


# ----------------------------------------------------------------------------- isolated builds


def _clean_copy(dst: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a clean clone would hold)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict, log: list[str], timeout: int = 900) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log.append(f"{time.perf_counter() - t0:6.1f} s  {' '.join(map(str, cmd))}")
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout + proc.stderr


CHECK_OP = """
import attnres, torch
from attnres import reference
assert attnres.backend("cpu") == "compiled", attnres.backend("cpu")
assert "site-packages" in attnres.__file__, attnres.__file__
torch.manual_seed(0)
sources = [torch.randn(64, 96, dtype=torch.float64) for _ in range(5)]
query = torch.randn(96, dtype=torch.float64)
out, lse = attnres.depth_attention(sources, query)
ref, ref_lse = reference.depth_attention(sources, query, 1e-6)
err = ((out - ref).norm() / ref.norm()).item()
assert err < 1e-12, err
print("compiled op ok, rel err", err)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("ATTNRES_TEST_PACKAGING")),
    reason="builds attnres in an isolated environment (minutes): runs in CI, or set "
    "ATTNRES_TEST_PACKAGING=1",
)
def test_the_isolated_wheel_build_installs_and_runs_in_a_fresh_venv_and_the_sdist_holds_its_sources(
    tmp_path,
):
    src = _clean_copy(tmp_path / "src")
    log: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # The isolated build environments take the torch this suite runs with (the user's path takes the
    # newest; both are plain default isolation): pinning it keeps CI from fetching another release.
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    env.update(PIP_CONSTRAINT=str(constraints), ATTNRES_CUDA="auto", MAX_JOBS="2")
    env.pop("TORCH_CUDA_ARCH_LIST", None)

    # the sdist: every source a build needs, the licence, the configs; no build outputs
    _run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(src)],
        src,
        env,
        log,
    )
    (sdist,) = (tmp_path / "dist").glob("attnres-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    expected |= {"LICENSE", "CHANGELOG.md", "setup.py", "pyproject.toml", "attnres/py.typed"}
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith((".so", "_build_info.json"))]

    # the wheel from the clean copy, with pip's default build isolation (what `pip install .` builds)
    wheels = tmp_path / "wheels"
    out = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(src)],
        tmp_path,
        env,
        log,
    )
    assert "building the CPU kernels only" in out or "building the CPU and CUDA kernels" in out
    (wheel,) = wheels.glob("attnres-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        content = set(zf.namelist())
        meta = zf.read(next(n for n in content if n.endswith("dist-info/METADATA"))).decode()
    assert any(n.startswith("attnres/_C") and n.endswith(".so") for n in content)
    assert {
        "attnres/_build_info.json",
        "attnres/py.typed",
        "attnres_configs/default.yaml",
        "attnres_configs/model/small.yaml",
        "lightning_modules/autotune/kda_sm90.tgz",
    } <= content
    release = ".".join(torch.__version__.split(".")[:2])
    major, minor = release.split(".")
    assert f"Requires-Dist: torch<{major}.{int(minor) + 1},>={release}" in meta
    # a wheel built from the sdist (what `pip install attnres` from an index builds) compiles the same
    # sources (checked above) and ships the same files: each file of this wheel has its source in the sdist
    # (not built a second time: two isolated builds took ~170 s of the CI suite's 15 minutes)
    built = {n for n in content
             if ".dist-info/" in n or n.startswith("attnres/_C") or n.endswith("_build_info.json")}
    missing = sorted(n for n in content - built
                     if ("configs/" + n.removeprefix("attnres_configs/") if n.startswith("attnres_configs/")
                         else n) not in names)
    assert not missing, f"in the wheel but without a source in the sdist: {missing}"

    # a fresh venv: install the wheel (dependencies resolved by pip) and check it from another directory
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, log)
    py = str(venv / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([py, "-m", "pip", "install", "-q", str(wheel)], tmp_path, env, log)
    assert "compiled op ok" in _run([py, "-c", CHECK_OP], elsewhere, env, log)
    info = _run([str(venv / "bin" / "attnres"), "info"], elsewhere, env, log)
    assert "loaded (compiled against torch" in info
    assert any(line.split() == ["backend", "cpu", "compiled"] for line in info.splitlines()), info
    printed = _run(
        [str(venv / "bin" / "attnres"), "fit", "-c", "default", "--print_config"], elsewhere, env, log
    )
    # the shipped default config, found by name outside a checkout: the tiny preset's model block
    model = yaml.safe_load(printed)["model"]
    model = model.get("init_args", model)["config"]
    tiny = get_config("tiny")
    assert (model["dim"], model["num_layers"], model["residual"]) == (tiny.dim, tiny.num_layers, "block")
    print("\n".join(log))

"""Tells the hooks where the template's own files are.

Cookiecutter renders each hook and runs it from a temporary file with the generated project as
its working directory, and ``cookiecutter._repo_dir`` is relative when the template was given as a
relative path (``cookiecutter .``). This Jinja extension is imported by cookiecutter from the
template directory itself (``_extensions`` in ``cookiecutter.json``), so its own location is the
template root, for a local path as for a git clone (``~/.cookiecutters/<name>``) or an unzipped
archive. The hooks read it as ``{{ template_root }}``.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment
from jinja2.ext import Extension

TEMPLATE_ROOT = Path(__file__).resolve().parent.parent


class TemplateSource(Extension):
    """Adds the global ``template_root``: the absolute path of the template (the repository root)."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        environment.globals["template_root"] = str(TEMPLATE_ROOT)

"""Lightning training for attnres: ``LanguageModel``, ``TextDataModule``, the ``attnres`` command
(:mod:`lightning_modules.main`, also ``python -m lightning_modules``) and its LightningCLI.

Imported lazily, so ``import lightning_modules.main`` (what ``attnres info`` pulls in) stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LanguageModel", "TextDataModule"]


def __getattr__(name: str) -> Any:
    if name == "LanguageModel":
        from lightning_modules.module import LanguageModel

        return LanguageModel
    if name == "TextDataModule":
        from lightning_modules.data import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")

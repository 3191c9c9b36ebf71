"""The GPU tests build KDA layers at head counts no preset uses: without the shipped autotune results and
the pinning of untuned shapes (what training does at its first step, `lightning_modules.warmup`), fla's
Triton autotuners would benchmark every configuration of every new shape, minutes per shape."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def kda_autotune_seeded_and_pinned():
    if torch.cuda.is_available() and importlib.util.find_spec("fla") and importlib.util.find_spec("triton"):
        from lightning_modules import warmup

        warmup.seed_autotune(torch.device("cuda"))
        warmup.pin_untuned_kda()
    yield

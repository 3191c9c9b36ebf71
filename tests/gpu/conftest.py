"""The GPU tests build KDA layers (and fla's own models) at shapes no preset uses: without the shipped
autotune results and the pinning of untuned keys, fla's Triton autotuners would benchmark every
configuration of every new shape and dtype, minutes per kernel (the GPU tests did not finish in 300 s,
session 17). The tests check numbers, not speed: every autotuned kernel of fla takes the nearest shipped
configuration, else its own first configuration that launches (``pin_untuned_kda(untuned="first")``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def kda_autotune_seeded_and_pinned():
    if torch.cuda.is_available() and importlib.util.find_spec("fla") and importlib.util.find_spec("triton"):
        from lightning_modules import warmup

        warmup.seed_autotune(torch.device("cuda"))
        warmup.pin_untuned_kda(untuned="first")
    yield

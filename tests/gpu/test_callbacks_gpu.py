"""The training callbacks on a CUDA device: what the CPU suite cannot see (CUDA events, no host syncs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_modules.callbacks import ThroughputMonitor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_throughput_monitor_times_each_step_by_cuda_events_one_step_late():
    """Three steps of known device time (``torch.cuda._sleep``, calibrated against events): each step's
    tokens/s is logged at the end of the next one, the last is counted at the end of training, and
    the values match the device time of each step (not the host's, which runs ahead)."""
    def sleep_ms(cycles: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    sleep_ms(1_000_000)  # the first launch loads the kernel (and the clocks ramp up)
    ms_per_cycle = sleep_ms(40_000_000) / 40_000_000

    logged: list[tuple[str, float]] = []
    module = SimpleNamespace(
        device=torch.device("cuda"), log=lambda name, value, **kw: logged.append((name, value)),
        flops_per_token=lambda seq_len: 1e9,
    )  # fmt: skip
    trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(distributed_sampler_kwargs=None))
    mon = ThroughputMonitor()
    batch = {"input_ids": torch.zeros(4, 256, dtype=torch.long)}
    cycles = [20_000_000, 40_000_000, 80_000_000]
    for i, c in enumerate(cycles):
        mon.on_train_batch_start(trainer, module, batch, i)
        torch.cuda._sleep(c)
        mon.on_train_batch_end(trainer, module, None, batch, i)
    tokens_logged = [v for name, v in logged if name == "train/tokens_per_s"]
    assert len(tokens_logged) == 2  # steps 0 and 1 so far
    mon.on_train_end(trainer, module)
    assert len(mon.history) == 3 and len([n for n, _ in logged if n == "train/tokens_per_s"]) == 2
    for tps, c in zip(mon.history, cycles, strict=True):
        expected = 4 * 256 / (c * ms_per_cycle / 1e3)
        assert tps == pytest.approx(expected, rel=0.25)
    # twice the sleep, half the throughput: each value is its own step's device time
    assert mon.history[0] / mon.history[1] == pytest.approx(2, rel=0.1)
    assert mon.history[1] / mon.history[2] == pytest.approx(2, rel=0.1)

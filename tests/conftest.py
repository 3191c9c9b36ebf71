import pytest
import torch


@pytest.fixture
def one_thread():
    """Small ops: one intra-op thread. With 2 threads on a shared, oversubscribed 2-core runner the
    OpenMP workers spin against other processes and tiny kernels get ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

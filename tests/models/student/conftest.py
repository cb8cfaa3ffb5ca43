"""Student tests run torch on one thread: the models are tiny, and on a shared 2-core machine
two intra-op threads mostly wait on each other (10x slower under load)."""

import pytest

from spear.models.device import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield

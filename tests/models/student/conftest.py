"""Student tests run torch on one thread: the models are tiny, and on a shared 2-core machine
two intra-op threads mostly wait on each other (10x slower under load)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

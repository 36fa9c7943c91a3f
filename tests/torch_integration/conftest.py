"""kinkprop.torch tests run with one torch thread. The tensors here are tiny, and with
``pytest -n 2`` on two cores torch's default thread pool per worker oversubscribes the CPU (an
8x8 ResNet step then takes seconds instead of milliseconds). The previous setting is restored
after each test, so other directories are unaffected."""

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    try:
        import torch
    except ImportError:  # the tests skip themselves
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

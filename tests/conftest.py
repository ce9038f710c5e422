"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module's tiny models on one torch thread (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Tiny models gain nothing from several threads, and on a busy 2-core machine OpenMP threads
    waiting for a core spin: a 16x16-latent UNet call took 9.8 s instead of 0.04 s, and the
    ViT tests ran 4x slower. The previous thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

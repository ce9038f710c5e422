"""One torch thread for tests of tiny models.

Tiny models gain nothing from several threads, and on a busy 2-core machine OpenMP threads
waiting for a core spin: the ViT tests ran 4x slower with 2 threads there. Import the fixture
into a test module (``from single_thread import one_torch_thread``) to use it for every test
of that module; the previous thread count is restored afterwards.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

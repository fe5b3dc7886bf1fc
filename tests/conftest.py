import os

import pytest
import torch

# Triton picks interpreter or compiled mode when a kernel module is imported, and any test (an app calling
# an op with backend="auto") may import kernels.triton first: decide for the whole session, up front.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and robust on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

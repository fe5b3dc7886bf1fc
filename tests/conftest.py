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


@pytest.fixture(scope="module")
def ext():
    """The compiled CPU kernels (kernels.cpu.load()); skips the module when they can't be built here, and puts the
    instruction set back to auto after it."""
    import kernels.cpu as kcpu

    if not kcpu.available():
        pytest.skip(f"CPU kernels unavailable: {kcpu.unavailable_reason()}")
    mod = kcpu.load()
    yield mod
    mod.set_isa("auto")


@pytest.fixture(autouse=True)
def leaves_ieee_subnormals_alone():
    """A test must not leave the process in flush-to-zero mode (torch.set_flush_denormal, or loading a shared
    object built with -ffast-math): every later test's float maths would silently change."""
    yield
    if 5e-324 * 1.0 == 0.0:  # the smallest float64 subnormal reads as 0 under FTZ/DAZ
        torch.set_flush_denormal(False)  # give the next tests IEEE semantics back
        pytest.fail("this test left the process in flush-to-zero mode (subnormal floats read as 0)")

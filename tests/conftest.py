import pytest
import torch

import openaff  # noqa: F401  (registers the models with timm)

# One intra-op thread for the whole suite: its tensors are tiny and gain nothing from two, and on a
# shared machine an OpenMP thread waiting for a descheduled partner spins (a 12 x 12 ResNet-8 pass took
# 3 ms on one thread, 0.8 s on two of a loaded box). Tests that are about threads set their own
# (test_bench gives the count back); subprocesses are told with --threads or OMP_NUM_THREADS.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def quick_torchscript():
    """As timm's tests: TorchScript's profiling executor without its optimisation passes, which cost seconds per
    model; the tests that script models check numbers, not TorchScript's speed."""
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_executor(executor)
    torch._C._jit_set_profiling_mode(mode)

"""Shared pytest set-up. Runs before any test module is imported."""

import os
import sys

import pytest

# Under pytest-xdist (`-n 2`, set in pytest.ini) each worker process gets one thread, and so do the
# scripts the tests start: two workers of two threads each on the 2-core CI machine wait for each
# other (OpenMP threads spin); measured, 550 s for the suite against 368 s with one thread each.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it is imported)

# Without a GPU, run the Triton kernels in Triton's CPU interpreter. Triton reads this when the
# kernels are defined, so it must be set before anything imports triton (or `kernels`).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The tests import the scripts (`import ddpm`) and `kernels` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine's 2 cores are shared: tiny tensors run fastest on one thread. Not autouse: a
    test module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`, and the
    others keep torch's default thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Shared pytest set-up. Runs before any test module is imported."""

import os
import sys

import pytest
import torch

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

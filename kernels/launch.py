"""What every Triton launch of kernels/ needs, whichever kernel it is."""

import contextlib

import torch


def on_device(t):
    """Make t's GPU the current device for the launches that follow.

    Triton launches on the *current* CUDA device and its current stream, whatever device the
    arguments are on: a model on cuda:1 in a process whose current device is cuda:0 would otherwise
    run its kernels on the wrong GPU (a crash, or silently wrong values). CPU tensors under the
    interpreter need nothing.
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

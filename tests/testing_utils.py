"""Helpers that the test files of every method script share (the scripts themselves share nothing
but `kernels/`; the tests may)."""

import glob
import os

import numpy as np
import torch
from PIL import Image


def randomize(model, seed=0):
    """Give every parameter a random value (an untrained U-Net outputs exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def state_equal(a, b):
    """Bitwise equality of nested state (tensors, dicts, lists, plain values)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def run_main(script, argv, capsys):
    """script.main in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()                                             # drop earlier output
    status = script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(script, status, err, *phrases):
    """Exit status 2 and exactly one line `<script>.py: error: ...` that contains every phrase."""
    assert status == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"{script.METHOD}.py: error: "), err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), f"{phrase!r} not in {err!r}"


def two_colour_folder(root, size=8, count=32):
    """Flat images of two colours: trivially learnable. Returns the colours in [0, 1]."""
    os.makedirs(root, exist_ok=True)
    colours = [(230, 40, 40), (40, 60, 230)]
    for i in range(count):
        Image.new("RGB", (size, size), colours[i % 2]).save(os.path.join(root, f"{i:03d}.png"))
    return np.array(colours) / 255.0


def judge_two_colour_samples(folder, colours):
    """For every sample PNG in `folder`: the distance of its mean colour to the nearer of the two
    colours (largest channel difference in [0, 1] units), which colour that is, and the largest
    channel standard deviation (0 for a flat image)."""
    distances, nearest, spread = [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "0*.png"))):
        pixels = np.asarray(Image.open(path)).reshape(-1, 3) / 255.0
        distance = np.abs(colours - pixels.mean(0)).max(1)          # to red, to blue
        distances.append(distance.min())
        nearest.append(distance.argmin())
        spread.append(pixels.std(0).max())
    return np.array(distances), nearest, spread

"""Streaming a folder from disk (`--max_memory_dataset_gb`): ddpm.py's load_image_folder,
StreamedImageFolder and train(), and the copies in patch_ddpm.py and patchify_ddpm.py.

What is checked:

- The switch: a folder whose decoded size (files x 3 x H x W bytes) is at most the flag stays a
  uint8 tensor; one byte more and it is streamed. The flag is in every script's --help.
- Streamed batches are bitwise the in-memory batches for the same indices, over every kind of
  image file (PNG RGB / L / RGBA / palette / 16-bit, JPEG, EXIF-rotated, small, non-square,
  nested, class folders), with the same labels, warning and start-up counts.
- Streaming decodes nothing at start-up and holds no pixel array (tracemalloc), while the
  in-memory path holds the dataset once, not twice; only the requested indices are decoded.
- Training: a 3-step run gives bitwise the same weights streamed and in memory; resuming a
  streamed run is exact.
- Bad files: unreadable headers are skipped at start-up with the usual warning; a folder of only
  such files exits 2 with one line. A file that passes the start-up check but fails to decode
  is replaced by the next readable image of its class, with one warning per file, and the run
  finishes; a folder where no file decodes exits 2.
"""

import functools
import io
import math
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import PIL.ImageFile
from PIL import Image

import ddpm
import patch_ddpm
import patchify_ddpm
import testing_utils
from testing_utils import state_equal

# The tiny configurations of tests/test_ddpm.py, test_patch_ddpm.py and test_patchify_ddpm.py.
TINY = ["--image_size", "16", "--base_channels", "32", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--batch_size", "4",
        "--num_samples", "4", "--sampling_steps", "4", "--timesteps", "100", "--warmup_steps", "2",
        "--sample_every", "100", "--save_every", "100", "--num_workers", "2"]
TINY_PATCH = ["--image_size", "16", "--patch_divider", "2", "--base_channels", "32",
              "--channel_mults", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "4",
              "--batch_size", "4", "--num_samples", "4", "--sampling_steps", "4", "--timesteps",
              "100", "--warmup_steps", "2", "--num_workers", "2"]
TINY_PATCHIFY = ["--image_size", "16", "--patch_size", "2", "--base_channels", "32",
                 "--channel_mults", "1,2", "--num_res_blocks", "1", "--attention_resolutions",
                 "4", "--batch_size", "4", "--num_samples", "4", "--sampling_steps", "4",
                 "--timesteps", "100", "--warmup_steps", "2", "--num_workers", "2"]
STREAM = ["--max_memory_dataset_gb", "0"]

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
STREAMED = re.compile(r", streamed from disk \([\d.e+-]+ GB decoded > --max_memory_dataset_gb 0\)")

run_main = functools.partial(testing_utils.run_main, ddpm)
assert_user_error = functools.partial(testing_utils.assert_user_error, ddpm)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# Image files
# ------------------------------------------------------------------------------------------------


def solid(color, width=16, height=16):
    return np.full((height, width, 3), color, dtype=np.uint8)


def noise(width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


save = testing_utils.save_image


def truncated(path, fmt="JPEG"):
    """An image file cut to 60% of its bytes: its header opens, decoding its pixels fails."""
    buffer = io.BytesIO()
    Image.fromarray(noise(32, 32, 0)).save(buffer, fmt)
    data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data[: len(data) * 6 // 10])
    return str(path)


def empty(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    return str(path)


def text(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("this is not an image\n")
    return str(path)


def rotated(path, **kw):
    """Stored 40 wide x 20 high with EXIF orientation 6: upright it is 20 wide x 40 high."""
    image = Image.fromarray(noise(40, 20, 7))
    exif = image.getexif()
    exif[0x0112] = 6
    return save(image, path, exif=exif, **kw)


def every_kind_folder(root):
    """Readable images of every kind in two class folders, and two files with unreadable headers.
    Returns the bad paths."""
    save(noise(16, 16, 1), root / "a" / "rgb.png")
    save(noise(24, 20, 2), root / "a" / "photo.JPG", quality=90)
    save(np.arange(256, dtype=np.uint8).reshape(16, 16), root / "a" / "gray.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3], rgba[8:, :, 3] = GREEN, 255                      # top half transparent
    save(rgba, root / "a" / "nested" / "alpha.png")
    palette = Image.fromarray((np.arange(256) % 3).astype(np.uint8).reshape(16, 16), "P")
    palette.putpalette([*RED, *BLUE, *GREEN] + [0] * (3 * 253))
    save(palette, root / "b" / "palette.png", transparency=2)
    save(Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)),
         root / "b" / "gray16.png")
    save(noise(6, 9, 3), root / "b" / "small.png")                  # upscaled
    save(noise(48, 16, 4), root / "b" / "wide.bmp")
    save(noise(16, 40, 5), root / "b" / "deep" / "er" / "tall.webp", lossless=True)
    rotated(root / "b" / "rotated.png")
    rotated(root / "b" / "rotated.jpg", quality=90)
    return [empty(root / "a" / "empty.png"), text(root / "b" / "text.jpg")]


def colour(image):
    """The colour of a flat uint8 (3, H, W) image."""
    assert (image == image[:, :1, :1]).all(), "not flat"
    return tuple(image[:, 0, 0].tolist())


def decode_warnings(err, script="ddpm"):
    return [line for line in err.splitlines()
            if line.startswith(f"{script}.py: warning:") and "cannot be decoded" in line]


def load(root, *, streamed, height=16, width=16, class_conditional=False, log=None):
    return ddpm.load_image_folder(str(root), height, width, class_conditional, 2,
                                  log=log or (lambda m: None),
                                  max_memory_gb=0 if streamed else math.inf)


# ------------------------------------------------------------------------------------------------
# The switch between memory and disk
# ------------------------------------------------------------------------------------------------


def test_the_decoded_size_decides_memory_or_disk(tmp_path):
    """2 files at 16x16 decode to 2 x 3 x 16 x 16 = 1536 bytes: in memory at a limit of
    1536e-9 GB, streamed one byte below it."""
    save(solid(RED), tmp_path / "a.png")
    save(solid(GREEN), tmp_path / "b.png")
    logged = []
    kept, _, _ = ddpm.load_image_folder(str(tmp_path), 16, 16, False, 1, log=logged.append,
                                        max_memory_gb=1536e-9)
    streamed, _, _ = ddpm.load_image_folder(str(tmp_path), 16, 16, False, 1, log=logged.append,
                                            max_memory_gb=1535e-9)
    assert isinstance(kept, torch.Tensor) and kept.shape == (2, 3, 16, 16)
    assert isinstance(streamed, ddpm.StreamedImageFolder) and len(streamed) == 2
    assert logged[0] == f"dataset: 2 images from {tmp_path}, 0 skipped, 0 upscaled to 16x16"
    assert logged[1] == (f"dataset: 2 images from {tmp_path}, 0 skipped, 0 upscaled to 16x16, "
                         f"streamed from disk (1.54e-06 GB decoded > --max_memory_dataset_gb "
                         f"1.535e-06)")


def test_load_dataset_passes_the_flag(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    base = ["--dataset_path", str(tmp_path), "--image_size", "16"]
    assert ddpm.parse_args(base).max_memory_dataset_gb == 4.0
    images, _, _ = ddpm.load_dataset(ddpm.parse_args(base), log=lambda m: None)
    assert isinstance(images, torch.Tensor)
    images, _, _ = ddpm.load_dataset(ddpm.parse_args(base + STREAM), log=lambda m: None)
    assert isinstance(images, ddpm.StreamedImageFolder)


@pytest.mark.parametrize("value", ["-1", "nan"])
@pytest.mark.parametrize("script", [ddpm, patch_ddpm, patchify_ddpm],
                         ids=["ddpm", "patch_ddpm", "patchify_ddpm"])
def test_negative_or_nan_limit_is_refused(script, value, capsys):
    status, _, err = testing_utils.run_main(script, ["--max_memory_dataset_gb", value, "--dry_run"],
                                            capsys)
    testing_utils.assert_user_error(script, status, err, "--max_memory_dataset_gb must be 0")


@pytest.mark.parametrize("script", [ddpm, patch_ddpm, patchify_ddpm],
                         ids=["ddpm", "patch_ddpm", "patchify_ddpm"])
def test_every_script_has_the_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert re.search(r"--max_memory_dataset_gb MAX_MEMORY_DATASET_GB decode the folder into "
                     r"memory .*streamed from disk.* \(0: always stream\) \(default: 4\.0\)", text)
    assert script.DEFAULTS["max_memory_dataset_gb"] == 4.0


# ------------------------------------------------------------------------------------------------
# Streamed batches are the in-memory batches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(16, 16), (24, 16)], ids=["16x16", "24x16"])
@pytest.mark.parametrize("class_conditional", [False, True], ids=["plain", "classes"])
def test_streamed_batches_equal_in_memory_batches(tmp_path, capsys, height, width,
                                                  class_conditional):
    every_kind_folder(tmp_path)
    memory_log, stream_log = [], []
    memory = load(tmp_path, streamed=False, height=height, width=width,
                  class_conditional=class_conditional, log=memory_log.append)
    memory_err = capsys.readouterr().err
    stream = load(tmp_path, streamed=True, height=height, width=width,
                  class_conditional=class_conditional, log=stream_log.append)
    assert capsys.readouterr().err == memory_err                   # the same skipped files
    assert "skipping 2 unreadable image file(s)" in memory_err
    images, streamed = memory[0], stream[0]
    assert isinstance(streamed, ddpm.StreamedImageFolder) and len(streamed) == len(images) == 11
    assert state_equal(memory[1:], stream[1:])                      # labels, class names
    # The same counts: at 16x16 only small.png is upscaled; at 24x16 (taller than wide) every
    # image less than 24 high too, but not the EXIF-rotated ones, which are 40 high upright (20
    # as stored: a count from the stored size would include them).
    assert STREAMED.search(stream_log[0])
    assert STREAMED.sub("", stream_log[0]) == memory_log[0]
    assert f", {1 if height == width else 8} upscaled to" in memory_log[0]
    everything = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    repeats = torch.tensor([3, 3, 0, 10, 3])
    batches = ddpm.BatchStream(len(images), 4, seed=5, rank=1, world=2)
    for indices in [everything, repeats] + [batches.indices(k) for k in range(4)]:
        batch = streamed[indices]
        assert batch.dtype == torch.uint8 and batch.shape == (len(indices), 3, height, width)
        assert torch.equal(batch, images[indices])
    assert not torch.equal(images[0], images[1])                    # the check can fail


def test_make_batch_is_the_same_on_both_paths(tmp_path):
    every_kind_folder(tmp_path)
    (images, _, _), (streamed, _, _) = load(tmp_path, streamed=False), load(tmp_path, streamed=True)
    indices = torch.tensor([4, 1, 7, 1])
    torch.manual_seed(3)
    a, _ = ddpm.make_batch(images, None, indices, True, torch.device("cpu"))
    torch.manual_seed(3)
    b, _ = ddpm.make_batch(streamed, None, indices, True, torch.device("cpu"))
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_only_the_requested_images_are_decoded(tmp_path, monkeypatch):
    """Each rank decodes its own batches: the files read are exactly those of the indices asked
    for or prefetched, and a prefetched batch is not decoded a second time."""
    for i in range(12):
        save(solid((i * 20, 0, 0)), tmp_path / f"{i:02d}.png")
    streamed, _, _ = load(tmp_path, streamed=True)
    read = []
    load_image = ddpm.load_image
    monkeypatch.setattr(ddpm, "load_image", lambda path, h, w: read.append(path)
                        or load_image(path, h, w))
    batches = ddpm.BatchStream(len(streamed), 2, seed=0, rank=1, world=2)
    streamed.prefetch([batches.indices(1)])
    for future in [f for futures in streamed.pending.values() for f in futures]:
        future.result()
    # The prefetch decoded batch 1 in the background, before anyone asked for it.
    assert sorted(read) == sorted(streamed.paths[i] for i in batches.indices(1).tolist())
    batch = streamed[batches.indices(0)]
    assert [colour(im)[0] // 20 for im in batch] == batches.indices(0).tolist()
    assert streamed[batches.indices(1)].shape == (2, 3, 16, 16)
    wanted = batches.indices(0).tolist() + batches.indices(1).tolist()
    assert sorted(read) == sorted(streamed.paths[i] for i in wanted)
    assert streamed.pending == {}


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def peak_bytes(function):
    """Peak Python-traced allocation (numpy's arrays are traced) while `function` runs."""
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_streamed_start_up_decodes_no_pixels(tmp_path, monkeypatch):
    """Streamed, start-up reads headers only: no image of any kind is decoded (PIL's load) until
    a batch asks for it."""
    every_kind_folder(tmp_path)
    loads = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                        lambda image: loads.append(image.format) or real_load(image))
    streamed, _, _ = load(tmp_path, streamed=True)
    assert len(streamed) > 0 and loads == []
    streamed[torch.arange(len(streamed))]
    assert len(loads) >= len(streamed)                 # the check itself sees decoding


def test_streaming_does_not_materialise_the_dataset(tmp_path):
    """64 small files at 128x128: 3.1 MB decoded. In memory that is held once (a list of arrays
    plus np.stack would peak at twice that); streamed, loading stays far below it and the object
    holds no pixels until a batch is asked for."""
    for i in range(64):
        save(solid((i, 2 * i, 3 * i), 8, 8), tmp_path / f"{i:02d}.png")
    decoded = 64 * 3 * 128 * 128
    (images, _, _), memory_peak = peak_bytes(lambda: load(tmp_path, streamed=False, height=128,
                                                          width=128))
    assert images.shape == (64, 3, 128, 128)
    assert decoded <= memory_peak < 1.5 * decoded, memory_peak
    (streamed, _, _), stream_peak = peak_bytes(lambda: load(tmp_path, streamed=True, height=128,
                                                            width=128))
    assert stream_peak < 0.1 * decoded, stream_peak
    held = [v for v in vars(streamed).values() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert held == [] and streamed.pending == {}
    assert torch.equal(streamed[torch.arange(64)], images)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def ten_image_folder(root):
    for i in range(10):
        save(noise(16, 16, 10 + i), root / f"{i}.png")
    return root


def checkpoint(run):
    return torch.load(Path(run) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def test_training_is_bitwise_identical_streamed_and_in_memory(tmp_path, capsys, monkeypatch):
    """3 steps of 2 micro-batches (prefetching across steps and past an epoch of 10 images), with
    flips and dropout: the same weights, EMA and optimizer state, bitwise; and while micro-batch
    k trains, k+1 and k+2 (never past the last) are being decoded."""
    prefetched = []
    real_prefetch = ddpm.StreamedImageFolder.prefetch
    monkeypatch.setattr(ddpm.StreamedImageFolder, "prefetch", lambda self, batches: real_prefetch(
        self, [prefetched.append(tuple(b.tolist())) or b for b in batches]))
    data = ten_image_folder(tmp_path / "data")
    common = ["--dataset_path", data, *TINY, "--max_steps", "3", "--accumulation_iters", "2",
              "--dropout", "0.1", "--ema_start", "1"]
    status, out, err = run_main([*common, "--output_dir", tmp_path / "memory"], capsys)
    assert status == 0, err
    assert "streamed from disk" not in out
    status, out, err = run_main([*common, *STREAM, "--output_dir", tmp_path / "stream"], capsys)
    assert status == 0, err
    assert STREAMED.search(out) and decode_warnings(err) == []
    a, b = checkpoint(tmp_path / "memory"), checkpoint(tmp_path / "stream")
    for key in ("model", "ema", "optimizer"):
        assert state_equal(a[key], b[key]), key
    stream = ddpm.BatchStream(10, 4, seed=0)                       # TINY: batch 4, seed 0
    assert sorted(set(prefetched)) == sorted(tuple(stream.indices(k).tolist()) for k in range(1, 6))


def test_resuming_a_streamed_run_is_exact(tmp_path, capsys):
    data = ten_image_folder(tmp_path / "data")
    argv = [str(a) for a in ["--dataset_path", data, *TINY, *STREAM, "--accumulation_iters", "2"]]
    testing_utils.assert_resume_is_exact(ddpm, argv, tmp_path,
                                         ("model", "ema", "optimizer", "lr_scheduler"))
    out = capsys.readouterr().out
    assert "resumed from" in out and len(STREAMED.findall(out)) == 2


@pytest.mark.parametrize("script, flags", [(patch_ddpm, TINY_PATCH),
                                           (patchify_ddpm, TINY_PATCHIFY)],
                         ids=["patch_ddpm", "patchify_ddpm"])
def test_method_scripts_train_on_a_streamed_folder(tmp_path, capsys, script, flags):
    data = tmp_path / "data"
    for i in range(3):
        save(noise(16, 16, i), data / f"{i}.png")
    truncated(data / "3.jpg")
    status, out, err = testing_utils.run_main(
        script, ["--dataset_path", data, *flags, *STREAM, "--max_steps", "1", "--output_dir",
                 tmp_path / "run"], capsys)
    assert status == 0, err
    assert f"dataset: 4 images from {data}, 0 skipped" in out and "streamed from disk" in out
    assert len(decode_warnings(err, script.METHOD)) == 1
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------


def test_unreadable_headers_are_skipped_at_start_up_with_one_warning(tmp_path, capsys):
    save(solid(RED), tmp_path / "a.png")
    save(solid(BLUE, 8, 8), tmp_path / "b.png")                     # upscaled
    bad = [empty(tmp_path / "c.png"), text(tmp_path / "d.jpg"), empty(tmp_path / "e.webp")]
    logged = []
    streamed, _, _ = load(tmp_path, streamed=True, log=logged.append)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("ddpm.py: warning: skipping 3 unreadable image file(s): ")
    assert all(path in err for path in bad)
    assert logged[0] == (f"dataset: 2 images from {tmp_path}, 3 skipped, 1 upscaled to 16x16, "
                         f"streamed from disk (3.84e-06 GB decoded > --max_memory_dataset_gb 0)")
    assert streamed.paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_a_folder_of_only_unreadable_headers_exits_2(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    empty(data / "a.png")
    text(data / "b.jpg")
    # Refused from the headers alone: the in-memory path, which decodes, would fail this.
    monkeypatch.setattr(ddpm, "load_image", lambda *a: pytest.fail("a streamed start-up decoded"))
    status, _, err = run_main(["--dataset_path", data, *TINY, *STREAM, "--max_steps", "1",
                               "--output_dir", tmp_path / "run"], capsys)
    assert_user_error(status, err, "none of the 2 image files", "could be read")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_file_that_fails_to_decode_is_replaced_by_the_next_readable_one(tmp_path, capsys, fmt):
    """Index 1 is truncated: the next readable file (index 2) stands in for it; the last index,
    also truncated, wraps around to index 0. One warning per file, however often it is asked for."""
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    save(solid(RED), tmp_path / "0.png")
    broken = truncated(tmp_path / f"1{suffix}", fmt)
    save(solid(GREEN), tmp_path / "2.png")
    save(solid(BLUE), tmp_path / "3.png")
    last = truncated(tmp_path / f"4{suffix}", fmt)
    streamed, _, _ = load(tmp_path, streamed=True)
    assert capsys.readouterr().err == ""                           # headers are fine
    assert len(streamed) == 5
    for _ in range(2):
        batch = streamed[torch.tensor([1, 1, 0, 4, 3])]
        assert [colour(im) for im in batch] == [GREEN, GREEN, RED, RED, BLUE]
    warnings = decode_warnings(capsys.readouterr().err)
    assert len(warnings) == 2, warnings
    assert any(broken in w for w in warnings) and any(last in w for w in warnings), warnings


def test_the_replacement_has_the_same_class(tmp_path, capsys):
    save(solid(RED), tmp_path / "a" / "0.png")
    broken = truncated(tmp_path / "a" / "1.jpg")
    save(solid(GREEN), tmp_path / "b" / "2.png")
    streamed, labels, classes = load(tmp_path, streamed=True, class_conditional=True)
    assert classes == ["a", "b"] and labels.tolist() == [0, 0, 1]
    assert [colour(im) for im in streamed[torch.tensor([1, 2])]] == [RED, GREEN]
    warnings = decode_warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and broken in warnings[0] and "of its class" in warnings[0]


def test_training_survives_a_file_that_fails_to_decode(tmp_path, capsys):
    """4 images and a batch of 4: every batch holds the truncated file, which is warned about
    once over 3 steps; the run writes its checkpoint."""
    data = tmp_path / "data"
    for i, c in enumerate((RED, GREEN, BLUE)):
        save(solid(c), data / f"{i}.png")
    broken = truncated(data / "3.jpg")
    status, out, err = run_main(["--dataset_path", data, *TINY, *STREAM, "--max_steps", "3",
                                 "--output_dir", tmp_path / "run"], capsys)
    assert status == 0, err
    assert f"dataset: 4 images from {data}, 0 skipped" in out
    warnings = decode_warnings(err)
    assert len(warnings) == 1 and broken in warnings[0], err
    assert checkpoint(tmp_path / "run")["step"] == 3


def test_a_folder_where_nothing_decodes_exits_2(tmp_path, capsys):
    data = tmp_path / "data"
    truncated(data / "a.jpg")
    truncated(data / "b.png", "PNG")
    status, _, err = run_main(["--dataset_path", data, *TINY, *STREAM, "--max_steps", "1",
                               "--output_dir", tmp_path / "run"], capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(decode_warnings(err)) == 2
    assert lines[-1].startswith("ddpm.py: error: none of the 2 image files can be decoded"), err

"""ddpm.py's data pipeline, command line, user errors and run outputs, on real files.

What is checked (CONVENTIONS.md "Command line", "Outputs", "Errors"):

- Image files written with PIL into tmp_path (PNG RGB / L / RGBA / palette / 16-bit, JPEG, images
  smaller than the training size, non-square images, uppercase extensions, nested and class
  subfolders, truncated / empty / mislabelled files) decode to the exact pixels expected.
- Every user error exits with status 2 and one line `ddpm.py: error: ...` on stderr, no traceback.
- `--help`, `--dry_run`, and a 2-step training run with its args.json, checkpoints, preview grid and
  TensorBoard scalars; checkpoints load with weights_only=True and no temporary file is left.

The model is tiny (16x16 images, 2 levels, batch 4, 2 steps) so the whole file runs in seconds.
"""

import contextlib
import functools
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import testing_utils
from testing_utils import SHARED_FLAGS, SYNOPSIS_FLAGS, TRAIN_SCALARS

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# A U-Net small enough for a 2-core CPU: 16x16 images, two levels (downsampling factor 2).
TINY = ["--image_size", "16", "--base_channels", "32", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--batch_size", "4",
        "--max_steps", "2", "--sample_every", "2", "--save_every", "2", "--num_samples", "4",
        "--sampling_steps", "3", "--procedural_size", "16"]

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# run_main, assert_user_error, run_cli (`python ddpm.py ARGS` as a user runs it): the shared
# helpers, bound to ddpm.
run_main = functools.partial(testing_utils.run_main, ddpm)
assert_user_error = functools.partial(testing_utils.assert_user_error, ddpm)
run_cli = functools.partial(testing_utils.run_cli, ddpm)


# ------------------------------------------------------------------------------------------------
# Helpers: image files and running main()
# ------------------------------------------------------------------------------------------------


def solid(color, width=16, height=16):
    return np.full((height, width, 3), color, dtype=np.uint8)


save = testing_utils.save_image


def three_bands(axis, side=16):
    """A 3*side x side image: red, green, blue bands along `axis` (1: left to right, 0: top to
    bottom). Only the green band survives a centre crop to side x side."""
    bands = [solid(c, side, side) for c in (RED, GREEN, BLUE)]
    return np.concatenate(bands, axis=axis)


def truncated_jpeg(path):
    """A JPEG cut to 60% of its bytes: PIL opens it, decoding fails ("image file is truncated")."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data[: len(data) * 6 // 10])
    return str(path)


def empty_png(path):
    Path(path).write_bytes(b"")
    return str(path)


def text_as_jpg(path):
    Path(path).write_text("this is not a JPEG\n")
    return str(path)


UNREADABLE = re.compile(r"^ddpm\.py: warning: skipping (\d+) unreadable image file\(s\): (.+)$")


def unreadable_warnings(err):
    """The `ddpm.py: warning: skipping N unreadable image file(s): ...` lines of stderr."""
    return [line for line in err.splitlines() if line.startswith("ddpm.py: warning:")]


def assert_one_unreadable_warning(err, count, paths, alone=True):
    """stderr has exactly one warning line, with the count and every bad path (at most 5 shown);
    alone: and nothing else (a training run also draws its progress bar on stderr)."""
    if alone:
        assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    lines = unreadable_warnings(err)
    assert len(lines) == 1, f"not one warning line: {err!r}"
    match = UNREADABLE.match(lines[0])
    assert match, lines[0]
    assert int(match.group(1)) == count, err
    for path in paths:
        assert path in match.group(2), f"{path!r} not in {err!r}"


def train_quietly(argv):
    """ddpm.main for a fixture (module scope has no capsys): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = ddpm.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------------
# Module fixtures: one real training run (plain) and one class-conditional run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on a folder of 6 readable images and one truncated JPEG."""
    base = tmp_path_factory.mktemp("trained")
    data = base / "data"
    save(solid((200, 30, 60)), data / "rgb.png")
    save(solid((40, 120, 220)), data / "photo.jpg", quality=95)
    save(np.full((16, 16), 90, dtype=np.uint8), data / "gray.png")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 1] = 255                                              # green hidden under alpha 0
    save(rgba, data / "nested" / "alpha.png")
    save(solid((10, 200, 10), 8, 8), data / "nested" / "small.png")    # upscaled
    save(three_bands(axis=1), data / "wide.PNG")
    broken = truncated_jpeg(data / "broken.jpg")
    (data / "notes.txt").write_text("not an image")
    run = base / "run"
    status, out, err = train_quietly(["--dataset_path", data, "--output_dir", run, *TINY])
    return {"data": data, "run": run, "status": status, "out": out, "err": err,
            "broken": broken, "last": run / "checkpoints" / "last.pt"}


@pytest.fixture(scope="module")
def class_conditional_checkpoint(tmp_path_factory):
    """A 1-step class-conditional run on two class folders (zebra, apple)."""
    base = tmp_path_factory.mktemp("classes")
    data = base / "data"
    for name, color in (("zebra", (250, 250, 250)), ("apple", (200, 20, 20))):
        for i in range(2):
            save(solid(color), data / name / f"{i}.png")
    run = base / "run"
    status, out, err = train_quietly(["--dataset_path", data, "--output_dir", run, *TINY,
                                      "--class_conditional", "--max_steps", "1",
                                      "--num_samples", "2"])
    assert status == 0, err
    assert unreadable_warnings(err) == [], err
    return {"out": out, "last": run / "checkpoints" / "last.pt"}


# ------------------------------------------------------------------------------------------------
# find_images
# ------------------------------------------------------------------------------------------------


def test_find_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    expected = [save(solid(RED), tmp_path / "B.PNG"), save(solid(RED), tmp_path / "a.png"),
                save(solid(RED), tmp_path / "c.JPG"), save(solid(RED), tmp_path / "d.jpeg"),
                save(solid(RED), tmp_path / "sub" / "e.bmp"),
                save(solid(RED), tmp_path / "sub" / "deeper" / "f.webp"),
                save(solid(RED), tmp_path / "z" / "g.TIFF")]
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub" / "labels.csv").write_text("ignored")
    (tmp_path / "README").write_text("ignored")
    paths, labels, classes = ddpm.find_images(str(tmp_path), class_conditional=False)
    assert paths == expected
    assert labels is None and classes == []


def test_find_images_labels_come_from_sorted_top_level_folders(tmp_path):
    zebra = save(solid(RED), tmp_path / "zebra" / "1.png")
    apple = save(solid(RED), tmp_path / "apple" / "1.png")
    nested = save(solid(RED), tmp_path / "mango" / "ripe" / "deep" / "1.JPG")
    (tmp_path / "README.txt").write_text("a non-image file in the root is fine")
    paths, labels, classes = ddpm.find_images(str(tmp_path), class_conditional=True)
    assert classes == ["apple", "mango", "zebra"]
    assert dict(zip(paths, labels)) == {apple: 0, nested: 1, zebra: 2}


def test_find_images_class_conditional_rejects_images_in_the_root(tmp_path):
    save(solid(RED), tmp_path / "cats" / "1.png")
    loose = save(solid(RED), tmp_path / "loose.png")
    with pytest.raises(ddpm.UserError, match="class subfolder") as error:
        ddpm.find_images(str(tmp_path), class_conditional=True)
    assert loose in str(error.value)


def test_find_images_without_image_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ddpm.UserError, match="no image files"):
        ddpm.find_images(str(tmp_path), class_conditional=False)


# ------------------------------------------------------------------------------------------------
# to_rgb and load_image: exact pixels
# ------------------------------------------------------------------------------------------------


def pixels(path, height=16, width=16):
    """load_image -> (H, W, 3) array and the upscaled flag."""
    result = ddpm.load_image(str(path), height, width)
    assert result is not None, f"{path} was not read"
    array, upscaled = result
    assert array.dtype == np.uint8 and array.shape == (3, height, width)
    return array.transpose(1, 2, 0), upscaled


def test_rgb_png_is_read_exactly(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image, upscaled = pixels(save(array, tmp_path / "x.png"))
    np.testing.assert_array_equal(image, array)
    assert not upscaled


def test_jpeg_is_read_close_to_its_colour(tmp_path):
    image, _ = pixels(save(solid((40, 120, 220)), tmp_path / "x.jpg", quality=95))
    assert np.abs(image.astype(int) - (40, 120, 220)).max() <= 3


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image, _ = pixels(save(gray, tmp_path / "gray.png"))
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], gray)


def test_transparent_pixels_become_white_not_the_hidden_colour(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = GREEN                                           # the colour under alpha
    rgba[:8, :, 3] = 0                                              # top half fully transparent
    rgba[8:, :, :3], rgba[8:, :, 3] = RED, 255                      # bottom half opaque red
    rgba[8, 0] = (0, 0, 255, 128)                                   # one half-transparent blue
    image, _ = pixels(save(rgba, tmp_path / "rgba.png"))
    assert (image[:8] == WHITE).all()
    assert (image[9:] == RED).all()
    assert np.abs(image[8, 0].astype(int) - (127, 127, 255)).max() <= 1


def test_gray_alpha_png_transparent_pixels_become_white(tmp_path):
    la = np.zeros((16, 16, 2), dtype=np.uint8)
    la[..., 0] = 30
    la[:, 8:, 1] = 255                                              # right half opaque
    image, _ = pixels(save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert (image[:, :8] == WHITE).all()
    assert (image[:, 8:] == 30).all()


def palette_image(transparency=None, path=None):
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[:, 8:] = 1
    indices[12:, :] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette([*RED, *BLUE, *GREEN] + [0] * (3 * 253))
    kw = {} if transparency is None else {"transparency": transparency}
    return save(image, path, **kw)


def test_palette_png_without_transparency(tmp_path):
    path = palette_image(path=tmp_path / "p.png")
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" not in check.info
    image, _ = pixels(path)
    assert (image[:12, :8] == RED).all()
    assert (image[:12, 8:] == BLUE).all()
    assert (image[12:] == GREEN).all()


def test_palette_png_transparent_index_becomes_white(tmp_path):
    path = palette_image(transparency=2, path=tmp_path / "pt.png")  # green index transparent
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    image, _ = pixels(path)
    assert (image[:12, :8] == RED).all()
    assert (image[:12, 8:] == BLUE).all()
    assert (image[12:] == WHITE).all()


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:4], values[4:8], values[8:12], values[12:] = 65535, 32768, 257 * 100, 0
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as check:
        assert check.mode == "I;16"
    image, _ = pixels(path)
    assert (image[:4] == 255).all()
    assert (image[4:8] == 128).all()                                # PIL's convert gives 255
    assert (image[8:12] == 100).all()
    assert (image[12:] == 0).all()


def test_to_rgb_returns_8_bit_rgb_for_every_mode():
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"):
        image = Image.new(mode, (4, 3))
        converted = ddpm.to_rgb(image)
        assert converted.mode == "RGB" and converted.size == (4, 3), mode


def test_small_image_is_upscaled(tmp_path):
    image, upscaled = pixels(save(solid((10, 200, 10), 8, 8), tmp_path / "small.png"))
    assert upscaled
    assert np.abs(image.astype(int) - (10, 200, 10)).max() <= 1


def test_image_small_in_one_side_only_counts_as_upscaled(tmp_path):
    _, upscaled = pixels(save(solid(RED, 64, 8), tmp_path / "strip.png"))
    assert upscaled


def test_large_image_is_downscaled_not_upscaled(tmp_path):
    image, upscaled = pixels(save(solid((70, 80, 90), 64, 64), tmp_path / "big.png"))
    assert not upscaled
    assert np.abs(image.astype(int) - (70, 80, 90)).max() <= 1


@pytest.mark.parametrize("axis", [1, 0], ids=["wide", "tall"])
def test_non_square_image_is_centre_cropped(tmp_path, axis):
    image, upscaled = pixels(save(three_bands(axis), tmp_path / "bands.png"))
    assert not upscaled
    assert (image == GREEN).all()


def test_centre_crop_after_downscaling(tmp_path):
    # 96x32 -> 48x16 (scale 1/2), then the middle 16 columns: the green band.
    image, _ = pixels(save(three_bands(axis=1, side=32), tmp_path / "wide.png"))
    inner = image[:, 3:13].astype(int)                              # away from resampling fringes
    assert np.abs(inner - GREEN).max() <= 2


def test_centre_crop_to_a_non_square_training_size(tmp_path):
    rows = np.concatenate([solid(RED, 16, 4), solid(GREEN, 16, 8), solid(BLUE, 16, 4)])
    image, _ = pixels(save(rows, tmp_path / "rows.png"), height=8, width=16)
    assert (image == GREEN).all()


@pytest.mark.parametrize("make", [truncated_jpeg, empty_png, text_as_jpg],
                         ids=["truncated_jpeg", "empty_png", "text_as_jpg"])
def test_unreadable_file_gives_none(tmp_path, make):
    suffix = ".png" if make is empty_png else ".jpg"
    assert ddpm.load_image(make(tmp_path / f"bad{suffix}"), 16, 16) is None


# ------------------------------------------------------------------------------------------------
# load_image_folder
# ------------------------------------------------------------------------------------------------


def mixed_folder(root):
    """6 readable images (one upscaled) and 3 unreadable image files; returns the bad paths."""
    save(solid(RED), root / "a.png")
    save(solid((40, 120, 220)), root / "b.JPG", quality=95)
    save(np.full((16, 16), 90, dtype=np.uint8), root / "c_gray.PNG")
    save(solid(BLUE, 8, 8), root / "deep" / "er" / "d_small.png")
    save(three_bands(axis=0), root / "deep" / "e_tall.png")
    save(solid(GREEN), root / "f.jpeg", quality=95)
    (root / "notes.txt").write_text("ignored without a warning")
    return [truncated_jpeg(root / "bad_truncated.jpg"), empty_png(root / "bad_empty.png"),
            text_as_jpg(root / "bad_text.jpg")]


def test_load_image_folder_skips_unreadable_files_with_one_warning(tmp_path, capsys):
    bad = mixed_folder(tmp_path)
    logged = []
    images, labels, classes = ddpm.load_image_folder(str(tmp_path), 16, 16, False, 2,
                                                     log=logged.append)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_unreadable_warning(captured.err, 3, bad)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 16, 16)
    assert labels is None and classes == []
    # find_images order: root files (a, b, bad_*, c, f), then deep/e_tall, then deep/er/d_small.
    order = [RED, (40, 120, 220), (90, 90, 90), GREEN, GREEN, BLUE]
    for image, color in zip(images, order):
        assert (image.permute(1, 2, 0).int() - torch.tensor(color)).abs().max() <= 3
    assert len(logged) == 1
    assert "6 images" in logged[0] and "3 skipped" in logged[0] and "1 upscaled" in logged[0]


def test_load_image_folder_good_files_give_no_warning(tmp_path, capsys):
    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("ignored silently")
    images, _, _ = ddpm.load_image_folder(str(tmp_path), 16, 16, False, 1, log=lambda m: None)
    assert images.shape == (1, 3, 16, 16)
    assert capsys.readouterr().err == ""


def test_load_image_folder_names_at_most_five_unreadable_files(tmp_path, capsys):
    save(solid(RED), tmp_path / "good.png")
    bad = [empty_png(tmp_path / f"bad{i}.png") for i in range(7)]   # sorted: bad0 .. bad6
    images, _, _ = ddpm.load_image_folder(str(tmp_path), 16, 16, False, 1, log=lambda m: None)
    assert images.shape == (1, 3, 16, 16)
    err = capsys.readouterr().err
    assert_one_unreadable_warning(err, 7, bad[:5])
    assert err.rstrip("\n").endswith(f"{bad[4]} and 2 more"), err
    assert bad[5] not in err and bad[6] not in err


def test_load_image_folder_class_labels(tmp_path, capsys):
    save(solid(RED), tmp_path / "zebra" / "1.png")
    save(solid(GREEN), tmp_path / "apple" / "1.png")
    save(solid(BLUE), tmp_path / "apple" / "sub" / "2.png")
    truncated_jpeg(tmp_path / "apple" / "3.jpg")
    logged = []
    images, labels, classes = ddpm.load_image_folder(str(tmp_path), 16, 16, True, 1,
                                                     log=logged.append)
    assert_one_unreadable_warning(capsys.readouterr().err, 1, [str(tmp_path / "apple" / "3.jpg")])
    assert classes == ["apple", "zebra"]
    assert labels.tolist() == [0, 0, 1]
    assert [tuple(im[:, 0, 0].tolist()) for im in images] == [GREEN, BLUE, RED]
    assert "2 classes: apple, zebra" in logged[0]


def test_load_image_folder_of_only_unreadable_files_is_an_error(tmp_path, capsys):
    truncated_jpeg(tmp_path / "a.jpg")
    empty_png(tmp_path / "b.png")
    with pytest.raises(ddpm.UserError, match="none of the 2 image files"):
        ddpm.load_image_folder(str(tmp_path), 16, 16, False, 1, log=lambda m: None)
    assert capsys.readouterr().err == ""                            # the error alone, no warning


def test_num_workers_do_not_change_the_decoded_dataset(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(12):
        h, w = rng.integers(8, 40, size=2)
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        save(array, tmp_path / f"class{i % 3}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    one = ddpm.load_image_folder(str(tmp_path), 16, 16, True, 1, log=lambda m: None)
    three = ddpm.load_image_folder(str(tmp_path), 16, 16, True, 3, log=lambda m: None)
    assert torch.equal(one[0], three[0])
    assert torch.equal(one[1], three[1])
    assert one[2] == three[2] == ["class0", "class1", "class2"]


# ------------------------------------------------------------------------------------------------
# User errors: exit status 2, one line on stderr
# ------------------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path, capsys):
    status, _, err = run_main(["--dataset_path", tmp_path / "nope", *TINY], capsys)
    assert_user_error(status, err, "is not a folder", str(tmp_path / "nope"))


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    status, _, err = run_main(["--dataset_path", tmp_path / "data", "--output_dir",
                               tmp_path / "run", *TINY], capsys)
    assert_user_error(status, err, "no image files")
    assert not (tmp_path / "run").exists()


def test_dataset_of_only_corrupt_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    truncated_jpeg(data / "a.jpg")
    empty_png(data / "b.png")
    text_as_jpg(data / "c.jpg")
    status, _, err = run_main(["--dataset_path", data, "--output_dir", tmp_path / "run", *TINY],
                              capsys)
    assert_user_error(status, err, "none of the 3 image files", "could be read")
    assert not (tmp_path / "run").exists()


def test_class_conditional_with_images_in_the_root(tmp_path, capsys):
    save(solid(RED), tmp_path / "data" / "cats" / "1.png")
    save(solid(RED), tmp_path / "data" / "2.png")
    status, _, err = run_main(["--dataset_path", tmp_path / "data", "--class_conditional",
                               "--output_dir", tmp_path / "run", *TINY], capsys)
    assert_user_error(status, err, "class subfolder")


@pytest.mark.parametrize("flags, phrases", [
    (["--image_size", "18", "--channel_mults", "1,2,2"], ["not divisible", "factor 4"]),
    (["--base_channels", "2"], ["--base_channels 2", "at least 4"]),
    (["--image_size", "abc"], ["--image_size", "'abc'"]),
    (["--image_size", "0"], ["--image_size", "positive"]),
    (["--sampling_steps", "20", "--timesteps", "10"], ["--sampling_steps 20", "--timesteps 10"]),
    (["--sampler", "foo"], ["--sampler", "invalid choice", "foo"]),
    (["--sample"], ["--checkpoint"]),
    (["--schedule", "linear", "--timesteps", "20", "--sampling_steps", "4"],
     ["--timesteps 20", "below 1", "--timesteps 21 or more"]),
], ids=["not_divisible", "base_channels_2", "image_size_abc", "image_size_0",
        "sampling_steps_gt_timesteps", "unknown_choice", "sample_without_checkpoint",
        "linear_schedule_too_short"])
def test_bad_flags(tmp_path, capsys, flags, phrases):
    testing_utils.assert_refused_before_any_work(ddpm, [*TINY, *flags], tmp_path, capsys, *phrases)


def test_resume_latest_without_a_checkpoint(tmp_path, capsys):
    status, _, err = run_main([*TINY, "--output_dir", tmp_path / "run", "--resume", "latest"],
                              capsys)
    assert_user_error(status, err, "--resume latest", "no checkpoint")
    assert not (tmp_path / "run").exists()


def checkpoint_variant(trained, path, change):
    ckpt = torch.load(trained["last"], map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


def test_checkpoint_of_another_script(trained, tmp_path, capsys):
    path = checkpoint_variant(trained, tmp_path / "other.pt",
                              lambda c: c.__setitem__("method", "patch_ddpm"))
    status, _, err = run_main(["--sample", "--checkpoint", path, "--output_dir",
                               tmp_path / "out"], capsys)
    assert_user_error(status, err, "patch_ddpm.py checkpoint")
    status, _, err = run_main([*TINY, "--output_dir", tmp_path / "run", "--resume", path], capsys)
    assert_user_error(status, err, "patch_ddpm.py checkpoint")


def test_truncated_checkpoint(trained, tmp_path, capsys):
    data = trained["last"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    status, _, err = run_main(["--sample", "--checkpoint", path], capsys)
    assert_user_error(status, err, "cannot be read", "truncated")


def test_resume_checks_the_checkpoint_before_decoding_the_dataset(trained, tmp_path, capsys):
    """A broken --resume checkpoint is reported before any image is decoded: the error line
    alone, without the warning about the folder's corrupt image."""
    data = tmp_path / "data"
    save(solid(RED), data / "good.png")
    truncated_jpeg(data / "corrupt.jpg")
    checkpoint = trained["last"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(checkpoint[: len(checkpoint) // 2])
    status, out, err = run_main(["--dataset_path", data, "--output_dir", tmp_path / "run", *TINY,
                                 "--resume", path], capsys)
    assert_user_error(status, err, "cannot be read", "truncated")
    assert unreadable_warnings(err) == []
    assert "dataset:" not in out


@pytest.mark.parametrize("kind", ["text", "other_dict"])
def test_file_that_is_not_a_checkpoint(tmp_path, capsys, kind):
    path = tmp_path / "weights.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
        phrase = "not a checkpoint"
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        phrase = "not a checkpoint of this repository"
    status, _, err = run_main(["--sample", "--checkpoint", path], capsys)
    assert_user_error(status, err, phrase, str(path))


def test_missing_checkpoint_file(tmp_path, capsys):
    status, _, err = run_main(["--sample", "--checkpoint", tmp_path / "none.pt"], capsys)
    assert_user_error(status, err, "does not exist")


def test_resume_with_an_incompatible_configuration(trained, tmp_path, capsys):
    flags = [a if a != "32" else "64" for a in TINY]                # --base_channels 64
    status, _, err = run_main(["--dataset_path", trained["data"], "--output_dir",
                               tmp_path / "run", *flags, "--resume", trained["last"]], capsys)
    assert_user_error(status, err, "different configuration", "--base_channels 32 (checkpoint)",
                      "64 (now)")


def test_sample_swa_weights_from_a_run_without_swa(trained, tmp_path, capsys):
    status, _, err = run_main(["--sample", "--checkpoint", trained["last"], "--weights", "swa",
                               "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(status, err, "no SWA weights", "--swa")


@pytest.mark.parametrize("label", ["2", "-1"])
def test_class_label_out_of_range(class_conditional_checkpoint, tmp_path, capsys, label):
    status, _, err = run_main(["--sample", "--checkpoint", class_conditional_checkpoint["last"],
                               "--class_label", label, "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(status, err, f"--class_label {label}", "0..1")


def test_cli_unknown_choice_end_to_end():
    result = run_cli(["--sampler", "foo"])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("ddpm.py: error: ") and "invalid choice" in result.stderr


def test_cli_unreadable_dataset_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    truncated_jpeg(data / "a.jpg")
    empty_png(data / "b.png")
    result = run_cli(["--dataset_path", data, "--output_dir", tmp_path / "run", *TINY],
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ddpm.py: error: none of the 2 image files")


# ------------------------------------------------------------------------------------------------
# --help and --dry_run
# ------------------------------------------------------------------------------------------------

def test_help_lists_every_shared_flag_with_its_default(capsys):
    # CONVENTIONS.md "Command line": the shared training flags, the train/sample synopses.
    blocks = testing_utils.help_blocks(ddpm, capsys, SHARED_FLAGS + SYNOPSIS_FLAGS, SHARED_FLAGS)
    assert "{fp32,bf16,fp16}" in blocks["--precision"]
    assert "{auto,triton,torch}" in blocks["--kernels"]


def test_dry_run_prints_the_configuration_and_writes_nothing(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        save(solid(RED), data / f"{i}.png")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    flags = ["--dataset_path", str(data), *TINY]
    config, parameters, rest = testing_utils.dry_run(ddpm, flags, capsys)
    assert config["image_size"] == [16, 16] and config["channel_mults"] == [1, 2]
    assert config["base_channels"] == 32 and config["dataset_path"] == str(data)
    assert config["output_dir"] == os.path.join("runs", "ddpm") and config["num_classes"] == 0
    expected = ddpm.count_parameters(ddpm.build_model(ddpm.parse_args(flags)))
    assert re.fullmatch(r" ([\d,]+); 3 training images\n", rest)
    assert parameters == expected
    assert list(cwd.iterdir()) == []                                # no runs/ddpm


# ------------------------------------------------------------------------------------------------
# A real training run and its outputs
# ------------------------------------------------------------------------------------------------


def test_training_run_skips_the_corrupt_file_and_finishes(trained):
    assert trained["status"] == 0, trained["err"]
    assert_one_unreadable_warning(trained["err"], 1, [trained["broken"]], alone=False)
    summary = [line for line in trained["out"].splitlines() if line.startswith("dataset:")]
    assert summary == [f"dataset: 6 images from {trained['data']}, 1 skipped, 1 upscaled to "
                       f"16x16"]


def test_training_run_writes_the_conventional_outputs(trained):
    run = trained["run"]
    config = testing_utils.conventional_outputs(run)
    assert config["image_size"] == [16, 16] and config["max_steps"] == 2
    assert config["dataset_path"] == str(trained["data"]) and config["num_classes"] == 0
    with Image.open(run / "samples" / "step_2.png") as grid:
        assert grid.mode == "RGB" and grid.size == (2 * 18 + 2, 2 * 18 + 2)   # 2x2 grid of 16px
    assert list(run.rglob("*.tmp*")) == []


def test_training_run_logs_tensorboard_scalars(trained):
    assert list(trained["run"].glob("events.out.tfevents.*"))
    events = testing_utils.tensorboard_events(trained["run"])
    tags = events.Tags()
    for tag in TRAIN_SCALARS:
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [2]
    assert np.isfinite(events.Scalars("train/loss")[0].value)
    assert events.Scalars("train/peak_memory_mb")[0].value > 0
    assert "samples" in tags["images"]


def test_checkpoint_has_exactly_the_conventional_keys(trained):
    for ckpt in testing_utils.conventional_checkpoints(trained["run"], "ddpm"):
        assert ckpt["format_version"] == ddpm.FORMAT_VERSION and ckpt["swa"] is None
        assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
        assert ckpt["args"]["image_size"] == [16, 16]
    model = ddpm.build_model(ddpm.parse_args(TINY))
    model.load_state_dict(ckpt["model"])
    model.load_state_dict(ckpt["ema"]["shadow"])


def test_sample_from_the_trained_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = run_main(["--sample", "--checkpoint", trained["last"], "--num_samples", "2",
                               "--output_dir", out], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png"]


def test_sample_does_not_need_the_training_folder(trained, tmp_path, capsys):
    path = checkpoint_variant(trained, tmp_path / "moved.pt", lambda c: c["args"].__setitem__(
        "dataset_path", str(tmp_path / "folder_deleted_after_training")))
    out = tmp_path / "out"
    status, _, err = run_main(["--sample", "--checkpoint", path, "--num_samples", "1",
                               "--output_dir", out], capsys)
    assert status == 0, err
    assert (out / "grid.png").is_file()


def test_class_conditional_run_names_its_classes(class_conditional_checkpoint):
    assert ("dataset: 4 images from" in class_conditional_checkpoint["out"]
            and "2 classes: apple, zebra" in class_conditional_checkpoint["out"])
    ckpt = torch.load(class_conditional_checkpoint["last"], map_location="cpu", weights_only=True)
    assert ckpt["args"]["num_classes"] == 2 and ckpt["args"]["class_conditional"] is True


def test_symbolic_link_cycles_are_entered_once(tmp_path):
    save(solid(RED), tmp_path / "a" / "1.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")             # a/loop -> a
    os.symlink(tmp_path / "a", tmp_path / "b")                      # b -> a: the same folder
    paths, _, _ = ddpm.find_images(str(tmp_path), False)
    assert [os.path.realpath(p) for p in paths] == [os.path.realpath(tmp_path / "a" / "1.png")]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise)."""
    array = np.zeros((20, 40, 3), np.uint8)                         # stored 40 wide, 20 high
    array[:, :20] = RED                                             # left half red
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.png", exif=exif)
    decoded, _ = ddpm.load_image(str(tmp_path / "phone.png"), 40, 20)   # upright: 20 wide, 40 high
    assert decoded.shape == (3, 40, 20)
    assert tuple(decoded[:, 5, 10]) == RED and tuple(decoded[:, 35, 10]) == (0, 0, 0)


def test_float_images_in_unit_range_are_scaled(tmp_path):
    image = Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")
    assert ddpm.to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("flags, phrases", [
    (["--num_heads", "3"], ["--num_heads 3", "divisor"]),
])
def test_attention_heads_are_checked_before_any_work(tmp_path, capsys, flags, phrases):
    testing_utils.assert_refused_before_any_work(ddpm, [*TINY, *flags], tmp_path, capsys, *phrases)


def test_a_dataset_smaller_than_a_batch_is_warned_about(tmp_path, capsys):
    for i in range(2):
        save(solid(RED), tmp_path / "data" / f"{i}.png")
    status, _, err = run_main([*TINY, "--dataset_path", tmp_path / "data", "--output_dir",
                               tmp_path / "run", "--batch_size", "4", "--max_steps", "1"], capsys)
    assert status == 0
    assert "ddpm.py: warning: 2 images for 4 per micro-batch" in err

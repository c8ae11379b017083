"""ddpm.py's data path, command line, user errors and run outputs, on real files.

- Image files written with PIL into tmp_path (every mode: RGB, L, LA, P with and without
  transparency, RGBA, 1, I;16, I, F, CMYK; JPEG, EXIF orientation, small, odd-sized and
  non-square images; nested and class folders; truncated, empty and mislabelled files) decode to
  the pixels expected.
- The dataset cache: decoded once into an array file under --cache_dir, reused, rebuilt when the
  folder changes, never half-built, never written into the dataset folder; the built-in dataset
  goes through it too.
- Every user error exits with status 2 and one line `ddpm.py: error: ...` on stderr.
- `--help`, `--dry_run`, and a 2-step training run: its args.json, checkpoints, preview grid and
  TensorBoard scalars.

(DDP sharing one cache file and exact resume through the cache are in tests/test_ddpm.py.)
"""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import testing_utils
from testing_utils import SHARED_FLAGS, SYNOPSIS_FLAGS, TRAIN_SCALARS, folder_state, load

pytestmark = pytest.mark.usefixtures("one_torch_thread")            # tests/conftest.py

# A U-Net small enough for a 2-core CPU: 16x16 images, two levels of width 8 and 16.
TINY = ["--image_size", "16", "--base_channels", "8", "--channel_mults", "1,2",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--num_heads", "2",
        "--batch_size", "4", "--max_steps", "2", "--sample_every", "2", "--save_every", "2",
        "--num_samples", "4", "--sampling_steps", "3", "--preview_samples", "4",
        "--preview_steps", "3", "--procedural_size", "16", "--num_workers", "2"]

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

save = testing_utils.save_image


def run_main(argv, capsys):
    return testing_utils.run_main(ddpm, argv, capsys)


def assert_user_error(status, err):
    testing_utils.assert_user_error(ddpm, status, err)


# ------------------------------------------------------------------------------------------------
# Helpers: image files and running main()
# ------------------------------------------------------------------------------------------------


def solid(color, width=16, height=16):
    return np.full((height, width, 3), color, dtype=np.uint8)


def three_bands(axis, side=16):
    """A 3*side x side image: red, green, blue bands along `axis` (1: left to right, 0: top to
    bottom). Only the green band survives a centre crop to side x side."""
    return np.concatenate([solid(c, side, side) for c in (RED, GREEN, BLUE)], axis=axis)


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"")
    return str(path)


def text_as_jpg(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("this is not a JPEG\n")
    return str(path)


def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("ddpm.py: warning:")]


def assert_one_warning_naming(err, paths):
    """stderr has exactly one warning line, and it names every one of `paths`."""
    lines = warnings_of(err)
    assert len(lines) == 1, f"not one warning line: {err!r}"
    for path in paths:
        assert path in lines[0], f"{path!r} not in {lines[0]!r}"


def quietly(argv):
    """ddpm.main for a fixture (module scope has no capsys): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = ddpm.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def dataset_args(data, cache, *extra):
    return ddpm.parse_args(["--dataset_path", str(data), "--image_size", "16", "--cache_dir",
                            str(cache), "--num_workers", "2", *map(str, extra)])


def arrays_in(cache):
    return sorted(p.name for p in Path(cache).glob("*.npy"))


# ------------------------------------------------------------------------------------------------
# Module fixtures: one training run on a folder, one class-conditional run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run on a folder of 6 readable images (one upscaled), a truncated JPEG and a text
    file."""
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
    before = folder_state(data)
    run = base / "run"
    status, out, err = quietly(["--dataset_path", data, "--output_dir", run, "--cache_dir",
                                base / "cache", *TINY])
    return {"data": data, "run": run, "status": status, "out": out, "err": err, "before": before,
            "broken": broken, "cache": base / "cache", "last": run / "checkpoints" / "last.pt"}


@pytest.fixture(scope="module")
def class_conditional(tmp_path_factory):
    """A 1-step class-conditional run on two class folders (zebra, apple)."""
    base = tmp_path_factory.mktemp("classes")
    data = base / "data"
    for name, color in (("zebra", (250, 250, 250)), ("apple", (200, 20, 20))):
        for i in range(2):
            save(solid(color), data / name / f"{i}.png")
    run = base / "run"
    status, out, err = quietly(["--dataset_path", data, "--output_dir", run, "--cache_dir",
                                base / "cache", *TINY, "--class_conditional", "--max_steps", "1"])
    assert status == 0, err
    assert warnings_of(err) == [], err
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
    save(solid(RED), tmp_path / "loose.png")
    with pytest.raises(ddpm.UserError):
        ddpm.find_images(str(tmp_path), class_conditional=True)


def test_find_images_without_image_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ddpm.UserError):
        ddpm.find_images(str(tmp_path), class_conditional=False)


def test_a_folder_that_cannot_be_listed_is_skipped_with_one_warning(tmp_path, monkeypatch,
                                                                    capsys):
    kept = save(solid(RED), tmp_path / "open" / "1.png")
    save(solid(RED), tmp_path / "locked" / "1.png")
    locked, real_scandir = str(tmp_path / "locked"), os.scandir

    def scandir(path):                                          # chmod 000 does not stop root
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert ddpm.find_images(str(tmp_path), False)[0] == [kept]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and locked in warnings[0]
    assert ddpm.find_images(str(tmp_path), False, warn=False)[0] == [kept]    # ranks but 0
    assert capsys.readouterr().err == ""
    locked = str(tmp_path)                                          # the folder itself
    with pytest.raises(ddpm.UserError) as error:
        ddpm.find_images(locked, False)
    assert locked in str(error.value) and capsys.readouterr().err == ""


def test_symbolic_link_cycles_are_entered_once(tmp_path):
    save(solid(RED), tmp_path / "a" / "1.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")             # a/loop -> a
    os.symlink(tmp_path / "a", tmp_path / "b")                      # b -> a: the same folder
    paths, _, _ = ddpm.find_images(str(tmp_path), False)
    assert [os.path.realpath(p) for p in paths] == [os.path.realpath(tmp_path / "a" / "1.png")]


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


def test_bilevel_png(tmp_path):
    bits = np.zeros((16, 16), dtype=bool)
    bits[:, 8:] = True
    image, _ = pixels(save(Image.fromarray(bits), tmp_path / "bits.png"))
    assert (image[:, :8] == 0).all() and (image[:, 8:] == 255).all()


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


@pytest.mark.parametrize("mode, key, other, expected", [
    ("L", 30, 200, (200,) * 3), ("RGB", GREEN, RED, RED), ("I;16", 5000, 40000, (156,) * 3)])
def test_colour_key_png_transparent_pixels_become_white(tmp_path, mode, key, other, expected):
    """A grayscale (8- or 16-bit) or RGB PNG whose tRNS chunk makes one value transparent."""
    image = Image.new(mode, (16, 16), key)
    image.paste(Image.new(mode, (16, 8), other), (0, 8))
    path = save(image, tmp_path / "keyed.png", transparency=key)
    with Image.open(path) as check:
        assert check.mode == mode and check.info["transparency"] == key
    image, _ = pixels(path)
    assert (image[:8] == WHITE).all()
    assert (image[8:] == expected).all()                            # 40000 / 257 = 155.6


def palette_image(path, transparency=None):
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[:, 8:] = 1
    indices[12:, :] = 2
    image = Image.fromarray(indices, "P")
    image.putpalette([*RED, *BLUE, *GREEN] + [0] * (3 * 253))
    return save(image, path, **({} if transparency is None else {"transparency": transparency}))


@pytest.mark.parametrize("transparency, bottom", [(None, GREEN), (2, WHITE)],
                         ids=["opaque", "transparent_index"])
def test_palette_png(tmp_path, transparency, bottom):
    path = palette_image(tmp_path / "p.png", transparency)
    with Image.open(path) as check:
        assert check.mode == "P" and ("transparency" in check.info) == (transparency is not None)
    image, _ = pixels(path)
    assert (image[:12, :8] == RED).all()
    assert (image[:12, 8:] == BLUE).all()
    assert (image[12:] == bottom).all()


def test_16_bit_grayscale_png_is_rescaled_not_clipped(tmp_path):
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


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [65535, 257 * 40, 0], [255, 40, 0]),                      # 16-bit range: rescaled
    ("I", [200, 7, 0], [200, 7, 0]),                                # 8-bit range: kept
    ("F", [1.0, 0.5, 0.0], [255, 128, 0]),                          # unit range: scaled
    ("F", [250.0, 100.0, 0.0], [250, 100, 0]),
])
def test_32_bit_integer_and_float_tiffs(tmp_path, mode, values, expected):
    array = np.repeat(np.array(values, np.int32 if mode == "I" else np.float32), [6, 5, 5])
    path = save(Image.fromarray(np.tile(array[:, None], (1, 16)), mode), tmp_path / "x.tif")
    with Image.open(path) as check:
        assert check.mode == mode
    image, _ = pixels(path)
    for rows, value in zip((slice(0, 6), slice(6, 11), slice(11, 16)), expected):
        assert (image[rows] == value).all(), (mode, values)


def test_cmyk_tiff(tmp_path):
    image, _ = pixels(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.tif"))
    assert (image == RED).all()


def test_to_rgb_returns_8_bit_rgb_for_every_mode():
    """A new image of each mode is all zeros: black, but white where alpha 0 makes it
    transparent and in CMYK (no ink); YCbCr's zeros are the colour PIL converts them to."""
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"):
        image = Image.new(mode, (4, 3))
        converted = ddpm.to_rgb(image)
        assert converted.mode == "RGB" and converted.size == (4, 3), mode
        expected = (np.asarray(image.convert("RGB")) if mode == "YCbCr" else
                    255 if mode in ("LA", "PA", "RGBA", "CMYK") else 0)
        assert (np.asarray(converted) == expected).all(), mode


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise)."""
    array = np.zeros((20, 40, 3), np.uint8)                         # stored 40 wide, 20 high
    array[:, :20] = RED                                             # left half red
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    for name in ("phone.png", "phone.jpg"):
        image.save(tmp_path / name, exif=exif, **({"quality": 95} if name.endswith("jpg") else {}))
        decoded, _ = ddpm.load_image(str(tmp_path / name), 40, 20)  # upright: 20 wide, 40 high
        assert decoded.shape == (3, 40, 20)
        assert np.abs(decoded[:, 5, 10].astype(int) - RED).max() <= 8, name
        assert decoded[:, 35, 10].max() <= 8, name


def test_a_sideways_jpeg_is_drafted_at_its_upright_size(tmp_path):
    """JPEG draft (decoding at 1/2..1/8) picks its scale before the EXIF rotation: for a photo
    stored sideways it must ask for the turned size, or a wide training size gets a decode too
    small for it, which is then upscaled."""
    image = Image.fromarray(np.full((1024, 2048, 3), 128, np.uint8))   # stored 2048 wide
    exif = image.getexif()
    exif[0x0112] = 6                                                    # upright: 1024 wide
    image.save(tmp_path / "side.jpg", exif=exif, quality=90)
    decoded, upscaled = ddpm.load_image(str(tmp_path / "side.jpg"), 64, 256)
    assert decoded.shape == (3, 64, 256) and not upscaled


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
    assert np.abs(image[:, 3:13].astype(int) - GREEN).max() <= 2    # away from the fringes


def test_centre_crop_to_a_non_square_training_size(tmp_path):
    rows = np.concatenate([solid(RED, 16, 4), solid(GREEN, 16, 8), solid(BLUE, 16, 4)])
    image, _ = pixels(save(rows, tmp_path / "rows.png"), height=8, width=16)
    assert (image == GREEN).all()


def test_odd_sizes_are_resized_to_cover_and_centre_cropped(tmp_path):
    """Scaled by max(H / h, W / w), keeping the aspect (bicubic up, Lanczos down), then the
    centre H x W: PIL's own resize and crop of the same image, not a stretch."""
    rng = np.random.default_rng(3)
    for h, w in ((7, 13), (31, 9), (17, 17), (40, 24)):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image, upscaled = pixels(save(array, tmp_path / f"{h}x{w}.png"), height=12, width=10)
        scale = max(12 / h, 10 / w)
        size = (max(10, round(w * scale)), max(12, round(h * scale)))
        resized = Image.fromarray(array).resize(size, Image.BICUBIC if scale > 1 else
                                                Image.LANCZOS)
        left, top = (size[0] - 10) // 2, (size[1] - 12) // 2
        assert np.array_equal(image, np.asarray(resized.crop((left, top, left + 10, top + 12))))
        assert upscaled == (h < 12 or w < 10)
        assert not np.array_equal(image, np.asarray(Image.fromarray(array).resize((10, 12))))


@pytest.mark.parametrize("make", [truncated_jpeg, empty_png, text_as_jpg],
                         ids=["truncated_jpeg", "empty_png", "text_as_jpg"])
def test_unreadable_file_gives_none(tmp_path, make):
    suffix = ".png" if make is empty_png else ".jpg"
    assert ddpm.load_image(make(tmp_path / f"bad{suffix}"), 16, 16) is None


# ------------------------------------------------------------------------------------------------
# load_dataset: the cache
# ------------------------------------------------------------------------------------------------


def mixed_folder(root):
    """6 readable images (one upscaled) in nested folders, 3 unreadable image files and a text
    file. Returns the bad paths."""
    save(solid(RED), root / "a.png")
    save(solid((40, 120, 220)), root / "b.JPG", quality=95)
    save(np.full((16, 16), 90, dtype=np.uint8), root / "c_gray.PNG")
    save(solid(BLUE, 8, 8), root / "deep" / "er" / "d_small.png")
    save(three_bands(axis=0), root / "deep" / "e_tall.png")
    save(solid(GREEN), root / "f.jpeg", quality=95)
    (root / "notes.txt").write_text("ignored without a warning")
    return [truncated_jpeg(root / "bad_truncated.jpg"), empty_png(root / "bad_empty.png"),
            text_as_jpg(root / "bad_text.jpg")]


def count_decodes(monkeypatch):
    """Count load_image calls (the decoding of a folder)."""
    calls, real = [], ddpm.load_image
    monkeypatch.setattr(ddpm, "load_image", lambda *a: calls.append(a[0]) or real(*a))
    return calls


def test_load_dataset_decodes_a_folder_into_a_memory_map(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    bad = mixed_folder(data)
    before = folder_state(data)
    logged = []
    images, labels, classes = ddpm.load_dataset(dataset_args(data, cache), log=logged.append)
    assert_one_warning_naming(capsys.readouterr().err, bad)
    assert isinstance(images, np.memmap) and not images.flags.writeable
    assert images.dtype == np.uint8 and images.shape == (6, 3, 16, 16)
    assert os.path.dirname(os.path.realpath(images.filename)) == os.path.realpath(cache)
    assert labels is None and classes == []
    # find_images order: root files (a, b, bad_*, c, f), then deep/e_tall, then deep/er/d_small.
    for image, color in zip(images, [RED, (40, 120, 220), (90, 90, 90), GREEN, GREEN, BLUE]):
        assert np.abs(image.transpose(1, 2, 0).astype(int) - color).max() <= 3
    summary = " ".join(logged)
    assert re.search(r"\b3 skipped", summary) and re.search(r"\b1 upscaled", summary), summary
    assert folder_state(data) == before                             # nothing written there


def test_good_files_give_no_warning(tmp_path, capsys):
    save(solid(RED), tmp_path / "data" / "a.png")
    (tmp_path / "data" / "notes.txt").write_text("ignored silently")
    images, _, _ = ddpm.load_dataset(dataset_args(tmp_path / "data", tmp_path / "cache"),
                                     log=lambda m: None)
    assert images.shape == (1, 3, 16, 16)
    assert capsys.readouterr().err == ""


def test_many_unreadable_files_are_one_warning_line(tmp_path, capsys):
    save(solid(RED), tmp_path / "data" / "good.png")
    bad = [empty_png(tmp_path / "data" / f"bad{i}.png") for i in range(7)]
    images, _, _ = ddpm.load_dataset(dataset_args(tmp_path / "data", tmp_path / "cache"),
                                     log=lambda m: None)
    assert images.shape == (1, 3, 16, 16)
    assert_one_warning_naming(capsys.readouterr().err, bad[:1])


def test_class_labels_follow_the_kept_images(tmp_path, capsys):
    data = tmp_path / "data"
    save(solid(RED), data / "zebra" / "1.png")
    save(solid(GREEN), data / "apple" / "1.png")
    save(solid(BLUE), data / "apple" / "sub" / "2.png")
    broken = truncated_jpeg(data / "apple" / "3.jpg")
    images, labels, classes = ddpm.load_dataset(
        dataset_args(data, tmp_path / "cache", "--class_conditional"), log=lambda m: None)
    assert_one_warning_naming(capsys.readouterr().err, [broken])
    assert classes == ["apple", "zebra"]
    assert labels.tolist() == [0, 0, 1]
    assert [tuple(im[:, 0, 0].tolist()) for im in images] == [GREEN, BLUE, RED]


def test_the_cache_is_reused(tmp_path, monkeypatch, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
    bad = mixed_folder(data)
    first, _, _ = ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    capsys.readouterr()
    monkeypatch.setattr(ddpm, "load_image", lambda *a: pytest.fail("decoded again"))
    again, _, _ = ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    assert np.array_equal(first, again) and again.filename == first.filename
    assert_one_warning_naming(capsys.readouterr().err, bad)         # still said, from the cache
    assert len(arrays_in(cache)) == 1


@pytest.mark.parametrize("change", ["add", "remove", "touch", "rewrite"])
def test_the_cache_is_rebuilt_when_the_folder_changes(tmp_path, monkeypatch, change):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for i, colour in enumerate((RED, GREEN, BLUE)):
        save(solid(colour), data / f"{i}.png")
    first, _, _ = ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    first = np.array(first)
    if change == "add":
        save(solid(WHITE), data / "sub" / "3.png")
    elif change == "remove":
        os.remove(data / "1.png")
    elif change == "touch":                                         # same bytes, new mtime
        stat = os.stat(data / "1.png")
        os.utime(data / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    else:                                                           # same size and mtime
        stat = os.stat(data / "1.png")
        save(solid((0, 254, 0)), data / "1.png")
        os.utime(data / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    calls = count_decodes(monkeypatch)
    images, _, _ = ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    assert len(calls) == len(images) and len(arrays_in(cache)) == 2
    expected = {"add": [RED, GREEN, BLUE, WHITE], "remove": [RED, BLUE],
                "touch": [RED, GREEN, BLUE], "rewrite": [RED, (0, 254, 0), BLUE]}[change]
    assert [tuple(im[:, 0, 0].tolist()) for im in images] == expected
    if change == "touch":
        assert np.array_equal(images, first)


def test_the_cache_depends_on_the_training_size_not_on_the_labels(tmp_path, monkeypatch):
    """Another training size decodes again; --class_conditional reuses the pixels (the labels
    come from the folder names at every start)."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    for name in ("a", "b"):
        save(solid(RED), data / name / "1.png")
    ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    calls = count_decodes(monkeypatch)
    small, _, _ = ddpm.load_dataset(dataset_args(data, cache, "--image_size", "8x4"),
                                    log=lambda m: None)
    assert small.shape == (2, 3, 8, 4) and len(calls) == 2
    _, labels, _ = ddpm.load_dataset(dataset_args(data, cache, "--class_conditional"),
                                     log=lambda m: None)
    assert labels.tolist() == [0, 1] and len(calls) == 2
    assert len(arrays_in(cache)) == 2


def test_an_interrupted_build_is_never_used(tmp_path, monkeypatch):
    """A build that dies half-way (an error on the 4th image) leaves no array under its final name;
    a killed one's leftovers (a temporary array of garbage under this host and process id, a list of
    kept images without its array) are not taken for a cache either: the next run decodes
    everything again and gets the right pixels."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    colours = [(20 * i, 0, 0) for i in range(8)]
    for i, colour in enumerate(colours):
        save(solid(colour), data / f"{i}.png")
    probe, _, _ = ddpm.load_dataset(dataset_args(data, tmp_path / "probe"), log=lambda m: None)
    stem = os.path.basename(probe.filename)[:-len(".npy")]          # the same name in any cache
    real, calls = ddpm.load_image, []

    def dies(*a):
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("the machine ran out of memory")
        return real(*a)
    monkeypatch.setattr(ddpm, "load_image", dies)
    with pytest.raises(MemoryError):
        ddpm.load_dataset(dataset_args(data, cache, "--num_workers", "1"), log=lambda m: None)
    assert not (cache / f"{stem}.npy").exists()
    leftover = cache / f"{stem}.{os.uname().nodename}.{os.getpid()}.tmp.npy"
    leftover.write_bytes(b"\x93NUMPY garbage")
    (cache / f"{stem}.json").write_text(json.dumps({"kept": [0], "extras": [False]}))
    monkeypatch.setattr(ddpm, "load_image", real)
    calls = count_decodes(monkeypatch)
    images, _, _ = ddpm.load_dataset(dataset_args(data, cache), log=lambda m: None)
    assert len(calls) == 8
    assert [tuple(im[:, 0, 0].tolist()) for im in images] == colours
    assert os.path.basename(images.filename) == f"{stem}.npy"


def test_num_workers_do_not_change_the_array(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    for i in range(12):
        h, w = rng.integers(8, 40, size=2)
        save(rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
             data / f"class{i % 3}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    one = ddpm.load_dataset(dataset_args(data, tmp_path / "one", "--class_conditional",
                                         "--num_workers", "1"), log=lambda m: None)
    three = ddpm.load_dataset(dataset_args(data, tmp_path / "three", "--class_conditional",
                                           "--num_workers", "3"), log=lambda m: None)
    assert np.array_equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert one[2] == three[2] == ["class0", "class1", "class2"]


@pytest.mark.parametrize("class_conditional", [False, True])
def test_the_built_in_dataset_goes_through_the_same_array(tmp_path, monkeypatch,
                                                          class_conditional):
    args = ddpm.parse_args(["--image_size", "12x8", "--procedural_size", "5", "--seed", "3",
                            "--cache_dir", str(tmp_path / "cache")]
                           + ["--class_conditional"] * class_conditional)
    images, labels, classes = ddpm.load_dataset(args, log=lambda m: None)
    assert isinstance(images, np.memmap) and images.shape == (5, 3, 12, 8)
    expected = [ddpm.procedural_landscape(i, 12, 8, 3) for i in range(5)]
    assert np.array_equal(images, np.stack([image for image, _ in expected]))
    if class_conditional:
        assert labels.tolist() == [label for _, label in expected] and len(classes) == 2
    else:
        assert labels is None and classes == []
    monkeypatch.setattr(ddpm, "procedural_landscape", lambda *a, **k: pytest.fail("drawn again"))
    again, _, _ = ddpm.load_dataset(args, log=lambda m: None)
    assert again.filename == images.filename
    other = ddpm.parse_args(["--image_size", "12x8", "--procedural_size", "5", "--seed", "4",
                             "--cache_dir", str(tmp_path / "cache")])
    with pytest.raises(pytest.fail.Exception):                      # another seed: other images
        ddpm.load_dataset(other, log=lambda m: None)


def test_a_dangling_symbolic_link_is_an_unreadable_file(tmp_path, capsys):
    """A link to a file that is gone is skipped with the warning, like any unreadable file."""
    data = tmp_path / "data"
    save(solid(RED), data / "a.png")
    os.symlink(tmp_path / "deleted.png", data / "gone.png")
    images, _, _ = ddpm.load_dataset(dataset_args(data, tmp_path / "cache"), log=lambda m: None)
    assert images.shape == (1, 3, 16, 16)
    assert_one_warning_naming(capsys.readouterr().err, [str(data / "gone.png")])


# ------------------------------------------------------------------------------------------------
def test_a_cache_that_cannot_be_written_is_a_user_error(tmp_path, monkeypatch):
    save(solid(RED), tmp_path / "data" / "a.png")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(np.lib.format, "open_memmap", refused)
    with pytest.raises(ddpm.UserError, match="Permission denied"):
        ddpm.load_dataset(dataset_args(tmp_path / "data", tmp_path / "cache"), log=print)


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_damaged_cache_list_is_a_user_error(tmp_path, damage):
    """The .json beside a cached array (written before it, so only a hand or a failing disk can
    spoil it) is refused with one line that says which file to delete."""
    save(solid(RED), tmp_path / "data" / "a.png")
    args = dataset_args(tmp_path / "data", tmp_path / "cache")
    images, _, _ = ddpm.load_dataset(args, log=lambda m: None)
    listing = images.filename[:-len(".npy")] + ".json"
    del images
    if damage == "garbage":
        Path(listing).write_text("{not json")
    else:
        os.remove(listing)
    with pytest.raises(ddpm.UserError) as error:
        ddpm.load_dataset(args, log=lambda m: None)
    assert listing[:-len(".json")] + ".npy" in str(error.value)      # the file to delete


def test_an_output_dir_that_is_a_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    status, _, err = run_main([*TINY, "--output_dir", tmp_path / "afile", "--cache_dir",
                               tmp_path / "cache"], capsys)
    assert_user_error(status, err)


@pytest.mark.parametrize("key", ["cache_dir", "output_dir"])
def test_a_folder_inside_the_dataset_is_refused(tmp_path, capsys, key):
    """A cache or run folder inside the dataset would put its files among the training images
    (the previews of one run would be trained on by the next)."""
    data = tmp_path / "data"
    save(solid(RED), data / "a.png")
    folders = {"cache_dir": tmp_path / "cache", "output_dir": tmp_path / "run", key: data / "in"}
    flags = [x for name, folder in folders.items() for x in (f"--{name}", folder)]
    status, _, err = run_main(["--dataset_path", data, *TINY, *flags], capsys)
    assert_user_error(status, err)
    assert not (data / "in").exists()


# User errors: exit status 2, one line on stderr
# ------------------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path, capsys):
    testing_utils.assert_refused_before_any_work(
        ddpm, ["--dataset_path", tmp_path / "nope", *TINY], tmp_path, capsys)


def test_dataset_folder_without_images(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    testing_utils.assert_refused_before_any_work(
        ddpm, ["--dataset_path", tmp_path / "data", *TINY], tmp_path, capsys)


def test_dataset_of_only_unreadable_files(tmp_path, capsys):
    data = tmp_path / "data"
    truncated_jpeg(data / "a.jpg")
    empty_png(data / "b.png")
    text_as_jpg(data / "c.jpg")
    status, _, err = run_main(["--dataset_path", data, "--output_dir", tmp_path / "run",
                               "--cache_dir", tmp_path / "cache", *TINY], capsys)
    assert_user_error(status, err)
    assert not (tmp_path / "run").exists() and arrays_in(tmp_path / "cache") == []


def test_class_conditional_with_images_in_the_root(tmp_path, capsys):
    save(solid(RED), tmp_path / "data" / "cats" / "1.png")
    save(solid(RED), tmp_path / "data" / "2.png")
    testing_utils.assert_refused_before_any_work(
        ddpm, ["--dataset_path", tmp_path / "data", "--class_conditional", *TINY], tmp_path,
        capsys)


@pytest.mark.parametrize("flags", [
    ["--image_size", "18", "--channel_mults", "1,2,2"],             # not divisible by 4
    ["--base_channels", "2"],
    ["--image_size", "abc"],
    ["--image_size", "0"],
    ["--channel_mults", "1,x"],
    ["--channel_mults", "1,nan"],
    ["--channel_mults", "1,inf"],
    ["--sampling_steps", "20", "--timesteps", "10"],
    ["--preview_steps", "20", "--timesteps", "10"],
    ["--sampler", "foo"],
    ["--prediction", "eps2"],
    ["--variance", "fixed"],
    ["--min_snr_gamma", "-1"],
    ["--sample"],                                                   # no --checkpoint
    ["--schedule", "linear", "--timesteps", "20", "--sampling_steps", "4", "--preview_steps", "4"],
    ["--num_heads", "3"],
    ["--dropout", "1.5"],
    ["--lr", "nan"],
    ["--batch_size", "0"],
    ["--unknown_flag"],
], ids=lambda flags: "_".join(flags).replace("-", ""))
def test_bad_flags(tmp_path, capsys, flags):
    testing_utils.assert_refused_before_any_work(ddpm, [*TINY, *flags], tmp_path, capsys)


def test_an_odd_base_width_trains(tmp_path, capsys):
    """--base_channels 5 passes every check of the widths (5 >= 4), and trains: its group norms
    take the one group that divides 5 channels into groups of at least 4."""
    status, _, err = run_main([*TINY, "--base_channels", "5", "--channel_mults", "1",
                               "--num_heads", "1", "--attention_resolutions", "",
                               "--max_steps", "1", "--output_dir", tmp_path / "run",
                               "--cache_dir", tmp_path / "cache"], capsys)
    assert status == 0, err
    assert (tmp_path / "run" / "checkpoints" / "step_1.pt").is_file()


def test_resume_latest_without_a_checkpoint(tmp_path, capsys):
    testing_utils.assert_refused_before_any_work(ddpm, [*TINY, "--resume", "latest"], tmp_path,
                                                 capsys)


def checkpoint_variant(trained, path, change):
    ckpt = load(trained["last"])
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change", [
    lambda c: c.__setitem__("method", "patch_ddpm"),
    lambda c: c.__setitem__("format_version", 1),
], ids=["another_script", "another_format"])
def test_checkpoint_of_another_script_or_format(trained, tmp_path, capsys, change):
    path = checkpoint_variant(trained, tmp_path / "other.pt", change)
    status, _, err = run_main(["--sample", "--checkpoint", path, "--output_dir",
                               tmp_path / "out"], capsys)
    assert_user_error(status, err)
    testing_utils.assert_refused_before_any_work(ddpm, [*TINY, "--resume", path], tmp_path,
                                                 capsys)


def test_truncated_checkpoint(trained, tmp_path, capsys):
    data = trained["last"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    status, _, err = run_main(["--sample", "--checkpoint", path], capsys)
    assert_user_error(status, err)


def test_resume_checks_the_checkpoint_before_decoding_the_dataset(trained, tmp_path, capsys):
    """A broken --resume checkpoint is reported before any image is decoded: the error line
    alone, without the warning about the folder's corrupt image, and no cache is made."""
    data = tmp_path / "data"
    save(solid(RED), data / "good.png")
    truncated_jpeg(data / "corrupt.jpg")
    checkpoint = trained["last"].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(checkpoint[: len(checkpoint) // 2])
    testing_utils.assert_refused_before_any_work(
        ddpm, ["--dataset_path", data, *TINY, "--resume", path], tmp_path, capsys)


@pytest.mark.parametrize("kind", ["text", "other_dict", "missing"])
def test_file_that_is_not_a_checkpoint(tmp_path, capsys, kind):
    path = tmp_path / "weights.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "other_dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    status, _, err = run_main(["--sample", "--checkpoint", path], capsys)
    assert_user_error(status, err)


def test_resume_with_an_incompatible_configuration(trained, tmp_path, capsys):
    testing_utils.assert_refused_before_any_work(
        ddpm, ["--dataset_path", trained["data"], *TINY, "--base_channels", "16", "--resume",
               trained["last"]], tmp_path, capsys)


def test_resume_on_a_folder_with_other_classes(class_conditional, tmp_path, capsys):
    data = tmp_path / "data"
    for name in ("a", "b", "c"):
        save(solid(RED), data / name / "1.png")
    status, _, err = run_main(["--resume", class_conditional["last"], "--dataset_path", data,
                               "--output_dir", tmp_path / "run", "--cache_dir",
                               tmp_path / "cache", "--max_steps", "2"], capsys)
    assert_user_error(status, err)
    assert not (tmp_path / "run").exists()


def test_sample_swa_weights_from_a_run_without_swa(trained, tmp_path, capsys):
    status, _, err = run_main(["--sample", "--checkpoint", trained["last"], "--weights", "swa",
                               "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(status, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", ["2", "-1"])
def test_class_label_out_of_range(class_conditional, tmp_path, capsys, label):
    status, _, err = run_main(["--sample", "--checkpoint", class_conditional["last"],
                               "--class_label", label, "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(status, err)


def test_cli_user_error_end_to_end(tmp_path):
    """`python ddpm.py` on a folder of unreadable files: status 2, one line, nothing on stdout
    but the start-up lines, no traceback."""
    data = tmp_path / "data"
    truncated_jpeg(data / "a.jpg")
    empty_png(data / "b.png")
    result = testing_utils.run_cli(ddpm, ["--dataset_path", data, "--output_dir",
                                          tmp_path / "run", "--cache_dir", tmp_path / "cache",
                                          *TINY], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ddpm.py: error: ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# --help and --dry_run
# ------------------------------------------------------------------------------------------------


def test_help_lists_every_shared_flag_with_its_default(capsys):
    blocks = testing_utils.help_blocks(ddpm, capsys)
    for flag in SHARED_FLAGS + SYNOPSIS_FLAGS:
        assert flag in blocks, f"{flag} missing from --help"
    for flag in SHARED_FLAGS:
        assert "default" in blocks[flag], f"{flag}'s help does not show its default"
    assert not [flag for flag, block in blocks.items() if "(default: None)" in block]


def test_dry_run_prints_the_configuration_and_writes_nothing(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        save(solid(RED), data / "a" / f"{i}.png")
    before = folder_state(data)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    flags = ["--dataset_path", str(data), *TINY, "--class_conditional"]
    status, out, err = run_main([*flags, "--dry_run"], capsys)
    assert status == 0, err
    config_text, marker, rest = out.partition("parameters:")
    config = json.loads(config_text)
    assert config["image_size"] == [16, 16] and config["channel_mults"] == [1, 2]
    assert config["base_channels"] == 8 and config["dataset_path"] == str(data)
    assert config["num_classes"] == 1
    args = ddpm.parse_args(flags)
    args.num_classes = 1
    parameters = sum(p.numel() for p in ddpm.build_model(args).parameters())
    assert int(re.match(r" ([\d,]+)", rest).group(1).replace(",", "")) == parameters
    assert list(cwd.iterdir()) == [] and folder_state(data) == before   # no runs/, no cache


# ------------------------------------------------------------------------------------------------
# A real training run and its outputs
# ------------------------------------------------------------------------------------------------


def test_training_run_skips_the_corrupt_file_and_finishes(trained):
    assert trained["status"] == 0, trained["err"]
    assert_one_warning_naming(trained["err"], [trained["broken"]])
    assert trained["out"].count(str(trained["data"])) >= 1          # the summary names the folder
    assert len(arrays_in(trained["cache"])) == 1


def test_training_run_leaves_the_dataset_folder_alone(trained):
    assert folder_state(trained["data"]) == trained["before"]


def test_training_run_writes_the_conventional_outputs(trained):
    run = trained["run"]
    config = testing_utils.conventional_outputs(run)
    assert config["image_size"] == [16, 16] and config["max_steps"] == 2
    assert config["dataset_path"] == str(trained["data"]) and config["num_classes"] == 0
    with Image.open(run / "samples" / "step_2.png") as grid:
        assert grid.mode == "RGB" and grid.size == (2 * 18 + 2, 2 * 18 + 2)   # 2x2 grid of 16px


def test_training_run_logs_tensorboard_scalars(trained):
    events = testing_utils.tensorboard_events(trained["run"])
    tags = events.Tags()
    for tag in TRAIN_SCALARS:
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [2]
    assert np.isfinite(events.Scalars("train/loss")[0].value)
    assert events.Scalars("train/peak_memory_mb")[0].value > 0
    assert events.Scalars("train/images_per_sec")[0].value > 0
    assert events.Scalars("train/kimg")[0].value == pytest.approx(2 * 4 / 1000)   # 2 steps of 4
    assert "samples" in tags["images"]


def test_checkpoint_format(trained):
    """CONVENTIONS.md's entries, written atomically (no temporary file left), last.pt equal to the
    last step's checkpoint, loadable with weights_only into the model."""
    last, _ = testing_utils.conventional_checkpoints(trained["run"], "ddpm")
    assert last["format_version"] == ddpm.FORMAT_VERSION and last["swa"] is None
    assert last["nimg"] == 2 * last["args"]["batch_size"]          # images seen in 2 steps
    assert last["args"]["image_size"] == [16, 16]
    model = ddpm.build_model(ddpm.parse_args(TINY))
    model.load_state_dict(last["model"])
    model.load_state_dict(last["ema"]["shadow"])
    assert last["scaler"] == {}                                     # fp32: no GradScaler state


def test_a_checkpoint_save_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ddpm.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real = torch.save

    def dies(state, f):
        real({"step": 2}, f)
        with open(f, "ab") as handle:
            handle.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        ddpm.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_sample_from_the_trained_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = run_main(["--sample", "--checkpoint", trained["last"], "--num_samples", "2",
                               "--output_dir", out], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "grid.png"]
    for name in ("00000.png", "00001.png"):
        with Image.open(out / name) as image:
            assert image.size == (16, 16) and image.mode == "RGB"


def test_sample_does_not_need_the_training_folder(trained, tmp_path, capsys):
    path = checkpoint_variant(trained, tmp_path / "moved.pt", lambda c: c["args"].__setitem__(
        "dataset_path", str(tmp_path / "folder_deleted_after_training")))
    out = tmp_path / "out"
    status, _, err = run_main(["--sample", "--checkpoint", path, "--num_samples", "1",
                               "--output_dir", out], capsys)
    assert status == 0, err
    assert (out / "grid.png").is_file()


def test_class_conditional_run_records_its_classes(class_conditional):
    ckpt = load(class_conditional["last"])
    assert ckpt["args"]["num_classes"] == 2 and ckpt["args"]["class_conditional"] is True
    assert ckpt["model"]["class_emb.weight"].shape[0] == 3          # 2 classes + the null label


def test_a_dataset_smaller_than_a_batch_is_warned_about(tmp_path, capsys):
    for i in range(2):
        save(solid(RED), tmp_path / "data" / f"{i}.png")
    status, _, err = run_main([*TINY, "--dataset_path", tmp_path / "data", "--output_dir",
                               tmp_path / "run", "--cache_dir", tmp_path / "cache",
                               "--batch_size", "4", "--max_steps", "1"], capsys)
    assert status == 0, err
    assert len(warnings_of(err)) == 1

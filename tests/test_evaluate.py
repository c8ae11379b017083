"""bench/evaluate.py and bench/inception.py: the metrics against their formulas, the feature
network, and the command line end to end (random Inception weights: no test downloads)."""

import argparse
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import ddpm
import patch_ddpm
import testing_utils

sys.path.insert(0, os.path.join(testing_utils.ROOT, "bench"))
import evaluate  # noqa: E402
import inception  # noqa: E402

EVALUATE = types.SimpleNamespace(METHOD="evaluate")                 # its error lines' prefix


def random_spd(rng, d, rank):
    a = rng.standard_normal((d, rank))
    return a @ a.T


def test_frechet_distance_against_float64_closed_forms():
    """Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    C against k^2 C with C singular (rank 2 of 6): FD = |dmu|^2 + (1 - k)^2 tr C."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    a, b = rng.uniform(0, 3, 6), rng.uniform(0, 3, 6)
    a[:2] = 0                                                       # singular too
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-7)     # sqrt of a rounding-level eigenvalue: 1e-8
    c, k = random_spd(rng, 6, 2), 2.5
    fd = evaluate.frechet_distance(mu1, c, mu2, k * k * c)
    assert fd == pytest.approx(((mu1 - mu2) ** 2).sum() + (1 - k) ** 2 * np.trace(c), rel=1e-7)
    s = random_spd(rng, 6, 6)
    assert abs(evaluate.frechet_distance(mu1, s, mu1, s)) < 1e-7 * np.trace(s)
    samples = rng.standard_normal((400_000, 3)) * [1.0, 2.0, 0.5]   # fitted Gaussians
    assert evaluate.frechet_distance(*evaluate.gaussian(samples), np.array([1.0, 0, 0]),
                                     np.diag([9.0, 1.0, 0.25])) == pytest.approx(6, rel=0.01)


@pytest.mark.parametrize("n1, n2", [(5, 9), (40, 7)])
def test_the_low_rank_frechet_distance_equals_the_covariance_one(n1, n2):
    """Fewer samples than the 12 dimensions in one set or both: the samples'-space computation
    equals the Gaussian formula on the fitted statistics."""
    rng = np.random.default_rng(n1)
    x, y = rng.standard_normal((n1, 12)), rng.standard_normal((n2, 12)) * 2 + 0.5
    assert evaluate.features_frechet_distance(x, y) == pytest.approx(
        evaluate.frechet_distance(*evaluate.gaussian(x), *evaluate.gaussian(y)), rel=1e-7)
    assert abs(evaluate.features_frechet_distance(x, x)) < 1e-7


def test_kid_is_the_unbiased_mmd_of_the_kid_paper():
    """polynomial_mmd2 equals the U-statistic written out pair by pair; on sets of one
    distribution its mean over many draws is 0 (unbiased), while the V-statistic (every pair,
    i = j included) is positive; whole sets as subsets give one value with spread 0."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 4)) + 0.3
    k = lambda a, b: (a @ b / 4 + 1) ** 3                          # noqa: E731
    m = len(x)
    u = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
         / (m * (m - 1)) - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert evaluate.polynomial_mmd2(x, y) == pytest.approx(u, rel=1e-12)
    mean, std = evaluate.kernel_inception_distance(x, y, subsets=3, subset_size=m)
    assert mean == pytest.approx(u, rel=1e-12) and std < 1e-12
    draws = [(rng.standard_normal((20, 4)), rng.standard_normal((20, 4))) for _ in range(2000)]
    unbiased = np.array([evaluate.polynomial_mmd2(a, b) for a, b in draws])
    biased = np.array([np.mean((a @ a.T / 4 + 1) ** 3) + np.mean((b @ b.T / 4 + 1) ** 3)
                       - 2 * np.mean((a @ b.T / 4 + 1) ** 3) for a, b in draws])
    sem = unbiased.std() / np.sqrt(len(draws))
    assert abs(unbiased.mean()) < 4 * sem < biased.mean()


def test_inception_has_pytorch_fid_parameter_names_and_shapes():
    """The state dict's names and shapes are those of pytorch-fid's network (the manifest was
    written from pytorch-fid's own modules by bench/inception_parity.py --manifest), so its
    weights file loads with strict=True."""
    with open(os.path.join(testing_utils.ROOT, "tests", "data",
                           "pytorch_fid_inception_shapes.json")) as f:
        manifest = json.load(f)
    ours = {k: list(v.shape) for k, v in inception.InceptionV3().state_dict().items()}
    assert ours == manifest


def test_block_pools_average_over_the_image_only():
    """FID's Inception divides a 3x3 average by the pixels inside the image: a constant map
    stays constant at the corners (torchvision's count_include_pad=True gives 4/9 there)."""
    pooled = inception.avg_pool(torch.ones(1, 1, 5, 5))
    assert torch.equal(pooled, torch.ones(1, 1, 5, 5))


def test_inception_features_shape_determinism_and_eval_mode():
    """(N, 2048) finite features; the same seed gives the same network; an image's features do
    not depend on its batch (batch norm in eval mode, even after .train())."""
    net = inception.InceptionV3(seed=0)
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 24, 40), dtype=np.uint8)
    one = evaluate.inception_features(net.train(), images, 3, "test")
    assert one.shape == (3, inception.FEATURES) and one.dtype == np.float64
    assert np.isfinite(one).all() and one.std(0).mean() > 0
    again = evaluate.inception_features(inception.InceptionV3(seed=0), images, 1, "test")
    np.testing.assert_allclose(again, one, rtol=1e-5, atol=1e-7)
    other = evaluate.inception_features(inception.InceptionV3(seed=1), images[:1], 1, "test")
    assert np.abs(other - one[:1]).max() > 1e-3


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:05d}.png")


def landscapes(n, size=32):
    return [Image.fromarray(ddpm.procedural_landscape(i, size, size)[0].transpose(1, 2, 0))
            for i in range(n)]


def result_lines(out):
    """evaluate.py's result lines -> {name: value}: "FID 1.5" -> {"FID": 1.5}, "KID 0.1 +- 0.01"
    -> {"KID": 0.1}, the same for "random-feature FD" and "KD"."""
    values = {}
    for line in out.splitlines():
        if line.startswith(("FID ", "KID ", "random-feature ")):
            words = line.split(" +- ")[0].split(" ")
            values[" ".join(words[:-1])] = float(words[-1])
    return values


def test_fid_of_a_folder_with_itself_is_zero_and_grows_with_blur_and_noise(tmp_path, capsys,
                                                                          monkeypatch):
    """Against the folder itself FD is 0; it grows with the blur radius and the noise level. The
    reference features are computed once per (folder contents, size, weights): once for five
    evaluations, again for a changed folder, another size and other weights (a file: then the
    lines say FID and KID). With the cached mean and covariance (taken when both sets have more
    images than features) FD is that of the features."""
    real = landscapes(6)
    rng = np.random.default_rng(0)
    variants = {"real": real}
    for radius in (1, 3):
        variants[f"blur{radius}"] = [im.filter(ImageFilter.GaussianBlur(radius)) for im in real]
    for level in (20, 80):
        variants[f"noise{level}"] = [Image.fromarray(np.clip(np.asarray(im) + rng.normal(
            0, level, (32, 32, 3)), 0, 255).astype(np.uint8)) for im in real]
    variants["small"] = [im.resize((16, 16), Image.BILINEAR) for im in real]
    for name, images in variants.items():
        write_folder(tmp_path / name, images)
    calls = []
    features = evaluate.inception_features
    monkeypatch.setattr(evaluate, "inception_features",
                        lambda net, images, b, desc: calls.append(desc) or features(net, images,
                                                                                    b, desc))

    def fd(name, *flags, lines=("random-feature FD", "random-feature KD")):
        status, out, err = testing_utils.run_main(evaluate, [
            "--samples", tmp_path / name, "--reference", tmp_path / "real", "--kid_subset_size",
            4, "--kid_subsets", 10, "--cache_dir", tmp_path / "cache", "--inception_weights",
            "random", "--output_dir", tmp_path / "out" / name, *flags], capsys)
        assert status == 0, err
        values = result_lines(out)
        assert sorted(values) == sorted(lines), out
        return values[lines[0]]
    scores = {name: fd(name) for name in ("real", "blur1", "blur3", "noise20", "noise80")}
    assert calls.count("reference features") == 1 and calls.count("sample features") == 5
    assert abs(scores["real"]) < 1e-6 * scores["blur1"]
    assert scores["blur1"] < scores["blur3"] and 0 < scores["noise20"] < scores["noise80"]
    metrics = json.loads((tmp_path / "out" / "noise80" / "metrics.json").read_text())
    assert metrics["random_feature_fd"] == pytest.approx(scores["noise80"], rel=1e-3)
    assert (metrics["num_samples"], metrics["num_reference"], metrics["resolution"]) == \
        (6, 6, "32x32") and "fid" not in metrics
    assert (tmp_path / "out" / "noise80" / "metrics.md").read_text().count("\n") == 3
    with monkeypatch.context() as patch:
        patch.setattr(inception, "FEATURES", 4)                     # 6 images > 4 "features"
        assert fd("noise80") == pytest.approx(scores["noise80"], rel=1e-6)
    assert calls.count("reference features") == 1
    fd("small")                                                     # the reference at 16 x 16
    assert calls.count("reference features") == 2
    weights = tmp_path / "weights.pth"
    torch.save(inception.InceptionV3(seed=1).state_dict(), weights)
    assert fd("real", "--inception_weights", weights, lines=("FID", "KID")) < 1e-6
    assert calls.count("reference features") == 3
    real[0].transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "real" / "00000.png")
    os.utime(tmp_path / "real" / "00000.png", ns=(1, 1))             # a changed file
    assert abs(fd("real")) < 1e-6 * scores["blur1"]                # against the new reference
    assert calls.count("reference features") == 4


def test_a_checkpoint_is_sampled_by_its_own_script_whatever_the_batch(tmp_path, capsys,
                                                                      monkeypatch):
    """A patch_ddpm.py checkpoint is sampled by patch_ddpm.main (ddpm.py would refuse it): the
    same images, hence the same numbers, in batches of 2 and of 4; the record says how. A second
    evaluation of fewer samples into the same folder scores only its own. The reference is the
    landscapes of the checkpoint's seed."""
    tiny = ["--image_size", "16", "--patch_divider", "2", "--base_channels", "8",
            "--channel_mults", "1,2", "--attention_resolutions", "4", "--num_heads", "2",
            "--batch_size", "4", "--procedural_size", "8", "--timesteps", "100",
            "--preview_samples", "2", "--preview_steps", "2", "--cache_dir", tmp_path / "cache",
            "--seed", "3"]
    run_dir = testing_utils.train_run(patch_ddpm, tiny, tmp_path, "run")
    checkpoint = os.path.join(run_dir, "checkpoints", "last.pt")
    calls, sample_main = [], patch_ddpm.main
    monkeypatch.setattr(patch_ddpm, "main", lambda argv: calls.append(argv) or sample_main(argv))
    seeds, load_dataset = [], ddpm.load_dataset           # the landscapes it trained on: seed 3
    monkeypatch.setattr(ddpm, "load_dataset", lambda data, **k: seeds.append(data.seed)
                        or load_dataset(data, **k))
    common = ["--checkpoint", checkpoint, "--inception_weights", "random", "--kid_subset_size",
              3, "--kid_subsets", 4, "--reference_size", 6, "--sampling_steps", 3,
              "--cache_dir", tmp_path / "cache"]
    results = []
    for batch, count, out_dir in ((2, 5, "eval2"), (4, 5, "eval4"), (4, 3, "eval4")):
        status, out, err = testing_utils.run_main(evaluate, common + [
            "--batch_size", batch, "--num_samples", count, "--output_dir", tmp_path / out_dir],
            capsys)
        assert status == 0, err
        images = [np.asarray(Image.open(tmp_path / out_dir / "samples" / f"{i:05d}.png"))
                  for i in range(count)]
        results.append((result_lines(out)["random-feature FD"], images,
                        json.loads((tmp_path / out_dir / "metrics.json").read_text())))
    assert len(calls) == 3 and all(c[:3] == ["--sample", "--checkpoint", checkpoint]
                                   for c in calls)
    (fd2, images2, record), (fd4, images4, _), (_, _, fewer) = results
    assert all(np.array_equal(a, b) for a, b in zip(images2, images4))
    assert fd4 == pytest.approx(fd2, rel=1e-6)
    assert (record["method"], record["sampler"], record["sampling_steps"], record["num_samples"]) \
        == ("patch_ddpm", "ddim", 3, 5)
    assert fewer["num_samples"] == 3
    assert seeds == [3, 3, 3]


@pytest.mark.parametrize("case", ["weights missing", "offline", "empty folder", "too few for KID",
                                  "two sizes", "not a checkpoint", "bad reference"])
def test_user_errors_are_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    """Exit status 2, one line that names what is wrong (a path, a count), and no sampling or
    feature computed first."""
    write_folder(tmp_path / "samples", landscapes(3, 16))
    argv = ["--samples", tmp_path / "samples", "--kid_subset_size", 2, "--cache_dir",
            tmp_path / "cache", "--output_dir", tmp_path / "out", "--inception_weights", "random"]
    named = str(tmp_path / "samples")
    if case == "weights missing":
        argv += ["--inception_weights", tmp_path / "nowhere.pth"]
        named = str(tmp_path / "nowhere.pth")
    elif case == "offline":                                          # the download fails
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.setattr(inception, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
        argv, named = argv[:-2], "http://127.0.0.1:9/pt_inception.pth"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        argv[1] = named = str(tmp_path / "empty")
    elif case == "too few for KID":
        argv += ["--kid_subset_size", 4]
        named = "3 samples"
    elif case == "two sizes":
        landscapes(1, 24)[0].save(tmp_path / "samples" / "odd.png")
        named = str(tmp_path / "samples" / "odd.png")
    elif case == "not a checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        argv[:2] = ["--checkpoint", tmp_path / "bad.pt"]
        named = str(tmp_path / "bad.pt")
    else:
        (tmp_path / "no images").mkdir()
        argv += ["--reference", tmp_path / "no images"]
        named = str(tmp_path / "no images")
    monkeypatch.setattr(evaluate, "inception_features", None)       # never reached
    status, out, err = testing_utils.run_main(evaluate, argv, capsys)
    if case == "offline":                          # the line that says what it downloads first
        download, err = err.split("\n", 1)
        assert named in download
    testing_utils.assert_user_error(EVALUATE, status, err)
    assert named in err


def test_compare_methods_runs_end_to_end_and_never_names_another_number_fid(tmp_path):
    """One method on 8 built-in landscapes: calibrated steps, sampling in a worker process, the
    thumbnail FD of the samples and of real images, and FID "not computed" without weights.
    patchify_ddpm.py's patch size follows the common image size."""
    sys.path.insert(0, os.path.join(testing_utils.ROOT, "bench"))
    import compare_methods
    out = tmp_path / "table.md"
    argv = ["--methods", "ddpm", "--minutes", "0.03", "--image_size", "16", "--procedural_size",
            "8", "--num_samples", "4", "--nfe", "3", "--kid_subset_size", "2", "--batch_size",
            "3", "--inception_weights", "random", "--work_dir", str(tmp_path / "work"), "--out",
            str(out), "--train_flags", "--base_channels 8 --channel_mults 1,2 --batch_size 4 "
            "--num_heads 2 --attention_resolutions 8"]
    assert compare_methods.main(argv) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")]
    ddpm_row, real_row = rows[1], rows[2]
    trained = testing_utils.load(tmp_path / "work" / "ddpm" / "run" / "checkpoints" / "last.pt")
    assert ddpm_row[0] == "| `ddpm.py`" and int(ddpm_row[2]) == trained["step"]
    assert ddpm_row[6] == "ddim x 3"
    assert ddpm_row[9:11] == ["not computed"] * 2 and float(ddpm_row[11].rstrip(" |")) > 0
    assert real_row[0] == "| real images (16x16)" and real_row[9] == "not computed"
    assert float(real_row[11].rstrip(" |")) < float(ddpm_row[11].rstrip(" |"))
    assert len(os.listdir(tmp_path / "work" / "ddpm" / "samples")) == 4 + 1       # and grid.png
    args = argparse.Namespace(image_size="64", dataset_path=None, procedural_size=8, seed=0,
                              preset="quick", work_dir="w", train_flags="")
    assert compare_methods.method_flags("patchify_ddpm", args)[-2:] == ["--patch_size", "4"]

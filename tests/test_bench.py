"""bench/bench_methods.py, bench/bench_kernels.py, bench/compare_peer.py and
bench/patch_diffusion_claims.py and bench/patch_dm_claims.py run end to end, the kernels'
targets are judged correctly, and
compare_peer's and patch_diffusion_claims' metrics are right (no timing is asserted: speed lives
in bench/)."""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_kernels  # noqa: E402
import bench_methods  # noqa: E402
import compare_peer  # noqa: E402
import ddpm  # noqa: E402
import patch_diffusion_claims  # noqa: E402
import patch_dm_claims  # noqa: E402
import patch_diffusion as pd  # noqa: E402
import patch_dm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = bench_methods.Row("tiny", "ddpm", "--image_size 16 --base_channels 32 --channel_mults 1,2 "
                         "--attention_resolutions 8 --batch_size 2")


@pytest.mark.parametrize("phase", ["train", "sample"])
def test_a_measurement_runs_in_a_fresh_process(phase):
    args = bench_methods.parse_args(["--iters", "2", "--warmup", "0", "--sample_iters", "1",
                                     "--sampling_steps", "3"])
    result, error = bench_methods.measure(TINY, phase, "cpu", "torch", args)
    assert error is None
    assert len(result["times_s"]) == (2 if phase == "train" else 1)
    assert all(t > 0 for t in result["times_s"])
    assert result["batch"] == 2 and result["image_size"] == [16, 16]
    assert result["params"] > 0 and result["peak_mib"] >= result["rss_after_imports_mib"] > 0


def test_patch_ddpm_rows_run_the_chunked_backward_and_count_flops():
    """patch_ddpm.py's training_losses are one term per patch chunk, backpropagated one at a time:
    the bench's training step goes through it; the sampling phase counts forward FLOPs."""
    row = bench_methods.Row("tiny-patch", "patch_ddpm", "--image_size 16 --patch_divider 2 "
                            "--patch_batch 1 --base_channels 32 --channel_mults 1,2 "
                            "--attention_resolutions '' --batch_size 2")
    args = bench_methods.parse_args(["--iters", "1", "--warmup", "0", "--sample_iters", "1",
                                     "--sampling_steps", "2"])
    for phase in ("train", "sample"):
        result, error = bench_methods.measure(row, phase, "cpu", "torch", args)
        assert error is None, error
        assert result["peak_mib"] >= result["start_mib"] > 0
    assert result["flops_per_image"] > 0


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        bench_methods.parse_args(["--iters", "0"])
    assert exit_info.value.code == 2


def test_targets_compare_the_named_rows():
    """A target's ratio comes from its two rows: per-image times, memory above start, FLOPs."""
    def res(time_s, batch, start, peak, flops):
        return {"times_s": [time_s], "batch": batch, "start_mib": start, "peak_mib": peak,
                "flops_per_image": flops}
    results = {
        ("patchify-256-p4", "cpu", "torch", "train"): res(1.0, 4, 0, 0, 0),
        ("patchify-256-p4", "cpu", "torch", "sample"): res(1.0, 4, 0, 0, 110.0),
        ("patchify-64-p1", "cpu", "torch", "train"): res(0.5, 2, 0, 0, 0),  # same per image
        ("patchify-64-p1", "cpu", "torch", "sample"): res(1.0, 4, 0, 0, 100.0),
        ("patch-128-n1", "cpu", "torch", "sample"): res(1.0, 8, 300.0, 1300.0, 1.0),
        ("patch-128-n2-k1", "cpu", "torch", "sample"): res(1.0, 8, 300.0, 700.0, 1.0),
    }
    text = bench_methods.targets_table("cpu", "torch", results)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    flops = lines["patchify_ddpm: forward FLOPs per image, P = 4 at 256 vs P = 1 at 64"]
    assert "| 1.1x | <= 1.05x | **missed** |" in flops
    time_line = lines["patchify_ddpm: training step time, P = 4 at 256 vs P = 1 at 64"]
    assert "| 1x | <= 1.15x | met |" in time_line
    memory = lines["patch_ddpm 128x128, K = 1: sampling peak memory above start, N = 2 vs N = 1"]
    assert "| 0.4x | <= 0.35x | **missed** |" in memory
    assert len(lines) == 3                                          # unmeasured targets left out


# ------------------------------------------------------------------------------------------------
# bench/bench_kernels.py


def run_bench_kernels(*argv, interpret):
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"),
                           *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(bench_kernels.DEVICE == "cuda", reason="on a GPU the real benchmark runs")
def test_kernel_bench_smoke_run_takes_every_path(tmp_path):
    """The GPU benchmark's code, run on tiny shapes under the Triton interpreter, so that a script
    error shows up here and not in the first minutes of a borrowed GPU. A CPU measures no CUDA
    memory and the shapes are small, so the memory-per-token and bandwidth targets are not
    reached here; the synthetic test below covers them."""
    out = tmp_path / "kernels.md"
    result = run_bench_kernels("--smoke", "--out", str(out), interpret=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert report == result.stdout.rstrip("\n") + "\n"
    for heading in ("## Group norm + scale/shift + SiLU", "## Attention (non-causal)",
                    "## End to end: ddpm.py training step", "## Targets"):
        assert heading in report
    for impl in ("| triton |", "| eager |", "| torch.compile(eager) |", "| sdpa MATH |",
                 "| naive |", "| torch.compile(naive) |", "| --kernels triton |"):
        assert impl in report, impl
    targets = report.split("## Targets")[1]
    for target in ("GN: speedup vs eager, >= 32x32", "GN: speedup vs eager, 8x8-16x16",
                   "GN: speedup vs torch.compile", "attention: speedup vs SDPA flash",
                   "attention: latency / fastest SDPA backend", "attention: speedup vs naive",
                   "end to end: ddpm.py step"):
        assert target in targets, target


@pytest.mark.skipif(bench_kernels.DEVICE == "cuda", reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv, interpret, phrase", [
    ([], False, "needs a CUDA GPU"),
    (["--smoke"], False, "set TRITON_INTERPRET=1"),
])
def test_kernel_bench_refuses_what_it_cannot_time(argv, interpret, phrase):
    result = run_bench_kernels(*argv, interpret=interpret)
    assert result.returncode == 2 and phrase in result.stderr, result.stderr


def test_kernel_targets_are_judged_from_the_measurements(monkeypatch):
    """Synthetic measurements (ms, MiB) through target_rows: every threshold of the issue, 'met'
    exactly at the bound, and 'missed by' the relative shortfall."""
    gn = {(64, 256, 32, 32): {"triton": (1, 1.0, 0), "eager": (1, 3.0, 0),
                              "torch.compile(eager)": (1, 1.1, 0)},
          (64, 512, 8, 8): {"triton": (1, 1.0, 0), "eager": (1, 1.5, 0),
                            "torch.compile(eager)": (1, 1.2, 0)}}
    flash = (1, 2.0, 0)
    attention = {(64, 4, 256, 64): {"triton": (1, 2.4, 64.0), "sdpa FLASH_ATTENTION": flash,
                                    "sdpa MATH": (1, 9.0, 0), "sdpa CUDNN_ATTENTION": None,
                                    "naive": (1, 9.6, 0)},
                 (4, 4, 4096, 64): {"triton": (1, 2.5, 64.0), "sdpa FLASH_ATTENTION": flash,
                                    "naive": (1, 5.0, 0)}}
    monkeypatch.setattr(bench_kernels, "DTYPE", bench_kernels.DTYPES["bf16"])
    rows = bench_kernels.target_rows(gn, attention, {"torch": 13.0, "triton": 10.0}, 3e12)
    got = {(r[0], r[1]): (r[2], r[4]) for r in rows}
    assert got[("GN: speedup vs eager, >= 32x32", "64, 256, 32, 32")] == ("3.00x", "met")
    assert got[("GN: speedup vs torch.compile", "64, 256, 32, 32")] == ("1.10x", "missed by 8%")
    assert got[("GN: speedup vs eager, 8x8-16x16", "64, 512, 8, 8")] == ("1.50x", "missed by 25%")
    assert got[("GN: speedup vs torch.compile", "64, 512, 8, 8")] == ("1.20x", "met")
    # 64 x 256 x 32 x 32 bf16 = 32 MiB per tensor: not a large shape, so no bandwidth row.
    assert not any(r[0].startswith("GN: fraction of copy bandwidth") for r in rows)
    assert got[("attention: latency / fastest SDPA backend, N <= 256", "64, 4, 256, 64")] == \
        ("1.20x", "met")
    assert got[("attention: speedup vs naive", "64, 4, 256, 64")] == ("4.00x", "met")
    assert got[("attention: speedup vs SDPA flash, N >= 1024, d = 64", "4, 4, 4096, 64")] == \
        ("0.80x", "missed by 20%")
    assert got[("attention: speedup vs naive", "4, 4, 4096, 64")] == ("2.00x", "missed by 33%")
    # Extra MiB per token: 64 / (64*4*256) at N = 256, 64 / (4*4*4096) at 4096: flat, linear.
    assert got[("attention: memory per token, linear in N", "d = 64, N 256 -> 4096")] == \
        ("1.00x", "met")
    assert got[("end to end: ddpm.py step, triton vs torch", "")] == ("1.30x", "met")
    big = {(32, 128, 128, 128): {"triton": (1, 1.0, 0), "eager": (1, 4.0, 0),
                                 "torch.compile(eager)": (1, 2.0, 0)}}
    rows = bench_kernels.target_rows(big, None, None, 2 * 5 * 2**27 / 1e-3)  # 2x what it got
    bandwidth = [r for r in rows if r[0].startswith("GN: fraction of copy bandwidth")]
    assert [(r[2], r[4]) for r in bandwidth] == [("50%", "missed by 33%")]


def test_noise_and_class_scores():
    """Flat images have no high-frequency energy, uniform noise has much; a sample nearest to a
    real image of class c counts c as covered."""
    flat = np.stack([np.full((3, 16, 16), v, np.uint8) for v in (0, 100, 200, 255)])
    noise = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    assert (compare_peer.high_frequency(flat) == 0).all()
    assert (compare_peer.high_frequency(noise) > 0.1).all()
    fd, noisy, covered = compare_peer.score(noise, flat, [0, 0, 1, 1])
    assert noisy == 5 and fd > 0.1 and covered in (1, 2)
    fd, noisy, covered = compare_peer.score(flat[:2], flat, [0, 0, 1, 1])
    assert noisy == 0 and covered == 1


def test_compare_peer_floors_step_times_and_bad_input(tmp_path, capsys, monkeypatch):
    """On the built-in landscapes the table has a held-out floor, of landscapes that no run
    trains on, above the floor drawn from the reference itself and far below noise; --time_only
    times every row; bad input is one line and status 2 before any work."""
    out = tmp_path / "table.md"
    args = compare_peer.parse_args(["--no_peer", "--out", str(out), "--image_size", "16",
                                    "--num_real", "64", "--num_samples", "32"])
    real, labels, _ = compare_peer.real_images(args, str(tmp_path / "work"))
    held_out, landscapes = [], compare_peer.landscapes
    monkeypatch.setattr(compare_peer, "landscapes",
                        lambda a, indices: held_out.append(landscapes(a, indices)[0]) or
                        landscapes(a, indices))
    compare_peer.write_table(args, [], real, labels)
    assert not any((image == real).all((1, 2, 3)).any() for image in held_out[0])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in
             out.read_text().splitlines() if line.startswith(("| real", "| uniform"))]
    fd = {row[0]: float(row[5]) for row in cells}
    assert fd["real images (drawn)"] < fd["real images (held out)"] < 0.2 * fd["uniform noise"]
    capsys.readouterr()
    assert ddpm.parse_args(compare_peer.budget_flags(args)).procedural_size == 64   # as the peer
    assert compare_peer.main(["--no_peer", "--time_only", "--out", str(tmp_path / "steps.md"),
                              "--image_size", "8", "--dim", "8", "--channel_mults", "1",
                              "--batch_size", "2", "--variant", "eps=", "--variant",
                              "v=--prediction v --attention_resolutions ''"]) == 0
    rows = [line for line in (tmp_path / "steps.md").read_text().splitlines()
            if line.startswith(("| eps |", "| v |"))]
    assert len(rows) == 2
    for row in rows:                                                # each row really timed
        assert min(map(float, re.findall(r"\d+\.\d+", row.split("|")[3]))) > 0
    bad = [["--no_peer", "--out", str(tmp_path / "missing" / "t.md")],
           ["--no_peer", "--out", str(tmp_path)], ["--no_peer", "--out", str(out), "--steps", "0"],
           ["--no_peer", "--out", str(out), "--variant", "x=--lr -1"],
           ["--no_peer", "--out", str(out), "--variant", "x=--lr '1"]]
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        bad.append(["--out", str(out)])                             # the peer is missing
    for argv in bad:
        assert compare_peer.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("compare_peer.py: error: ")


def test_compare_peer_ddpm_rows_run_end_to_end(tmp_path):
    """Two ddpm.py rows on a folder of two classes: a table with both rows and the references."""
    from PIL import Image
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "data" / str(c) / f"{i}.png")
    out = tmp_path / "table.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare_peer.py"),
                    "--dataset_path", str(tmp_path / "data"), "--classes", "--no_peer",
                    "--steps", "2", "--batch_size", "2", "--image_size", "16", "--dim", "8",
                    "--channel_mults", "1,2", "--num_samples", "4", "--work_dir",
                    str(tmp_path / "work"), "--out", str(out), "--variant", "eps=",
                    "--variant", "v=--prediction v --schedule sigmoid"], check=True,
                   capture_output=True)
    table = out.read_text()
    for row in ("| eps | (quick preset) | ", "| v | `--prediction v --schedule sigmoid` |",
                "| real images (drawn) |", "| uniform noise |"):
        assert row in table
    assert (tmp_path / "table_v.png").exists()


PD_TINY = ["--image_size", "16", "--batch_size", "2", "--flags", "--base_channels", "16",
           "--channel_mults", "1,2", "--attention_resolutions", "", "--num_heads", "1"]


def test_patch_diffusion_claims_run_end_to_end(tmp_path):
    """The speed table has the three --real_p rows and the three crop sizes; the quality run
    (a few seconds per --real_p, on 8 landscapes) writes its table, curve and grids."""
    speed = tmp_path / "speed.md"
    assert patch_diffusion_claims.main(["speed", "--steps", "1", "--warmup", "0", "--out",
                                        str(speed), *PD_TINY]) == 0
    text = speed.read_text()
    for row in ("| 1.0 |", "| 0.5 |", "| 0.25 |", "R/4 (4x4)", "R/2 (8x8)", "R/1 (16x16)"):
        assert row in text, row
    quality = tmp_path / "quality.md"
    assert patch_diffusion_claims.main(["quality", "--minutes", "0.02", "--every", "0.01",
                                        "--limit", "8", "--held_out", "4", "--out",
                                        str(quality), *PD_TINY]) == 0
    text = quality.read_text()
    assert text.count("| 1.0 | ") == 1 and text.count("| 0.5 | ") == 1 and "| 0.01 |" in text
    for name in ("real_p_1.0", "real_p_0.5", "side_by_side"):
        assert (tmp_path / f"quality_{name}.png").is_file()


def test_patch_dm_claims_run_end_to_end(tmp_path):
    """The memory table measures each size with K and with 0 in its own process; the seams table
    scores a checkpoint's samples and the rendered landscapes, and writes the figure panels."""
    memory = tmp_path / "memory.md"
    assert patch_dm_claims.main(["memory", "--sizes", "32", "--patch_batch", "1", "--out",
                                 str(memory), "--flags", "--patch_size", "16", "--base_channels",
                                 "8", "--channel_mults", "1,2", "--attention_resolutions", "8",
                                 "--num_heads", "1"]) == 0
    rows = [line for line in memory.read_text().splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 2 and all("MiB" in row for row in rows), rows
    run = tmp_path / "run"
    assert patch_dm.main(["--image_size", "16x32", "--patch_size", "8", "--base_channels", "8",
                          "--channel_mults", "1,2", "--attention_resolutions", "4",
                          "--num_heads", "1", "--batch_size", "2", "--procedural_size", "4",
                          "--max_steps", "1", "--latent_steps", "1", "--latent_width", "16",
                          "--latent_layers", "2", "--preview_samples", "1", "--preview_steps",
                          "1", "--output_dir", str(run), "--cache_dir",
                          str(tmp_path / "cache")]) == 0
    seams = tmp_path / "seams.md"
    assert patch_dm_claims.main(["seams", "--checkpoints", str(run / "checkpoints" / "last.pt"),
                                 "--image_size", "16x64", "--num_samples", "2",
                                 "--sampling_steps", "2", "--out", str(seams)]) == 0
    text = seams.read_text()
    assert "| collage:" in text and "| built-in landscapes" in text
    assert (tmp_path / "seams_0.png").is_file() and (tmp_path / "seams_1.png").is_file()


def test_held_out_edm_loss_of_known_denoisers():
    """Images that are all one constant c: D(x; sigma) = c is the best denoiser, loss 0; the
    untrained U-Net (F = 0) gives D = c_skip (c + sigma n), whose loss at each sigma is
    lambda ((c_skip - 1)^2 c^2 + c_skip^2 sigma^2) in expectation over n."""
    c, images = 0.3, torch.full((16, 3, 16, 16), 0.3)

    class Exact(torch.nn.Module):
        def forward(self, z, c_noise):                              # z = c_in x
            sigma = (4 * c_noise).exp()[:, None, None, None]
            c_skip, c_out, c_in, _ = pd.edm_precondition(sigma)
            return (c - c_skip * z / c_in) / c_out                  # F such that D = c

    per_sigma, training = patch_diffusion_claims.edm_losses(Exact(), images, 0)
    assert max(per_sigma) < 1e-6 and training < 1e-6
    class Zero(torch.nn.Module):
        def forward(self, z, c_noise):
            return torch.zeros_like(z)

    per_sigma, _ = patch_diffusion_claims.edm_losses(Zero(), images, 0)
    for sigma, loss in zip(patch_diffusion_claims.SIGMAS, per_sigma):
        c_skip = 0.25 / (sigma ** 2 + 0.25)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        expected = weight * ((c_skip - 1) ** 2 * c ** 2 + c_skip ** 2 * sigma ** 2)
        assert loss == pytest.approx(expected, rel=0.05), sigma

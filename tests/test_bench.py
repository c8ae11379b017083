"""bench/bench_methods.py runs end to end (no timing is asserted: speed lives in bench/)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_methods  # noqa: E402

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
    """patch_ddpm.py's training_loss runs the backward pass itself (one patch chunk at a time):
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

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


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        bench_methods.parse_args(["--iters", "0"])
    assert exit_info.value.code == 2

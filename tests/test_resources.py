"""Peak memory per stage instance: scoped to the measured work, kept per shard, summed up for the manifest."""

from __future__ import annotations

import numpy as np

from fuse import resources


def test_peak_is_the_measured_work_not_the_process_lifetime(tmp_path):
    with resources.measure() as big:
        block = np.ones(400 * 2**20 // 8)  # 400 MB touched
        del block
    with resources.measure() as small:
        np.ones(1000).sum()
    assert big["host_rss_scope"] == "stage"  # Linux: VmHWM reset per measured block
    assert big["host_rss_peak_mb"] > small["host_rss_peak_mb"] + 300


def test_shards_are_recorded_and_summed_up(tmp_path):
    for shard, size in ((0, 1), (2, 300)):
        with resources.recorded(tmp_path, shard):
            np.ones(size * 2**20 // 8).sum()
    peaks = resources.summary(tmp_path, 3)
    one = [resources.summary(tmp_path, 1)["host_rss_peak_mb"]]
    assert peaks["shards_measured"] == 2 and peaks["host_rss_peak_mb"] > one[0] + 200
    assert resources.summary(tmp_path / "none", 3) is None
    assert resources.describe({"host_rss_peak_mb": 1536.0, "gpu_peak_mb": 10240.0}) == "RSS 1.5G GPU 10.0G"
    assert resources.describe(None) == ""

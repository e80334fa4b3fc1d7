"""Peak memory per stage instance: scoped to the measured work, kept per shard, summed up for the manifest."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

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


HEAP_PROBE = """
import ctypes
import sys
from pathlib import Path

import torch

from fuse.resources import return_freed_memory, set_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]

def rss_mb():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
# glibc's thresholds where a long run leaves them: freeing mapped blocks raised the mmap threshold to its 32 MiB cap,
# and the trim threshold with it to twice that
libc.mallopt(-3, 32 << 20)
libc.mallopt(-1, 64 << 20)
returned = {"on": return_freed_memory, "keep": lambda: return_freed_memory() and set_allocator(False)}.get(sys.argv[1], lambda: None)()
base, mapped = rss_mb(), libc.mallinfo2().hblkhd
blocks, pins = [], []
for _ in range(100):  # 100 layer-sized tensors (4 MiB), each followed by a small live one
    blocks.append(torch.ones(1 << 20))
    pins.append(torch.ones(256))
mapped = (libc.mallinfo2().hblkhd - mapped) >> 20
del blocks
print(returned, mapped, round(rss_mb() - base))
"""


def heap_probe(mode: str, **env: str) -> tuple[str, int, int]:
    import os
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | env,
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_freed_tensors_go_back_to_the_os():
    """With glibc's threshold risen (as in a training), 400 MB of 4 MiB tensors come from the heap, where freed
    memory stays with the allocator (resident or not depends on the heap's layout); after return_freed_memory each
    is mapped on its own and unmapped when freed. A user's own glibc setting is left alone."""
    returned, mapped, _ = heap_probe("off")
    assert returned == "None" and mapped == 0
    returned, mapped, kept = heap_probe("on")
    assert returned == "True" and mapped >= 399 and kept < 50
    assert heap_probe("on", MALLOC_MMAP_THRESHOLD_="33554432")[0] == "False"
    # a stage that is not a training one: glibc's ceiling again, after a training stage lowered it
    returned, mapped, _ = heap_probe("keep")
    assert returned == "True" and mapped == 0


def test_training_stages_return_freed_memory_and_the_others_do_not():
    from fuse.executor import returns_freed_memory
    from fuse.stage_table import STAGE_TABLE

    assert {s for s in STAGE_TABLE if returns_freed_memory(s)} == {"distill", "fpo"}
    assert returns_freed_memory("a_stage_of_a_plugin")

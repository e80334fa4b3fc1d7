"""Peak memory of each stage instance — host RSS of the process running it (and of the children it waited for),
GPU memory where there is one — recorded per shard and summed up into the manifest, so that users size SLURM
`--mem` and GPUs from a measured run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuse.io import read_json, write_json_atomic

FOLDER = (
    "resources"  # <stage dir>/resources/shard-00003.json: one writer per file (array tasks run in parallel)
)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks from this size up are mapped on their own and unmapped when freed.
MMAP_THRESHOLD = 128 * 1024
# glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): where a long run leaves it
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@functools.cache
def _tunable_libc() -> Any:
    """glibc, when fuse may set its thresholds: Linux with glibc, and the user has not set them (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_) or preloaded another allocator (LD_PRELOAD); else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def set_allocator(return_freed: bool) -> bool:
    """How freed host memory is handled from now on in this process (Linux with glibc; False where it is left alone).

    return_freed: freed tensors go back to the OS. glibc raises its mmap threshold each time a mapped block is freed,
    up to 32 MiB, so a training's layer-sized tensors end up in the heap, where freed memory stays resident: measured
    on a gemma-3-270m fpo step, 1.4 GB of the peak (bench/results/train_memory.md). A fixed 128 KiB threshold keeps
    every block of that size and more mapped on its own. The price is the kernel's page faults on every such block:
    measured on the real pair's SFT-only stage (gemma-3 pivot, 8 steps), 9.50 s a step and a 5.48 GB peak against
    8.23 s and 5.87 GB with glibc's own behaviour (+15% time); on evaluating SmolLM2-135M (generation, held-out CE,
    preference margins) 149 s against 123 s (+21%).
    Else: glibc's threshold fixed at its own ceiling (32 MiB), where its dynamic threshold ends up in a long run,
    so a stage after a training one runs at glibc's speed again (a set threshold cannot be made dynamic again).
    Left alone where the user set glibc's MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (to keep glibc's own
    behaviour: MALLOC_MMAP_THRESHOLD_=33554432), or preloads another allocator (LD_PRELOAD)."""
    libc = _tunable_libc()
    if libc is None:
        return False
    threshold = MMAP_THRESHOLD if return_freed else GLIBC_MMAP_THRESHOLD_MAX
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)
    )


def return_freed_memory() -> bool:
    """Freed tensors go back to the OS from now on (set_allocator(True)): training stages and ranks."""
    return set_allocator(True)


def _reset_host_peak() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak is this shard's, not the process's whole life
    (the local executor runs every stage in one process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _host_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / scale


def _children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _cuda() -> Any:
    torch = sys.modules.get("torch")  # only if the stage imported it: never pay torch's import for this
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@contextlib.contextmanager
def measure(return_freed: bool = True) -> Iterator[dict[str, Any]]:
    """Measure the peaks of the enclosed work, with freed memory returned to the OS or not (set_allocator); the dict
    is filled on leaving (also after an error)."""
    peaks: dict[str, Any] = {}
    set_allocator(return_freed)
    scoped = _reset_host_peak()
    children_before = _children_peak_mb()
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    try:
        yield peaks
    finally:
        peaks["host_rss_peak_mb"] = round(_host_peak_mb(), 1)
        peaks["host_rss_scope"] = "stage" if scoped else "process lifetime"
        children = _children_peak_mb()
        if children > children_before:  # a child of this stage set a new high (training launchers)
            peaks["children_rss_peak_mb"] = round(children, 1)
        cuda = cuda or _cuda()
        if cuda is not None:
            peaks["gpu_peak_mb"] = round(
                max(cuda.max_memory_allocated(d) for d in range(cuda.device_count())) / 2**20, 1
            )


@contextlib.contextmanager
def recorded(stage_dir: Path, shard: int, return_freed: bool = True) -> Iterator[None]:
    """Measure the enclosed shard's work and keep its peaks in <stage dir>/resources/. return_freed: see
    set_allocator (the executor asks it for training stages, whose peaks it bounds, and not for the others, whose
    time it costs)."""
    with measure(return_freed) as peaks:
        yield
    write_json_atomic(stage_dir / FOLDER / f"shard-{shard:05d}.json", peaks)


def summary(stage_dir: Path, num_shards: int) -> dict[str, Any] | None:
    """The largest peaks over the instance's shards (what one job of it needs), or None when none was measured."""
    files = [stage_dir / FOLDER / f"shard-{i:05d}.json" for i in range(num_shards)]
    found = [read_json(f) for f in files if f.is_file()]
    if not found:
        return None
    keys = ("host_rss_peak_mb", "children_rss_peak_mb", "gpu_peak_mb")
    peaks = {k: max(p[k] for p in found if k in p) for k in keys if any(k in p for p in found)}
    return peaks | {"shards_measured": len(found)}


def host_peak_gb(peaks: dict[str, Any] | None) -> float:
    """The host memory a job needed: the larger of its own peak RSS and its children's (training launchers), GB."""
    peaks = peaks or {}
    return max(peaks.get("host_rss_peak_mb", 0.0), peaks.get("children_rss_peak_mb", 0.0)) / 1024


def describe(peaks: dict[str, Any] | None) -> str:
    """'RSS 1.5G GPU 10.2G' for status tables; '' when unmeasured."""
    if not peaks:
        return ""
    text = f"RSS {host_peak_gb(peaks):.1f}G"
    if "gpu_peak_mb" in peaks:
        text += f" GPU {peaks['gpu_peak_mb'] / 1024:.1f}G"
    return text

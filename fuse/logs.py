"""Console logging for fuse's entry points (`fuse`, `python -m fuse.zoo`, a training rank, the bench scripts), and
the tail of a log file that `fuse logs` prints.

One function so that every process configures the root logger the same way: stderr, once per process.
"""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TAIL_BLOCK = 1 << 16  # bytes read at a time, from the end backwards
# at most this much is read per line asked for: a progress bar's \r-separated "line" can be the whole log
TAIL_BYTES_PER_LINE = 1 << 16


def setup_logging(level: int = logging.INFO, fmt: str | logging.Formatter = LOG_FORMAT) -> None:
    """Log records at `level` and above to stderr, formatted by `fmt` (a format string or a Formatter).

    Like logging.basicConfig, it does nothing where the root logger already has handlers: a test's log capture
    or a program embedding fuse keeps its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(fmt if isinstance(fmt, logging.Formatter) else logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


def tail_lines(handle: BinaryIO, count: int) -> list[str]:
    """The last `count` lines of a binary file, read backwards block by block from its end: memory and reading are
    bounded by the lines asked for (and TAIL_BYTES_PER_LINE each), not by the size of the log."""
    if count <= 0:
        return []
    budget = count * TAIL_BYTES_PER_LINE
    end = handle.seek(0, os.SEEK_END)
    start, blocks, newlines = end, [], 0
    while start > 0 and newlines <= count and end - start < budget:
        size = min(TAIL_BLOCK, start, budget - (end - start))
        start -= size
        handle.seek(start)
        block = handle.read(size)
        blocks.append(block)
        newlines += block.count(b"\n")
    lines = b"".join(reversed(blocks)).decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:] if newlines > count else ["…" + lines[0], *lines[1:]]
    return lines[-count:]

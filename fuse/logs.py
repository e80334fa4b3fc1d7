"""Console logging for fuse's entry points (`fuse`, `python -m fuse.zoo`, a training rank, the bench scripts).

One function so that every process configures the root logger the same way: stderr, once per process.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, fmt: str | logging.Formatter = LOG_FORMAT) -> None:
    """Log records at `level` and above to stderr, formatted by `fmt` (a format string or a Formatter).

    Like logging.basicConfig, it does nothing where the root logger already has handlers: a test's log capture
    or a program embedding fuse keeps its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(fmt if isinstance(fmt, logging.Formatter) else logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])

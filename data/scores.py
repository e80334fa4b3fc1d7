"""The score table: what the score stage writes per shard (one row per preference pair, each side's summed
log-prob, token and byte count and truncation flag under one model) and how fpo reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# the score table's schema (fuse.preference reads it through these names)
COLUMNS = (
    "id",
    "chosen_logp",
    "chosen_tokens",
    "chosen_bytes",
    "chosen_truncated",
    "rejected_logp",
    "rejected_tokens",
    "rejected_bytes",
    "rejected_truncated",
)
SCORE_COLUMNS = COLUMNS[1:]  # less the id


class ScoreError(ValueError):
    """Score tables that cannot serve as a reference: missing rows, missing columns, non-finite values."""


def scores_name(shard: int) -> str:
    return f"scores-{shard:05d}.parquet"


def load_table(score_out: str | Path) -> Any:
    """All shards of a finished score stage's output as one pyarrow table (the files its report.json lists)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(score_out)
    files = json.loads((root / "report.json").read_text(encoding="utf-8"))["files"]
    return pa.concat_tables([pq.read_table(root / name) for name in files])


def read_scores(score_out: str | Path, model: str) -> dict[str, np.ndarray]:
    """A score stage's out/ folder as arrays {id, chosen_logp, ...}: the files its report.json lists (written once
    every shard is done), else every parquet file under it."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(score_out)
    report = root / "report.json"
    if report.is_file():
        files = [root / name for name in json.loads(report.read_text(encoding="utf-8"))["files"]]
    else:
        files = sorted(root.rglob("*.parquet"))
    if not files:
        raise ScoreError(f"score.{model}: no parquet files under {score_out}")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    missing = [c for c in ("id", *SCORE_COLUMNS) if c not in table.column_names]
    if missing:
        raise ScoreError(f"score.{model}: {files[0]} has no column(s) {', '.join(missing)}")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("id", *SCORE_COLUMNS)}

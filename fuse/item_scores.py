"""Every evaluated model's score on every item (held-out response, text, skill item, lm-eval sample), as one long
table in `scores.parquet` beside evaluate's metrics: what paired comparisons and seed aggregation are computed from.

One row per (model, item, metric): `kind` (domain / text / skill / preference / lm_eval), `group` (the domain, skill
or task; a preference pair's skill),
`item` (its index in the evaluation's own order, the same for every model), `value` and `bytes` (the UTF-8 bytes a
summed NLL is divided by; 0 where the metric is a mean). pandas/datasets load it as it is.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuse.io import write_bytes_atomic

FILE = "scores.parquet"
COLUMNS = ("model", "kind", "group", "item", "metric", "value", "bytes")


@dataclass(frozen=True)
class Column:
    """A table column computed from items: a ratio of summed values over summed bytes (CE/byte) or a mean."""

    kind: str
    group: str
    metric: str

    @property
    def label(self) -> str:
        """The column's name in evaluate's table (fuse.evaluation.markdown_table)."""
        if self.kind == "domain":
            return f"CE {self.group}"
        if self.kind == "text":
            return "CE/byte"
        if self.kind == "lm_eval":
            return f"{self.group} {self.metric}"
        if self.kind == "preference":
            return f"pref {self.group}"
        return self.group

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "nll"


def model_rows(
    name: str, per_item: Mapping[str, Any], skills: Sequence[str], domains: Sequence[str]
) -> list[tuple]:
    """One model's rows. `skills` / `domains`: the skill of each evaluation item and the domain of each held-out
    response, in evaluation order (per_item holds only the scores)."""
    rows: list[tuple] = []
    for index, correct in enumerate(per_item.get("skill", [])):
        rows.append((name, "skill", skills[index], index, "correct", float(correct), 0))
    for kind, groups in (("text", None), ("domain", domains)):
        scores = per_item.get(kind)
        for index, (nll, size) in enumerate(
            zip(scores["nll"], scores["bytes"], strict=True) if scores else ()
        ):
            rows.append(
                (name, kind, groups[index] if groups else "text", index, "nll", float(nll), int(size))
            )
    preference = per_item.get("preference")
    for index, (margin, group) in enumerate(
        zip(preference["margin"], preference["group"], strict=True) if preference else ()
    ):
        rows.append((name, "preference", group, index, "correct", float(margin > 0), 0))
    for task, metrics in per_item.get("lm_eval", {}).items():
        for metric, values in metrics.items():
            rows += [(name, "lm_eval", task, i, metric, float(v), 0) for i, v in enumerate(values)]
    return rows


def scores_table(
    results: Mapping[str, Mapping[str, Any]], skills: Sequence[str], domains: Sequence[str], key: str
) -> Any:
    """The long table (a pyarrow Table) of every model's per-item scores, found under `results[model][key]`."""
    import pyarrow as pa

    rows = [
        row
        for name, result in results.items()
        for row in model_rows(name, result.get(key, {}), skills, domains)
    ]
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in COLUMNS]
    types = [pa.string(), pa.string(), pa.string(), pa.int64(), pa.string(), pa.float64(), pa.int64()]
    return pa.table(
        {name: pa.array(values, type) for name, values, type in zip(COLUMNS, columns, types, strict=True)}
    )


def write_scores(path: str | Path, table: Any) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())


def read_scores(path: str | Path) -> Any:
    """The table as a pandas DataFrame."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def columns_of(frame: Any) -> list[Column]:
    """Every column the table can compute, in a stable order (skills, text, domains, lm-eval)."""
    order = {"skill": 0, "preference": 1, "text": 2, "domain": 3, "lm_eval": 4}
    keys = frame[["kind", "group", "metric"]].drop_duplicates().itertuples(index=False)
    return sorted((Column(*key) for key in keys), key=lambda c: (order.get(c.kind, 9), c.group, c.metric))


def item_values(frame: Any, model: str, column: Column) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, bytes or None) of one model on one column's items, in item order: pairable across models."""
    rows = frame[
        (frame["model"] == model)
        & (frame["kind"] == column.kind)
        & (frame["group"] == column.group)
        & (frame["metric"] == column.metric)
    ].sort_values("item")
    values = rows["value"].to_numpy(dtype=np.float64)
    return values, rows["bytes"].to_numpy(dtype=np.float64) if column.metric == "nll" else None


def column_value(frame: Any, model: str, column: Column) -> float | None:
    """The column's aggregate for one model (CE/byte = summed NLL / summed bytes; else the mean)."""
    values, size = item_values(frame, model, column)
    if not len(values):
        return None
    return float(values.sum() / size.sum()) if size is not None else float(values.mean())

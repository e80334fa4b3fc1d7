"""Merge diagnostics: are the targets mergeable, and how much of each target's learning reached the merge?

Per tensor the engine records a few sums (the Gram matrix of the deltas, the merged delta's dot product with
each delta, squared norms); the report adds them up per tensor family and turns them into delta norms, pairwise
cosine similarities and the share of each target's delta energy that survives into the merged delta:

    share_i = ⟨Δ_merged, Δ_i⟩ / ‖Δ_i‖²

i.e. the coefficient of the projection of the merged delta onto Δ_i. 1 = Δ_i came through whole (one target, or
identical targets); 1/n = a uniform average of n mutually orthogonal deltas; ≤ 0 = the merge undid it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch

FAMILIES = ("attention", "mlp", "embeddings/head", "norms/other")

# Checked in this order: "post_attention_layernorm" is a norm, "lm_head" is not an MLP.
_FAMILY_PATTERNS = (
    ("embeddings/head", re.compile(r"embed|\bwte\b|\bwpe\b|lm_head|^output\.weight$")),
    ("norms/other", re.compile(r"norm|\bln_|\bln\d|layernorm")),
    ("attention", re.compile(r"attn|attention|\b[qkvo]_proj\b|\bquery\b|\bkey\b|\bvalue\b")),
    ("mlp", re.compile(r"mlp|feed_forward|ffn|\b(gate|up|down)_proj\b|\bc_fc\b|\bfc\d\b|experts")),
)


def tensor_family(name: str) -> str:
    """The family a tensor name belongs to (attention, mlp, embeddings/head, norms/other)."""
    for family, pattern in _FAMILY_PATTERNS:
        if pattern.search(name):
            return family
    return "norms/other"


def delta_gram(deltas: torch.Tensor) -> list[list[float]]:
    """⟨Δ_i, Δ_j⟩ for every pair of the stacked deltas [n, …], taken before a method overwrites them."""
    flat = deltas.reshape(deltas.shape[0], -1)
    return (flat @ flat.T).double().tolist()


def squared_norm(tensor: torch.Tensor, chunk: int = 1 << 22) -> float:
    """‖t‖² summed in float64, a chunk at a time (no float64 copy of a 7B model's embedding matrix)."""
    flat = tensor.reshape(-1)
    return sum(float(part.square().sum(dtype=torch.float64)) for part in flat.split(chunk))


def tensor_record(
    name: str, base: torch.Tensor, gram: list[list[float]], merged_delta: torch.Tensor, dots: list[float]
) -> dict[str, Any]:
    """What one tensor contributes to the report (small: n² + n + 3 numbers)."""
    return {
        "family": tensor_family(name),
        "gram": gram,
        "merged_dot": dots,
        "merged_sq": squared_norm(merged_delta),
        "base_sq": squared_norm(base),
    }


def _add(total: dict[str, Any], record: dict[str, Any], n: int) -> None:
    for i in range(n):
        total["merged_dot"][i] += record["merged_dot"][i]
        for j in range(n):
            total["gram"][i][j] += record["gram"][i][j]
    total["merged_sq"] += record["merged_sq"]
    total["base_sq"] += record["base_sq"]
    total["numel"] += record.get("numel", 0)


def _empty(n: int) -> dict[str, Any]:
    return {
        "gram": [[0.0] * n for _ in range(n)],
        "merged_dot": [0.0] * n,
        "merged_sq": 0.0,
        "base_sq": 0.0,
        "numel": 0,
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _group(total: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Norms, cosines and surviving energy shares from one family's summed records."""
    gram, n = total["gram"], len(labels)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    cosine = {
        f"{labels[i]}~{labels[j]}": _ratio(gram[i][j], norms[i] * norms[j])
        for i in range(n)
        for j in range(i + 1, n)
    }
    return {
        "numel": total["numel"],
        "delta_norm": dict(zip(labels, norms, strict=True)),
        "relative_delta_norm": {
            label: _ratio(norm, math.sqrt(total["base_sq"]))
            for label, norm in zip(labels, norms, strict=True)
        },
        "cosine": cosine,
        "energy_share": {labels[i]: _ratio(total["merged_dot"][i], gram[i][i]) for i in range(n)},
        "merged_delta_norm": math.sqrt(total["merged_sq"]),
    }


def _weights_summary(records: Iterable[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per target and family: element-weighted mean, min and max of the per-tensor weights a method computed."""
    out: dict[str, Any] = {}
    for family in ("all", *FAMILIES):
        rows = [r for r in records if r.get("weights") and (family == "all" or r.get("family") == family)]
        if not rows:
            continue
        total = sum(r["numel"] for r in rows) or 1
        out[family] = {
            label: {
                "mean": sum(r["weights"][i] * r["numel"] for r in rows) / total,
                "min": min(r["weights"][i] for r in rows),
                "max": max(r["weights"][i] for r in rows),
            }
            for i, label in enumerate(labels)
        }
    return out


def summarize(stats: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The diagnostics section of the merge report from the per-tensor records."""
    n = len(labels)
    records = [s for s in stats.values() if "gram" in s]
    totals = {family: _empty(n) for family in ("all", *FAMILIES)}
    for record in records:
        _add(totals["all"], record, n)
        _add(totals[record["family"]], record, n)
    families = {f: _group(t, labels) for f, t in totals.items() if t["numel"] or f == "all"}
    return {
        "targets": labels,
        "families": families,
        "weights": _weights_summary(records, labels),
        "verdict": verdict(families, labels),
    }


# Below this mean pairwise cosine a family's deltas are called "far apart": a uniform average of n deltas with
# pairwise cosine c keeps (1 + (n − 1)·c)/n of each one's energy, i.e. under 75% of it for two targets.
FAR_APART = 0.5


def verdict(families: dict[str, Any], labels: list[str]) -> list[str]:
    """Plain sentences a user can act on: families whose deltas are far apart, targets the merge mostly dropped."""
    if len(labels) == 1:
        return ["One target: it is the merge (copied unchanged), so all of its learning is kept."]
    lines = []
    for family in (f for f in FAMILIES if f in families):
        cosines = [c for c in families[family]["cosine"].values() if c is not None]
        shares = [v for v in families[family]["energy_share"].values() if v is not None]
        if cosines and shares and sum(cosines) / len(cosines) < FAR_APART:
            lines.append(
                f"{family}: the targets' deltas are far apart (mean cosine {sum(cosines) / len(cosines):.2f}); "
                f"the merge keeps {min(shares):.0%}–{max(shares):.0%} of each target's delta energy there, so "
                "skills stored in these tensors may not survive the merge."
            )
    for label, share in families["all"]["energy_share"].items():
        if share is not None and share < 0.5:
            lines.append(f"{label}: only {share:.0%} of its delta energy survives in the merged delta.")
    return lines or [f"The targets' deltas point the same way (mean cosine ≥ {FAR_APART} in every family)."]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def diagnostics_markdown(diagnostics: dict[str, Any]) -> str:
    """Tables: per target norms and surviving energy per family, pairwise cosines per family, weights."""
    labels, families = diagnostics["targets"], diagnostics["families"]
    names = [f for f in ("all", *FAMILIES) if f in families]
    lines = ["## Diagnostics", "", *(f"- {line}" for line in diagnostics["verdict"]), ""]
    lines += [
        "Delta norm ‖Δ‖ (relative to ‖θ_base‖) and the share of its energy surviving in the merged delta, "
        "⟨Δ_merged, Δ⟩ / ‖Δ‖², per tensor family:",
        "",
        "| target | "
        + " | ".join(f"‖Δ‖ {f}" for f in names)
        + " | "
        + " | ".join(f"kept {f}" for f in names)
        + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for label in labels:
        norms = [
            f"{families[f]['delta_norm'][label]:.3g} ({_fmt(families[f]['relative_delta_norm'][label], '.1e')})"
            for f in names
        ]
        shares = [_fmt(families[f]["energy_share"][label], ".2f") for f in names]
        lines.append(f"| {label} | " + " | ".join(norms + shares) + " |")
    pairs = list(families["all"]["cosine"])
    if pairs:
        lines += ["", "Cosine similarity of the targets' deltas:", ""]
        lines += ["| pair | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        lines += [
            f"| {pair.replace('~', ' · ')} | "
            + " | ".join(_fmt(families[f]["cosine"][pair]) for f in names)
            + " |"
            for pair in pairs
        ]
    weights = diagnostics.get("weights") or {}
    if weights:
        lines += [
            "",
            "Per-tensor weights the method computed (element-weighted mean [min, max] over tensors):",
            "",
        ]
        wnames = [f for f in ("all", *FAMILIES) if f in weights]
        lines += ["| target | " + " | ".join(wnames) + " |", "|---" * (1 + len(wnames)) + "|"]
        for label in labels:
            cells = [
                f"{weights[f][label]['mean']:.3f} [{weights[f][label]['min']:.3f}, {weights[f][label]['max']:.3f}]"
                for f in wnames
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

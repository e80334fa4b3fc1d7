"""score: for every preference pair, the summed log-prob, token count and byte count of the chosen and of the
rejected response under one model's own tokenizer and chat template (the input to InfiFPO), one parquet per shard.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import concatenate_datasets

from fuse.backends import make_backend, track_batches
from fuse.context import StageContext
from fuse.data.chat import ChatRenderError, render_chat, response_mask, truncate
from fuse.data.prepared import load_split
from fuse.data.scores import COLUMNS, scores_name
from fuse.io import atomic_write, read_json, write_json_atomic
from fuse.models import load_tokenizer

CHUNK_PAIRS = 256
SPLITS = ("train", "heldout")  # held-out pairs are scored so fpo's held-out metrics use the fused reference

log = logging.getLogger(__name__)


def scored_spec(ctx: StageContext) -> Any:
    """score.<model>: that recipe model. score.target-<s> / score.merged: the model its `model` input made, which
    inherits the pivot's settings (chat template override, remote code) since it was trained from the pivot."""
    if ctx.has_input("model"):
        return ctx.made_model_spec(ctx.made_model("model"), ctx.instance.key)
    return ctx.model_spec(ctx.instance.key)


def response_sum(chat: Any, logprobs: Any) -> float:
    """Sum of the realized log-probs over the response's tokens (row t predicts token t+1)."""
    return float(np.sum(logprobs.target_logprobs[chat.mask[1:]], dtype=np.float64))


def render_pair_side(
    tokenizer: Any, row: dict, side: str, max_length: int, counts: Counter, vocab_size: int | None = None
) -> Any:
    """The prompt + one response, masked on that response's content (and its end-of-turn token) only."""
    messages = [*row["prompt"], {"role": "assistant", "content": row[side]}]
    chat = render_chat(tokenizer, messages, where=f"pair {row['id']} ({side}): ", vocab_size=vocab_size)
    chat.mask = response_mask(chat.offsets, chat.spans[-1:])
    if chat.num_tokens > max_length:
        chat = truncate(chat, max_length)
        counts[f"{side} truncated"] += 1
    return chat


def scored_bytes(row: dict, side: str, chat: Any) -> int:
    """b(y): the response's UTF-8 size, the same for every model; for a truncated side, the bytes of the part that
    was scored (its log-prob covers no more), and fpo refuses the pair."""
    if not chat.truncated:
        return len(row[side].encode())
    span = chat.spans[-1] if chat.spans and chat.spans[-1].role == "assistant" else None
    return len(chat.text[span.start : span.end].encode()) if span is not None else 0


def renderable_pairs(
    tokenizer: Any, rows: list[dict], max_length: int, counts: Counter, vocab_size: int | None
) -> list[tuple[dict, list]]:
    """(row, [chosen chat, rejected chat]) for each pair both sides of which render; bad pairs counted, skipped."""
    kept = []
    for row in rows:
        try:
            chats = [
                render_pair_side(tokenizer, row, side, max_length, counts, vocab_size)
                for side in ("chosen", "rejected")
            ]
        except ChatRenderError as error:
            counts[f"skipped: {error.reason}"] += 1
            log.warning("%s", error)
            continue
        kept.append((row, chats))
    return kept


def score_rows(
    backend: Any,
    tokenizer: Any,
    rows: list[dict],
    max_length: int,
    counts: Counter,
    vocab_size: int | None = None,
) -> list[dict]:
    """Each pair's two response log-probs. A backend with `pair_sums` (transformers) scores a pair in one packed
    forward, its prompt and shared response tokens once; the others, and a pair it cannot pack, go through
    `logprobs` as two sequences."""
    pairs = renderable_pairs(tokenizer, rows, max_length, counts, vocab_size)
    packed = getattr(backend, "pair_sums", None)
    sums = [packed(*((c.input_ids, c.mask) for c in chats)) if packed else None for _, chats in pairs]
    apart = [i for i, s in enumerate(sums) if s is None]
    results = backend.logprobs([c.input_ids for i in apart for c in pairs[i][1]], 1) if apart else []
    for k, i in enumerate(apart):
        sums[i] = [response_sum(chat, results[2 * k + j]) for j, chat in enumerate(pairs[i][1])]
    scored = []
    for i, (row, chats) in enumerate(pairs):
        record: dict[str, Any] = {"id": row["id"]}
        for j, side in enumerate(("chosen", "rejected")):
            logp, tokens = sums[i][j], int(chats[j].mask[1:].sum())
            record |= {
                f"{side}_logp": logp,
                f"{side}_tokens": tokens,
                f"{side}_bytes": scored_bytes(row, side, chats[j]),
                f"{side}_truncated": bool(chats[j].truncated),
            }
        scored.append(record)
    return scored


def preference_rows(prepare_out: Any) -> Any:
    """The train pairs, then the held-out ones (when prepare made that split), as one dataset to shard."""
    parts = []
    for split in SPLITS:
        try:
            part = load_split(prepare_out, "preference", split)
        except FileNotFoundError:
            if split == "train":
                raise
            continue
        if len(part) or not parts:
            parts.append(part)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def run(ctx: StageContext) -> None:
    settings = ctx.settings  # stages.score.models.<name> over the stage's
    spec = scored_spec(ctx)
    tokenizer = load_tokenizer(spec, require_chat_template=True)
    dataset = preference_rows(ctx.input("data"))
    indices = ctx.shard_range(len(dataset))
    backend = make_backend(settings.backend, spec, settings, str(ctx.dir / "scratch"))
    max_length = min(settings.max_length, backend.max_length)
    counts: Counter = Counter()
    records: list[dict] = []
    # items: sequences (two per pair), as the backend reports them
    label = f"{ctx.instance.name} shard {ctx.shard or 0}"
    progress = track_batches(backend, label, 2 * len(indices), "sequences", ctx.log, ctx.progress)
    try:
        for start in range(indices.start, indices.stop, CHUNK_PAIRS):
            batch = dataset[start : min(start + CHUNK_PAIRS, indices.stop)]
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            records += score_rows(backend, tokenizer, rows, max_length, counts, backend.vocab_size)
            progress.chunk_done(2 * len(rows), [0] * (2 * len(rows)))
    finally:
        backend.close()
    write_scores(ctx, records, dict(counts))


def write_scores(ctx: StageContext, records: list[dict], counts: dict[str, int]) -> None:
    shard = ctx.shard or 0
    table = pa.table({name: [r[name] for r in records] for name in COLUMNS})
    with atomic_write(ctx.out / scores_name(shard)) as handle:
        pq.write_table(table, handle)
    write_json_atomic(ctx.out / f"report-{shard:05d}.json", {"pairs": len(records), "counts": counts})


def finalize(ctx: StageContext) -> None:
    """report.json: pairs and truncations over all shards, and the list of score files."""
    totals: Counter = Counter()
    pairs = 0
    for shard in range(ctx.num_shards):
        part = read_json(ctx.out / f"report-{shard:05d}.json")
        pairs += part["pairs"]
        totals.update(part["counts"])
    files = [scores_name(shard) for shard in range(ctx.num_shards)]
    write_json_atomic(
        ctx.out / "report.json",
        {"model": ctx.instance.key, "pairs": pairs, "counts": dict(totals), "files": files},
    )

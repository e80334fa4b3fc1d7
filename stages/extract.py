"""extract: for every prepared SFT sample, one model's top-K next-token log-probs in its own tokenization and
chat template (or the pivot's), with content spans and the response mask, as one log-prob store shard per shard.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from fuse.backends import make_backend, track_batches
from fuse.context import StageContext
from fuse.data.chat import ChatRenderError, render_chat, truncate
from fuse.data.logprobs import LogprobWriter, SampleLogprobs, shard_name, write_index
from fuse.data.prepared import load_split
from fuse.io import read_json, write_json_atomic
from fuse.models import check_tokenizer_fits, identity, load_tokenizer

CHUNK_ROWS = 256  # rows rendered and sent to the backend at once: bounds the uncompressed results in memory

log = logging.getLogger(__name__)


def chat_template_for(ctx: StageContext, tokenizer: Any) -> str | None:
    """None: the model's own template. 'pivot': the pivot's, for every model (FuseChat's choice)."""
    if ctx.settings.template == "own":
        return None

    return load_tokenizer(ctx.model_spec("pivot"), require_chat_template=True).chat_template


def render_rows(
    tokenizer: Any,
    rows: list[dict],
    template: str | None,
    max_length: int,
    overlength: str,
    counts: Counter,
    vocab_size: int | None = None,
) -> list:
    """(row, RenderedChat) for each usable row; skips and truncations counted in `counts`."""
    kept = []
    for row in rows:
        where = f"row {row['id']}: "
        try:
            chat = render_chat(tokenizer, row["messages"], template, where=where, vocab_size=vocab_size)
        except ChatRenderError as error:
            counts[f"skipped: {error.reason}"] += 1
            log.warning("%s", error)
            continue
        if chat.adapted:
            counts["system turn folded into the first user turn"] += 1
        if chat.num_tokens > max_length:
            if overlength == "skip":
                counts["skipped: longer than max_length"] += 1
                continue
            chat = truncate(chat, max_length)
            counts["truncated"] += 1
        if chat.num_tokens < 2:
            counts["skipped: fewer than 2 tokens"] += 1
            continue
        kept.append((row, chat))
    return kept


def to_sample(row: dict, chat: Any, result: Any) -> SampleLogprobs:
    return SampleLogprobs(
        id=row["id"],
        text=chat.text,
        spans=chat.spans,
        input_ids=chat.input_ids,
        offsets=chat.offsets,
        mask=chat.mask,
        topk_ids=result.topk_ids,
        topk_logprobs=result.topk_logprobs,
        target_logprobs=result.target_logprobs,
        extra={"truncated": True} if chat.truncated else {},
    )


def run(ctx: StageContext) -> None:
    settings, key = ctx.settings, ctx.instance.key
    spec = ctx.model_spec(key)
    tokenizer = load_tokenizer(spec, require_chat_template=settings.template == "own")
    template = chat_template_for(ctx, tokenizer)
    dataset = load_split(ctx.input("data"), "sft", "train")
    indices = ctx.shard_range(len(dataset))
    backend = make_backend(settings.backend, spec, settings, str(ctx.dir / "scratch"))
    check_tokenizer_fits(spec, tokenizer, backend.vocab_size)  # ordinary ids past the output: an error now
    max_length = min(settings.max_length, backend.max_length)
    counts: Counter = Counter()
    shard = ctx.shard or 0
    writer = LogprobWriter(
        ctx.out / shard_name(shard),
        settings.top_k,
        backend.vocab_size,
        model={"name": key, **identity(spec)},
        meta={
            "template": settings.template,
            "backend": settings.backend,
            "max_length": max_length,
            "dtype": backend.dtype,  # what ran (`auto` resolved)
        },
    )
    label = f"{ctx.instance.name} shard {shard}"
    progress = track_batches(backend, label, len(indices), "rows", ctx.log, ctx.progress)
    try:
        for start in range(indices.start, indices.stop, CHUNK_ROWS):
            rows = dataset[start : min(start + CHUNK_ROWS, indices.stop)]
            rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
            kept = render_rows(
                tokenizer, rows, template, max_length, settings.overlength, counts, backend.vocab_size
            )
            results = backend.logprobs([chat.input_ids for _, chat in kept], settings.top_k) if kept else []
            for (row, chat), result in zip(kept, results, strict=True):
                writer.add(to_sample(row, chat, result))
            counts["rows"] += len(rows)
            progress.chunk_done(len(rows), [chat.num_tokens for _, chat in kept])
    finally:
        backend.close()
    writer.meta["counts"] = dict(counts)
    writer.close()
    ctx.log.info("%s shard %d: %d samples written, %s", ctx.instance.name, shard, len(writer), dict(counts))


def finalize(ctx: StageContext) -> None:
    """index.json over all shards, and report.json with the counted skips and truncations."""
    index = write_index(ctx.out, ctx.num_shards)
    totals: Counter = Counter()
    for entry in index["shards"]:
        totals.update(read_json(ctx.out / entry["name"] / "header.json")["meta"].get("counts", {}))
    report = {
        "model": ctx.instance.key,
        "samples": index["num_samples"],
        "tokens": index["num_tokens"],
        "top_k": index["top_k"],
        "counts": dict(totals),
    }
    write_json_atomic(ctx.out / "report.json", report)

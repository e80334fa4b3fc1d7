"""The oracle teacher of the zoo: each domain chain's exact next-token distribution in the pivot's vocabulary, at
every response position of the fusion set's domain conversations, written as a log-prob store (the ceiling)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fuse.data.chat import RenderedChat, render_chat, truncate
from fuse.data.logprobs import LogprobWriter, SampleLogprobs, shard_name, write_index
from fuse.data.prepared import row_id, sft_messages
from fuse.io import read_json
from fuse.zoo.world import Domain, domains

Distribution = dict[int, float]  # token id -> probability
TokenCache = dict[str, tuple[int, ...]]


class Option(NamedTuple):
    """One thing the chain may write at a step: a word (with its space or capital) or a sentence's '.'."""

    text: str
    probability: float
    word: str | None  # None for the '.'


class Step(NamedTuple):
    """One move of the chain in the realized response: characters [start, end) of the content, and every option
    the chain had there. Each option is one pre-token of a word-splitting tokenizer, so no token crosses steps."""

    start: int
    end: int
    options: tuple[Option, ...]


# --------------------------------------------------------------------------------------------- the chain's steps


def step_options(domain: Domain, sentence: int, words: Sequence[str]) -> list[Option]:
    """What the chain may write next, given how many sentences are done and the current sentence's words."""
    if not words:
        space = " " if sentence else ""  # sentences are joined by one space; the first one opens the content
        return [Option(space + word.capitalize(), p, word) for word, p in domain.starts]
    p_end = domain.end_probability(len(words))
    options = [Option(".", p_end, None)] if p_end > 0 else []
    if p_end < 1:
        options += [Option(" " + word, (1 - p_end) * p, word) for word, p in domain.successors[words[-1]]]
    return options


def chain_steps(domain: Domain, content: str) -> list[Step]:
    """The response parsed into the chain's steps; after the last sentence's '.' the chain writes nothing more."""
    steps, cursor, sentence, words = [], 0, 0, []
    while sentence < domain.sentences:
        options = step_options(domain, sentence, words)
        taken = [o for o in options if content.startswith(o.text, cursor)]
        if len(taken) != 1:  # none: the domain cannot write it; several: its options are not prefix-free
            raise ValueError(
                f"{domain.name}: {content!r} at character {cursor}: {len(taken)} of the chain's options match"
            )
        steps.append(Step(cursor, cursor + len(taken[0].text), tuple(options)))
        cursor += len(taken[0].text)
        sentence, words = (sentence + 1, []) if taken[0].word is None else (sentence, [*words, taken[0].word])
    if cursor != len(content):
        raise ValueError(f"{domain.name}: {content!r} goes on after its last sentence (character {cursor})")
    return steps


# --------------------------------------------------------------------------------------------- tokens


def option_tokens(tokenizer: Any, text: str, cache: TokenCache) -> tuple[int, ...]:
    """An option's tokens on its own: the same as in context, since a pre-token is tokenized by itself."""
    if text not in cache:
        cache[text] = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return cache[text]


def step_token_range(offsets: np.ndarray, start: int, end: int) -> range:
    """The tokens that tile characters [start, end) exactly (ValueError if a token crosses either end)."""
    inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
    if not len(inside) or offsets[inside[0], 0] != start or offsets[inside[-1], 1] != end:
        raise ValueError(f"characters [{start}, {end}): a token crosses the step's edge (not a pre-token?)")
    if inside[0] == 0:
        raise ValueError("the response starts at the first token: no position predicts it")
    return range(int(inside[0]), int(inside[-1]) + 1)


def prefix_distribution(
    options: Sequence[tuple[tuple[int, ...], float]], emitted: tuple[int, ...]
) -> Distribution:
    """The next token given the tokens already emitted in this step: the options whose tokens begin with them,
    renormalized, each voting for its next token."""
    k = len(emitted)
    live = [(tokens, p) for tokens, p in options if tokens[:k] == emitted and p > 0]
    if any(len(tokens) == k for tokens, _ in live):
        # the step could be over here or go on: its next token would mix in the following step's
        raise ValueError(f"an option's tokens {emitted} are a prefix of another option's")
    total = math.fsum(p for _, p in live)
    distribution: Distribution = {}
    for tokens, p in live:
        distribution[tokens[k]] = distribution.get(tokens[k], 0.0) + p / total
    return distribution


def next_token_distributions(
    domain: Domain,
    tokenizer: Any,
    text: str,
    content_start: int,
    content_end: int,
    ids: Sequence[int] | np.ndarray,
    offsets: np.ndarray,
) -> dict[int, Distribution]:
    """Row t -> the exact distribution of token t+1 given tokens 0..t, for every t whose next token is in the
    response content [content_start, content_end) of `text` or after it. After it (end of turn, ...) the
    template alone decides: probability 1 on the realized token. `ids`, `offsets`: the tokenized `text`."""
    ids, offsets = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    cache: TokenCache = {}
    rows: dict[int, Distribution] = {}
    for step in chain_steps(domain, text[content_start:content_end]):
        span = step_token_range(offsets, content_start + step.start, content_start + step.end)
        realized = tuple(int(i) for i in ids[span.start : span.stop])
        piece = text[content_start + step.start : content_start + step.end]
        if realized != option_tokens(tokenizer, piece, cache):  # the exactness rests on this
            raise ValueError(f"{piece!r} is tokenized differently in context than alone (not a pre-token?)")
        options = [(option_tokens(tokenizer, o.text, cache), o.probability) for o in step.options]
        for k, t in enumerate(span):
            rows[t - 1] = prefix_distribution(options, realized[:k])
    for t in range(max(rows) + 1, len(ids) - 1):
        rows[t] = {int(ids[t + 1]): 1.0}
    return rows


# --------------------------------------------------------------------------------------------- the store


def render_domain_row(tokenizer: Any, row: dict[str, Any], vocab_size: int) -> tuple[str, RenderedChat]:
    """(prepared id, rendering) of one SFT row: prepare's normalization and id, extract's `render_chat` call with
    the model's own template (so the tokens are the pivot extract's)."""
    messages = sft_messages(row, "messages", {})
    chat = render_chat(tokenizer, messages, None, where=f"row {row['id']}: ", vocab_size=vocab_size)
    return row_id({"messages": messages}), chat


def oracle_rows(domain: Domain, tokenizer: Any, chat: RenderedChat) -> list[Distribution]:
    """One distribution per row of the chat; rows before the response hold the realized token with probability 1
    (the oracle does not model prompts; the mask leaves those rows out)."""
    spans = [s for s in chat.spans if s.role == "assistant"]
    if len(spans) != 1:
        raise ValueError(f"a domain conversation has one assistant turn, this one {len(spans)}")
    ids = chat.input_ids
    defined = next_token_distributions(
        domain, tokenizer, chat.text, spans[0].start, spans[0].end, ids, chat.offsets
    )
    return [defined.get(t, {int(ids[t + 1]): 1.0}) for t in range(len(ids) - 1)]


def oracle_sample(
    sample_id: str, chat: RenderedChat, rows: list[Distribution], top_k: int, max_length: int
) -> SampleLogprobs:
    """The sample as extract would write it, its top-K the oracle's support (empty slots: id 0, -inf)."""
    truncated = chat.num_tokens > max_length
    if truncated:  # extract's default for over-long rows; the oracle's rows are cut with the tokens
        chat, rows = truncate(chat, max_length), rows[: max_length - 1]
    ids, logprobs = np.zeros((len(rows), top_k), np.int64), np.full((len(rows), top_k), -np.inf)
    for t, distribution in enumerate(rows):
        ids[t, : len(distribution)] = list(distribution)
        logprobs[t, : len(distribution)] = np.log(list(distribution.values()))
    target = [math.log(rows[t][int(token)]) for t, token in enumerate(chat.input_ids[1:])]
    return SampleLogprobs(
        id=sample_id,
        text=chat.text,
        spans=chat.spans,
        input_ids=chat.input_ids,
        offsets=chat.offsets,
        mask=chat.mask,
        topk_ids=ids,
        topk_logprobs=logprobs,
        target_logprobs=np.asarray(target, dtype=np.float64),
        extra={"truncated": True} if truncated else {},
    )


def domain_rows(sft_path: str | os.PathLike, by_name: dict[str, Domain]) -> Iterator[tuple[Domain, dict]]:
    """(domain, row) for the SFT file's domain rows: ids like 'harbor-003' name their domain."""
    with open(sft_path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            domain = by_name.get(str(row["id"]).rsplit("-", 1)[0])
            if domain is not None:
                yield domain, row


def write_oracle_store(
    sft_path: str | os.PathLike,
    tokenizer: Any,
    domain_list: Sequence[Domain],
    out_dir: str | os.PathLike,
    vocab_size: int | None = None,
    max_length: int = 256,
    top_k: int | None = None,
) -> dict[str, Any]:
    """The oracle's store of the SFT file's domain rows (one shard + index.json, as extract writes it), with the
    pivot extract's sample ids, tokens and mask. `vocab_size`: the pivot model's output size (default: the
    tokenizer's); `max_length`: the pivot extract's; `top_k`: default the largest support. Returns the index."""
    vocab_size = vocab_size or len(tokenizer)
    samples, seen = [], set()
    for domain, row in domain_rows(sft_path, {d.name: d for d in domain_list}):
        sample_id, chat = render_domain_row(tokenizer, row, vocab_size)
        if sample_id not in seen:  # prepare keeps the first of identical rows
            seen.add(sample_id)
            samples.append((sample_id, chat, oracle_rows(domain, tokenizer, chat)))
    if not samples:
        raise ValueError(f"{sft_path}: no rows of the domains {[d.name for d in domain_list]}")
    support = max(len(d) for _, _, rows in samples for d in rows)
    if top_k is not None and top_k < support:
        raise ValueError(f"top_k={top_k} but the oracle needs {support} entries at some positions")
    model = {"name": "oracle", "kind": "zoo domain oracle"}
    meta = {
        "template": "own",
        "backend": "oracle",
        "max_length": max_length,
        "counts": {"rows": len(samples)},
    }
    with LogprobWriter(Path(out_dir) / shard_name(0), top_k or support, vocab_size, model, meta) as writer:
        for sample_id, chat, rows in samples:
            writer.add(oracle_sample(sample_id, chat, rows, top_k or support, max_length))
    return write_index(out_dir, 1)


def write_zoo_oracle(
    root: str | os.PathLike, seed: int, out_dir: str | os.PathLike, max_length: int = 256
) -> dict[str, Any]:
    """`write_oracle_store` for a built zoo folder: its SFT file, its pivot's tokenizer (loaded as extract loads
    it) and output size, and the world's domains for `seed`."""
    from fuse.models import load_tokenizer_dir

    pivot = Path(root) / "models" / "pivot"
    vocab_size = int(read_json(pivot / "config.json")["vocab_size"])
    tokenizer = load_tokenizer_dir(pivot)
    return write_oracle_store(
        Path(root) / "data" / "sft.jsonl", tokenizer, domains(seed), out_dir, vocab_size, max_length
    )

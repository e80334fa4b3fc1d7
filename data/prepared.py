"""The normalized datasets that `prepare` writes and every later stage reads.

SFT rows: {id, messages: [{role, content}, ...]} ending with an assistant turn. Preference rows: {id, prompt:
[{role, content}, ...], chosen, rejected}. Normalizers are pure: a raw row in, a row or a reason to drop it out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class Dropped(ValueError):
    """A row that cannot be used; the message is the reason, counted in the prepare report."""


def _column(row: Mapping[str, Any], columns: Mapping[str, str], field: str) -> Any:
    name = columns.get(field, field)
    if name not in row:
        raise KeyError(name)
    return row[name]


def _clean_messages(messages: Any, min_chars: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise Dropped("messages is empty or not a list")
    clean = []
    for turn in messages:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
            raise Dropped("a message is not {role, content} with string content")
        if not isinstance(turn.get("role"), str) or turn["role"] not in ROLES:
            raise Dropped(f"unknown role {repr(turn.get('role'))[:40]}")
        clean.append({"role": str(turn["role"]), "content": turn["content"]})
    if clean[-1]["role"] != "assistant":
        raise Dropped("the conversation does not end with an assistant message")
    if len(clean[-1]["content"].strip()) < min_chars:
        raise Dropped("empty assistant response")
    if not any(t["role"] == "user" for t in clean):
        raise Dropped("no user message")
    return clean


def sft_messages(
    row: Mapping[str, Any], fmt: str, columns: Mapping[str, str], min_chars: int = 1
) -> list[dict]:
    """One raw SFT row in `fmt` (messages | sharegpt | prompt_response) as a clean messages list."""
    if fmt == "messages":
        return _clean_messages(_column(row, columns, "messages"), min_chars)
    if fmt == "sharegpt":
        turns = _column(row, columns, "conversations")
        if not isinstance(turns, list):
            raise Dropped("conversations is not a list")
        messages = []
        for turn in turns:
            role = (
                SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, Mapping) else None
            )
            if role is None:
                raise Dropped(
                    f"unknown sharegpt speaker {repr(turn.get('from') if isinstance(turn, Mapping) else turn)[:40]}"
                )
            messages.append({"role": role, "content": turn.get("value")})
        return _clean_messages(messages, min_chars)
    if fmt == "prompt_response":
        prompt, response = _column(row, columns, "prompt"), _column(row, columns, "response")
        system = row.get(columns.get("system", "system"))
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        return _clean_messages(messages, min_chars)
    raise ValueError(f"format {fmt!r} is not an SFT format")


def _response_text(value: Any) -> str:
    """A chosen/rejected field: a string, or a conversation whose last assistant turn is the response."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and isinstance(value[-1], Mapping)
        and value[-1].get("role") == "assistant"
    ):
        return str(value[-1].get("content", ""))
    raise Dropped("chosen/rejected is neither a string nor a conversation ending with an assistant turn")


def preference_row(row: Mapping[str, Any], columns: Mapping[str, str], min_chars: int = 1) -> dict[str, Any]:
    """One raw preference row as {prompt: messages, chosen, rejected}."""
    chosen_raw, rejected_raw = _column(row, columns, "chosen"), _column(row, columns, "rejected")
    prompt_name = columns.get("prompt", "prompt")
    prompt = row.get(prompt_name)
    if prompt is None and isinstance(chosen_raw, list):
        prompt = chosen_raw[:-1]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is not None and not isinstance(prompt, list):
        raise Dropped("prompt is neither a string nor a list of messages")
    chosen, rejected = _response_text(chosen_raw), _response_text(rejected_raw)
    if len(chosen.strip()) < min_chars or len(rejected.strip()) < min_chars:
        raise Dropped("empty chosen or rejected response")
    if chosen == rejected:
        raise Dropped("chosen and rejected responses are identical")
    messages = _clean_messages([*(prompt or []), {"role": "assistant", "content": chosen}], min_chars)
    return {"prompt": messages[:-1], "chosen": chosen, "rejected": rejected}


def row_id(content: Any) -> str:
    """A stable id from a row's normalized content: the same row gets the same id in every run."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def is_heldout(identifier: str, fraction: float, seed: int) -> bool:
    """Deterministic split by id: adding rows to a dataset does not move existing rows between splits."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{identifier}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_dir(prepare_out: str | Path, kind: str, split: str) -> Path:
    if kind not in ("sft", "preference") or split not in ("train", "heldout"):
        raise ValueError(f"no prepared split {kind}/{split}")
    return Path(prepare_out) / kind / split


def load_split(prepare_out: str | Path, kind: str, split: str):
    """A prepared split as a `datasets.Dataset` (memory-mapped Arrow)."""
    from datasets import load_from_disk

    path = split_dir(prepare_out, kind, split)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no prepared {kind}/{split} split (is the prepare stage done?)")
    state = path / "state.json"
    if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files"):
        # an empty split is saved without data files, which load_from_disk cannot read back
        from datasets import Dataset, DatasetInfo

        features = DatasetInfo.from_directory(str(path)).features
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return load_from_disk(str(path))


def labels_for(input_ids: Any, mask: Any) -> Any:
    """Token ids where the mask is set (the tokens a loss counts), -100 elsewhere."""
    import numpy as np

    return np.where(mask, input_ids, -100).astype(np.int64)


def sft_rows(
    prepare_out: str, model: dict[str, Any], max_length: int, split: str = "train"
) -> Iterator[dict[str, Any]]:
    """Gold rows of a prepared SFT split rendered with the pivot's template, tokens as extract makes them: the
    SFT-only arms' training rows, every arm's validation rows (split "heldout") and fpo's replayed conversations."""
    import logging

    from fuse.data.chat import ChatRenderError, render_chat
    from fuse.models import load_tokenizer
    from fuse.recipe import ModelSpec

    tokenizer = load_tokenizer(ModelSpec.model_validate(model), require_chat_template=True)
    for number, row in enumerate(load_split(prepare_out, "sft", split)):
        try:
            chat = render_chat(
                tokenizer, row["messages"], max_length=max_length, where=f"sft/{split} row {number}: "
            )
        except ChatRenderError as error:  # extract skips the same rows for the targets
            logging.getLogger(__name__).warning("skipped: %s", error)
            continue
        yield {
            "id": row["id"],
            "input_ids": chat.input_ids.tolist(),
            "labels": labels_for(chat.input_ids, chat.mask).tolist(),
        }

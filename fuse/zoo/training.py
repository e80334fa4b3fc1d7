"""Tiny causal-LM pre-training for the zoo: deterministic, single-threaded, a minute or less per model.

Each model sees general text, its own skill and its own domain (both rendered in its own chat template); nothing
else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 6e-3
    warmup_steps: int = 30
    skill_fraction: float = 0.35  # share of each batch that is skill conversations
    domain_fraction: float = 0.3  # share of each batch that is domain conversations (the rest: general text)
    max_length: int = 96


def encode_all(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text; texts carry their own BOS (chat templates) so no special tokens are added here."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [row[:max_length] for row in ids]


def _batch(rows: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model: Any,
    general: list[list[int]],
    skill: list[list[int]],
    domain: list[list[int]],
    pad_id: int,
    settings: PretrainSettings,
    seed: int,
) -> list[float]:
    """Train in place on batches mixing general text, skill and domain conversations; returns the loss curve."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    n_skill = round(settings.batch_size * settings.skill_fraction)
    n_domain = round(settings.batch_size * settings.domain_fraction)
    streams = ((skill, n_skill), (domain, n_domain), (general, settings.batch_size - n_skill - n_domain))
    losses = []
    model.train()
    for _ in range(settings.steps):
        rows = [
            stream[i]
            for stream, count in streams
            for i in torch.randint(len(stream), (count,), generator=generator).tolist()
        ]
        input_ids, labels = _batch(rows, pad_id)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses

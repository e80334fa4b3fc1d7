"""The distillation Trainer: HF `Trainer` whose compute_loss is `fuse.losses.distill_loss` on sparse targets (from
the backbone's hidden states through a chunked head where the model allows: `fuse.heads.plain_head`),
the collator that pads sparse targets, and the builder that `fuse.training` calls in every rank.

Training rows (an Arrow dataset on disk): input_ids [T], labels [T] (-100 outside responses) and, unless the run is
SFT-only, target_ids / target_probs flattened [T * J] with target_width J (-1 / 0 = no teacher id in that slot).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from transformers import Trainer, TrainingArguments

from fuse.heads import last_hidden, plain_head
from fuse.length_grouping import LengthGrouping
from fuse.losses import IGNORE_INDEX, PAD_ID, LossParts, distill_loss, distill_loss_from_hidden
from fuse.models import load_tokenizer, pad_id
from fuse.recipe import DistillSettings, ModelSpec
from fuse.training import RecordedMetrics, TrainingJob, load_trainable, with_adapters

TARGET_COLUMNS = ("target_ids", "target_probs", "target_width")


def _pad(rows: list[np.ndarray], value: float, dtype: Any, width: int | None = None) -> torch.Tensor:
    length = max(len(r) for r in rows)
    shape = (len(rows), length) if width is None else (len(rows), length, width)
    out = np.full(shape, value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _targets(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    width = int(row["target_width"])
    ids = np.asarray(row["target_ids"], dtype=np.int64).reshape(-1, width)
    probs = np.asarray(row["target_probs"], dtype=np.float32).reshape(-1, width)
    return ids, probs


def sparse_collator(pad_token_id: int):
    """Right-pads input_ids / labels / attention_mask, and sparse targets to the batch's widest J."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        batch = {
            "input_ids": _pad(ids, pad_token_id, np.int64),
            "labels": _pad([np.asarray(r["labels"], dtype=np.int64) for r in rows], IGNORE_INDEX, np.int64),
            "attention_mask": _pad([np.ones(len(r), dtype=np.int64) for r in ids], 0, np.int64),
        }
        if "target_ids" in rows[0]:
            targets = [_targets(r) for r in rows]
            width = max(t[0].shape[1] for t in targets)
            batch["target_ids"] = _pad(
                [np.pad(t[0], ((0, 0), (0, width - t[0].shape[1])), constant_values=PAD_ID) for t in targets],
                PAD_ID,
                np.int64,
                width,
            )
            batch["target_probs"] = _pad(
                [np.pad(t[1], ((0, 0), (0, width - t[1].shape[1]))) for t in targets], 0.0, np.float32, width
            )
        return batch

    return collate


class DistillTrainer(RecordedMetrics, LengthGrouping, Trainer):
    """compute_loss = λ·CE(gold) + (1−λ)·D(P_fused ‖ q_θ) on response tokens; logs gold_ce and distill."""

    loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args: Any, settings: DistillSettings, **kw: Any):
        super().__init__(*args, **kw)
        self.settings = settings  # λ, temperature and divergence reach the loss from here, and only from here

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        target_ids, target_probs = inputs.pop("target_ids", None), inputs.pop("target_probs", None)
        s = self.settings
        smoothing = s.label_smoothing if model.training else 0.0  # validation scores plain gold CE
        found = plain_head(model)
        if found is not None and not return_outputs and s.temperature == 1.0 and smoothing == 0.0:
            # the response rows through the head in chunks: no [B, T, V] logits (distill_loss_from_hidden)
            backbone, head = found
            parts = distill_loss_from_hidden(
                last_hidden(backbone, inputs, head),
                head.weight,
                labels,
                target_ids,
                target_probs,
                lambda_=s.lambda_,
                kind=s.divergence,
            )
            self._record(model, parts)
            return parts.loss
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        parts = distill_loss(
            outputs.logits,
            labels,
            target_ids,
            target_probs,
            lambda_=s.lambda_,
            temperature=s.temperature,
            kind=s.divergence,
            label_smoothing=smoothing,
        )
        self._record(model, parts)
        return (parts.loss, outputs) if return_outputs else parts.loss

    def _record(self, model: Any, parts: LossParts) -> None:
        if model.training:
            self.record("gold_ce", parts.gold_ce.item())
            if parts.distill is not None:
                self.record("distill", parts.distill.item())


def build_distill_trainer(job: TrainingJob, args: TrainingArguments) -> Trainer:
    """The builder named in distill jobs: λ, temperature and divergence from the job's DistillSettings; params:
    model (a ModelSpec dump), train_data and validation_data (dataset folders; validation optional). With
    settings.peft the pivot trains LoRA adapters only."""
    params = job.params
    spec = ModelSpec.model_validate(params["model"])
    tokenizer = load_tokenizer(spec)
    settings = job.load_settings()
    model = load_trainable(spec, settings)
    if settings.peft is not None:
        model = with_adapters(model, settings)
    dataset = load_from_disk(params["train_data"])
    validation = params.get("validation_data")
    return DistillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=load_from_disk(validation) if validation else None,
        data_collator=sparse_collator(pad_id(tokenizer)),
        processing_class=tokenizer,
        settings=settings,
    )

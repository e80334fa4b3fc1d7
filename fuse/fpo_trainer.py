"""The InfiFPO Trainer: TRL's DPOTrainer whose reference is a precomputed per-pair column (the fused, normalized
l_fu of `fuse.preference`) and whose compute_loss is `fuse.preference.infifpo_loss`; its collator and builder.

Training rows (an Arrow dataset on disk, written by the fpo stage): chosen_input_ids / rejected_input_ids [T] and
chosen_completion_mask / rejected_completion_mask [T] (1 on the response tokens the score stage sums, in the policy's
own chat template), chosen_norm / rejected_norm (what the policy's summed log-prob is divided by), ref_chosen_logps /
ref_rejected_logps (l_fu, normalized), picked (the source max_margin chose, -1 otherwise), clipped_terms; with a
replay, replay_input_ids / replay_completion_mask (an SFT conversation and its assistant tokens, in the same template).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import load_from_disk
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer

from fuse.heads import last_hidden, plain_head
from fuse.length_grouping import LengthGrouping
from fuse.losses import token_logprobs
from fuse.models import load_tokenizer, pad_id
from fuse.preference import infifpo_loss, reward_accuracy
from fuse.recipe import FpoSettings, ModelSpec
from fuse.training import RecordedMetrics, TrainingJob, load_trainable

PER_PAIR = ("ref_chosen_logps", "ref_rejected_logps", "picked", "clipped_terms")
# the prefix of a row's replayed SFT conversation: replay_input_ids, replay_completion_mask
REPLAY = "replay_"


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = np.full((len(rows), max(len(r) for r in rows)), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def pair_collator(pad_token_id: int):
    """TRL's preference batch layout (chosen rows first, then rejected, right-padded; completion_mask aligned with
    input_ids), with the per-sequence normalizer and the per-pair reference columns."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        masks = [r["chosen_completion_mask"] for r in rows] + [r["rejected_completion_mask"] for r in rows]
        batch = {
            "input_ids": _pad(ids, pad_token_id),
            "attention_mask": _pad([[1] * len(i) for i in ids], 0),
            "completion_mask": _pad(masks, 0),
            "norm": torch.tensor([r["chosen_norm"] for r in rows] + [r["rejected_norm"] for r in rows]),
        }
        for name in PER_PAIR:
            if name in rows[0]:
                batch[name] = torch.tensor([r[name] for r in rows])
        if REPLAY + "input_ids" in rows[0]:
            replay = [r[REPLAY + "input_ids"] for r in rows]
            batch[REPLAY + "input_ids"] = _pad(replay, pad_token_id)
            batch[REPLAY + "attention_mask"] = _pad([[1] * len(i) for i in replay], 0)
            batch[REPLAY + "completion_mask"] = _pad([r[REPLAY + "completion_mask"] for r in rows], 0)
        return batch

    return collate


def summed_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the response tokens' log-probs per sequence [2B], no [B, T, V] logits: the backbone's hidden states at
    the response positions through fuse.losses.token_logprobs (plain_head), else TRL's fused LM head. A LoRA policy
    goes through its base model, whose layers carry the adapters."""
    found = plain_head(model)
    if found is not None:
        backbone, head = found
        hidden = last_hidden(backbone, batch, head)
        # position t predicts token t + 1: the response tokens from the second position on
        rows, cols = batch["completion_mask"][:, 1:].nonzero(as_tuple=True)
        logps = token_logprobs(hidden[rows, cols], head.weight, batch["input_ids"][rows, cols + 1])
        sums = torch.zeros(hidden.shape[0], dtype=logps.dtype, device=logps.device)
        return sums.index_add(0, rows, logps)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    return outputs.log_probs.sum(dim=1)


def replay_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The replayed SFT conversations' negative log-likelihood per token: over every assistant token of the batch's
    replay rows (those their completion mask marks after the first position), as the distill stage's SFT term."""
    replay = {name: batch[REPLAY + name] for name in ("input_ids", "attention_mask", "completion_mask")}
    tokens = replay["completion_mask"][:, 1:].sum().clamp(min=1)
    summed = summed_logps(model, replay)
    return -summed.sum() / tokens.to(summed.dtype)


def chosen_nll(summed: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """TRL's `sft` loss term (RPO, Pang et al. 2024): the chosen answers' negative log-likelihood per token, over
    every chosen response token of the batch. `summed` [2B] are the sequences' summed response log-probs (chosen
    first); a response token is one the completion mask marks after the first position (position t predicts t + 1)."""
    chosen_sums, _ = summed.chunk(2, dim=0)
    chosen_mask, _ = completion_mask[:, 1:].chunk(2, dim=0)
    return -chosen_sums.sum() / chosen_mask.sum().clamp(min=1).to(chosen_sums.dtype)


class InfiFpoTrainer(RecordedMetrics, LengthGrouping, DPOTrainer):
    """DPOTrainer with the fused reference as precomputed columns; logs reward accuracy, margins, rewards,
    normalized log-probs, the share of clipped terms and which source max_margin picked."""

    def __init__(
        self,
        *args: Any,
        sources: Sequence[str] = (),
        terms_per_pair: int = 0,
        sft_weight: float = 0.0,
        replay_weight: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.sources, self.terms_per_pair = tuple(sources), int(terms_per_pair)
        self.sft_weight, self.replay_weight = float(sft_weight), float(replay_weight)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by the fpo stage with the score stage's rendering, not TRL's

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # the reference columns are the fused scores, computed before training

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        summed = summed_logps(model, inputs)
        normalized = summed / inputs["norm"].to(torch.float32)
        chosen, rejected = normalized.chunk(2, dim=0)
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        losses, margins = infifpo_loss(
            chosen,
            rejected,
            ref_chosen.to(chosen.dtype),
            ref_rejected.to(chosen.dtype),
            self.beta,
            self.label_smoothing,
        )
        loss = losses.mean()
        nll = None
        if self.sft_weight > 0:
            nll = chosen_nll(summed, inputs["completion_mask"])
            loss = loss + self.sft_weight * nll
        replayed = None
        if self.replay_weight > 0 and REPLAY + "input_ids" in inputs:
            replayed = replay_nll(model, inputs)
            loss = loss + self.replay_weight * replayed
        if model.training:
            self._record_step(chosen.detach(), rejected.detach(), margins.detach(), inputs)
            gather = self.accelerator.gather_for_metrics
            if nll is not None:
                self.record("nll_loss", gather(nll.detach()).mean().item())
            if replayed is not None:
                self.record("replay_nll", gather(replayed.detach()).mean().item())
        return (loss, {"margins": margins}) if return_outputs else loss

    def _record_step(self, chosen, rejected, margins, inputs) -> None:
        gather = self.accelerator.gather_for_metrics
        margins = gather(margins)
        self.record("rewards/accuracies", reward_accuracy(margins))
        self.record("rewards/margins", margins.mean().item())
        self.record("logps/chosen", gather(chosen).mean().item())
        self.record("logps/rejected", gather(rejected).mean().item())
        if self.terms_per_pair and "clipped_terms" in inputs:
            clipped = gather(inputs["clipped_terms"])
            self.record("clipped_share", clipped.float().sum().item() / (self.terms_per_pair * len(clipped)))
        if len(self.sources) > 0 and "picked" in inputs:
            picked = gather(inputs["picked"])
            for k, name in enumerate(self.sources):
                self.record(f"picked/{name}", (picked == k).float().mean().item())


def dpo_config(args: TrainingArguments, settings: FpoSettings | None = None, **dpo: Any) -> DPOConfig:
    """The shared TrainingArguments as a DPOConfig: every Trainer field carried over, DPO fields from `dpo` and from
    the recipe's trainer_args (disable_dropout, activation_offloading)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    extra = {k: v for k, v in settings.trainer_args.items() if k in settings.CONFIG_ONLY} if settings else {}
    return DPOConfig(**values, precompute_ref_log_probs=True, **extra, **dpo)


def build_fpo_trainer(job: TrainingJob, args: TrainingArguments) -> InfiFpoTrainer:
    """The builder named in fpo jobs. params: model (a ModelSpec dump), train_data (a dataset folder), beta,
    label_smoothing, sources (names, index = picked), terms_per_pair, sft_weight, replay_weight (with the rows'
    replay_* columns). With settings.peft, TRL wraps the policy in
    LoRA adapters (its peft_config path); the reference stays the precomputed fused columns."""
    params = job.params
    spec = ModelSpec.model_validate(params["model"])
    tokenizer = load_tokenizer(spec)
    settings = job.load_settings()
    config = dpo_config(
        args,
        settings,
        beta=float(params["beta"]),
        label_smoothing=float(params.get("label_smoothing", 0.0)),
    )
    return InfiFpoTrainer(
        model=load_trainable(spec, settings),
        args=config,
        peft_config=settings.peft.lora_config() if settings.peft is not None else None,
        train_dataset=load_from_disk(params["train_data"]),
        data_collator=pair_collator(pad_id(tokenizer)),
        processing_class=tokenizer,
        sources=params.get("sources", ()),
        terms_per_pair=int(params.get("terms_per_pair", 0)),
        sft_weight=float(params.get("sft_weight", 0.0)),
        replay_weight=float(params.get("replay_weight", 0.0)),
    )


@torch.inference_mode()
def policy_scores(model: Any, rows: Sequence[dict[str, Any]], pad_token_id: int, batch_size: int = 8):
    """Normalized log-probs (chosen [N], rejected [N]) of the policy on encoded pairs, the way training sees them.
    `model` must carry TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) where plain_head finds none."""
    collate = pair_collator(pad_token_id)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(rows[start : start + batch_size])).items()}
        normalized = (summed_logps(model, batch).double() / batch["norm"].double()).cpu().numpy()
        half = len(normalized) // 2
        chosen.append(normalized[:half])
        rejected.append(normalized[half:])
    return np.concatenate(chosen), np.concatenate(rejected)

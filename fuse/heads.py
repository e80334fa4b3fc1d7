"""Where a trainer may take the LM head's work into its own hands: the response positions' losses from the
backbone's hidden states through a chunked head (fuse.losses.token_logprobs, distill_loss_from_hidden), so no
[B, T, V] logits exist — at a 262k vocabulary those of 8 × 512 tokens are 4.3 GB in float32."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel

# config keys of a post-processing of the logits that a plain `hidden @ weightᵀ` would leave out
LOGIT_SCALES = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def plain_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(backbone, head) when the logits are exactly `backbone(...).last_hidden_state @ head.weightᵀ`: an unwrapped
    model (DDP and DeepSpeed engines need their own forward; a LoRA model goes through its base model, whose layers
    carry the adapters), a bias-free linear head whose weight is whole (not ZeRO-3 partitioned), logits neither
    scaled nor soft-capped. Else None: the caller takes the model's logits."""
    inner = model.get_base_model() if is_peft_model(model) else model
    if not isinstance(inner, PreTrainedModel):  # a DDP or DeepSpeed engine around it
        return None
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or hasattr(head.weight, "ds_id"):
        return None
    config = inner.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_SCALES):
        return None
    backbone = getattr(inner, inner.base_model_prefix, None)
    return (backbone, head) if backbone is not None else None


def last_hidden(backbone: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's last hidden states [B, T, d] for a batch of input_ids / attention_mask."""
    return backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state

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


def last_hidden(
    backbone: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Linear | None = None
) -> torch.Tensor:
    """The backbone's last hidden states [B, T, d] for a batch of input_ids / attention_mask. With the `head` whose
    weight the input embedding shares (tied), the lookup's gradient is added into that weight's gradient in place
    (tied_lookup): no second [V, d] gradient at the end of the backward pass."""
    embedding = backbone.get_input_embeddings()
    if head is not None and shares_trained_weight(embedding, head):
        return backbone(
            inputs_embeds=tied_lookup(embedding, batch["input_ids"]),
            attention_mask=batch["attention_mask"],
            use_cache=False,
        ).last_hidden_state
    return backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state


def shares_trained_weight(embedding: Any, head: torch.nn.Linear) -> bool:
    """An nn.Embedding (any subclass that scales its rows) whose weight is the head's, trained in this pass."""
    return (
        isinstance(embedding, torch.nn.Embedding)
        and embedding.weight is head.weight
        and embedding.weight.requires_grad
        and embedding.max_norm is None
        and torch.is_grad_enabled()
    )


def tied_lookup(embedding: torch.nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """`embedding(input_ids)` whose gradient reaches the tied weight as a sparse [N, d] update added into the weight's
    gradient in place, once the backward pass has put the head's part there.

    Why: autograd sums a weight's two contributions (the head's dense [V, d], the lookup's) into a fresh [V, d]
    tensor before accumulating it (a dense + sparse sum is in place only when autograd holds the last reference to
    the dense one), so the peak of a backward pass holds one [V, d] gradient more than the weight's own: 640 MiB at
    gemma-3's 262k × 640. Here the lookup runs on the detached weight; its output is a leaf whose gradient hook, which
    fires at the very end of the pass (the input side), adds the lookup's part to `weight.grad`: by then the head's
    part is there (autograd accumulates a parameter as soon as its last producer, the head, has run). The sum is the
    same as autograd's (the order of the row additions aside)."""
    weight = embedding.weight
    with torch.no_grad():
        rows = torch.func.functional_call(embedding, {"weight": weight.detach()}, (input_ids,))
    rows.requires_grad_(True)

    def add_lookup_grad(grad_rows: torch.Tensor) -> None:
        # the lookup's vector-Jacobian product as a sparse gradient (the module's own scale included)
        with torch.enable_grad():
            leaf = weight.detach().requires_grad_(True)
            sparse, embedding.sparse = embedding.sparse, True
            try:
                out = torch.func.functional_call(embedding, {"weight": leaf}, (input_ids,))
            finally:
                embedding.sparse = sparse
            (update,) = torch.autograd.grad(out, leaf, grad_rows)
        with torch.no_grad():
            if weight.grad is None:
                weight.grad = update.to_dense()
            else:
                weight.grad.add_(update)

    rows.register_hook(add_lookup_grad)
    return rows

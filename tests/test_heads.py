"""fuse.heads: the tied input embedding's gradient added in place (tied_lookup) equals autograd's own sum."""

from __future__ import annotations

import pytest
import torch

from fuse.heads import last_hidden, plain_head, shares_trained_weight
from fuse.losses import token_logprobs


def tiny_model(kind: str):
    """A tied-embedding causal LM of each kind the tied path meets: gemma-3 scales its embedding rows by √d."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip
    if kind == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**shape, sliding_window=8)).train()
    return LlamaForCausalLM(LlamaConfig(**shape)).train()


def gradients(model, batches, tied_path: bool, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Each parameter's gradient after the batches' losses are backpropagated one after another (accumulated)."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad(set_to_none=True)
    backbone, head = plain_head(model)
    for ids in batches:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        hidden = last_hidden(backbone, batch, head if tied_path else None)
        logps = token_logprobs(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, ids[:, 1:].reshape(-1)
        )
        (-logps.mean()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tied_lookup_gradients_equal_autograds(kind, checkpointing):
    model = tiny_model(kind)
    backbone, head = plain_head(model)
    assert shares_trained_weight(backbone.get_input_embeddings(), head)
    generator = torch.Generator().manual_seed(1)
    # a token repeated within and across rows: the lookup's rows add up on the same weight row
    batches = [torch.randint(0, 300, (3, 12), generator=generator) for _ in range(2)]
    batches[0][:, 0] = 7
    reference = gradients(model, batches, tied_path=False, checkpointing=checkpointing)
    tied = gradients(model, batches, tied_path=True, checkpointing=checkpointing)
    assert reference.keys() == tied.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(tied[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    weight = backbone.get_input_embeddings().weight
    assert not weight.grad.is_sparse
    # the lookup's part is really there: row 7 gets input-side gradient the head alone does not give it
    assert reference["model.embed_tokens.weight"][7].abs().sum() > 0


def test_untied_or_frozen_embeddings_take_the_plain_path():
    model = tiny_model("llama")
    backbone, head = plain_head(model)
    embedding = backbone.get_input_embeddings()
    head.weight.requires_grad_(False)
    assert not shares_trained_weight(embedding, head)
    head.weight.requires_grad_(True)
    with torch.no_grad():
        assert not shares_trained_weight(embedding, head)
    other = torch.nn.Linear(32, 300, bias=False)
    assert not shares_trained_weight(embedding, other)

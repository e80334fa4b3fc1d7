"""Tiny homologous Llama checkpoints for the merge tests: a base and fine-tuned-like perturbations of it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tiny_lm import WORDS as TINY_WORDS

WORDS = TINY_WORDS
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def tiny_config(vocab: int = 96, tied: bool = False, intermediate: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.chat_template = TEMPLATE
    wrapped.save_pretrained(directory)


def make_family(root: Path, n: int = 2, seed: int = 0, **config) -> list[Path]:
    """[base, t1, …, tn]: each target = base + dense noise + a few large sparse updates (like a fine-tune)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config))
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(1, n + 1):
        generator = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator) * 0.01
                sparse = (torch.rand(param.shape, generator=generator) < 0.05) * torch.randn(
                    param.shape, generator=generator
                )
                param.copy_(base_state[name] + noise + 0.1 * sparse)
        paths.append(root / f"t{i}")
        model.save_pretrained(paths[-1])
    return paths


def rewrite(directory: Path, target: Path, edit) -> Path:  # noqa: ANN001 — edit(state, config) in place
    """A copy of checkpoint `directory` at `target` with its state dict and config edited."""
    target.mkdir(parents=True, exist_ok=True)
    state = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    edit(state, config)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def merge_context(recipe, made: dict[str, Path], tmp_path: Path):  # noqa: ANN001, ANN201
    """A StageContext of the recipe's merge instance whose parents' out/model are the given folders (parent
    instance name -> model folder), linked into tmp_path; its out/ folder made."""
    import os

    from fuse.context import StageContext
    from fuse.dag import build_dag

    instance = build_dag(recipe)["merge"]
    inputs = {}
    for parent, path in made.items():
        (tmp_path / parent / "out").mkdir(parents=True)
        os.symlink(path, tmp_path / parent / "out" / "model")
        inputs[parent] = tmp_path / parent / "out"
    ctx = StageContext(recipe=recipe, instance=instance, dir=tmp_path / "run" / "merge", inputs=inputs)
    ctx.out.mkdir(parents=True)
    return ctx

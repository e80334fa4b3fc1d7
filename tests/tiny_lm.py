"""Tiny random causal LMs with locally trained tokenizers and chat templates, for the log-prob tests.

Two deliberately different pairs: a `▁` BPE Llama with an [INST] template and a byte-level BPE (`Ġ`) Qwen2 with a
ChatML template; head_dim 32 so that vLLM's CPU attention accepts them. (transformers 5 loads any tokenizer of a
qwen2 model as Qwen2Tokenizer, which replaces a `▁` pre-tokenizer: hence byte-level for the Qwen2.)
"""

from __future__ import annotations

import random
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INST = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
    "{% elif m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
WORDS = [
    "the",
    "a",
    "fox",
    "cat",
    "dog",
    "runs",
    "jumps",
    "over",
    "under",
    "river",
    "hill",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", "!"])
        for _ in range(n)
    ]


def conversations(n: int, seed: int = 1) -> list[dict]:
    """SFT rows {id, messages}; some with a system turn, some multi-turn, some non-ASCII."""
    rng = random.Random(seed)
    texts = corpus(4 * n + 8, seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            messages += [
                {"role": "user", "content": texts.pop()},
                {"role": "assistant", "content": texts.pop()},
            ]
        if i % 4 == 1:
            messages[-1]["content"] += " café ü"
        rows.append({"id": f"row{i:03d}", "messages": messages})
    rng.shuffle(rows)
    return rows


def _tokenizer(kind: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"[]<>/_|é\n:")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus() + ["Be brief. café ü [INST] [/INST] <<SYS>>"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def build(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A saved tiny model folder (safetensors + tokenizer + chat template); `arch` in llama | qwen2."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = _tokenizer("metaspace" if arch == "llama" else "bytelevel", 300 if arch == "llama" else 400)
    tokenizer.chat_template = INST if arch == "llama" else CHATML
    config_cls = LlamaConfig if arch == "llama" else Qwen2Config
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1 if arch == "qwen2" else 2,
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper than the default init, so top-K ranks are not all near-ties
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def shared_models(tmp_path_factory) -> dict[str, Path]:
    """Both tiny models, built once per test session under pytest's base temp folder."""
    root = tmp_path_factory.getbasetemp() / "tiny_lm"
    return {arch: build(root / arch, arch) for arch in ("llama", "qwen2")}

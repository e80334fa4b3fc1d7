"""Model and tokenizer loading, in one place.

Safetensors only unless the recipe allows pickles for that model, `trust_remote_code` only when the recipe says
so for that model, offline mode honoured, and vocabulary-size mismatches detected and reported.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuse.recipe import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    pass


def offline() -> bool:
    """As huggingface_hub reads it (1/on/yes/true, any case; TRANSFORMERS_OFFLINE as a fallback), so that fuse and
    the hub client never disagree about whether the network may be used."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def resolve_model_dir(spec: ModelSpec, weights: bool = True) -> Path:
    """The local folder holding `spec`'s files: the path itself, or the hub snapshot (downloaded unless offline).
    `weights=False`: configs, tokenizer and templates only — what a tokenizer, `fuse validate` and `plan
    --estimate` read, so that checking a 72B recipe on a login node does not download 145 GB."""
    local = Path(spec.path)
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"model {spec.name or spec.path!r}: {spec.path} is a file, not a model folder")
    if local.is_absolute() or spec.path.startswith("."):
        raise ModelLoadError(f"model {spec.name or spec.path!r}: folder {spec.path} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    if spec.allow_pickle:
        patterns.append("*.bin")
    if not weights:
        patterns = [p for p in patterns if p not in WEIGHT_PATTERNS]
    try:
        return Path(
            snapshot_download(
                spec.path, revision=spec.revision, allow_patterns=patterns, local_files_only=offline()
            )
        )
    except Exception as error:  # the hub client raises many types; one message for the user
        mode = "offline (HF_HUB_OFFLINE=1), not in the local cache" if offline() else str(error)
        raise ModelLoadError(
            f"model {spec.name or spec.path!r}: cannot resolve hub id {spec.path!r}: {mode}"
        ) from None


def chat_template_text(spec: ModelSpec) -> str | None:
    """The recipe's chat template override: inline Jinja, or the contents of a template file."""
    if spec.chat_template is None:
        return None
    if "{" in spec.chat_template:
        return spec.chat_template
    path = Path(spec.chat_template)
    if not path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: chat_template file {path} does not exist")
    return path.read_text(encoding="utf-8")


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")

# How a tokenizer was loaded, not what it is: from_pretrained keeps these in `init_kwargs` ("is_local",
# "local_files_only" always; the others when given), and save_pretrained writes init_kwargs into
# tokenizer_config.json, where they would describe our machine to whoever loads the published folder.
LOADER_KEYS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "token",
    "use_auth_token",
    "revision",
    "subfolder",
    "force_download",
    "proxies",
    "trust_remote_code",
    "gguf_file",
    "_commit_hash",
)


def without_loader_keys(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tokenizer`, forgetting how it was loaded (LOADER_KEYS), so that every folder it is saved to is clean."""
    loaded_with = getattr(tokenizer, "init_kwargs", {})  # every transformers tokenizer has it
    for key in LOADER_KEYS:
        loaded_with.pop(key, None)
    return tokenizer


def load_tokenizer_dir(
    directory: str | os.PathLike, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A tokenizer folder as its tokenizer.json says, not as the model type suggests.

    transformers maps a model type to a tokenizer class (qwen2 -> Qwen2Tokenizer) and that class rebuilds its own
    pre-tokenizer, silently replacing a different one in tokenizer.json. A folder that declares the generic
    class is loaded with it, so the text is tokenized exactly as the file says.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_path = Path(directory) / "tokenizer_config.json"
    declared = None
    if config_path.is_file():
        declared = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
    if declared in GENERIC_TOKENIZER_CLASSES and (Path(directory) / "tokenizer.json").is_file():
        return without_loader_keys(PreTrainedTokenizerFast.from_pretrained(directory))
    return without_loader_keys(
        AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, use_fast=True)
    )


def load_tokenizer(spec: ModelSpec, require_chat_template: bool = False) -> PreTrainedTokenizerBase:
    directory = resolve_model_dir(spec, weights=False)
    tokenizer = load_tokenizer_dir(directory, spec.trust_remote_code)
    override = chat_template_text(spec)
    if override is not None:
        tokenizer.chat_template = override
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"model {spec.name!r} ({spec.path}): the tokenizer has no chat template and the recipe gives none "
            f"(set chat_template: for this model)"
        )
    return tokenizer


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else 0.

    Padded positions are masked out of attention and loss, and generate() fills finished rows with it before
    decoding with skip_special_tokens, so any special id works; what matters is that every collator, generate()
    call and saved config picks the same one. `is not None`, not `or`: id 0 is a real pad token in many vocabularies.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _torch_dtype(name: str) -> Any:
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        name
    ]


def load_model(
    spec: ModelSpec,
    dtype: str | None = None,
    device: str = "cpu",
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    quantization_config: Any = None,
) -> PreTrainedModel:
    """A causal LM from safetensors. `device_map` ("auto", or module -> device) shards a model too big for one
    device over the GPUs, then CPU memory, then `offload_folder` (within `max_memory`); otherwise it goes whole to
    `device`. `attn_implementation`: sdpa, flash_attention_2, eager (default: transformers' choice).
    `quantization_config` (e.g. bitsandbytes 4-bit for QLoRA) goes to from_pretrained; place it with device_map."""
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(spec)
    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors and not spec.allow_pickle:
        raise ModelLoadError(
            f"model {spec.name!r} ({directory}): no .safetensors weights; pickle weights are refused unless the "
            f"recipe sets allow_pickle: true for this model"
        )
    extra: dict[str, Any] = {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if device_map is not None:
        extra.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=_torch_dtype(dtype or spec.dtype),
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=True if not spec.allow_pickle else None,
        **extra,
    )
    return model if device_map is not None else model.to(device)


@dataclass(frozen=True)
class VocabReport:
    config_vocab: int
    tokenizer_vocab: int
    embedding_rows: int | None

    @property
    def padded(self) -> bool:
        return self.config_vocab > self.tokenizer_vocab

    def describe(self) -> str:
        rows = f", embedding rows {self.embedding_rows}" if self.embedding_rows is not None else ""
        return f"config vocab {self.config_vocab}, tokenizer {self.tokenizer_vocab}{rows}"


def check_vocab(spec: ModelSpec, config: Any, tokenizer: Any, model: Any = None) -> VocabReport:
    """Padded embeddings (config 152064 vs tokenizer 151665) are fine and logged. A tokenizer larger than the
    model's output is fine when every id past it is an added token (Gemma-3's `<image_soft_token>` at 262144 with
    262,144 embedding rows): text produces one only by spelling it out, and a row that does is skipped with its id
    (`fuse.data.chat.TokenOutOfRange`). Ordinary vocabulary past the embedding is an error: any text may need it."""
    rows = None
    if model is not None:
        rows = int(model.get_input_embeddings().weight.shape[0])
    report = VocabReport(int(config.vocab_size), len(tokenizer), rows)
    check_tokenizer_fits(spec, tokenizer, rows if rows is not None else report.config_vocab)
    if report.padded:
        log.info("model %s: padded vocabulary (%s)", spec.name, report.describe())
    return report


def check_tokenizer_fits(spec: ModelSpec, tokenizer: Any, limit: int) -> None:
    """Every ordinary tokenizer id must index the model's `limit` output rows; added tokens past them are logged
    (a row that spells one out is skipped with its id: `fuse.data.chat.TokenOutOfRange`)."""
    size = len(tokenizer)
    if size <= limit:
        return
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ordinary = [i for i in range(limit, size) if i not in added]
    if ordinary:
        raise ModelLoadError(
            f"model {spec.name!r} ({spec.path}): the tokenizer has {size} tokens but the model outputs {limit}; "
            f"{len(ordinary)} ordinary vocabulary ids lie past them (first: {ordinary[0]} "
            f"{tokenizer.convert_ids_to_tokens(ordinary[0])!r}): vocab-size mismatch"
        )
    log.warning(
        "model %s: the tokenizer's added tokens %s lie past the model's %d output rows; a row that spells one out "
        "is skipped with its id",
        spec.name,
        ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in range(limit, min(size, limit + 5))),
        limit,
    )


def identity(spec: ModelSpec) -> dict[str, Any]:
    """What names a model's weights for fingerprints: file digests for local folders, the revision for hub ids."""
    from fuse.fingerprint import files_digest

    local = Path(spec.path)
    if local.is_dir():
        files = sorted(
            p
            for p in local.iterdir()
            if p.is_file()
            # .py: a trust_remote_code model's code is part of what it computes
            and (p.suffix in WEIGHT_SUFFIXES or p.suffix in (".json", ".jinja", ".model", ".txt", ".py"))
        )
        return {"files": files_digest(files)}  # by content: a moved or copied model is the same model
    return {"hub_id": spec.path, "revision": spec.revision or "main"}

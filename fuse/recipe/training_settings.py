"""Settings of the stages that train (distill, fpo): the HF Trainer's knobs, DeepSpeed and trackers.

TrainingJob records a settings class as "module:Class" (fuse/training.py); jobs written before the recipe became a
package say "fuse.recipe:DistillSettings", which still resolves through fuse/recipe/__init__.py's re-export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fuse.recipe.base import Frozen, StageSettings, operational

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


class DistillSettings(TrainSettings):
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
        return self.model_copy(update=self._defaults("sft_baseline", "controls", "oracle_teacher"))

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
    weights: dict[str, float] = Field(default_factory=dict, description="Per-source weights for `mean`.")
    include_pivot: bool = Field(False, description="Count the pivot among the fused sources.")

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

"""Training infrastructure shared by the distill and fpo stages: TrainingArguments and a DeepSpeed config from the
recipe, multi-process launch through `accelerate launch`, resume from the newest complete checkpoint, logs, final save.

A stage describes its run as a `TrainingJob` (JSON-able) whose `builder` ("module:function") makes the Trainer;
the same job runs in-process (one process, no DeepSpeed) or in every rank of an `accelerate launch` child
(`python -m fuse.training job.json`), so both paths share one code path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fuse import preemption
from fuse.estimate import size_text
from fuse.io import publish_dir, write_json_atomic
from fuse.launch import allocated_nodes, multinode_command
from fuse.length_grouping import STRATEGY
from fuse.logs import setup_logging
from fuse.process_group import die_with_parent, run_in_group
from fuse.recipe import TrainSettings
from fuse.resources import return_freed_memory
from fuse.store import MODEL_FOLDER

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FOLDER = "adapter"  # out/adapter: a LoRA run's trained adapter, beside the merged out/model
LOG_FILE = "train.jsonl"
PLOT_FILE = "loss.png"


class TrainingError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class TrainingJob:
    """Everything a rank needs to build and run one training: plain data, written to job.json for launches."""

    builder: str  # "module:function", called as function(job, args) -> Trainer
    settings_class: str  # "fuse.recipe.training_settings:DistillSettings"
    settings: dict[str, Any]  # settings.model_dump(by_alias=True)
    checkpoint_dir: str  # Trainer output_dir: checkpoint-N folders
    model_dir: str  # the final HF checkpoint
    log_dir: str  # JSONL log and loss plot
    settings_key: str = "stages"  # YAML path of the settings, for error messages
    params: dict[str, Any] = field(default_factory=dict)  # builder-specific
    # the stage instance: progress lines, and the trackers' run name where `tracking` has none
    run_name: str = ""
    tracking: dict[str, str] = field(default_factory=dict)  # project, group, run_name: tracking_names()
    # the nodes its ranks span (num_processes on each): what the recipe planned, checked at launch
    nodes: int = 1

    def load_settings(self) -> TrainSettings:
        return _import(self.settings_class).model_validate(self.settings)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingJob:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    @property
    def adapter_dir(self) -> Path:
        """Where a LoRA run keeps its trained adapter: beside the final model (out/adapter)."""
        return Path(self.model_dir).parent / ADAPTER_FOLDER


def _import(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def tracking_names(settings: TrainSettings, recipe_name: str, instance: str) -> dict[str, str]:
    """What the trackers file a stage instance's run under: the recipe's tracking names (default: the recipe's name)
    and the run <recipe name>/<instance>."""
    return {
        "project": settings.tracking.project or recipe_name,
        "group": settings.tracking.group or recipe_name,
        "run_name": f"{recipe_name}/{instance}",
    }


def make_job(
    builder: str,
    settings: TrainSettings,
    stage_dir: Path,
    out: Path,
    settings_key: str,
    recipe_name: str = "",
    nodes: int = 1,
    **params,
) -> TrainingJob:
    """The usual layout: checkpoints in <stage>/checkpoints (kept across reruns), logs in <stage>/logs; with the
    recipe's name, the trackers' names (tracking_names)."""
    cls = type(settings)
    return TrainingJob(
        builder=builder,
        settings_class=f"{cls.__module__}:{cls.__name__}",
        settings=settings.model_dump(by_alias=True, mode="json"),
        checkpoint_dir=str(stage_dir / "checkpoints"),
        model_dir=str(out / MODEL_FOLDER),
        log_dir=str(stage_dir / "logs"),
        settings_key=settings_key,
        params=params,
        run_name=stage_dir.name,
        tracking=tracking_names(settings, recipe_name, stage_dir.name) if recipe_name else {},
        nodes=nodes,
    )


# --------------------------------------------------------------------------------------------- configuration


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def needs_launcher(settings: TrainSettings, nodes: int = 1) -> bool:
    """DeepSpeed or several processes (on one node or more) need `accelerate launch`; plain single-process training
    runs in-process."""
    ds = settings.deepspeed
    return nodes > 1 or settings.num_processes > 1 or ds.zero_stage > 0 or ds.config is not None


# Modules that make each `report_to` tracker work (any one of them), when it is not the tracker's own name.
TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "azure_ml": ("azureml",),
    "flyte": ("flytekit",),
}


def check_settings(settings: TrainSettings, key: str) -> None:
    """Optional packages the recipe asks for that are not installed, reported up front with their YAML key.
    (DeepSpeed combinations it would reject mid-launch are refused when the recipe loads: DeepSpeedSettings.)"""
    from importlib.util import find_spec

    for tracker in settings.report_to:
        if not any(find_spec(m) for m in TRACKER_MODULES.get(tracker, (tracker,))):
            raise TrainingError(f"{key}.report_to: {tracker} is not installed (pip install {tracker})")
    if settings.liger and find_spec("liger_kernel") is None:
        raise TrainingError(f"{key}.liger: liger-kernel is not installed (pip install liger-kernel)")
    if (settings.attn_implementation or "").startswith("flash_attention") and find_spec("flash_attn") is None:
        raise TrainingError(
            f"{key}.attn_implementation: flash-attn is not installed (pip install flash-attn)"
        )
    if settings.peft is not None and find_spec("peft") is None:
        raise TrainingError(f"{key}.peft: peft is not installed (pip install peft)")
    if settings.peft is not None and settings.peft.load_in_4bit:
        if find_spec("bitsandbytes") is None:
            raise TrainingError(
                f"{key}.peft.load_in_4bit: bitsandbytes is not installed (pip install bitsandbytes)"
            )
        if not on_gpu():
            raise TrainingError(
                f"{key}.peft.load_in_4bit: QLoRA needs a CUDA GPU (bitsandbytes' 4-bit weights) and there is none "
                "here: train LoRA on full-precision weights (load_in_4bit: false), or run on a GPU node"
            )


def merge_config(base: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """`mine` over `base`, mapping by mapping."""
    merged = dict(base)
    for name, value in mine.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = merge_config(merged[name], value)
        else:
            merged[name] = value
    return merged


def deepspeed_config(settings: TrainSettings, gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for `settings`: fuse's, the recipe's own `deepspeed.config` merged over it, then what
    fuse must keep: batch sizes, clipping and precision "auto" (the Trainer fills them from the recipe) and, under
    ZeRO-3, gathered weights at save."""
    ds = settings.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": gpu}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    config = merge_config(
        {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "zero_optimization": zero,
            # HF's AdamW also works with an offloaded optimizer on CPU (no DeepSpeedCPUAdam build needed).
            "zero_force_ds_cpu_optimizer": False,
        },
        ds.config or {},
    )
    if ds.zero_stage == 3:
        # Without this, ZeRO-3 saves each rank's shard only and save_model writes an empty state dict.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def training_arguments(
    settings: TrainSettings, output_dir: str, launched: bool, **overrides: Any
) -> TrainingArguments:
    """TrainingArguments from the recipe. `launched`: this rank runs under `accelerate launch` (state configured)."""
    from transformers import TrainingArguments

    gpu = on_gpu()
    if settings.bf16 and not gpu:
        log.info("bf16 is requested but there is no GPU: training in float32")
    zero3_adapters = settings.peft is not None and launched and settings.deepspeed.zero_stage == 3
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=settings.weight_decay,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.bf16 and gpu,
        gradient_checkpointing=settings.gradient_checkpointing,
        # PEFT under ZeRO-3 needs reentrant checkpointing (as TRL sets it: trl#2514)
        gradient_checkpointing_kwargs={"use_reentrant": zero3_adapters}
        if settings.gradient_checkpointing
        else None,
        use_cpu=not gpu,
        report_to=list(settings.report_to),
        use_liger_kernel=settings.liger,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if settings.group_by_length:  # fuse.length_grouping.LengthGrouping answers it in fuse's trainers
        values["train_sampling_strategy"] = STRATEGY
    if getattr(settings, "validation", False):
        # one selection rule for every arm: the validation loss at every checkpoint, the best one kept
        values.update(
            eval_strategy="steps",
            eval_steps=settings.save_steps,
            per_device_eval_batch_size=settings.per_device_batch_size,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
        )
    values.update(passthrough(settings))
    if launched:
        values["deepspeed"] = deepspeed_config(settings, gpu)
        values["accelerator_config"] = {"use_configured_state": True}
    values.update(overrides)
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as error:
        if not settings.trainer_args:
            raise
        raise TrainingError(
            f"{settings.STAGE}.trainer_args: the Trainer refuses these arguments: {error}"
        ) from None


def passthrough(settings: TrainSettings) -> dict[str, Any]:
    """The recipe's trainer_args that are TrainingArguments fields (fpo's DPOConfig-only ones go to
    fuse.fpo_trainer.dpo_config). Any other key is refused here too, for a recipe loaded where the installed
    transformers' fields could not be read."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(settings.trainer_args) - fields - set(settings.CONFIG_ONLY))
    if unknown:
        raise TrainingError(
            f"{settings.STAGE}.trainer_args: {', '.join(unknown)}: not a {settings.TRAINER_CONFIG} field"
        )
    return {key: value for key, value in settings.trainer_args.items() if key in fields}


def job_arguments(job: TrainingJob, settings: TrainSettings, launched: bool) -> TrainingArguments:
    """The job's TrainingArguments: the recipe's, with the trackers' run name (and trackio's project)."""
    names = job.tracking
    overrides: dict[str, Any] = {"run_name": names.get("run_name") or job.run_name or None}
    if names.get("project"):
        overrides["project"] = names["project"]
    return training_arguments(settings, job.checkpoint_dir, launched, **overrides)


# Where each tracker reads a run's project and group (its run name is TrainingArguments.run_name; trackio's project
# is TrainingArguments.project). mlflow has no group: it gets a `group` tag (MLFLOW_TAGS).
TRACKER_VARIABLES = {
    "wandb": {"WANDB_PROJECT": "project", "WANDB_RUN_GROUP": "group"},
    "mlflow": {"MLFLOW_EXPERIMENT_NAME": "project", "MLFLOW_TAGS": "group"},
    "comet_ml": {"COMET_PROJECT_NAME": "project"},
    "clearml": {"CLEARML_PROJECT": "project", "CLEARML_TASK": "run_name"},
    "swanlab": {"SWANLAB_PROJECT": "project"},
}


def training_env(
    job: TrainingJob, settings: TrainSettings, environ: dict[str, str] | os._Environ = os.environ
) -> dict[str, str]:
    """The environment variables the job's trackers read: the tensorboard folder of this instance, and the project,
    group and run names. A name the recipe sets (tracking.project, tracking.group) is set; a default one (the
    recipe's name) only where `environ` does not already set that variable."""
    env: dict[str, str] = {}
    if "tensorboard" in settings.report_to:  # each instance's events beside its other logs
        env["TENSORBOARD_LOGGING_DIR"] = str(Path(job.log_dir) / "tensorboard")
    explicit = {name for name in ("project", "group") if getattr(settings.tracking, name) is not None}
    for tracker in settings.report_to:
        for variable, name in TRACKER_VARIABLES.get(tracker, {}).items():
            value = job.tracking.get(name)
            if not value or (name not in explicit and variable in environ):
                continue
            env[variable] = json.dumps({"group": value}) if variable == "MLFLOW_TAGS" else value
    return env


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]):
    """`values` in os.environ for the duration (the training's trackers read them), the previous state after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------- LoRA / QLoRA


def load_trainable(spec: Any, settings: TrainSettings) -> Any:
    """The model a training starts from: float32 weights (bf16 runs under autocast), with the recipe's attention
    kernel; for QLoRA (peft.load_in_4bit) frozen 4-bit NF4 weights on this rank's GPU, computing in bf16 or float32."""
    from fuse.models import load_model

    if settings.peft is None or not settings.peft.load_in_4bit:
        return load_model(spec, dtype="float32", attn_implementation=settings.attn_implementation)
    import torch
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if settings.bf16 else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    return load_model(
        spec,
        dtype="bfloat16" if settings.bf16 else "float32",
        attn_implementation=settings.attn_implementation,
        device_map={"": PartialState().local_process_index},
        quantization_config=quantization,
    )


def with_adapters(model: Any, settings: TrainSettings) -> Any:
    """`model` with LoRA adapters (settings.peft) on its target modules, everything else frozen, as TRL's trainers
    wrap a model they are given a peft_config for."""
    from peft import get_peft_model

    model = get_peft_model(model, settings.peft.lora_config())
    if settings.gradient_checkpointing:
        # checkpointed blocks need an input that requires grad when every weight before them is frozen
        model.enable_input_require_grads()
    return model


def merge_adapter(job: TrainingJob, tokenizer: Any) -> None:
    """The trained adapter (out/adapter) merged into a fresh float32 copy of the model the job started from, written
    as the job's final model: a full checkpoint, the same files as full fine-tuning writes. For QLoRA the base is
    loaded in full precision, not 4-bit: the merge adds the adapter to the real weights."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from fuse.models import load_model
    from fuse.recipe import ModelSpec

    # Under a live ZeRO-3 config, from_pretrained partitions a model as it loads (deepspeed.zero.Init: collective
    # calls that the other ranks, waiting at the barrier, never join). The training is over: let its config go.
    unset_hf_deepspeed_config()
    base = load_model(ModelSpec.model_validate(job.params["model"]), dtype="float32")
    merged = PeftModel.from_pretrained(base, str(job.adapter_dir)).merge_and_unload()
    model_dir = Path(job.model_dir)
    staging = model_dir.parent / f".{model_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    publish_dir(staging, model_dir)


# --------------------------------------------------------------------------------------------- disk space

ADAM_STATE_BYTES = 8  # two float32 moments per trained parameter
MASTER_COPY_BYTES = 4  # mixed precision keeps a float32 copy of each trained parameter in the optimizer state


@dataclass(frozen=True)
class DiskNeed:
    """What a training run writes at most: `alive` checkpoints at once, each of `checkpoint` bytes, and the final
    model (`final` bytes)."""

    checkpoint: int
    alive: int
    final: int

    @property
    def total(self) -> int:
        return self.checkpoint * self.alive + self.final


def disk_need(
    weight_bytes: int,
    trained_weight_bytes: int,
    trained_params: int,
    steps: int,
    save_steps: int,
    save_total_limit: int,
    mixed_precision: bool = False,
) -> DiskNeed:
    """The most a run writes: a checkpoint holds the weights it trains (all of them; a LoRA run only its adapter's,
    `trained_weight_bytes`) and Adam's state for each trained parameter; the Trainer writes a new checkpoint before
    it deletes the oldest, so up to save_total_limit + 1 are alive, and never more than the saves the run makes plus
    one (a preemption's); the final model has every weight (`weight_bytes`)."""
    optimizer = trained_params * (ADAM_STATE_BYTES + (MASTER_COPY_BYTES if mixed_precision else 0))
    saves = steps // save_steps + 1
    return DiskNeed(trained_weight_bytes + optimizer, min(save_total_limit + 1, saves), weight_bytes)


def planned_steps(args: TrainingArguments, rows: int, world_size: int) -> int:
    """The optimizer steps a run makes: max_steps, else its epochs of `rows` in batches over every rank."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(rows / (args.per_device_train_batch_size * world_size))
    return math.ceil(batches / args.gradient_accumulation_steps * args.num_train_epochs)


def check_free_space(trainer: Trainer, key: str) -> None:
    """Refuse to start a training whose checkpoints and final model do not fit in the free space of its folder (a
    full disk otherwise ends it at its first checkpoint with a torn file and an error that does not say why)."""
    model, args = trainer.model, trainer.args
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    need = disk_need(
        weight_bytes,
        sum(p.numel() * p.element_size() for p in trained),
        sum(p.numel() for p in trained),
        planned_steps(args, len(trainer.train_dataset), args.world_size),
        args.save_steps,
        args.save_total_limit,
        mixed_precision=args.bf16 or args.fp16,
    )
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need.total:
        raise TrainingError(
            f"{key}: {folder} has {size_text(free)} free; this training writes up to {size_text(need.total)} "
            f"({need.alive} checkpoint(s) of {size_text(need.checkpoint)} at once with save_total_limit "
            f"{args.save_total_limit}, and the final model of {size_text(need.final)}). Free space there, or lower "
            "save_total_limit / raise save_steps."
        )


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG states): a
    checkpoint is complete when it parses, names this step, and the weights and optimizer state are there."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if state.get("global_step") != checkpoint_step(path):
        return False
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("global_step*"))
    has_optimizer = (path / "optimizer.pt").is_file() or any(path.glob("global_step*"))
    return has_weights and has_optimizer


def newest_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    for _step, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
        log.warning("ignoring incomplete checkpoint %s", path)
    return None


def check_checkpoint_trust(path: Path) -> None:
    """Resuming unpickles the checkpoint (optimizer, scheduler and RNG states; DeepSpeed loads its own files with
    weights_only=False), so whoever can write there can run code in this job. Refuse a checkpoint with a file or
    folder that is someone else's or writable by others than its owner (chmod -R go-w fixes ours). Where the
    workdir is group-writable on purpose and the group is trusted, FUSE_TRUST_CHECKPOINTS=1 skips the check."""
    if os.environ.get("FUSE_TRUST_CHECKPOINTS") == "1":
        return
    for item in [path.parent, path, *sorted(path.rglob("*"))]:
        st = item.lstat()
        if st.st_uid != os.getuid():
            why = f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
        elif st.st_mode & 0o022 and not item.is_symlink():
            why = f"is writable by {'group and others' if st.st_mode & 0o002 else 'its group'}"
        else:
            continue
        raise TrainingError(
            f"not resuming from {path}: {item} {why}, and resuming unpickles that checkpoint (it could run "
            f"someone else's code). Fix the permissions (chmod -R go-w {path.parent}), delete the checkpoint to "
            "start over, or set FUSE_TRUST_CHECKPOINTS=1 if everyone who can write there is trusted."
        )


# --------------------------------------------------------------------------------------------- logging


class RecordedMetrics:
    """A Trainer mixin (put it first in the bases): `record(name, value)` during compute_loss, averaged into the
    next logged training entry."""

    def record(self, name: str, value: float) -> None:
        if not hasattr(self, "_recorded"):
            self._recorded: dict[str, list[float]] = {}
        self._recorded.setdefault(name, []).append(float(value))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        recorded = getattr(self, "_recorded", {})
        if "loss" in logs and recorded:  # training entries only, not the final summary
            logs.update({name: sum(v) / len(v) for name, v in recorded.items() if v})
            self._recorded = {}
        super().log(logs, *args, **kwargs)


def jsonl_logger(path: Path) -> Any:
    """A TrainerCallback appending every log entry (with its step) to `path` on the main process."""
    from transformers import TrainerCallback

    class JsonlLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLogger()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Log entries by step; after a resume the rerun steps appear twice and the later entry wins."""
    entries: dict[tuple[int, bool], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                entries[(entry["step"], "loss" in entry)] = entry
    return [entries[key] for key in sorted(entries)]


def plot_loss_curves(entries: list[dict[str, Any]], png: Path, title: str = "") -> None:
    """The run's curves as fuse.plots draws them: losses smoothed over their raw points with the learning rate on
    a second axis; beside them, for a preference run, rewards/accuracies and rewards/margins (TRL's names)."""
    from fuse import plots

    plots.plot_loss_curves(entries, png, title)


# --------------------------------------------------------------------------------------------- running


def save_final_model(trainer: Trainer, model_dir: Path) -> None:
    """Every rank calls save_model (ZeRO-3 gathers collectively); rank 0 moves the files into place atomically,
    with the tokenizer, chat template and generation config, and without the pickled training_args.bin. The config
    keeps the KV cache on (the Trainer turns it off for gradient checkpointing; a saved model generates with it)."""
    config = getattr(trainer.model, "config", None)
    if getattr(config, "use_cache", None) is False:
        config.use_cache = True
    staging = model_dir.parent / f".{model_dir.name}.staging"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (staging / "training_args.bin").unlink(missing_ok=True)
        publish_dir(staging, model_dir)
    trainer.accelerator.wait_for_everyone()


def console_progress(label: str) -> Callable[..., None]:
    """Progress lines of a launched rank (called on rank 0 only) on its stderr: the SLURM log, or the console of
    the `fuse run` that started it."""
    from fuse.progress import Progress

    display = Progress()

    def report(done: int, total: int | None = None, unit: str = "step", **metrics: Any) -> None:
        if not display.prefix:
            display.start(label)
        display.update(done, total, unit, **metrics)

    return report


def run_job(
    job: TrainingJob,
    launched: bool = False,
    callbacks: tuple = (),
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Build the Trainer, resume from the newest complete checkpoint, train, save the model, plot the losses.
    `progress(step, max_steps, "step", loss=...)` is called on rank 0 after each step (default: lines on stderr).
    The trackers' variables (training_env) are set for this run only."""
    settings = job.load_settings()
    with scoped_environ(training_env(job, settings)):
        return _run(job, settings, launched, callbacks, progress)


def _run(
    job: TrainingJob,
    settings: TrainSettings,
    launched: bool,
    callbacks: tuple,
    progress: Callable[..., None] | None,
) -> dict[str, Any]:
    from transformers import PrinterCallback, set_seed

    from fuse.progress import training_callback

    args = job_arguments(job, settings, launched)
    # what the builder draws at random (LoRA's initial A matrices) must be the same in every run of the job, as the
    # Trainer then seeds its own draws
    set_seed(args.seed)
    trainer = _import(job.builder)(job, args)
    check_free_space(trainer, job.settings_key)
    log_path = Path(job.log_dir) / LOG_FILE
    trainer.add_callback(jsonl_logger(log_path))
    progress = progress or console_progress(job.run_name or Path(job.log_dir).parent.name)
    for callback in (*callbacks, training_callback(progress), preemption.trainer_callback()):
        trainer.add_callback(callback)
    trainer.remove_callback(
        PrinterCallback
    )  # logs go to the JSONL file, the trackers and the progress display
    resume = newest_complete_checkpoint(job.checkpoint_dir)
    if resume is not None:
        check_checkpoint_trust(resume)
        log.info("resuming from %s", resume)
    with preemption.checkpointing():  # SIGUSR1 (SLURM preemption): save a checkpoint at the next step, stop
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    preemption.raise_if_requested()  # a stopped run is not a finished one: never save it as the final model
    if settings.peft is None:
        save_final_model(trainer, Path(job.model_dir))
    else:  # the adapter, then the full model merged from it: what merge, evaluate and publish read
        save_final_model(trainer, job.adapter_dir)
        if trainer.is_world_process_zero():
            merge_adapter(job, trainer.processing_class)
        trainer.accelerator.wait_for_everyone()
    summary = {
        "resumed_from": resume and resume.name,
        "ranks": rank_placement(),
        "global_step": trainer.state.global_step,
        **result.metrics,
        **best_checkpoint(trainer.state),
    }
    if trainer.is_world_process_zero():
        plot_loss_curves(
            read_log(log_path), Path(job.log_dir) / PLOT_FILE, Path(job.model_dir).parent.parent.name
        )
        write_json_atomic(Path(job.log_dir) / "summary.json", summary)
    return summary


RUN_FACTS = ("resumed_from", "ranks", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def rank_placement() -> list[str]:
    """Where each rank ran, in rank order: its SLURM node (SLURMD_NODENAME), else its host. A collective: every rank
    calls it."""
    from accelerate.utils import gather_object

    return gather_object([os.environ.get("SLURMD_NODENAME") or socket.gethostname()])


def result_of(summary: dict[str, Any]) -> dict[str, Any]:
    """A training summary without how this particular run went (its timings, the checkpoint it resumed from):
    what goes into a stage's outputs, so a resumed or repeated run that trains the same weights writes the same
    files and nothing downstream goes stale. The whole summary stays in logs/summary.json."""
    return {k: v for k, v in summary.items() if k not in RUN_FACTS}


def best_checkpoint(state: Any) -> dict[str, Any]:
    """With validation: the kept checkpoint's step and validation loss, and the validation curve."""
    if state.best_model_checkpoint is None:
        return {}
    curve = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]
    return {
        "best_step": checkpoint_step(Path(state.best_model_checkpoint)),
        "best_validation_loss": state.best_metric,
        "validation_curve": curve,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# torchrun (under `accelerate launch`) passes these signals on to its ranks and waits this long for them to exit
# before SIGKILL: SIGUSR1 (preemption) leaves the ranks time to save a checkpoint, within SLURM's default signal
# grace (executor.slurm.signal_grace_seconds, 120 s). Older torch versions ignore the variables.
LAUNCHER_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90",
}


def launch_command(job_path: Path, settings: TrainSettings) -> list[str]:
    """`accelerate launch` with DeepSpeed (ZeRO stage from the recipe, 0 included) on `num_processes` ranks."""
    return [  # one option and its value a line
        sys.executable, "-m", "accelerate.commands.launch",
        "--use_deepspeed",
        "--num_processes", str(settings.num_processes),
        "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "bf16" if settings.bf16 and on_gpu() else "no",
        "--dynamo_backend", "no",
        "-m", "fuse.training", str(job_path),
    ]  # fmt: skip


def train(
    job: TrainingJob, callbacks: tuple = (), progress: Callable[..., None] | None = None
) -> dict[str, Any]:
    """Run `job`: in this process when it is single-process without DeepSpeed, else through `accelerate launch`
    (`callbacks` and `progress` apply in-process; launched ranks print their own progress lines from rank 0)."""
    settings = job.load_settings()
    check_settings(settings, job.settings_key)
    check_nodes(job)
    if not needs_launcher(settings, job.nodes):
        return run_job(job, callbacks=callbacks, progress=progress)
    job_path = Path(job.log_dir) / "job.json"
    job.save(job_path)
    # Inside a multi-node SLURM allocation: one launcher per node through srun (unchanged otherwise). The launcher
    # and its ranks end with this process (fuse.process_group); a SIGUSR1 is passed on to the ranks, which save a
    # checkpoint and stop, and then this stage stops too.
    command = multinode_command(launch_command(job_path, settings), job.nodes)
    log.info("launching %d processes: %s", settings.num_processes, " ".join(command))
    with preemption.checkpointing():
        returncode = run_in_group(command, {**os.environ, **LAUNCHER_ENV})
    preemption.raise_if_requested()
    if returncode != 0:
        raise TrainingError(f"training ranks failed (exit {returncode}); see the log above and {job.log_dir}")
    return json.loads((Path(job.log_dir) / "summary.json").read_text(encoding="utf-8"))


def check_nodes(job: TrainingJob, environ: Mapping[str, str] | None = None) -> None:
    """Before any rank starts: a job planned for several nodes runs in an allocation of exactly those, or its global
    batch, and so its weights, would not be what its fingerprint says. (A one-node job runs on one node of any.)"""
    nodes = allocated_nodes(environ)
    if job.nodes > 1 and nodes != job.nodes:
        where = "outside SLURM" if nodes == 1 else f"in an allocation of {nodes} nodes"
        raise TrainingError(
            f"{job.run_name or job.log_dir}: planned for {job.nodes} node(s) (executor.resources.<stage>.nodes, "
            f"{job.nodes} x num_processes ranks) but running {where}: submit it with `fuse submit`, or change "
            f"the recipe's node count"
        )


def init_distributed_state() -> None:
    """Configure accelerate before TrainingArguments: on CPU (DS_ACCELERATOR=cpu) it otherwise reports
    world_size 1 on every rank; gloo is the CPU backend."""
    from accelerate import PartialState

    PartialState(**({} if on_gpu() else {"backend": "gloo"}))


def main(argv: list[str] | None = None) -> None:
    """Rank entry point: python -m fuse.training job.json (started by `accelerate launch`)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m fuse.training JOB.json")
    die_with_parent()  # the launcher's ranks run in sessions of their own: none outlives it, even a SIGKILLed one
    setup_logging(logging.INFO)
    return_freed_memory()
    init_distributed_state()
    run_job(TrainingJob.load(argv[0]), launched=True)
    leave_process_group()


def leave_process_group() -> None:
    """After a finished training, every rank waits for rank 0 to write the last files, then leaves the process
    group. A rank that exits with the group open while another still works can abort in its communication threads
    ("terminate called without an active exception", seen on two nodes), and the launcher then fails the job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The Trainer passthrough (stages.distill/fpo.trainer_args: any TrainingArguments / DPOConfig field fuse does not
set itself) and the trackers' names (project, group, run) a stage instance's training carries."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuse import training
from fuse.recipe import DistillSettings, FpoSettings, RecipeError, parse_recipe
from fuse.recipe.training_settings import (
    DPO_BY_SETTING,
    DPO_OWNED_FOR,
    DPO_PASSTHROUGH,
    OPERATIONAL_TRAINER_ARGS,
    OWNED_BY_SETTING,
    OWNED_FOR,
    TrackingSettings,
    trainer_argument_fields,
)


def recipe_with(tmp_path: Path, **stages) -> dict:
    """A recipe that parses (no file is read): only its training stages matter here."""
    return {
        "name": "toy",
        "workdir": str(tmp_path / "run"),
        "pivot": {"path": str(tmp_path)},
        "sources": [{"name": "a", "path": str(tmp_path)}],
        "data": {"sft": {"path": "x.jsonl"}, "preference": {"path": "p.jsonl", "format": "preference"}},
        "stages": stages,
    }


def problems(tmp_path: Path, **stages) -> list[str]:
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe_with(tmp_path, **stages))
    return [line.removeprefix("  - ") for line in str(error.value).splitlines()[1:]]


def test_trainer_args_reach_the_training_arguments(tmp_path):
    distill = {
        "trainer_args": {
            "max_grad_norm": 0.3,
            "optim": "adafactor",
            "adam_beta2": 0.95,
            "dataloader_num_workers": 1,
        },
        "warmup_ratio": 0.1,
        "lr_scheduler": "cosine_with_min_lr",
        "learning_rate": 2e-4,
    }
    settings = parse_recipe(recipe_with(tmp_path, distill=distill)).stages.distill
    args = training.training_arguments(settings, str(tmp_path), launched=False)
    assert (args.max_grad_norm, args.optim, args.adam_beta2) == (0.3, "adafactor", 0.95)
    assert args.dataloader_num_workers == 1  # a passthrough key overrides fuse's own default
    assert (args.warmup_steps, args.lr_scheduler_type, args.learning_rate) == (
        0.1,
        "cosine_with_min_lr",
        2e-4,
    )
    launched = training.deepspeed_config(settings, gpu=False)
    assert launched["gradient_clipping"] == "auto"  # the Trainer fills it from max_grad_norm


def test_fpo_passes_dpo_fields_to_its_dpo_config(tmp_path):
    from fuse.fpo_trainer import dpo_config

    fpo = {"trainer_args": {"max_grad_norm": 0.5, "disable_dropout": False}}
    settings = parse_recipe(recipe_with(tmp_path, fpo=fpo)).stages.fpo
    config = dpo_config(
        training.training_arguments(settings, str(tmp_path), launched=False), settings, beta=2.5
    )
    assert config.max_grad_norm == 0.5 and config.disable_dropout is False and config.beta == 2.5


def test_a_typo_and_an_owned_key_each_give_their_one_error(tmp_path):
    assert problems(tmp_path, distill={"trainer_args": {"max_grad_nrom": 1.0}}) == [
        "stages.distill.trainer_args.max_grad_nrom: not a TrainingArguments field; did you mean max_grad_norm?"
    ]
    assert problems(tmp_path, distill={"trainer_args": {"lr_scheduler_type": "linear"}}) == [
        "stages.distill.trainer_args.lr_scheduler_type: fuse sets it from stages.distill.lr_scheduler: set that "
        "instead"
    ]
    assert problems(tmp_path, fpo={"trainer_args": {"output_dir": "elsewhere"}}) == [
        "stages.fpo.trainer_args.output_dir: fuse sets it: checkpoints go to <instance>/checkpoints in the run store"
    ]
    # a DPOConfig field is one for fpo only; one of InfiFPO's own is refused with the reason
    assert problems(tmp_path, distill={"trainer_args": {"disable_dropout": False}}) == [
        "stages.distill.trainer_args.disable_dropout: not a TrainingArguments field (a DPOConfig one: "
        "stages.fpo.trainer_args takes it)"
    ]
    assert problems(tmp_path, fpo={"trainer_args": {"loss_type": "ipo"}})[0].startswith(
        "stages.fpo.trainer_args.loss_type: fuse sets it: fpo's loss is InfiFPO's"
    )


def test_the_key_lists_match_the_installed_libraries():
    """The fields read from transformers' source are its TrainingArguments' (without importing it at recipe load);
    every DPOConfig field beyond them is classed; every classed key is a real field."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    assert trainer_argument_fields() == fields
    dpo_only = {f.name for f in dataclasses.fields(DPOConfig) if f.init} - fields
    assert dpo_only == set(DPO_BY_SETTING) | set(DPO_OWNED_FOR) | set(DPO_PASSTHROUGH)
    assert set(OWNED_BY_SETTING) | set(OWNED_FOR) <= fields | {"warmup_ratio"}  # warmup_ratio: gone in v5
    assert OPERATIONAL_TRAINER_ARGS.issubset(fields | set(DPO_PASSTHROUGH))
    assert not OPERATIONAL_TRAINER_ARGS & (set(OWNED_BY_SETTING) | set(OWNED_FOR))
    assert all(key in DistillSettings.model_fields or key == "tracking" for key in OWNED_BY_SETTING.values())


def test_loading_a_recipe_with_a_passthrough_stays_light(tmp_path):
    """Checking trainer_args reads transformers' source: neither transformers nor torch is imported."""
    code = (
        "import json, sys; from fuse.recipe import parse_recipe; "
        f"parse_recipe(json.loads({json.dumps(json.dumps(recipe_with(tmp_path, distill={'trainer_args': {'optim': 'sgd'}})))}));"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------- tracking


def job_for(tmp_path: Path, settings, recipe: str = "tiny-demo", instance: str = "distill.llama"):
    stage_dir = tmp_path / instance
    return training.make_job(
        "x:y", settings, stage_dir, stage_dir / "out", "stages.distill", recipe_name=recipe
    )


def test_a_stage_instance_carries_its_project_group_and_run_names(tmp_path):
    job = job_for(tmp_path, DistillSettings())
    args = training.job_arguments(job, DistillSettings(), launched=False)
    assert (
        args.run_name == "tiny-demo/distill.llama" and args.project == "tiny-demo"
    )  # trackio reads .project
    assert job.run_name == "distill.llama"  # the progress lines keep the instance's name

    trackers = DistillSettings(report_to=["wandb", "mlflow", "tensorboard"])
    env = training.training_env(job_for(tmp_path, trackers), trackers, environ={})
    assert env == {
        "TENSORBOARD_LOGGING_DIR": str(tmp_path / "distill.llama" / "logs" / "tensorboard"),
        "WANDB_PROJECT": "tiny-demo",
        "WANDB_RUN_GROUP": "tiny-demo",
        "MLFLOW_EXPERIMENT_NAME": "tiny-demo",
        "MLFLOW_TAGS": '{"group": "tiny-demo"}',
    }
    # a default name yields to what the environment already says; a name the recipe sets does not
    assert "WANDB_PROJECT" not in training.training_env(
        job_for(tmp_path, trackers), trackers, {"WANDB_PROJECT": "t"}
    )
    named = DistillSettings(report_to=["wandb"], tracking=TrackingSettings(project="fusion", group="lora"))
    env = training.training_env(
        job_for(tmp_path, named), named, {"WANDB_PROJECT": "t", "WANDB_RUN_GROUP": "g"}
    )
    assert env == {"WANDB_PROJECT": "fusion", "WANDB_RUN_GROUP": "lora"}
    assert training.job_arguments(job_for(tmp_path, named), named, launched=False).project == "fusion"


def test_the_trackers_variables_are_set_for_the_training_only(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_GROUP", "outer")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    with training.scoped_environ({"WANDB_PROJECT": "fusion", "WANDB_RUN_GROUP": "lora"}):
        assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_RUN_GROUP"]) == ("fusion", "lora")
    assert "WANDB_PROJECT" not in os.environ and os.environ["WANDB_RUN_GROUP"] == "outer"


def test_the_stages_name_their_runs_after_the_recipe(tmp_path):
    """make_job as the stages call it: a job without a recipe name (older job files) keeps the instance's name."""
    job = job_for(tmp_path, FpoSettings(), recipe="fusechat", instance="fpo.gemma")
    assert job.tracking == {"project": "fusechat", "group": "fusechat", "run_name": "fusechat/fpo.gemma"}
    stage_dir = tmp_path / "distill.a"
    bare = training.make_job("x:y", DistillSettings(), stage_dir, stage_dir / "out", "stages.distill")
    assert training.job_arguments(bare, DistillSettings(), launched=False).run_name == "distill.a"

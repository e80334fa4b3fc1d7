"""The progress display (fuse/progress.py) and what training reports: per-step lines with rate, ETA and loss from
rank 0 only (in-process and under accelerate/DeepSpeed), and `report_to` trackers (TensorBoard events for real)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import test_distill
from test_distill import distill_job

from fuse import training
from fuse.progress import Progress, progress_line
from fuse.recipe import DeepSpeedSettings

# The distill tests' tiny pivot and synthetic top-K set (session fixtures).
pivot_dir, train_data = test_distill.pivot_dir, test_distill.train_data


def test_progress_line_has_rate_eta_and_metrics():
    line = progress_line("distill.llama", 40, 100, "step", 20.0, {"loss": 1.23456, "lr": None})
    assert line.startswith("distill.llama step 40/100 (40%) 2 step/s ETA 00:00:30 loss=1.235")
    assert "lr=" not in line and line.endswith("[00:00:20]")
    slow = progress_line("extract.qwen", 2, None, "rows", 10.0, {})
    assert "5 s/rows" in slow and "ETA" not in slow


def test_non_tty_lines_are_throttled_but_the_last_count_is_shown():
    stream = io.StringIO()
    progress = Progress(stream, interval=3600)
    progress.start("score.a")
    for done in range(1, 6):
        progress.update(done, 10, "pairs")
    progress.end("done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines  # started, the first update, the last throttled one, done
    assert "pairs 1/10" in lines[1] and "pairs 5/10" in lines[2] and lines[3].endswith("]")
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)  # timestamped for SLURM logs
    assert "\r" not in stream.getvalue()


@pytest.mark.slow
def test_training_reports_steps_with_loss_and_writes_tensorboard_events(tmp_path, pivot_dir, train_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = distill_job(tmp_path, pivot_dir, train_data, max_steps=4, report_to=["tensorboard"])
    reports = []
    training.train(job, progress=lambda *args, **metrics: reports.append((args, metrics)))
    assert [args for args, _ in reports] == [(step, 4, "step") for step in (1, 2, 3, 4)]
    assert all("loss" in metrics for _, metrics in reports[1:])  # the loss logged at the step before
    events = list((Path(job.log_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(Path(job.log_dir).rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4] and all(e.value > 0 for e in losses)
    assert "train/gold_ce" in accumulator.Tags()["scalars"]  # the stage's own metrics reach the tracker too


def test_missing_tracker_is_reported_with_its_key(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    job = distill_job(tmp_path, tmp_path, tmp_path, report_to=["wandb"])
    with pytest.raises(training.TrainingError, match=r"stages\.distill\.report_to: wandb is not installed"):
        training.train(job)


@pytest.mark.parametrize(
    ("settings", "missing", "message"),
    [
        ({"liger": True}, "liger_kernel", r"stages\.distill\.liger: liger-kernel is not installed"),
        (
            {"attn_implementation": "flash_attention_2"},
            "flash_attn",
            r"attn_implementation: flash-attn is not",
        ),
    ],
)
def test_optional_kernels_missing_are_reported_before_training(
    tmp_path, monkeypatch, settings, missing, message
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    with pytest.raises(training.TrainingError, match=message):
        training.train(distill_job(tmp_path, tmp_path, tmp_path, **settings))


def test_pass_through_settings_reach_the_training_arguments(tmp_path):
    from fuse.recipe import DistillSettings

    settings = DistillSettings(gradient_checkpointing=True, report_to=["tensorboard"], liger=True)
    args = training.training_arguments(settings, str(tmp_path), launched=False, run_name="distill.x")
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.report_to == ["tensorboard"] and args.run_name == "distill.x" and args.use_liger_kernel


def test_deepspeed_config_of_the_recipe_is_merged_under_what_fuse_keeps(tmp_path):
    from fuse.recipe import DistillSettings

    mine = tmp_path / "ds.json"
    mine.write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7}, "steps_per_print": 7}')
    settings = DistillSettings.model_validate(
        {"deepspeed": {"config": str(mine), "offload_params": True}, "num_processes": 2}
    )
    assert settings.deepspeed.config["steps_per_print"] == 7  # the file's content is what the recipe records
    assert training.needs_launcher(settings)
    config = training.deepspeed_config(settings, gpu=False)
    zero = config["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["reduce_bucket_size"] == 5e7 and zero["offload_param"]["device"] == "cpu"
    )
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # fuse needs it to save under ZeRO-3
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["steps_per_print"] == 7


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, "config.train_micro_batch_size_per_gpu: the Trainer sets it"),
        ({"bf16": {"enabled": True}}, "config.bf16.enabled: precision comes from"),
        ("missing.json", "cannot read the DeepSpeed config"),
    ],
)
def test_bad_deepspeed_config_names_the_key(tmp_path, config, message):
    from fuse.recipe import RecipeError, load_recipe

    from recipes import toy_recipe, write_recipe

    recipe = toy_recipe(tmp_path)
    recipe["stages"]["distill"] = {"deepspeed": {"config": config}}
    with pytest.raises(RecipeError, match=re.escape("stages.distill.deepspeed")) as error:
        load_recipe(write_recipe(tmp_path, recipe))
    assert message in str(error.value)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launched_ranks_report_progress_from_rank_zero_only(
    tmp_path, pivot_dir, train_data, capfd, monkeypatch
):
    monkeypatch.setenv("FUSE_PROGRESS_INTERVAL", "0")
    job = distill_job(
        tmp_path / "distill.x",
        pivot_dir,
        train_data,
        max_steps=2,
        num_processes=2,
        deepspeed=DeepSpeedSettings(stage=2),
        report_to=["tensorboard"],
    )
    training.train(job)
    err = capfd.readouterr().err
    steps = [line for line in err.splitlines() if re.search(r"distill\.x step \d/2", line)]
    assert len(steps) == 2, err[-3000:]  # one line per step: rank 1 stays quiet
    assert "loss=" in steps[-1] and "ETA" in steps[0]
    assert list((Path(job.log_dir) / "tensorboard").glob("events.out.tfevents.*"))

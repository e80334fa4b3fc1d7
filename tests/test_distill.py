"""The distill training infrastructure on a tiny model and a synthetic top-K dataset: single-process training,
reload with AutoModelForCausalLM, kill-and-resume equality, DeepSpeed ZeRO-2/3 on two CPU processes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fuse import training
from fuse.recipe import DeepSpeedSettings, DistillSettings, ModelSpec
from fuse.training import TrainingJob, make_job, newest_complete_checkpoint

BUILDER = "fuse.distill_trainer:build_distill_trainer"


@pytest.fixture(scope="session")
def pivot_dir(tmp_path_factory) -> Path:
    from tiny_lm import build

    return build(tmp_path_factory.mktemp("distill-pivot") / "pivot", arch="qwen2")


def synthetic_rows(tokenizer, n: int = 16, k: int = 4, seed: int = 0) -> list[dict]:
    """Chat rows tokenized with the pivot's template; random sparse teachers on response positions only."""
    from tiny_lm import corpus

    rng = random.Random(seed)
    texts = corpus(2 * n, seed)
    vocab = len(tokenizer)
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": texts[2 * i]}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(texts[2 * i + 1] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + answer_ids
        labels = [-100] * len(prompt_ids) + answer_ids
        ids, probs = [], []
        for position, label in enumerate(labels):
            if label == -100:
                ids += [-1] * k
                probs += [0.0] * k
                continue
            others = rng.sample([t for t in range(vocab) if t != label], k - 1)
            ids += [label, *others]
            weights = [rng.random() for _ in range(k)]
            probs += [0.6, *(0.3 * w / sum(weights) for w in weights[1:])]
            del position
        rows.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "target_ids": ids,
                "target_probs": probs,
                "target_width": k,
            }
        )
    return rows


@pytest.fixture(scope="session")
def train_data(pivot_dir, tmp_path_factory) -> Path:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pivot_dir)
    path = tmp_path_factory.mktemp("distill-data") / "train"
    Dataset.from_list(synthetic_rows(tokenizer)).save_to_disk(str(path))
    return path


def distill_job(tmp: Path, pivot_dir: Path, train_data: Path, **settings) -> TrainingJob:
    values = dict(
        max_steps=6,
        save_steps=2,
        save_total_limit=5,
        logging_steps=1,
        per_device_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler="constant",
        seed=7,
        lambda_=0.5,
    )
    values.update(settings)
    spec = ModelSpec(name="pivot", path=str(pivot_dir))
    params = {"model": spec.model_dump(mode="json"), "train_data": str(train_data)}
    return make_job(BUILDER, DistillSettings(**values), tmp, tmp / "out", "stages.distill", **params)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------------------------- configuration


def test_deepspeed_config_from_recipe():
    settings = DistillSettings(
        deepspeed=DeepSpeedSettings(stage=3, offload_optimizer=True, offload_params=True)
    )
    config = training.deepspeed_config(settings, gpu=False)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"] == {"enabled": "auto"}
    zero2 = training.deepspeed_config(DistillSettings(deepspeed=DeepSpeedSettings(stage=2)), gpu=False)
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]


def bare_recipe(tmp_path, distill: dict) -> dict:
    """A recipe that parses (no file is read): only its stages.distill matters to the test."""
    return {
        "name": "x",
        "workdir": str(tmp_path),
        "pivot": {"path": str(tmp_path)},
        "sources": [{"name": "s", "path": str(tmp_path)}],
        "data": {"sft": {"path": "x.jsonl"}},
        "stages": {"distill": distill},
    }


def test_bad_deepspeed_combination_names_the_key(tmp_path):
    from fuse.recipe import RecipeError, parse_recipe

    recipe = bare_recipe(tmp_path, {"deepspeed": {"stage": 2, "offload_params": True}})
    with pytest.raises(RecipeError, match=r"stages\.distill\.deepspeed: offload_params needs ZeRO stage 3"):
        parse_recipe(recipe)


def test_training_arguments_follow_the_recipe(tmp_path):
    settings = DistillSettings(
        learning_rate=2e-4,
        gradient_accumulation_steps=3,
        save_steps=5,
        bf16=True,
        gradient_checkpointing=True,
        deepspeed=DeepSpeedSettings(stage=2),
    )
    args = training.training_arguments(settings, str(tmp_path), launched=False)
    assert args.learning_rate == 2e-4 and args.gradient_accumulation_steps == 3 and args.save_steps == 5
    assert args.gradient_checkpointing and not args.bf16  # bf16 only on GPU
    assert training.needs_launcher(settings) and not training.needs_launcher(DistillSettings())


def test_incomplete_checkpoints_are_ignored(tmp_path):
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / "model.safetensors").write_bytes(b"x")
    (good / "optimizer.pt").write_bytes(b"x")
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torn = tmp_path / "checkpoint-4"  # killed while writing: no trainer_state.json yet
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"x")
    half = tmp_path / "checkpoint-6"
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_st')
    assert newest_complete_checkpoint(tmp_path) == good
    assert newest_complete_checkpoint(tmp_path / "none") is None


# --------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_single_process_training_writes_a_reloadable_checkpoint(tmp_path, pivot_dir, train_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = distill_job(tmp_path, pivot_dir, train_data, max_steps=4, gradient_checkpointing=True)
    summary = training.train(job)
    model_dir = Path(job.model_dir)
    assert summary["global_step"] == 4 and summary["resumed_from"] is None
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert not (model_dir / "training_args.bin").exists()  # no pickles in the published folder
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert AutoTokenizer.from_pretrained(model_dir).chat_template  # the chat template travels with the model
    assert (
        model.config.use_cache
    )  # the Trainer turned it off for gradient checkpointing; a saved model has it on
    before, after = weights(pivot_dir), weights(model_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    entries = [json.loads(line) for line in (Path(job.log_dir) / training.LOG_FILE).read_text().splitlines()]
    assert any("gold_ce" in e and "distill" in e for e in entries)
    assert (Path(job.log_dir) / training.PLOT_FILE).stat().st_size > 1000
    # the free-space check's sizes against what the run wrote: a checkpoint's weights and optimizer state, the model
    params = sum(t.numel() for t in before.values())
    need = training.disk_need(4 * params, 4 * params, params, steps=4, save_steps=2, save_total_limit=5)
    checkpoint = Path(job.checkpoint_dir) / "checkpoint-4"
    written = (checkpoint / "model.safetensors").stat().st_size + (checkpoint / "optimizer.pt").stat().st_size
    assert 0.95 < need.checkpoint / written < 1.05
    assert 0.95 < need.final / (model_dir / "model.safetensors").stat().st_size < 1.05
    assert need.alive == 3  # checkpoints 2 and 4, and one a preemption may add


def test_disk_need_by_hand():
    # 10 trained parameters of 100 (an adapter), float32: a checkpoint holds 40 bytes of weights and 80 of Adam
    need = training.disk_need(400, 40, 10, steps=100, save_steps=10, save_total_limit=2)
    assert (need.checkpoint, need.alive, need.final, need.total) == (120, 3, 400, 760)
    assert training.disk_need(400, 40, 10, steps=38, save_steps=1000, save_total_limit=2).alive == 1
    assert training.disk_need(400, 40, 10, 5, 1000, 2, mixed_precision=True).checkpoint == 40 + 10 * 12


def test_a_training_that_does_not_fit_on_the_disk_is_refused_before_it_starts(
    tmp_path, pivot_dir, train_data, monkeypatch
):
    import shutil

    job = distill_job(tmp_path, pivot_dir, train_data, max_steps=4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(training.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(
        training.TrainingError, match=r"stages.distill: .* has 1.0 MB free; this training writes"
    ):
        training.train(job)
    assert not list(Path(job.checkpoint_dir).glob("checkpoint-*")) and not Path(job.model_dir).exists()


class CrashAt:
    """Simulates a kill: raise out of training after `step` (checkpoints up to then are on disk)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == outer.step:
                    raise KeyboardInterrupt(f"killed at step {outer.step}")

        self.step, self.callback = step, Callback()


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, pivot_dir, train_data):
    straight = distill_job(tmp_path / "straight", pivot_dir, train_data)
    training.run_job(straight)

    resumed = distill_job(tmp_path / "resumed", pivot_dir, train_data)
    with pytest.raises(KeyboardInterrupt):
        training.run_job(resumed, callbacks=(CrashAt(5).callback,))
    assert not Path(resumed.model_dir).exists()
    torn = Path(resumed.checkpoint_dir) / "checkpoint-6"  # as if killed while saving step 6
    torn.mkdir()
    (torn / "config.json").write_text("{}")
    summary = training.run_job(resumed)
    assert summary["resumed_from"] == "checkpoint-4" and summary["global_step"] == 6
    expected, got = weights(Path(straight.model_dir)), weights(Path(resumed.model_dir))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sft_only_rows_without_targets_train(tmp_path, pivot_dir, train_data):
    from datasets import load_from_disk

    plain = tmp_path / "plain"
    load_from_disk(str(train_data)).remove_columns(
        ["target_ids", "target_probs", "target_width"]
    ).save_to_disk(str(plain))
    job = distill_job(tmp_path, pivot_dir, plain, max_steps=2, lambda_=1.0)
    summary = training.train(job)
    assert summary["global_step"] == 2
    entries = [json.loads(line) for line in (Path(job.log_dir) / training.LOG_FILE).read_text().splitlines()]
    assert any("gold_ce" in e for e in entries) and not any("distill" in e for e in entries)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_on_cpu(tmp_path, pivot_dir, train_data, stage):
    from transformers import AutoModelForCausalLM

    job = distill_job(
        tmp_path,
        pivot_dir,
        train_data,
        max_steps=3,
        save_steps=2,
        num_processes=2,
        deepspeed=DeepSpeedSettings(stage=stage),
    )
    summary = training.train(job)
    assert summary["global_step"] == 3
    assert summary["train_samples_per_second"] > 0
    model, info = AutoModelForCausalLM.from_pretrained(job.model_dir, output_loading_info=True)
    assert not info["missing_keys"]
    before, after = weights(pivot_dir), weights(Path(job.model_dir))
    assert set(before) == set(after)  # ZeRO-3 gathered the full model, not a rank's shard
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (
        Path(job.checkpoint_dir) / "checkpoint-2" / "rng_state_1.pth"
    ).is_file()  # both ranks checkpointed


# --------------------------------------------------------------------------------------------- the stage


def stores_ready(
    tmp,
    pivot_dir,
    distill: dict,
    heldout_fraction: float,
    conversations_n: int,
    later: dict | None = None,
    top: dict | None = None,
    ready: tuple[str, ...] = ("prepare", "extract.pivot", "extract.src", "align.src"),
):
    """prepare -> extract (pivot, src) -> align.src on tiny models of different vocabularies, run once; returns the
    recipe, whose distill settings are `distill` (every other stage after align off, but those `later` sets).
    `top`: more top-level recipe keys (a `data.preference` path is merged into `data`); `ready`: the instances run."""
    from fuse.executor import run_stage
    from fuse.recipe import parse_recipe

    from tiny_lm import build, conversations

    source_dir = build(tmp / "src", arch="llama", seed=1)
    sft = tmp / "sft.jsonl"
    rows = conversations(conversations_n)
    sft.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    off = {"enabled": False}
    top = dict(top or {})
    data = {"sft": {"path": str(sft)}, "heldout_fraction": heldout_fraction, **top.pop("data", {})}
    recipe = parse_recipe(
        {
            "name": "distill-test",
            "workdir": str(tmp / "run"),
            "pivot": {"path": str(pivot_dir)},
            "sources": [{"name": "src", "path": str(source_dir)}],
            "data": data,
            "stages": {
                "extract": {"top_k": 4, "max_length": 96},
                "distill": distill,
                **{stage: off for stage in ("fpo", "score", "merge", "evaluate", "publish")},
                **(later or {}),
            },
            **top,
        }
    )
    for name in ready:
        run_stage(recipe, name)
    return recipe


TINY_BUDGET = {
    "save_steps": 2,
    "logging_steps": 1,
    "per_device_batch_size": 2,
    "learning_rate": 1e-3,
    "max_length": 96,
}


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, pivot_dir):
    distill = TINY_BUDGET | {"max_steps": 3, "sft_baseline": True, "joint": True}
    return stores_ready(tmp_path_factory.mktemp("distill-stage"), pivot_dir, distill, 0.0, 12)


@pytest.mark.slow
def test_distill_stage_trains_from_the_stores(distill_run):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from fuse.data.logprobs import LogprobReader
    from fuse.executor import run_stage
    from fuse.io import read_json
    from fuse.store import RunStore

    assert run_stage(distill_run, "distill.src")
    store = RunStore(distill_run.workdir)
    out = store.out("distill.src")
    AutoModelForCausalLM.from_pretrained(out / "model")
    report = read_json(out / "distill_report.json")
    assert report["lambda"] == 0.9 and report["fusion"] == "min_ce" and report["training"]["global_step"] == 3
    assert sum(report["data"]["sequences_won"].values()) == report["data"]["samples"] > 0
    assert (store.dir("distill.src") / "logs" / "loss.png").is_file()

    # min_ce: each row's targets are exactly the winner's stored top-K, shifted by one position.
    data = load_from_disk(str(store.dir("distill.src") / "checkpoints" / "train_data"))
    stores = {0: LogprobReader(store.out("extract.pivot")), 1: LogprobReader(store.out("align.src"))}
    for row in data.select(range(3)):
        winner = int(np.argmax(row["weights"]))
        assert row["weights"][winner] == 1.0
        assert np.argmin(row["ce_per_byte"]) == winner or row["ce_per_byte"][0] == row["ce_per_byte"][1]
        sample = stores[winner].get(row["id"])
        ids = np.asarray(row["target_ids"]).reshape(-1, row["target_width"])
        probs = np.asarray(row["target_probs"]).reshape(-1, row["target_width"])
        assert row["input_ids"] == sample.input_ids.tolist()
        t = int(np.flatnonzero(sample.mask[1:])[0])  # first training row: predicts token t+1
        finite = np.isfinite(sample.topk_logprobs[t])
        assert ids[t + 1][finite].tolist() == sample.topk_ids[t][finite].tolist()
        np.testing.assert_allclose(probs[t + 1][finite], np.exp(sample.topk_logprobs[t][finite]), rtol=1e-5)
        assert (ids[0] == -1).all() and row["labels"][t + 1] == sample.input_ids[t + 1]


@pytest.mark.slow
def test_the_joint_stage_with_one_source_trains_on_the_pairwise_targets_rows(distill_run):
    """distill.joint run as a stage: with a single source its rows are exactly distill.src's (the same teachers,
    weights and targets), its report names the teachers by name, and it trains and saves a model."""
    from datasets import load_from_disk

    from fuse.executor import run_stage
    from fuse.io import read_json
    from fuse.store import RunStore

    assert run_stage(distill_run, "distill.src") and run_stage(distill_run, "distill.joint")
    store = RunStore(distill_run.workdir)
    report = read_json(store.out("distill.joint") / "distill_report.json")
    assert report["arm"] == "joint" and report["training"]["global_step"] == 3
    assert set(report["data"]["ce_per_byte"]) == {"pivot", "src"}
    assert sum(report["data"]["sequences_won"].values()) == report["data"]["samples"] > 0
    assert (store.out("distill.joint") / "model" / "model.safetensors").is_file()
    joint, pairwise = (
        load_from_disk(str(store.dir(name) / "checkpoints" / "train_data"))
        for name in ("distill.joint", "distill.src")
    )
    columns = ("id", "input_ids", "target_ids", "target_probs", "ce_per_byte", "weights")
    assert joint.select_columns(list(columns)).to_list() == pairwise.select_columns(list(columns)).to_list()


@pytest.mark.slow
def test_sft_baseline_reads_only_the_prepared_split(distill_run):
    from fuse.executor import run_stage
    from fuse.io import read_json
    from fuse.store import RunStore

    assert run_stage(distill_run, "distill.sft_baseline")
    out = RunStore(distill_run.workdir).out("distill.sft_baseline")
    report = read_json(out / "distill_report.json")
    assert report["lambda"] == 1.0 and report["fusion"] is None and report["data"]["samples"] == 12
    assert (out / "model" / "model.safetensors").is_file()


def test_unknown_fusion_in_the_recipe_is_reported_with_its_key(tmp_path):
    from fuse.losses import FUSIONS
    from fuse.recipe import DistillSettings, RecipeError, parse_recipe

    recipe = bare_recipe(tmp_path, {"fusion": "best_of"})
    with pytest.raises(RecipeError, match=r"stages\.distill\.fusion: Input should be 'min_ce'"):
        parse_recipe(recipe)
    # the schema's choices are exactly the registry's names
    assert set(DistillSettings.model_fields["fusion"].annotation.__args__) == set(FUSIONS)


def test_ce_per_byte_by_hand():
    from fuse.data.logprobs import ContentSpan, SampleLogprobs
    from fuse.data.response import LOGPROB_FLOOR, ce_per_byte

    text = "Q: hi A: héllo<eot>"  # the assistant content "héllo" is 6 bytes, then the end-of-turn token
    sample = SampleLogprobs(
        id="s",
        text=text,
        spans=[ContentSpan("user", 3, 5), ContentSpan("assistant", 9, 14)],
        input_ids=np.arange(6),
        offsets=np.array([[0, 3], [3, 5], [5, 9], [9, 11], [11, 14], [14, 19]]),
        mask=np.array([False, False, False, True, True, True]),
        topk_ids=np.zeros((5, 1), np.int64),
        topk_logprobs=np.zeros((5, 1), np.float32),
        target_logprobs=np.array([-9.0, -9.0, -1.0, -np.inf, -7.0], np.float32),
    )
    # rows 2..3 predict the content tokens 3..4 (the -inf is counted at the floor); row 4 predicts the end-of-turn
    # token, which spells no byte of the response and is left out
    assert ce_per_byte(sample) == pytest.approx((1.0 - LOGPROB_FLOOR) / 6)


def test_the_sft_baseline_does_not_go_stale_when_the_teachers_settings_change(tmp_path):
    """It trains at λ = 1 whatever stages.distill.lambda (or fusion, temperature) says: changing them reruns the
    targets, never the baseline (a full training run at real scale)."""
    from fuse.dag import build_dag
    from fuse.plan import fingerprints
    from fuse.recipe import parse_recipe

    from recipes import toy_recipe

    def prints(**distill):
        recipe = parse_recipe(toy_recipe(tmp_path, stages={"distill": {"sft_baseline": True, **distill}}))
        return {name: fp for name, (fp, _) in fingerprints(recipe, build_dag(recipe)).items()}

    base, ablation = prints(), prints(**{"lambda": 0.5, "fusion": "avg_ce", "temperature": 2.0})
    assert ablation["distill.sft_baseline"] == base["distill.sft_baseline"]
    assert ablation["distill.a"] != base["distill.a"]
    assert prints(learning_rate=3e-4)["distill.sft_baseline"] != base["distill.sft_baseline"]
    assert DistillSettings(lambda_=0.5, fusion="avg_ce").sft_only().lambda_ == 1.0


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory, pivot_dir):
    """A held-out split, validation on, and the teacher-free and self-teacher controls."""
    distill = TINY_BUDGET | {
        "max_steps": 4,
        "validation": True,
        "controls": ["self_distill", "label_smoothing"],
    }
    return stores_ready(tmp_path_factory.mktemp("arms"), pivot_dir, distill, 0.25, 16)


@pytest.mark.slow
def test_validation_keeps_the_best_checkpoint(arms_run):
    """Every checkpoint is scored on the held-out split's gold CE; the saved model is the best one's weights."""
    from fuse.executor import run_stage
    from fuse.io import read_json
    from fuse.store import RunStore

    assert run_stage(arms_run, "distill.src")
    store = RunStore(arms_run.workdir)
    training = read_json(store.out("distill.src") / "distill_report.json")["training"]
    curve = dict(training["validation_curve"])
    assert sorted(curve) == [2, 4] and training["best_validation_loss"] == min(curve.values())
    assert curve[training["best_step"]] == training["best_validation_loss"]
    best = store.dir("distill.src") / "checkpoints" / f"checkpoint-{training['best_step']}"
    saved = weights(store.out("distill.src") / "model")
    kept = weights(best)
    assert all(torch.equal(saved[name], kept[name]) for name in saved)


@pytest.mark.slow
def test_control_arms_train_on_one_teacher_or_none(arms_run):
    from datasets import load_from_disk

    from fuse.data.logprobs import LogprobReader
    from fuse.executor import run_stage
    from fuse.io import read_json
    from fuse.store import RunStore

    store = RunStore(arms_run.workdir)
    for control in ("self_distill", "label_smoothing"):
        assert run_stage(arms_run, f"distill.{control}")
        report = read_json(store.out(f"distill.{control}") / "distill_report.json")
        assert report["arm"] == f"control: {control}" and "best_step" in report["training"]
    assert read_json(store.out("distill.label_smoothing") / "distill_report.json")["label_smoothing"] == 0.1
    assert read_json(store.out("distill.label_smoothing") / "distill_report.json")["lambda"] == 1.0
    # self-distillation: each row's targets are the pivot's own stored top-K, shifted by one position
    data = load_from_disk(str(store.dir("distill.self_distill") / "checkpoints" / "train_data"))
    pivot = LogprobReader(store.out("extract.pivot"))
    row = data[0]
    sample = pivot.get(row["id"])
    ids = np.asarray(row["target_ids"]).reshape(-1, row["target_width"])
    t = int(np.flatnonzero(sample.mask[1:])[0])
    finite = np.isfinite(sample.topk_logprobs[t])
    assert ids[t + 1][finite].tolist() == sample.topk_ids[t][finite].tolist()


@pytest.mark.slow
def test_a_forced_rerun_that_trains_the_same_weights_keeps_its_children(distill_run):
    """The outputs hold what was trained, not how the run went (timings, the checkpoint it resumed from): a
    repeated run with the same weights has the same outputs digest, so nothing downstream goes stale."""
    import stat

    from fuse.executor import run_stage
    from fuse.io import published_mode, read_json
    from fuse.store import RunStore
    from fuse.training import RUN_FACTS

    store = RunStore(distill_run.workdir)
    assert run_stage(distill_run, "distill.src")
    before = store.manifest("distill.src")["outputs_digest"]
    assert run_stage(distill_run, "distill.src", force=True)
    assert store.manifest("distill.src")["outputs_digest"] == before
    report = read_json(store.out("distill.src") / "distill_report.json")["training"]
    assert not set(RUN_FACTS) & set(report)
    assert read_json(store.dir("distill.src") / "logs" / "summary.json")["train_runtime"] > 0
    weights = store.out("distill.src") / "model" / "model.safetensors"  # readable by whoever shares the store
    assert stat.S_IMODE(weights.stat().st_mode) == published_mode()


@pytest.mark.parametrize("lambda_", [0.5, 1.0])
def test_the_trainer_takes_the_loss_from_hidden_states_and_it_equals_the_logits_loss(
    pivot_dir, train_data, lambda_
):
    """DistillTrainer.compute_loss on a bare model goes through the backbone's hidden states (no [B, T, V] logits)
    and gives the loss and gradients of the full-logits path (which validation, with return_outputs, still takes)."""
    from types import SimpleNamespace

    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from fuse.distill_trainer import DistillTrainer, sparse_collator
    from fuse.heads import plain_head

    model = AutoModelForCausalLM.from_pretrained(pivot_dir, dtype=torch.float32)
    model.train()
    assert plain_head(model) is not None
    rows = load_from_disk(str(train_data)).select(range(3))
    batch = sparse_collator(0)(list(rows))
    if lambda_ == 1.0:
        batch = {k: v for k, v in batch.items() if not k.startswith("target")}
    trainer = SimpleNamespace(settings=DistillSettings(lambda_=lambda_), _record=lambda *_: None)
    results = []
    for outputs in (False, True):  # hidden states, then full logits
        model.zero_grad()
        loss = DistillTrainer.compute_loss(trainer, model, dict(batch), return_outputs=outputs)
        loss = loss[0] if outputs else loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (hidden_loss, hidden_grads), (logits_loss, logits_grads) = results
    torch.testing.assert_close(hidden_loss, logits_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(hidden_grads, logits_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- distill.joint


def joint_sample(sample_id: str, rng: np.random.Generator, targets: list[float]) -> Any:
    """A teacher's record of one fixed conversation: random top-3 rows over 12 ids, its own gold log-probs."""
    from fuse.data.logprobs import ContentSpan, SampleLogprobs

    k, rows = 3, 5
    ids = np.stack([rng.choice(12, size=k, replace=False) for _ in range(rows)])
    probs = rng.dirichlet(np.ones(k + 1), size=rows)[:, :k]  # a tail bucket keeps some mass
    logp = np.log(np.sort(probs, axis=1)[:, ::-1]).astype(np.float32)
    return SampleLogprobs(
        id=sample_id,
        text="Q: hi A: héllo<eot>",
        spans=[ContentSpan("user", 3, 5), ContentSpan("assistant", 9, 14)],
        input_ids=np.array([1, 2, 3, 4, 5, 6]),
        offsets=np.array([[0, 3], [3, 5], [5, 9], [9, 11], [11, 14], [14, 19]]),
        mask=np.array([False, False, False, True, True, True]),
        topk_ids=ids,
        topk_logprobs=logp,
        target_logprobs=np.array([-9.0, -9.0, *targets], np.float32),
    )


@pytest.mark.parametrize("fusion", ["min_ce", "avg_ce"])
def test_joint_rows_fuse_every_teacher_as_a_dense_mixture(tmp_path, fusion):
    """distill.joint's rows against a dense computation by hand: per sequence the fusion function's weights over
    the pivot and every source (each rated by its own CE per byte), and per position Σ_m w_m p_m over the ids."""
    from types import SimpleNamespace

    from fuse.data.logprobs import LogprobReader, write_shard
    from fuse.data.response import ce_per_byte
    from fuse.losses import get_fusion
    from stages.distill import rows_of, write_rows

    rng = np.random.default_rng(0)
    # three conversations; each teacher's gold log-probs make a different one the best: s0 the pivot, s1 source
    # a, s2 source b (the lowest CE per byte)
    gold = {
        "pivot": [[-0.5, -0.5, -1.0], [-3.0, -3.0, -1.0], [-3.0, -3.0, -1.0]],
        "a": [[-2.0, -2.0, -1.0], [-0.2, -0.2, -1.0], [-2.5, -2.5, -1.0]],
        "b": [[-2.5, -2.5, -1.0], [-2.0, -2.0, -1.0], [-0.1, -0.1, -1.0]],
    }
    paths = {}
    for name, rows in gold.items():
        samples = [joint_sample(f"s{i}", rng, targets) for i, targets in enumerate(rows)]
        paths[name] = str(write_shard(tmp_path / name / "shard-00000", samples, top_k=3, vocab_size=12))
    # the stage's own arguments for distill.joint, through datasets as the stage writes them
    inputs = {"pivot_logprobs": {"pivot": paths["pivot"]}, "source_logprobs": {}, "alignment": {}}
    inputs["alignment"] = inputs["source_logprobs"] = {"a": paths["a"], "b": paths["b"]}
    ctx = SimpleNamespace(
        settings=DistillSettings(fusion=fusion, max_length=64),
        input=lambda role: paths["pivot"],
        inputs_of=lambda role: inputs[role],
    )
    rows = list(write_rows(*rows_of(ctx, "joint"), tmp_path / "rows"))
    assert len(rows) == 3 and all(len(row["weights"]) == 3 for row in rows)
    stores = {name: LogprobReader(path) for name, path in paths.items()}
    for row in rows:
        teachers = [stores[name].get(row["id"]) for name in ("pivot", "a", "b")]
        ce = torch.tensor([[ce_per_byte(t) for t in teachers]], dtype=torch.float64)
        weights = get_fusion(fusion).fn(ce)[0].numpy()
        np.testing.assert_allclose(row["weights"], weights)
        if fusion == "min_ce":
            assert int(np.argmax(weights)) == int(row["id"][1:])  # the teacher that knows this conversation
        ids = np.asarray(row["target_ids"]).reshape(-1, row["target_width"])
        probs = np.asarray(row["target_probs"]).reshape(-1, row["target_width"])
        for t in range(1, len(row["input_ids"])):
            dense = np.zeros(12)
            np.add.at(dense, ids[t][ids[t] >= 0], probs[t][ids[t] >= 0])
            want = np.zeros(12)
            if teachers[0].mask[t]:  # row t-1 of each teacher predicts token t
                for w, teacher in zip(weights, teachers, strict=True):
                    np.add.at(want, teacher.topk_ids[t - 1], w * np.exp(teacher.topk_logprobs[t - 1]))
            np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-7)


def test_joint_is_one_more_target_taught_by_every_source(tmp_path):
    """stages.distill.joint adds distill.joint (the pivot's and every source's stores, labelled by source), which
    evaluate reports as a fused model and merge leaves out; turning it on leaves every other instance as it was."""
    from fuse.dag import build_dag
    from fuse.plan import fingerprints
    from fuse.recipe import parse_recipe

    from recipes import toy_recipe

    def dag_and_prints(**distill):
        recipe = parse_recipe(toy_recipe(tmp_path, stages={"distill": {"sft_baseline": True, **distill}}))
        dag = build_dag(recipe)
        return dag, {name: fp for name, (fp, _) in fingerprints(recipe, dag).items()}

    dag, prints = dag_and_prints(joint=True)
    joint = dag["distill.joint"]
    assert {(e.role, e.parent, e.label) for e in joint.edges if e.role != "data"} == {
        ("pivot_logprobs", "extract.pivot", None),
        ("source_logprobs", "extract.a", "a"),
        ("source_logprobs", "extract.b", "b"),
        ("alignment", "align.a", "a"),
        ("alignment", "align.b", "b"),
    }
    assert "distill.joint" not in dag["merge"].parents
    assert ("fused", "distill.joint") in {(e.role, e.parent) for e in dag["evaluate"].edges}
    _, without = dag_and_prints()
    assert {n: fp for n, fp in prints.items() if n in without and n not in ("evaluate", "publish")} == {
        n: fp for n, fp in without.items() if n not in ("evaluate", "publish")
    }

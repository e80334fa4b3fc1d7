"""The fpo stage on tiny models with different tokenizers (a ChatML Qwen2 policy, an [INST] Llama source) scored by
the real score stage: step-0 agreement with score.target, `none` against TRL's own sigmoid_norm DPO loss, a short run
that raises held-out accuracy, kill-and-resume, and bad input."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fuse import training
from fuse.context import StageContext
from fuse.dag import build_dag
from fuse.data.chat import render_chat
from fuse.recipe import FpoSettings, parse_recipe

WORDS = [
    "the",
    "a",
    "fox",
    "cat",
    "dog",
    "runs",
    "jumps",
    "over",
    "under",
    "river",
    "hill",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
]
RUN = dict(
    max_steps=12,
    save_steps=4,
    save_total_limit=5,
    logging_steps=1,
    per_device_batch_size=4,
    learning_rate=3e-3,
    lr_scheduler="constant",
    seed=3,
)


def pairs(n: int, seed: int, good: str, bad: str, prefix: str) -> list[dict]:
    """Pairs that differ only in their first word: `good` is preferred, whatever follows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) + "?"
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + "."
        rows.append(
            {
                "id": f"{prefix}{i:03d}",
                "prompt": [{"role": "user", "content": question}],
                "chosen": f"{good} {tail}",
                "rejected": f"{bad} {tail}",
            }
        )
    return rows


def save_split(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))


@dataclass
class World:
    root: Path
    recipe_data: dict
    prepare: Path  # prepared splits (what score saw)
    distill: Path  # distill.a's out/ (model/ = the policy)
    scores: dict[str, Path]  # model name -> score out/

    def ctx(self, tmp: Path, name: str = "fpo.a", inputs: dict | None = None, **fpo) -> StageContext:
        data = json.loads(json.dumps(self.recipe_data))
        data["stages"]["fpo"] = {**RUN, **fpo}
        recipe = parse_recipe(data)
        instance = build_dag(recipe)[name]
        paths = {
            "prepare": self.prepare,
            "distill.a": self.distill,
            "score.target-a": self.scores["target-a"],
            "score.a": self.scores["a"],
        }
        paths.update(inputs or {})
        (tmp / "out").mkdir(parents=True, exist_ok=True)
        return StageContext(recipe, instance, tmp, {p: paths[p] for p in instance.parents})


def run_score(recipe, name: str, inputs: dict, directory: Path) -> Path:
    from fuse.stages import score

    (directory / "out").mkdir(parents=True)
    ctx = StageContext(recipe, build_dag(recipe)[name], directory, inputs)
    score.run(ctx)
    score.finalize(ctx)
    return ctx.out


def initial_preference(model_dir: Path, rows: list[dict]) -> float:
    """The share of pairs where the untrained policy already prefers the chosen response."""
    from fuse.fpo_trainer import policy_scores
    from fuse.models import load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.stages.fpo import encode_split, load_scoring_model

    spec = ModelSpec(name="policy", path=str(model_dir))
    encoded, _ = encode_split(load_tokenizer(spec), rows, FpoSettings())
    chosen, rejected = policy_scores(load_scoring_model(spec), encoded, 0)
    return float(np.mean(chosen > rejected))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    from tiny_lm import build

    root = tmp_path_factory.mktemp("fpo")
    distill = root / "distill.a"
    policy = build(distill / "model", arch="qwen2", seed=1)
    source = build(root / "models" / "a", arch="llama", seed=2)
    # the preferred first word is the one the untrained policy likes less, so any held-out gain is learned
    probe = pairs(16, 9, "yes", "no", "probe")
    good, bad = ("no", "yes") if initial_preference(policy, probe) > 0.5 else ("yes", "no")
    prepare = root / "prepare"
    save_split(pairs(32, 1, good, bad, "t"), prepare / "preference" / "train")
    save_split(pairs(16, 2, good, bad, "h"), prepare / "preference" / "heldout")
    (root / "sft.jsonl").write_text("")
    recipe_data = {
        "name": "fpo-test",
        "workdir": str(root / "run"),
        "pivot": {"path": str(policy)},
        "sources": [{"name": "a", "path": str(source)}],
        "data": {
            "sft": {"path": str(root / "sft.jsonl")},
            "preference": {"path": str(root / "sft.jsonl"), "format": "preference"},
        },
        "stages": {},
    }
    recipe = parse_recipe(recipe_data)
    scores = {
        "target-a": run_score(
            recipe, "score.target-a", {"prepare": prepare, "distill.a": distill}, root / "st"
        ),
        "a": run_score(recipe, "score.a", {"prepare": prepare}, root / "sa"),
    }
    return World(root, recipe_data, prepare, distill, scores)


@pytest.fixture(scope="session")
def trained(world, tmp_path_factory) -> Path:
    """One uninterrupted max_margin run (the reference for kill-and-resume)."""
    from fuse.stages import fpo

    directory = tmp_path_factory.mktemp("fpo-run")
    fpo.run(world.ctx(directory))
    return directory


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------------------------- reference checks


@pytest.mark.slow
def test_policy_at_step_zero_equals_score_target(world):
    from fuse.data.scores import read_scores
    from fuse.models import load_tokenizer
    from fuse.preference import join_scores, normalized_scores
    from fuse.recipe import ModelSpec
    from fuse.stages.fpo import encode_split, init_check, load_scoring_model

    spec = ModelSpec(name="policy", path=str(world.distill / "model"))
    for normalization in ("tokens", "bytes"):
        settings = FpoSettings(normalization=normalization)
        rows, _ = encode_split(load_tokenizer(spec), load_rows(world.prepare, "train"), settings)
        table = join_scores(
            read_scores(world.scores["target-a"], "target-a"), [r["id"] for r in rows], "target-a"
        )
        check = init_check(load_scoring_model(spec), rows, normalized_scores(table, normalization), 0)
        assert check["rows"] == 16 and check["max_abs_diff"] < 1e-5, normalization


def load_rows(prepare: Path, split: str) -> list[dict]:
    from fuse.data.prepared import load_split

    return load_split(prepare, "preference", split).to_list()


def fpo_trainer(spec, rows: list[dict], tmp_path: Path, data: str, run: dict | None = None, **params):
    """(fuse's InfiFPO trainer on these encoded rows at beta 2.5 with `params` and RUN | `run` settings, its
    TrainingArguments)."""
    from fuse.fpo_trainer import build_fpo_trainer
    from fuse.stages.fpo import save_rows

    settings = FpoSettings(**(RUN | (run or {})))
    args = training.training_arguments(settings, str(tmp_path / "ckpt"), launched=False)
    job = training.make_job(
        "x:y",
        settings,
        tmp_path,
        tmp_path / "out",
        "stages.fpo",
        model=spec.model_dump(),
        train_data=str(save_rows(rows, tmp_path / data)),
        beta=2.5,
        **params,
    )
    return build_fpo_trainer(job, args), args


@pytest.mark.slow
@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_none_equals_trl_sigmoid_norm_dpo_loss(world, tmp_path, sft_weight):
    """fusion `none` with per-token normalization is TRL's `sigmoid_norm` loss with p as the reference model;
    the reference is perturbed so that the loss is not the trivial log 2 of a policy equal to its reference.
    With an sft weight, TRL's two-term loss (`sigmoid_norm` + weight x `sft`, the chosen answers' NLL per token)."""
    from datasets import Dataset
    from trl import DPOTrainer

    from fuse.data.scores import read_scores
    from fuse.fpo_trainer import dpo_config, pair_collator
    from fuse.models import load_model, load_tokenizer
    from fuse.preference import join_scores
    from fuse.recipe import ModelSpec
    from fuse.stages.fpo import encode_split

    spec = ModelSpec(name="policy", path=str(world.distill / "model"))
    tokenizer = load_tokenizer(spec)
    rows, _ = encode_split(tokenizer, load_rows(world.prepare, "train")[:6], FpoSettings())
    table = join_scores(
        read_scores(world.scores["target-a"], "target-a"), [r["id"] for r in rows], "target-a"
    )
    shift = np.random.default_rng(0).normal(0, 3.0, size=(2, len(rows)))
    ref_sum_c, ref_sum_r = table["chosen_logp"] + shift[0], table["rejected_logp"] + shift[1]
    rows = [
        {
            **r,
            "ref_chosen_logps": ref_sum_c[k] / r["chosen_norm"],
            "ref_rejected_logps": ref_sum_r[k] / r["rejected_norm"],
            "picked": -1,
            "clipped_terms": 0,
        }
        for k, r in enumerate(rows)
    ]

    ours, args = fpo_trainer(spec, rows, tmp_path, "data", sft_weight=sft_weight)
    conversational = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            }
        ]
    )
    theirs = DPOTrainer(
        model=load_model(spec, dtype="float32"),
        args=dpo_config(
            args,
            beta=2.5,
            loss_type=["sigmoid_norm", "sft"] if sft_weight else ["sigmoid_norm"],
            loss_weights=[1.0, sft_weight] if sft_weight else None,
        ),
        train_dataset=conversational,
        processing_class=tokenizer,
    )

    batch = pair_collator(0)(rows)
    trl_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    trl_batch |= {
        "ref_chosen_logps": torch.tensor(ref_sum_c, dtype=torch.float32),
        "ref_rejected_logps": torch.tensor(ref_sum_r, dtype=torch.float32),
    }
    with torch.no_grad():
        ours_loss = ours.compute_loss(ours.model, {k: v.clone() for k, v in batch.items()})
        trl_loss = theirs.compute_loss(theirs.model, trl_batch)
    assert abs(ours_loss.item() - math.log(2.0)) > 0.05  # not the trivial value
    torch.testing.assert_close(ours_loss, trl_loss, rtol=1e-5, atol=1e-6)


def conversations(n: int, seed: int) -> list[dict]:
    """SFT rows (prepare's sft split layout): a question and an answer of random words."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [
        {
            "id": f"s{i:03d}",
            "messages": [
                {"role": "user", "content": say(rng.randint(2, 5)) + "?"},
                {"role": "assistant", "content": say(rng.randint(3, 9)) + "."},
            ],
        }
        for i in range(n)
    ]


def test_with_replay_cycles_the_conversations_and_keeps_distills_labels():
    from fuse.stages.fpo import FpoInputError, with_replay

    replay = [{"input_ids": [1, 2, 3 + k], "labels": [-100, 2, 3 + k]} for k in range(3)]
    rows = with_replay([{"id": i} for i in range(7)], replay, seed=0)
    assert [r["id"] for r in rows] == list(range(7))
    used = [r["replay_input_ids"][-1] - 3 for r in rows]
    assert sorted(used[:3]) == [0, 1, 2] and sorted(used[3:6]) == [0, 1, 2]  # every one before any twice
    assert all(r["replay_completion_mask"] == [0, 1, 1] for r in rows)
    with pytest.raises(FpoInputError, match="replay_weight"):
        with_replay([{"id": 0}], [], seed=0)


@pytest.mark.slow
def test_replay_adds_the_replayed_conversations_sft_loss(world, tmp_path):
    """replay_weight w: the loss is the preference loss + w x the replayed conversations' next-token NLL per
    assistant token, which the reference computes from the model's own dense logits (its `labels` loss)."""
    from fuse.fpo_trainer import pair_collator
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.stages.fpo import encode_split, with_replay

    spec = ModelSpec(name="policy", path=str(world.distill / "model"))
    tokenizer = load_tokenizer(spec)
    rows, _ = encode_split(tokenizer, load_rows(world.prepare, "train")[:5], FpoSettings())
    rng = np.random.default_rng(1)
    rows = [
        {**r, "ref_chosen_logps": -rng.uniform(1, 3), "ref_rejected_logps": -rng.uniform(1, 3)} for r in rows
    ]
    replay = []
    for row in conversations(4, 5):
        chat = render_chat(tokenizer, row["messages"])
        replay.append(
            {
                "input_ids": chat.input_ids.tolist(),
                "labels": np.where(chat.mask, chat.input_ids, -100).tolist(),
            }
        )
    rows = with_replay(rows, replay, seed=2)
    batch = pair_collator(0)(rows)

    losses = {}
    for weight in (0.0, 0.6):
        trainer, _ = fpo_trainer(spec, rows, tmp_path, f"data-{weight}", replay_weight=weight)
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})

    ids, mask = batch["replay_input_ids"], batch["replay_completion_mask"]
    with torch.no_grad():
        dense = load_model(spec, dtype="float32")(
            input_ids=ids,
            attention_mask=batch["replay_attention_mask"],
            labels=ids.masked_fill(mask == 0, -100),
        ).loss
    assert dense.item() > 0.5 and int(mask[:, 1:].sum()) > 20
    torch.testing.assert_close(losses[0.6] - losses[0.0], 0.6 * dense, rtol=1e-5, atol=1e-6)


def test_pairs_are_grouped_by_their_longer_side(world, tmp_path):
    """group_by_length in fpo: the stage's rows carry max(chosen, rejected) as their length (the two sides are padded
    together), and the trainer's batches follow fuse.length_grouping's order of them."""
    from fuse.length_grouping import length_grouped_order
    from fuse.models import load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.stages.fpo import encode_split

    spec = ModelSpec(name="policy", path=str(world.distill / "model"))
    rows, _ = encode_split(load_tokenizer(spec), load_rows(world.prepare, "train")[:12], FpoSettings())
    rows = [{**r, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for r in rows]
    trainer, _ = fpo_trainer(spec, rows, tmp_path, "data", run={"group_by_length": True})
    lengths = [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
    assert len(set(lengths)) > 3
    order = length_grouped_order(lengths, 4, seed=RUN["seed"])
    expected = [max(lengths[i] for i in order[k : k + 4]) for k in range(0, len(order), 4)]
    assert [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()] == expected


# --------------------------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_short_run_raises_heldout_accuracy(trained):
    summary = json.loads((trained / "out" / "summary.json").read_text())
    heldout = summary["heldout"]
    assert summary["fusion"] == "max_margin" and summary["beta"] == 2.5 and summary["pairs"]["train"] == 32
    assert summary["init_check"]["max_abs_diff"] < 1e-5
    # score covers the held-out pairs too: they are measured against the same fused reference as training
    assert heldout["pairs"] == 16 and heldout["reference"] == "fused"
    before, after = heldout["before"], heldout["after"]
    assert after["rewards/accuracies"] >= 0.75 and after["rewards/margins"] > 0
    assert (
        after["rewards/accuracies"] > before["rewards/accuracies"]
        and after["rewards/margins"] > before["rewards/margins"]
    )
    assert after["preference_accuracy"] > before["preference_accuracy"] + 0.25
    assert set(summary["train_reference"]["picked"]) == {"a"} and summary["training"]["global_step"] == 12
    log = [json.loads(line) for line in (trained / "logs" / training.LOG_FILE).read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert {"rewards/accuracies", "rewards/margins", "clipped_share", "picked/a", "logps/chosen"} <= set(
        steps[0]
    )
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (trained / "out" / "model" / "model.safetensors").is_file()
    assert "| after |" in (trained / "out" / "summary.md").read_text()
    assert summary["moved"] is True and "Nothing moved" not in (trained / "out" / "summary.md").read_text()
    assert 0 <= summary["train_reference"]["reach"]["saturated_share"] <= 1


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(world, trained, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from fuse.stages import fpo

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt("killed at step 6")

    real_run_job = training.run_job
    with monkeypatch.context() as patch:
        patch.setattr(
            training, "train", lambda job, **kw: real_run_job(job, **{**kw, "callbacks": (Crash(),)})
        )
        with pytest.raises(KeyboardInterrupt):
            fpo.run(world.ctx(tmp_path))
    assert not (tmp_path / "out" / "model").exists()
    fpo.run(world.ctx(tmp_path))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "resumed_from" not in summary["training"] and summary["training"]["global_step"] == 12
    assert json.loads((tmp_path / "logs" / "summary.json").read_text())["resumed_from"] == "checkpoint-4"
    expected, got = weights(trained / "out" / "model"), weights(tmp_path / "out" / "model")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero2_on_two_processes(world, tmp_path):
    from fuse.stages import fpo

    fpo.run(
        world.ctx(tmp_path, num_processes=2, deepspeed={"stage": 2}, max_steps=2, per_device_batch_size=2)
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["training"]["global_step"] == 2 and summary["heldout"]["pairs"] == 16
    assert (
        tmp_path / "checkpoints" / "checkpoint-2" / "rng_state_1.pth"
    ).is_file()  # both ranks checkpointed
    log = [json.loads(line) for line in (tmp_path / "logs" / training.LOG_FILE).read_text().splitlines()]
    assert any("picked/a" in e for e in log)


@pytest.mark.slow
def test_a_lora_policy_learns_against_the_fused_reference(world, tmp_path):
    """With peft the policy trains adapters (TRL's peft_config path) against the same precomputed fused reference;
    out/model is the adapter merged into the policy, a full checkpoint, which the held-out check then reads."""
    from fuse.stages import fpo

    fpo.run(world.ctx(tmp_path, peft={"r": 8, "lora_alpha": 16}, learning_rate=1e-2))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["training"]["global_step"] == 12 and summary["heldout"]["pairs"] == 16
    before, after = summary["heldout"]["before"], summary["heldout"]["after"]
    assert after["rewards/margins"] > before["rewards/margins"] and summary["moved"]
    log = [json.loads(line) for line in (tmp_path / "logs" / training.LOG_FILE).read_text().splitlines()]
    assert any("picked/a" in e for e in log)
    policy, trained = weights(world.distill / "model"), weights(tmp_path / "out" / "model")
    assert trained.keys() == policy.keys()
    changed = {name for name in policy if not torch.equal(trained[name], policy[name])}
    assert changed == {
        name for name in policy if name.endswith("proj.weight")
    }  # all-linear: no embedding, no head
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_with_replay_trains_on_the_sft_split(world, tmp_path):
    """The stage renders prepare's sft/train split in the policy's template (distill's SFT rows), gives every training
    pair one conversation, and the trainer logs the replay term next to the preference loss."""
    import shutil

    from datasets import load_from_disk

    from fuse.stages import fpo

    prepare = tmp_path / "prepare"
    shutil.copytree(world.prepare, prepare)
    save_split(conversations(12, 3), prepare / "sft" / "train")
    fpo.run(world.ctx(tmp_path / "run", inputs={"prepare": prepare}, replay_weight=0.5))
    summary = json.loads((tmp_path / "run" / "out" / "summary.json").read_text())
    assert summary["replay_weight"] == 0.5 and summary["training"]["global_step"] == 12
    rows = load_from_disk(str(tmp_path / "run" / "data" / "train"))
    assert len(rows) == 32 and len({tuple(r) for r in rows["replay_input_ids"]}) == 12
    assert all(sum(m[1:]) > 0 for m in rows["replay_completion_mask"])
    log = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / training.LOG_FILE).read_text().splitlines()
    ]
    replayed = [e["replay_nll"] for e in log if "replay_nll" in e]
    assert len(replayed) == 12 and all(math.isfinite(v) and v > 0 for v in replayed)
    assert replayed[-1] < 0.8 * replayed[0]  # the replayed conversations are learned


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lora_under_zero3_on_two_processes(world, tmp_path):
    """ZeRO-3 partitions the policy, adapters included: the saved adapter is gathered whole, and rank 0 merges it
    into a copy of the policy it loads unpartitioned while the other rank waits (a partitioned load there would
    wait on that rank forever)."""
    from safetensors.torch import load_file

    from fuse.stages import fpo

    peft = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    run = dict(num_processes=2, deepspeed={"stage": 3}, max_steps=2, per_device_batch_size=2)
    fpo.run(world.ctx(tmp_path, **run, gradient_checkpointing=True, peft=peft))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["training"]["global_step"] == 2
    policy, trained = weights(world.distill / "model"), weights(tmp_path / "out" / "model")
    changed = {name for name in policy if not torch.equal(trained[name], policy[name])}
    assert changed == {name for name in policy if name.endswith(("q_proj.weight", "v_proj.weight"))}
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 2 and all(
        4 in t.shape for t in adapter.values()
    )  # A, B x 2 targets x 2 layers


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_missing_source_scores_name_the_source_and_the_row_count(world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fuse.data.scores import ScoreError, read_scores
    from fuse.stages import fpo

    table = read_scores(world.scores["a"], "a")
    partial = tmp_path / "score-a"
    partial.mkdir()
    pq.write_table(pa.table({k: v[5:] for k, v in table.items()}), partial / "scores-00000.parquet")
    with pytest.raises(ScoreError, match=r"score\.a: 5 of 32 train preference pairs have no scores"):
        fpo.run(world.ctx(tmp_path / "stage", inputs={"score.a": partial}))
    assert not (tmp_path / "stage" / "checkpoints").exists()  # refused before any training


@pytest.mark.slow
def test_identical_and_empty_pairs_are_refused_and_counted(world, tmp_path):
    from fuse.stages import fpo

    rows = load_rows(world.prepare, "train")
    bad = [
        {**rows[0], "id": "same", "rejected": rows[0]["chosen"]},
        {**rows[1], "id": "empty", "chosen": "  "},
    ]
    prepare = tmp_path / "prepare"
    save_split(rows + bad, prepare / "preference" / "train")
    save_split(load_rows(world.prepare, "heldout"), prepare / "preference" / "heldout")
    fpo.run(world.ctx(tmp_path / "stage", inputs={"prepare": prepare}, max_steps=1, fusion="mean"))
    summary = json.loads((tmp_path / "stage" / "out" / "summary.json").read_text())
    assert summary["pairs"]["skipped_train"] == {
        "chosen and rejected responses are identical": 1,
        "empty chosen or rejected response": 1,
    }
    assert summary["pairs"]["train"] == 32

    only_bad = tmp_path / "only-bad"
    save_split(bad, only_bad / "preference" / "train")
    with pytest.raises(fpo.FpoInputError, match="no usable pairs .*identical"):
        fpo.run(world.ctx(tmp_path / "stage2", inputs={"prepare": only_bad}))


def test_pairs_truncated_by_any_models_score_are_refused_and_counted():
    import logging
    from collections import Counter

    from fuse.stages.fpo import drop_truncated

    def table(ids, chosen, rejected):
        return {
            "id": np.array(ids),
            "chosen_truncated": np.array(chosen),
            "rejected_truncated": np.array(rejected),
        }

    tables = {
        "pivot": table(["a", "b", "c"], [False, False, False], [False, True, False]),
        "src": table(["a", "b", "c"], [True, False, False], [False, False, False]),
    }
    skipped: Counter = Counter()
    rows = [{"id": i} for i in ("a", "b", "c")]
    kept = drop_truncated(rows, tables, skipped, logging.getLogger("test"))
    assert [r["id"] for r in kept] == ["c"]
    assert skipped == Counter({"truncated by score.pivot": 1, "truncated by score.src": 1})


def test_reach_and_nothing_moved_on_hand_numbers():
    from fuse.preference import PairScores, Reference
    from fuse.stages.fpo import SATURATED, nothing_moved, reach

    pivot = PairScores(np.array([-1.0, -1.0, -1.0]), np.array([-1.5, -1.5, -1.5]))  # margins 0.5
    fused = PairScores(np.array([-0.2, -1.0, -1.0]), np.array([-4.0, -1.5, -2.0]))  # margins 3.8, 0.5, 1.0
    reference = Reference(fused, np.zeros(3, np.int64), np.zeros(3, np.int64), ("s",))
    got = reach(reference, pivot, beta=2.0)  # gaps 6.6, 0, 1.0
    assert got["median_gap"] == pytest.approx(1.0)
    assert got["saturated_share"] == pytest.approx(1 / 3) and SATURATED < 6.6
    weights = [1 / (1 + math.exp(-g)) for g in (6.6, 0.0, 1.0)]
    assert got["mean_weight"] == pytest.approx(sum(weights) / 3)

    def heldout(accuracy, margin):
        return {"preference_accuracy": accuracy, "policy_margin": margin}

    def summary(before, after):
        return {"pairs": 4, "before": before, "after": after}

    assert nothing_moved(summary(heldout(0.5, 0.300), heldout(0.5, 0.305)))
    assert not nothing_moved(summary(heldout(0.5, 0.30), heldout(0.5, 0.35)))  # the margin moved
    assert not nothing_moved(summary(heldout(0.5, 0.30), heldout(0.75, 0.30)))  # a pair changed sides
    assert not nothing_moved({"pairs": 0})  # nothing to judge by


@pytest.mark.parametrize("family", ["llama31", "gemma3"])
def test_summed_logps_from_hidden_states_match_trls_fused_head(real_families, family):
    """The policy's response log-probs through fuse.losses.token_logprobs on the backbone's hidden states equal TRL's
    fused LM head's, values and gradients, on a real family's tiny model (Gemma's scaled embeddings included)."""
    from trl.trainer.utils import add_fused_lm_head

    from fuse.fpo_trainer import summed_logps
    from fuse.heads import plain_head
    from fuse.models import load_model
    from fuse.recipe import ModelSpec

    model = load_model(ModelSpec(name=family, path=str(real_families[family])), dtype="float32")
    add_fused_lm_head(model)
    assert plain_head(model) is not None
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.get_text_config().vocab_size - 1, (4, 12))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0  # a right-padded row
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    completion[2, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}

    def run(plain: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if plain:
            logps = summed_logps(model, batch)
        else:
            labels = ids.masked_fill(completion == 0, -100)
            out = model(
                input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False
            )
            logps = out.log_probs.sum(dim=1)
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (ours, our_grads), (trl, trl_grads) = run(True), run(False)
    assert torch.allclose(ours, trl, atol=1e-4, rtol=1e-5)
    assert len(our_grads) == len(trl_grads)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(our_grads, trl_grads, strict=True))

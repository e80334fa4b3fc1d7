"""group_by_length: batches of similar length in random order, the same order after a resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_distill
import torch
from test_distill import CrashAt, distill_job, weights

from fuse import training
from fuse.length_grouping import LENGTH_COLUMN, LengthGroupedOrder, length_grouped_order
from fuse.recipe import DistillSettings

pivot_dir, train_data = test_distill.pivot_dir, test_distill.train_data


def padded_tokens(lengths: np.ndarray, order: list[int], batch_size: int) -> int:
    """What a collator that pads each batch to its longest row computes."""
    return sum(
        int(lengths[order[i : i + batch_size]].max()) * len(order[i : i + batch_size])
        for i in range(0, len(order), batch_size)
    )


def test_every_row_once_in_batches_that_do_not_interleave():
    lengths = np.random.default_rng(0).integers(5, 500, size=61)
    order = length_grouped_order(lengths, batch_size=8, seed=3)
    assert sorted(order) == list(range(61))
    batches = [lengths[order[i : i + 8]] for i in range(0, 56, 8)]
    # one window (61 rows < 50 batches): each batch is a run of the sorted lengths, so no two batches interleave
    for a in batches:
        for b in batches:
            assert a.max() <= b.min() or b.max() <= a.min() or a is b
    assert len(order[56:]) == 5 and lengths[order[56:]].max() <= min(
        b.min() for b in batches
    )  # the rest, last
    # and the batches are not in length order (no long-to-short curriculum)
    maxima = [b.max() for b in batches]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_grouping_pads_less_than_a_random_order_and_depends_on_the_seed_alone():
    lengths = np.random.default_rng(1).integers(40, 480, size=304)
    grouped = length_grouped_order(lengths, 8, seed=0)
    shuffled = np.random.default_rng(0).permutation(304).tolist()
    assert padded_tokens(lengths, grouped, 8) < 0.8 * padded_tokens(lengths, shuffled, 8)
    assert grouped == length_grouped_order(lengths, 8, seed=0)
    assert grouped != length_grouped_order(lengths, 8, seed=1)
    # several windows: still a permutation, the windows' batches each sorted within
    windowed = length_grouped_order(lengths, 4, seed=0, window=10)
    assert sorted(windowed) == list(range(304))


def test_the_sampler_order_is_a_function_of_seed_and_epoch():
    lengths = list(range(3, 40))
    first = LengthGroupedOrder(lengths, 4, seed=7)
    epochs = []
    for epoch in range(2):
        first.set_epoch(epoch)
        epochs.append(list(first))
    again = LengthGroupedOrder(lengths, 4, seed=7)  # a resumed run builds a new sampler
    again.set_epoch(1)
    assert list(again) == epochs[1] != epochs[0] and len(again) == len(lengths)


def test_the_setting_reaches_the_trainer_and_owns_its_trainer_args():
    args = training.training_arguments(DistillSettings(group_by_length=True), "unused", launched=False)
    assert args.train_sampling_strategy == "group_by_length"
    assert (
        training.training_arguments(DistillSettings(), "unused", launched=False).train_sampling_strategy
        == "random"
    )
    with pytest.raises(ValueError, match="group_by_length"):
        DistillSettings(trainer_args={"train_sampling_strategy": "group_by_length"})


@pytest.fixture(scope="module")
def grouped_data(train_data, tmp_path_factory) -> Path:
    from datasets import load_from_disk

    rows = load_from_disk(str(train_data))
    path = tmp_path_factory.mktemp("grouped") / "train"
    rows.add_column(LENGTH_COLUMN, [len(ids) for ids in rows["input_ids"]]).save_to_disk(str(path))
    return path


def test_the_distill_trainer_batches_rows_of_similar_length(tmp_path, pivot_dir, grouped_data):
    from datasets import load_from_disk

    from fuse.distill_trainer import build_distill_trainer

    job = distill_job(tmp_path, pivot_dir, grouped_data, group_by_length=True, per_device_batch_size=4)
    trainer = build_distill_trainer(job, training.job_arguments(job, job.load_settings(), launched=False))
    lengths = np.asarray(load_from_disk(str(grouped_data))[LENGTH_COLUMN])
    seen = [batch["attention_mask"].sum(1).numpy() for batch in trainer.get_train_dataloader()]
    assert isinstance(trainer._get_train_sampler(), LengthGroupedOrder)
    assert np.array_equal(np.concatenate(seen), lengths[length_grouped_order(lengths, 4, seed=7)])
    assert sum(int(b.max()) * len(b) for b in seen) < padded_tokens(lengths, list(range(len(lengths))), 4)


@pytest.mark.slow
def test_a_grouped_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, pivot_dir, grouped_data):
    """16 rows at batch 2: 8 steps an epoch; killed at step 5 (checkpoint 4), the rerun crosses into epoch 1."""
    settings = dict(group_by_length=True, max_steps=10)
    straight = distill_job(tmp_path / "straight", pivot_dir, grouped_data, **settings)
    training.run_job(straight)
    resumed = distill_job(tmp_path / "resumed", pivot_dir, grouped_data, **settings)
    with pytest.raises(KeyboardInterrupt):
        training.run_job(resumed, callbacks=(CrashAt(5).callback,))
    summary = training.run_job(resumed)
    assert summary["resumed_from"] == "checkpoint-4" and summary["global_step"] == 10
    expected, got = weights(Path(straight.model_dir)), weights(Path(resumed.model_dir))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)

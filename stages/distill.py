"""distill.<source>: train a target T_i from the pivot's weights with L = λ·CE(gold) + (1−λ)·D(P_fused ‖ q_θ),
where P_fused fuses, per sequence, the pivot's own top-K and the source's top-K projected onto the pivot's vocab.
distill.joint (stages.distill.joint, FuseLLM) fuses the pivot's and every source's in one target.

Reads extract.pivot and align.<source> (same store format, same samples, the pivot's tokens); distill.sft_baseline
(option sft_only) reads the prepared SFT split only and trains with λ = 1; the control arms (distill.self_distill,
distill.label_smoothing, distill.oracle) train the same way with one teacher, or none. Writes out/model (a full HF checkpoint;
with stages.distill.peft the LoRA adapter merged into the pivot's weights, the adapter itself in out/adapter) and
out/distill_report.json; checkpoints go to <stage>/checkpoints, logs and the loss plot to <stage>/logs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset, load_from_disk

from fuse.context import StageContext
from fuse.data.logprobs import LogprobReader
from fuse.data.prepared import labels_for, sft_rows
from fuse.data.response import ce_per_byte
from fuse.io import atomic_dir, write_json_atomic
from fuse.length_grouping import LENGTH_COLUMN
from fuse.losses import fuse_sparse, get_fusion
from fuse.training import check_settings, make_job, result_of, train

if TYPE_CHECKING:
    from fuse.data.logprobs import SampleLogprobs

BUILDER = "fuse.distill_trainer:build_distill_trainer"


class DistillInputError(ValueError):
    pass


# --------------------------------------------------------------------------------------------- per-sample math


def sparse_rows(sample: SampleLogprobs) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) [T-1, K]; empty slots (-inf) become id -1 (the loss's padding)."""
    logprobs = np.asarray(sample.topk_logprobs, dtype=np.float32)
    ids = np.where(np.isfinite(logprobs), sample.topk_ids, -1).astype(np.int64)
    return ids, np.where(np.isfinite(logprobs), logprobs, -np.inf)


def fused_targets(
    pivot: SampleLogprobs, aligned: list[SampleLogprobs], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The fused sparse distribution per position, aligned with the tokens: position t+1 holds row t; position 0
    and positions outside the response get no teacher (-1 / 0). `aligned`: the sources' records on the pivot's
    tokens (one for a target, every source for distill.joint), weighted after the pivot in that order."""
    candidates = [tuple(torch.from_numpy(a) for a in sparse_rows(s)) for s in (pivot, *aligned)]
    ids, probs = (t.numpy() for t in fuse_sparse(candidates, torch.from_numpy(weights)))
    train_rows = pivot.mask[1:]
    ids, probs = np.where(train_rows[:, None], ids, -1), np.where(train_rows[:, None], probs, 0.0)
    width = ids.shape[1]
    return np.vstack([np.full((1, width), -1), ids]), np.vstack([np.zeros((1, width)), probs])


def check_pair(pivot: SampleLogprobs, aligned: SampleLogprobs | None, aligned_path: str) -> SampleLogprobs:
    if aligned is None:
        raise DistillInputError(
            f"{aligned_path}: sample {pivot.id!r} of extract.pivot is missing (align incomplete?)"
        )
    if not np.array_equal(pivot.input_ids, aligned.input_ids):
        raise DistillInputError(
            f"{aligned_path}: sample {pivot.id!r} is not on the pivot's tokens (aligned from another extract?)"
        )
    return aligned


# --------------------------------------------------------------------------------------------- training rows


def training_row(
    pivot: SampleLogprobs, ids: np.ndarray, probs: np.ndarray, max_length: int
) -> dict[str, Any]:
    """A row on the pivot's tokens (cut at max_length) with its sparse targets [T, J] flattened."""
    n = min(len(pivot.input_ids), max_length)
    return {
        "id": pivot.id,
        "input_ids": pivot.input_ids[:n].tolist(),
        "labels": labels_for(pivot.input_ids, pivot.mask)[:n].tolist(),
        "target_ids": ids[:n].reshape(-1).tolist(),
        "target_probs": probs[:n].reshape(-1).astype(np.float32).tolist(),
        "target_width": int(ids.shape[1]),
    }


def distill_rows(
    pivot_path: str,
    aligned_paths: tuple[str, ...],
    fusion: str,
    max_length: int,
    source_paths: tuple[str, ...] | None = None,
) -> Iterator[dict[str, Any]]:
    """One training row per sample of the pivot's store (module-level and plain arguments: datasets hashes it).

    `aligned_paths`: the sources' aligned stores (one for a target; every source for distill.joint, the fusion
    function choosing among all of them per sequence). Tuples, since `Dataset.from_generator` splits a list into
    shards, one generator call each. A source's CE comes from its own extract (its own tokenization, as FuseChat
    does) when `source_paths` (one per aligned store) is given, else from the aligned store (the projected
    distribution's log-prob of the pivot's tokens)."""
    own_paths = source_paths or (None,) * len(aligned_paths)
    fuse_weights = get_fusion(fusion).fn
    aligned_stores = [LogprobReader(path) for path in aligned_paths]
    own_stores = [LogprobReader(path) if path else None for path in own_paths]
    for pivot in LogprobReader(pivot_path):
        aligned = [
            check_pair(pivot, store.get(pivot.id) if pivot.id in store else None, path)
            for store, path in zip(aligned_stores, aligned_paths, strict=True)
        ]
        own = [
            own_store.get(pivot.id) if own_store is not None and pivot.id in own_store else projected
            for own_store, projected in zip(own_stores, aligned, strict=True)
        ]
        ce = torch.tensor([[ce_per_byte(pivot), *(ce_per_byte(o) for o in own)]], dtype=torch.float64)
        weights = fuse_weights(ce)[0].numpy()
        ids, probs = fused_targets(pivot, aligned, weights)
        yield training_row(pivot, ids, probs, max_length) | {
            "ce_per_byte": ce[0].tolist(),
            "weights": weights.tolist(),
        }


def single_teacher_rows(pivot_path: str, teacher_path: str, max_length: int) -> Iterator[dict[str, Any]]:
    """Control arms' rows: one teacher's distribution as the target, no fusion (the pivot's own store for
    self-distillation, an oracle's store on the pivot's tokens). A sample the teacher lacks gets gold labels only."""
    teacher_store = LogprobReader(teacher_path)
    for pivot in LogprobReader(pivot_path):
        if pivot.id in teacher_store:
            teacher = check_pair(pivot, teacher_store.get(pivot.id), teacher_path)
            ids, probs = fused_targets(teacher, [], np.array([1.0]))  # one teacher, as it is
        else:
            ids, probs = np.full((len(pivot.input_ids), 1), -1), np.zeros((len(pivot.input_ids), 1))
        yield training_row(pivot, ids, probs, max_length)


def write_rows(generator: Any, gen_kwargs: dict[str, Any], path: Path) -> Any:
    """Materialize the rows as an Arrow dataset at `path` (atomically), for this process and every rank."""
    dataset = Dataset.from_generator(generator, gen_kwargs=gen_kwargs, cache_dir=str(path.parent / ".cache"))
    dataset = dataset.filter(lambda row: any(label != -100 for label in row["labels"][1:]))
    dataset = dataset.add_column(
        LENGTH_COLUMN, [len(ids) for ids in dataset["input_ids"]]
    )  # group_by_length's
    with atomic_dir(path) as tmp:
        dataset.save_to_disk(str(tmp))
    return dataset


def data_report(dataset: Any, teachers: list[str] | None) -> dict[str, Any]:
    """Samples and response tokens; with `teachers` (a fused arm's teacher names, the pivot first): each
    teacher's mean CE per byte and mean weight, and how many sequences each one won."""
    report: dict[str, Any] = {
        "samples": len(dataset),
        "response_tokens": int(sum(sum(1 for x in r[1:] if x != -100) for r in dataset["labels"])),
    }
    if teachers and len(dataset):
        ce = np.asarray(dataset["ce_per_byte"])
        weights = np.asarray(dataset["weights"])
        winners = Counter(teachers[int(i)] for i in weights.argmax(axis=1))
        report.update(
            ce_per_byte={name: float(ce[:, i].mean()) for i, name in enumerate(teachers)},
            mean_weight={name: float(weights[:, i].mean()) for i, name in enumerate(teachers)},
            sequences_won=dict(winners),
        )
    return report


# --------------------------------------------------------------------------------------------- the stage


def check_inputs(ctx: StageContext, arm: str) -> None:
    settings = ctx.settings
    try:
        get_fusion(settings.fusion)
    except ValueError as error:
        raise DistillInputError(f"stages.distill.fusion: {error}") from None
    roles = {
        "target": ("pivot_logprobs", "alignment"),
        "joint": ("pivot_logprobs", "alignment"),
        "self_distill": ("pivot_logprobs",),
    }.get(arm, ())
    for role in roles:
        for label, folder in ctx.inputs_of(role).items():
            if not any(folder.glob("shard-*")) and not (folder / "index.json").is_file():
                raise DistillInputError(
                    f"{ctx.instance.name}: input {label} ({folder}) holds no log-prob store"
                )
    if arm == "oracle" and not Path(settings.oracle_teacher).is_file():
        raise DistillInputError(f"stages.distill.oracle_teacher: {settings.oracle_teacher} does not exist")


def arm_of(ctx: StageContext) -> str:
    """What this instance trains: a target (fused teachers), the joint target (the pivot and every source), the
    SFT-only baseline or a control arm."""
    if ctx.instance.option("sft_only", False):
        return "sft_only"
    if ctx.instance.option("joint", False):
        return "joint"
    control = ctx.instance.option("control")
    return "sft_only" if control == "label_smoothing" else str(control or "target")


def rows_of(ctx: StageContext, arm: str) -> tuple[Any, dict[str, Any]]:
    """The row generator of an arm and its arguments (plain values: datasets hashes them)."""
    settings = ctx.settings
    if arm == "sft_only":
        model = ctx.model_spec("pivot").model_dump(mode="json")
        return sft_rows, {
            "prepare_out": str(ctx.input("data")),
            "model": model,
            "max_length": settings.max_length,
        }
    pivot = str(ctx.input("pivot_logprobs"))
    if arm in ("self_distill", "oracle"):
        teacher = pivot if arm == "self_distill" else str(Path(settings.oracle_teacher).parent)
        return single_teacher_rows, {
            "pivot_path": pivot,
            "teacher_path": teacher,
            "max_length": settings.max_length,
        }
    # a target's one source, or distill.joint's every source in the recipe's order; each source's own extract for
    # its CE in its own tokenization
    own = tuple(str(p) for p in ctx.inputs_of("source_logprobs").values())
    return distill_rows, {
        "pivot_path": pivot,
        "aligned_paths": tuple(str(p) for p in ctx.inputs_of("alignment").values()),
        "fusion": settings.fusion,
        "max_length": settings.max_length,
        "source_paths": own if settings.rate_by == "own" and own else None,
    }


def teacher_names(ctx: StageContext, arm: str) -> list[str] | None:
    """The fused arms' teachers in their weights' order (a pairwise target's: pivot and source)."""
    if arm == "joint":
        return ["pivot", *ctx.inputs_of("alignment")]
    return ["pivot", "source"] if arm == "target" else None


def training_data(ctx: StageContext, arm: str) -> tuple[Path, dict[str, Any]]:
    """Build (or, on a resumed run, reuse) the training rows under <stage>/checkpoints/train_data."""
    path = ctx.dir / "checkpoints" / "train_data"
    if (path / "dataset_info.json").is_file():
        dataset = load_from_disk(str(path))
    else:
        dataset = write_rows(*rows_of(ctx, arm), path)
    if len(dataset) == 0:
        raise DistillInputError(f"{ctx.instance.name}: no training sample has a response token")
    return path, data_report(dataset, teacher_names(ctx, arm))


def validation_data(ctx: StageContext) -> Path | None:
    """With stages.distill.validation: the prepared held-out SFT split's gold rows, the same for every arm."""
    if not ctx.settings.validation:
        return None
    path = ctx.dir / "checkpoints" / "validation_data"
    if (path / "dataset_info.json").is_file():
        return path
    model = ctx.model_spec("pivot").model_dump(mode="json")
    arguments = {"prepare_out": str(ctx.input("data")), "model": model, "max_length": ctx.settings.max_length}
    if len(write_rows(sft_rows, arguments | {"split": "heldout"}, path)) == 0:
        raise DistillInputError(
            "stages.distill.validation: the prepared SFT held-out split is empty (set data.heldout_fraction > 0)"
        )
    return path


def run(ctx: StageContext) -> None:
    arm = arm_of(ctx)
    settings = ctx.settings
    check_settings(settings, "stages.distill")
    check_inputs(ctx, arm)
    data_path, report = training_data(ctx, arm)
    validation = validation_data(ctx)
    ctx.log.info("%s: %s", ctx.instance.name, report)
    job = make_job(
        BUILDER,
        settings,
        ctx.dir,
        ctx.out,
        "stages.distill",
        recipe_name=ctx.recipe.name,
        nodes=ctx.recipe.executor.nodes_for(ctx.instance.stage, ctx.instance.name),
        model=ctx.model_spec("pivot").model_dump(mode="json"),
        train_data=str(data_path),
        validation_data=validation and str(validation),
    )
    summary = train(job, progress=ctx.progress)  # steps, rate, ETA and loss on the run's display
    write_json_atomic(
        ctx.out / "distill_report.json",
        {
            "instance": ctx.instance.name,
            "arm": arm
            if not ctx.instance.option("control")
            else f"control: {ctx.instance.option('control')}",
            "lambda": settings.lambda_,
            "fusion": settings.fusion if arm in ("target", "joint") else None,
            "divergence": settings.divergence,
            "temperature": settings.temperature,
            "label_smoothing": settings.label_smoothing,
            "data": report,
            "training": result_of(summary),
            # only when set: a report written before LoRA existed stays byte for byte what a rerun writes
            **({"peft": settings.peft.model_dump(mode="json")} if settings.peft is not None else {}),
        },
    )

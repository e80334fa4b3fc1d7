"""fpo: InfiFPO preference optimization of one policy (a distilled target T_i, or the merged model) against a
reference fused from the sources' sequence-level scores, on TRL's DPO trainer; held-out reward accuracy before/after.

Inputs: prepare (preference pairs), the stage that made the policy (distill.<s> or merge: its out/model), score.<p> of
the policy at its initial weights (score.target-<s> or score.merged), and score.<k> for every fused source k. Writes
out/model (with stages.fpo.peft: the LoRA adapter merged into the policy, the adapter itself in out/adapter).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from trl.trainer.utils import add_fused_lm_head

from fuse import training
from fuse.context import StageContext
from fuse.data.chat import ChatRenderError, render_chat, response_mask
from fuse.data.prepared import load_split, sft_rows
from fuse.data.scores import ScoreError, read_scores
from fuse.fpo_trainer import REPLAY, policy_scores
from fuse.io import atomic_dir, write_json_atomic, write_text_atomic
from fuse.length_grouping import LENGTH_COLUMN
from fuse.models import load_model, load_tokenizer, pad_id
from fuse.preference import (
    default_beta,
    fused_reference,
    get_pair_fusion,
    join_scores,
    normalized_scores,
    normalizer,
    picked_histogram,
    reward_accuracy,
)
from fuse.recipe import FpoSettings, ModelSpec

INIT_CHECK_ROWS = 16
# Normalized log-probs of the policy at step 0 and the score stage's numbers for p agree to float32 round-off;
# more than this means the two renderings differ (template, special tokens, mask) and the reference is skewed.
INIT_TOLERANCE = 1e-3


class FpoInputError(ValueError):
    """Inputs the fpo stage cannot train on: no policy parent, no usable pairs."""


# --------------------------------------------------------------------------------------------- inputs


def score_tables(ctx: StageContext) -> tuple[str, dict[str, Path]]:
    """(p, model -> score table folder): p names the policy's own scores (the pivot of the sequence-level
    fusion, "target-<s>" or "merged"); the other entries are the fused sources'."""
    policy_scores = ctx.instance.in_role("policy_scores")
    if len(policy_scores) != 1 or not ctx.has_input("source_scores"):
        raise FpoInputError(
            f"{ctx.instance.name}: expected one policy_scores input and at least one source_scores input, "
            f"got {[(e.role, e.parent) for e in ctx.instance.edges]}"
        )
    pivot = policy_scores[0].label or policy_scores[0].parent
    return pivot, {pivot: ctx.input("policy_scores"), **ctx.inputs_of("source_scores")}


def policy_spec(ctx: StageContext) -> ModelSpec:
    """The policy's folder with the pivot's loading options, exactly as the score stage builds score.target-<s> /
    score.merged (both through StageContext.made_model_spec), so both render the pairs the same way."""
    return ctx.made_model_spec(ctx.made_model("policy"), ctx.instance.key or "policy")


def unusable(row: dict[str, Any]) -> str | None:
    """Why a pair cannot be trained on (prepare drops these; the stage refuses them again), else None."""
    if not row["chosen"].strip() or not row["rejected"].strip():
        return "empty chosen or rejected response"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected responses are identical"
    return None


# --------------------------------------------------------------------------------------------- encoding


def response_tokens(tokenizer: Any, prompt: list[dict], response: str, template: str | None, where: str):
    """(ids, mask) of prompt + response in the policy's chat template, cut after the last response token; the
    mask is the score stage's: tokens of the final assistant content plus the end-of-turn token after it."""
    chat = render_chat(
        tokenizer, [*prompt, {"role": "assistant", "content": response}], template, where=where
    )
    mask = response_mask(chat.offsets, chat.spans[-1:])
    end = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else 0
    return chat.input_ids[:end].tolist(), mask[:end].astype(np.int64).tolist()


def encode_pair(tokenizer: Any, row: dict[str, Any], settings: FpoSettings) -> dict | str:
    """The pair as training columns (ids, masks, the policy's normalizers), or why it is skipped."""
    encoded: dict[str, Any] = {"id": row["id"]}
    for side in ("chosen", "rejected"):
        try:
            ids, mask = response_tokens(
                tokenizer, row["prompt"], row[side], None, f"pair {row['id']} {side}: "
            )
        except ChatRenderError as error:
            return error.reason
        if not any(mask):
            return "no response tokens after rendering"
        if len(ids) > settings.max_length:
            return f"longer than max_length ({settings.max_length} tokens)"
        # b(y) is the response's UTF-8 size, the same for every model (the score stage counts it the same way)
        norm = normalizer([sum(mask)], [len(row[side].encode("utf-8"))], settings.normalization)[0]
        encoded.update(
            {f"{side}_input_ids": ids, f"{side}_completion_mask": mask, f"{side}_norm": float(norm)}
        )
    return encoded


def encode_split(tokenizer: Any, rows: list[dict], settings: FpoSettings) -> tuple[list[dict], Counter]:
    encoded, skipped = [], Counter()
    for row in rows:
        reason = unusable(row)
        item = encode_pair(tokenizer, row, settings) if reason is None else reason
        if isinstance(item, str):
            skipped[item] += 1
        else:
            encoded.append(item)
    return encoded, skipped


# --------------------------------------------------------------------------------------------- reference


@dataclass
class Split:
    """One split's encoded pairs; `reference` (and the reference columns in `rows`) when the scores cover it."""

    rows: list[dict]
    skipped: Counter
    pivot: Any = None  # fuse.preference.PairScores of p
    reference: Any = None  # fuse.preference.Reference


def reference_for(
    rows: list[dict], tables: dict, pivot: str, sources: list[str], settings: FpoSettings, split: str
):
    """(p's normalized scores, the fused Reference) for `rows`, joined on id; missing scores raise ScoreError."""
    ids = [r["id"] for r in rows]
    pivot_scores = normalized_scores(join_scores(tables[pivot], ids, pivot, split), settings.normalization)
    used = sources if get_pair_fusion(settings.fusion).uses_sources else []
    scores = {
        k: normalized_scores(join_scores(tables[k], ids, k, split), settings.normalization) for k in used
    }
    reference = fused_reference(
        pivot_scores, scores, settings.fusion, settings.clip, settings.weights or None
    )
    return pivot_scores, reference


def drop_truncated(rows: list[dict], tables: dict, skipped: Counter, logger: Any) -> list[dict]:
    """Pairs some model scored only a prefix of (its tokenizer made a side longer than score's max_length) are
    refused: that model's log-prob is of another, shorter text, so a fused reference over it compares unlike
    things. Each is counted per model and logged with its id."""
    truncated: dict[str, str] = {}
    for model, table in tables.items():
        flags = np.asarray(table["chosen_truncated"], bool) | np.asarray(table["rejected_truncated"], bool)
        for pair_id in np.asarray(table["id"])[flags]:
            truncated.setdefault(str(pair_id), model)
    kept = []
    for row in rows:
        model = truncated.get(str(row["id"]))
        if model is None:
            kept.append(row)
            continue
        skipped[f"truncated by score.{model}"] += 1
        logger.warning("pair %s: skipped, score.%s scored a truncated response", row["id"], model)
    return kept


def with_reference(rows: list[dict], reference: Any) -> list[dict]:
    return [
        {
            **row,
            "ref_chosen_logps": float(reference.scores.chosen[k]),
            "ref_rejected_logps": float(reference.scores.rejected[k]),
            "picked": int(reference.picked[k]),
            "clipped_terms": int(reference.clipped_terms[k]),
        }
        for k, row in enumerate(rows)
    ]


def prepare_split(
    ctx: StageContext, tokenizer: Any, split: str, tables: dict, names: tuple[str, list[str]]
) -> Split:
    """Load, check, encode and reference one split. Train needs every score; held-out may lack them."""
    try:
        raw = load_split(ctx.input("data"), "preference", split).to_list()
    except FileNotFoundError:
        if split == "train":
            raise
        raw = []
    rows, skipped = encode_split(tokenizer, raw, ctx.settings)
    rows = drop_truncated(rows, tables, skipped, ctx.log)
    result = Split(rows, skipped)
    if rows:
        try:
            result.pivot, result.reference = reference_for(rows, tables, *names, ctx.settings, split)
            result.rows = with_reference(rows, result.reference)
        except ScoreError as error:
            if split == "train":
                raise
            ctx.log.info(
                "held-out pairs are not fully scored, their reference is the policy at init: %s", error
            )
    return result


# --------------------------------------------------------------------------------------------- evaluation


def load_scoring_model(spec: ModelSpec):
    """The model in float32 with TRL's fused LM head, on the GPU when there is one."""
    model = load_model(spec, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu").eval()
    add_fused_lm_head(model)
    return model


def heldout_metrics(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """TRL's names: rewards/accuracies, the share of pairs whose implicit reward margin
    beta * [(l_theta(y_w) - l_ref(y_w)) - (l_theta(y_l) - l_ref(y_l))] is > 0 (ties count as wrong), and
    rewards/margins, its mean; preference_accuracy: the share with l_theta(y_w) > l_theta(y_l), the policy alone
    preferring y_w; policy_margin: the mean of l_theta(y_w) - l_theta(y_l)."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return {
        "rewards/accuracies": reward_accuracy(margins, tie=beta * INIT_TOLERANCE),
        "rewards/margins": float(np.mean(margins)),
        "preference_accuracy": float(np.mean(chosen > rejected)),
        "policy_margin": float(np.mean(chosen - rejected)),
        "logps/chosen": float(np.mean(chosen)),
        "logps/rejected": float(np.mean(rejected)),
    }


# Below these the policy did not move: no held-out pair changed sides and its mean margin moved by less than this.
MOVED_MARGIN = 0.01


def nothing_moved(heldout: dict[str, Any]) -> bool:
    """No held-out pair changed sides and the policy's mean margin moved by less than MOVED_MARGIN (normalized)."""
    if not heldout.get("pairs"):
        return False
    before, after = heldout["before"], heldout["after"]
    return (
        before["preference_accuracy"] == after["preference_accuracy"]
        and abs(after["policy_margin"] - before["policy_margin"]) < MOVED_MARGIN
    )


# beta * (reference margin - policy margin) above this: the pair's loss weight sigmoid(.) is > 0.95, the reference
# is out of reach there and the loss is linear in the policy's margin (no pair is weighted above another)
SATURATED = 3.0


def reach(reference: Any, pivot: Any, beta: float) -> dict[str, float]:
    """How far the fused reference is from the policy at step 0: beta * (margin_fu - margin_p) per pair (the DPO
    loss's argument, negated), its median, and the share of pairs past SATURATED."""
    gap = beta * (reference.scores.margin - pivot.margin)
    return {
        "median_gap": float(np.median(gap)) if gap.size else 0.0,
        "saturated_share": float(np.mean(gap > SATURATED)) if gap.size else 0.0,
        "mean_weight": float(np.mean(1 / (1 + np.exp(-gap)))) if gap.size else 0.0,
    }


def heldout_summary(heldout: Split, before, after, beta: float) -> dict[str, Any]:
    """Before/after metrics on held-out pairs against the fused reference (or the policy at init)."""
    if before is None or after is None:
        return {"pairs": 0}
    if heldout.reference is not None:
        ref, kind = (heldout.reference.scores.chosen, heldout.reference.scores.rejected), "fused"
    else:
        ref, kind = before, "policy_at_init"
    return {
        "pairs": len(heldout.rows),
        "reference": kind,
        "before": heldout_metrics(*before, *ref, beta),
        "after": heldout_metrics(*after, *ref, beta),
    }


def init_check(model: Any, rows: list[dict], pivot_scores: Any, pad_id: int) -> dict[str, float]:
    """The policy's normalized log-probs at step 0 against p's score-stage numbers on the first rows."""
    n = min(INIT_CHECK_ROWS, len(rows))
    chosen, rejected = policy_scores(model, rows[:n], pad_id)
    diff = np.concatenate(
        [np.abs(chosen - pivot_scores.chosen[:n]), np.abs(rejected - pivot_scores.rejected[:n])]
    )
    return {"rows": n, "max_abs_diff": float(diff.max())}


# --------------------------------------------------------------------------------------------- the stage


def check_weights(settings: FpoSettings, sources: list[str]) -> None:
    unknown = sorted(set(settings.weights) - set(sources))
    if unknown:
        raise FpoInputError(f"stages.fpo.weights: {', '.join(unknown)} not among the fused sources {sources}")
    if settings.fusion == "mean" and sum(settings.weights.get(s, 1.0) for s in sources) <= 0:
        raise FpoInputError(
            "stages.fpo.weights: the weights of the fused sources must sum to a positive number"
        )


def with_replay(rows: list[dict], replay: list[dict], seed: int) -> list[dict]:
    """Each training pair with one SFT conversation for the replay term (replay_input_ids, replay_completion_mask:
    1 on the tokens distill's SFT loss counts): the conversations shuffled with the training seed and cycled, so
    every one is replayed before any twice."""
    if not replay:
        raise FpoInputError(
            "stages.fpo.replay_weight: the prepared sft/train split has no usable conversation"
        )
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(replay)) for _ in range(-(-len(rows) // len(replay)))])
    return [
        {
            **row,
            REPLAY + "input_ids": replay[k]["input_ids"],
            REPLAY + "completion_mask": [int(label != -100) for label in replay[k]["labels"]],
        }
        for row, k in zip(rows, order.tolist(), strict=False)
    ]


def save_rows(rows: list[dict], path: Path) -> Path:
    with atomic_dir(path) as tmp:
        # group_by_length's key: a pair's two sides are padded together
        lengths = [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
        Dataset.from_list(rows).add_column(LENGTH_COLUMN, lengths).save_to_disk(str(tmp))
    return path


def run(ctx: StageContext) -> None:
    settings: FpoSettings = ctx.settings
    beta = settings.beta or default_beta(settings.normalization)
    parent, (pivot, folders) = ctx.parent("policy"), score_tables(ctx)
    sources = [m for m in folders if m != pivot]
    check_weights(settings, sources)
    spec = policy_spec(ctx)
    tokenizer = load_tokenizer(spec, require_chat_template=True)
    pad = pad_id(tokenizer)
    tables = {m: read_scores(folder, m) for m, folder in folders.items()}

    train = prepare_split(ctx, tokenizer, "train", tables, (pivot, sources))
    if not train.rows:
        raise FpoInputError(
            f"{ctx.instance.name}: no usable pairs in prepare's train split ({dict(train.skipped)})"
        )
    if train.skipped:
        ctx.log.warning("skipped %d train pairs: %s", sum(train.skipped.values()), dict(train.skipped))
    heldout = prepare_split(ctx, tokenizer, "heldout", tables, (pivot, sources))

    model = load_scoring_model(spec)
    check = init_check(model, train.rows, train.pivot, pad)
    if check["max_abs_diff"] > INIT_TOLERANCE:
        ctx.log.warning(
            "the policy at step 0 differs from score.%s by %.2e (normalized log-prob): do the "
            "renderings differ?",
            pivot,
            check["max_abs_diff"],
        )
    before = policy_scores(model, heldout.rows, pad) if heldout.rows else None
    del model

    rows = train.rows
    if settings.replay_weight > 0:
        replay = list(sft_rows(ctx.input("data"), spec.model_dump(mode="json"), settings.max_length))
        rows = with_replay(
            rows, [r for r in replay if any(x != -100 for x in r["labels"][1:])], settings.seed
        )
    data = save_rows(rows, ctx.dir / "data" / "train")
    reference = train.reference
    params = {
        "model": spec.model_dump(mode="json"),
        "train_data": str(data),
        "beta": beta,
        "label_smoothing": settings.label_smoothing,
        "sft_weight": settings.sft_weight,
        "replay_weight": settings.replay_weight,
        "sources": list(reference.sources),
        "terms_per_pair": reference.terms_per_pair if settings.clip != "none" else 0,
    }
    job = training.make_job(
        "fuse.fpo_trainer:build_fpo_trainer",
        settings,
        ctx.dir,
        ctx.out,
        "stages.fpo",
        recipe_name=ctx.recipe.name,
        nodes=ctx.recipe.executor.nodes_for(ctx.instance.stage, ctx.instance.name),
        **params,
    )
    trained = training.train(job, progress=ctx.progress)  # steps, rate, ETA and loss on the run's display

    after = None
    if heldout.rows:
        model = load_scoring_model(spec.model_copy(update={"path": job.model_dir}))
        after = policy_scores(model, heldout.rows, pad)
        del model
    summary = stage_summary(ctx, parent, pivot, sources, beta, train, heldout, check, trained)
    summary["heldout"] = heldout_summary(heldout, before, after, beta)
    summary["moved"] = not nothing_moved(summary["heldout"])
    if not summary["moved"]:
        ctx.log.warning(
            "the policy did not move: no held-out pair changed sides and its mean margin moved by < %.2f; "
            "raise learning_rate or epochs (train reference: %s)",
            MOVED_MARGIN,
            summary["train_reference"]["reach"],
        )
    write_json_atomic(ctx.out / "summary.json", summary)
    write_text_atomic(ctx.out / "summary.md", summary_markdown(summary))


def stage_summary(
    ctx, parent, pivot, sources, beta, train: Split, heldout: Split, check, trained
) -> dict[str, Any]:
    s: FpoSettings = ctx.settings
    ref = train.reference
    terms = ref.terms_per_pair * len(train.rows)
    return {
        "instance": ctx.instance.name,
        "policy": parent,
        "reference_pivot": ctx.parent("policy_scores"),
        "sources": sources,
        "fusion": s.fusion,
        "normalization": s.normalization,
        "clip": s.clip,
        "beta": beta,
        "label_smoothing": s.label_smoothing,
        "sft_weight": s.sft_weight,
        "replay_weight": s.replay_weight,
        "pairs": {
            "train": len(train.rows),
            "heldout": len(heldout.rows),
            "skipped_train": dict(train.skipped),
            "skipped_heldout": dict(heldout.skipped),
        },
        "train_reference": {
            "picked": picked_histogram(ref.picked, ref.sources),
            "clipped_share": float(ref.clipped_terms.sum() / terms) if terms else 0.0,
            "reach": reach(ref, train.pivot, beta),
        },
        "init_check": check,
        "training": training.result_of(trained),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The human-readable summary: settings, pair counts, and held-out accuracies before and after."""
    reach = summary["train_reference"]["reach"]
    lines = [
        f"# {summary['instance']}: {'DPO control' if summary['fusion'] == 'none' else 'InfiFPO'} ({summary['fusion']})",
        "",
        f"Policy: `{summary['policy']}/model`; reference pivot `{summary['reference_pivot']}`; sources: "
        f"{', '.join(summary['sources']) or '-'}. Normalization `{summary['normalization']}`, clip "
        f"{summary['clip']}, beta {summary['beta']}, label smoothing {summary['label_smoothing']}, sft weight "
        f"{summary.get('sft_weight', 0.0)}, replay weight {summary.get('replay_weight', 0.0)}.",
        "",
        f"Pairs: {summary['pairs']['train']} train, {summary['pairs']['heldout']} held-out; skipped "
        f"{json.dumps(summary['pairs']['skipped_train'])} (train), {json.dumps(summary['pairs']['skipped_heldout'])} "
        "(held-out).",
        f"Train reference: picks {json.dumps(summary['train_reference']['picked'])}, clipped share "
        f"{summary['train_reference']['clipped_share']:.3f}; beta x (reference margin - policy margin) at step 0: "
        f"median {reach['median_gap']:.2f}, {reach['saturated_share']:.0%} of pairs past {SATURATED:g} (loss weight "
        f"> 0.95: the reference is out of reach there), mean loss weight {reach['mean_weight']:.3f}. Step-0 check: "
        f"max |policy - score| {summary['init_check']['max_abs_diff']:.2e} over {summary['init_check']['rows']} "
        "pairs.",
        "",
    ]
    if not summary.get("moved", True):
        lines += [
            "**Nothing moved**: no held-out pair changed sides and the policy's margin barely changed.",
            "",
        ]
    heldout = summary["heldout"]
    if heldout.get("pairs"):
        lines += [
            f"Held-out ({heldout['pairs']} pairs, reference: {heldout['reference']}). Reward accuracy = share of "
            "pairs with beta*[(l_theta(y_w)-l_ref(y_w)) - (l_theta(y_l)-l_ref(y_l))] > 0; preference accuracy = "
            "share with l_theta(y_w) > l_theta(y_l) (normalized).",
            "",
            "| | rewards/accuracies | rewards/margins | preference accuracy | policy margin | logps/chosen "
            "| logps/rejected |",
            "|---|---|---|---|---|---|---|",
        ]
        for when in ("before", "after"):
            m = heldout[when]
            lines.append(
                f"| {when} | {m['rewards/accuracies']:.3f} | {m['rewards/margins']:.4f} | "
                f"{m['preference_accuracy']:.3f} | {m['policy_margin']:.4f} | {m['logps/chosen']:.4f} | "
                f"{m['logps/rejected']:.4f} |"
            )
    else:
        lines.append("No held-out pairs: no before/after accuracy.")
    return "\n".join(lines) + "\n"

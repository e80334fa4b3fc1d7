"""The merge stage: the targets (fpo.* or distill.* models) merged with the pivot (or the SFT-only model) as base,
tensor by tensor.

Writes out/model/ (a full HF checkpoint with the pivot's tokenizer, chat template and generation config, and the
special-token ids its targets were trained with) and out/merge_report.json + .md (method, parameters, per-tensor
weights, and the diagnostics: each target's delta norm, pairwise cosines per tensor family, the share of each target's
delta energy that survives). One target (a one-source recipe) is copied unchanged, except by slerp (an interpolation
between the base and it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fuse.context import StageContext
from fuse.io import read_json, write_json_atomic, write_text_atomic
from fuse.merging import MergeConfig
from fuse.merging.engine import report_markdown, run_merge
from fuse.models import load_tokenizer, resolve_model_dir


def merge_config(ctx: StageContext) -> MergeConfig:
    """The stage settings as a standalone merge config: the pivot (or the SFT-only model) as base, one entry per
    target."""
    settings = ctx.settings
    targets = ctx.made_models("targets")  # source -> the folder of its target
    unknown = sorted(set(settings.model_parameters) - set(targets))
    if unknown:
        raise ValueError(f"stages.merge.model_parameters: no merged target named {unknown}")
    models = [
        {"path": str(folder), "name": name, "parameters": settings.model_parameters.get(name, {})}
        for name, folder in targets.items()
    ]
    if settings.base == "sft_baseline":
        base = ctx.made_model("sft_baseline")
    else:
        base = resolve_model_dir(ctx.model_spec("pivot"))
    return MergeConfig(
        base_model=str(base),
        models=models,
        method=settings.method,
        parameters=settings.parameters,
        output=str(ctx.model_out),
        dtype=settings.dtype,
        max_shard_size=settings.max_shard_size,
        seed=settings.seed,
    )


# the config keys a training sets from the pivot's tokenizer (the Trainer aligns them: gemma-3's eos becomes its
# <end_of_turn>): the targets' values, where they all agree, are the merged model's
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _pivot_files(tokenizer, folder: Path, base_dir: Path, targets: list[Path]) -> None:  # noqa: ANN001
    """The pivot's tokenizer (with the recipe's chat template override, if any) and generation config, and the
    targets' special tokens (targets_special_tokens)."""
    tokenizer.save_pretrained(folder)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")
    targets_special_tokens(folder, targets)


def targets_special_tokens(folder: Path, targets: list[Path]) -> None:
    """The special-token ids the targets were trained with, in the merged model's config.json and
    generation_config.json, where every target has that file and they all agree on the key: a merged chat model
    stops where its targets stop (gemma-3's base config ends at <eos>, its trained targets at <end_of_turn> too),
    and a merge of one target is that target to the last file (evaluate scores it once)."""
    for name in ("config.json", "generation_config.json"):
        if not (folder / name).is_file() or not all((t / name).is_file() for t in targets):
            continue
        merged, configs = read_json(folder / name), [read_json(t / name) for t in targets]
        changed = False
        for key in SPECIAL_TOKEN_KEYS:
            values = [c.get(key) for c in configs]
            if values[0] is not None and all(v == values[0] for v in values) and merged.get(key) != values[0]:
                merged[key], changed = values[0], True
        if changed:
            write_json_atomic(folder / name, merged)


def run(ctx: StageContext) -> None:
    config = merge_config(ctx)
    tokenizer = load_tokenizer(ctx.model_spec("pivot"))
    base = "the SFT-only model" if ctx.settings.base == "sft_baseline" else "the pivot"
    ctx.log.info("merging %s into %s with %s", [m.label for m in config.models], base, config.method)
    report = run_merge(
        config,
        ctx.model_out,
        tokenizer_vocab=len(tokenizer),
        finish_folder=lambda folder: _pivot_files(
            tokenizer,
            folder,
            resolve_model_dir(ctx.model_spec("pivot")),
            [Path(m.path) for m in config.models],
        ),
        progress=lambda done, total: ctx.progress(done, total, "tensor"),
    )
    outputs = {k: v for k, v in report.items() if k != "seconds"}  # the time goes to the log, not the outputs
    write_json_atomic(ctx.out / "merge_report.json", outputs)
    write_text_atomic(ctx.out / "merge_report.md", report_markdown(outputs))
    shares = report["diagnostics"]["families"]["all"]["energy_share"]
    ctx.log.info(
        "merged in %.1f s; delta energy kept per target: %s",
        report["seconds"],
        ", ".join(f"{k} {v:.2f}" for k, v in shares.items() if v is not None),
    )
    for line in report["diagnostics"]["verdict"]:
        ctx.log.info("merge diagnostics: %s", line)

"""The table of stages: what `plan` needs to know about a stage without importing it.

A stage's code version is part of every fingerprint, so `fuse plan` reads it here rather than from the stage module:
planning stays fast (no stage module, no torch) and stage modules import what they use at the top. Bump a stage's
`version` whenever a change to its code changes what it writes: every output made by the old code becomes stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StageInfo:
    name: str
    version: int
    per: Literal["run", "model", "source", "target"]  # one instance per …
    sharded: bool = False  # its instances split their rows over shards (job arrays on SLURM)
    trains: bool = False  # runs a training job (multi-node capable, checkpoints)

    @property
    def module(self) -> str:
        """The module whose `run(ctx)` does the work."""
        return f"fuse.stages.{self.name}"


STAGE_TABLE: dict[str, StageInfo] = {
    info.name: info
    for info in (
        StageInfo("prepare", 1, "run"),
        # 2: store v2; rows a template refuses folded or skipped; ids past the output skipped
        StageInfo("extract", 2, "model", sharded=True),
        # 2: held-out pairs scored too; truncated sides flagged, their bytes those of the scored prefix.
        # Per fused source, plus the pivot when fpo.include_pivot, plus each policy fpo starts from.
        StageInfo("score", 2, "source", sharded=True),
        # 2: positions from the first visible character, end-of-turn by role, no renormalization, teacher signal;
        # 3: rows by cause and signal, sound projection, chunk likelihood, completion, pivot fallback (width K+1);
        # 4, 5: candidate scoring asks prefixes with the words they begin, and a content's opening word
        StageInfo("align", 5, "source"),
        # 2: fusion CE per byte over content tokens only; 3: control arms, validation with the best checkpoint kept
        StageInfo("distill", 3, "source", trains=True),
        # 2: pairs truncated by any score refused; held-out pairs against the fused reference; 3: max_margin picks on
        # own margins, clip sides/margin, the dpo control, TRL metric names, reach and nothing-moved checks; 4: the
        # policy's log-probs from its hidden states through fuse.losses.token_logprobs
        StageInfo("fpo", 4, "target", trains=True),
        # 2: sce = FuseChat's SCE, one target copied, diagnostics
        StageInfo("merge", 2, "run"),
        # 2: per-domain CE/byte and the limit row; 3: every item's score (scores.parquet), paired differences; 4: held-out
        # preference accuracy; 5: code items pass/fail by their tests; 6: standard errors of every aggregate, accuracy
        # plot in distinct colours with error bars
        StageInfo("evaluate", 6, "run"),
        # 3: the merge diagnostics in the model card; 4: the card through huggingface_hub (model-index with standard
        # errors, licence name/link, usage, model revisions), the recipe, images and LICENSES.md beside it
        StageInfo("publish", 4, "run"),
    )
}
STAGES = tuple(STAGE_TABLE)  # in the order a run does them

"""Every stage's settings under `stages:` (Stages), and those of the stages that neither run models forward
in bulk nor train (prepare, align, merge, evaluate, publish); extract/score and distill/fpo settings live in
inference_settings.py and training_settings.py.

Every stage's settings are a frozen model, so a stage instance's fingerprint is computed from the settings object
itself and a bad key is reported with its YAML path before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fuse.recipe.base import Frozen, StageSettings, added, operational
from fuse.recipe.inference_settings import ExtractSettings, ScoreSettings
from fuse.recipe.training_settings import DistillSettings, FpoSettings


class PrepareSettings(StageSettings):
    min_response_chars: int = 1


class AlignSettings(StageSettings):
    method: Literal["offsets", "dtw"] = "offsets"
    vocab_map: Literal[
        "exact+stats+mined", "exact+mined", "exact+stats+first_piece", "exact+first_piece", "exact"
    ] = Field(
        "exact+stats+mined",
        description="How source ids become pivot ids: exact bytes, then the corpus statistics (FuseChat), then for "
        "the rest either minimum edit distance (mined, FuseChat's) or the pivot token the pivot writes first for the "
        "source token's text (first_piece: sound where the source's token covers the pivot's).",
    )
    min_stat_count: int = Field(
        1, ge=1, description="Fewest aligned co-occurrences for a statistics-based mapping."
    )
    stats_pairs: Literal["same_start", "one_to_one"] = Field(
        "same_start",
        description="Pairs counted for the statistics-based map: tokens starting at the same byte (1:1 and many:1), "
        "or 1:1 only (byte-exact 1:1 pairs always spell the same bytes, so they rarely add to the exact map).",
    )
    project: Literal["one_to_one", "sound", "same_start"] = Field(
        "sound",
        description="Pivot positions that receive the source's projected top-K: where both next tokens cover the "
        "same text (one_to_one, FuseChat's strict setting); also where the source's next token covers the pivot's "
        "(sound); also where the source spells the pivot token in pieces, projecting the first piece's "
        "distribution, a prefix's (same_start: unsound).",
    )
    chunk: bool = Field(
        True,
        description="Where the source spells the pivot token in several pieces ending with it: the source's "
        "likelihood of the whole token (its pieces' realized log-probs summed; ALM's chunk likelihood) as the "
        "gold's probability, the rest in the tail.",
    )
    chunk_rest: Literal["tail", "pivot"] = Field(
        "tail",
        description="At a chunk row, where the mass the gold does not take goes: the tail bucket (every other "
        "token, in the student's own proportions), or the pivot's other candidates in the pivot's proportions (the "
        "pivot's distribution with the gold set to the chunk probability: the least-KL change of the pivot's).",
    )
    complete: bool = Field(
        False,
        description="A source candidate that begins some of the pivot's own candidates at the row (its top-K and "
        "the gold) has its mass split among them by the pivot's probabilities, not put on the id its prefix maps to.",
    )
    within: bool = Field(
        False,
        description="Where the pivot spells in several pieces what the source writes as one token, the pieces after "
        "the first receive the source's candidates for that token conditioned on the pieces already written (the "
        "chain rule carries the source's word probability across the pieces); else a one-hot.",
    )
    within_norm: Literal["bound", "topk"] = Field(
        "bound",
        description="within's denominator: bound, the top-K's mass consistent with the written text plus the mass "
        "outside the top-K (never sharper than the source could be); topk, the consistent top-K mass alone.",
    )
    score_candidates: bool = Field(
        True,
        description="Ask the source model for the exact probability of each candidate pivot token's text (the "
        "gold, the pivot's top-K, the words the source's likely first pieces begin) at every response row where "
        "both tokenizations have a boundary; runs the source with stages.extract's backend and settings.",
    )
    max_candidates: int = Field(32, ge=2, le=256, description="Candidates scored per row, at most.")
    fallback: Literal["one_hot", "pivot"] = Field(
        "one_hot",
        description="What a row no source signal reaches receives: the gold one-hot, or the pivot's own "
        "distribution.",
    )


class MergeSettings(StageSettings):
    method: str = "sce"
    base: Literal["pivot", "sft_baseline"] = added(
        "pivot",
        description="What the targets' deltas are taken against. pivot: FuseChat's choice. sft_baseline: the SFT-only "
        "model (needs stages.distill.sft_baseline), which trained on the same data and budget, so each target's delta "
        "holds what its teacher added and not the fine-tuning every target shares.",
    )
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per-target parameters keyed by source name, e.g. {llama: {weight: 0.5}}.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    max_shard_size: str = operational("2GB", description="Size of each safetensors file of the merged model.")
    seed: int = 0


class LmEvalSettings(Frozen):
    """lm-evaluation-harness tasks run on every evaluated model (fuse/lm_eval.py); no tasks: not run."""

    tasks: list[str] = Field(default_factory=list, description="Task or group names: mmlu, gsm8k, ifeval.")
    include_path: str | None = Field(
        None, description="A folder of your own task YAMLs (relative to the recipe), e.g. on local JSONL."
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers (sharded over GPUs with `parallelize`); vllm: tensor parallel."
    )
    parallelize: bool = operational(
        False, description="hf: spread a model too big for one GPU over all of them."
    )
    tensor_parallel_size: int = operational(1, ge=1, description="vllm backend.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0, description="Examples per task (a fraction when < 1).")
    batch_size: int = operational(8, ge=1)
    apply_chat_template: bool = Field(False, description="Prompt through each model's chat template.")
    seed: int = 0

    @field_validator("include_path")
    @classmethod
    def _relative_to_recipe(cls, value: str | None, info: Any) -> str | None:
        if value is None or Path(value).expanduser().is_absolute():
            return value and str(Path(value).expanduser())
        return str((Path((info.context or {}).get("base_dir") or Path.cwd()) / value).resolve())


class EvaluateSettings(StageSettings):
    items: str | None = Field(
        None,
        description="JSONL of {skill, prompt, answer} (the zoo writes data/eval_items.jsonl), scored by exact match, "
        "or of code items {skill, prompt, test, entry_point, prefix}, scored by running the completion's program "
        "with its tests in a sandboxed subprocess (fuse.code_exec); unset: no accuracy.",
    )
    heldout_text: str | None = Field(
        None, description="Text file/JSONL for per-byte CE; default: prepared held-out SFT."
    )
    domains: str | None = Field(
        None,
        description="JSONL of {domain, messages, nll}: held-out responses of domains with a known generator "
        "(the zoo writes data/domains.jsonl); per-domain response CE/byte next to the limit (nll per byte).",
    )
    preference: str | None = Field(
        None,
        description="JSONL of held-out preference pairs {prompt, chosen, rejected, skill (optional)} (the zoo writes "
        "data/preference_heldout.jsonl): every model's preference accuracy, the share of pairs whose chosen "
        "response it finds likelier per byte, in its own chat template.",
    )
    max_new_tokens: int = Field(32, ge=1)
    code_timeout_s: float = Field(
        10.0, gt=0, description="Wall-clock (and CPU-second) limit of one code item's test run."
    )
    max_items_per_skill: int | None = Field(None, ge=1)
    batch_size: int = operational(32, ge=1, description="Prompts per greedy-generation batch.")
    include: list[Literal["pivot", "sources", "targets", "fused", "sft_baseline", "controls"]] = Field(
        default_factory=lambda: ["pivot", "sources", "targets", "fused", "sft_baseline", "controls"]
    )
    lm_eval: LmEvalSettings = Field(
        default_factory=LmEvalSettings,
        description="lm-evaluation-harness tasks run on every evaluated model, reported beside the table.",
    )


LICENSE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


class PublishSettings(StageSettings):
    license: str | None = Field(
        None,
        description="The card's Hub license id (apache-2.0, llama3.1, gemma, ...); default 'other': a fused model "
        "inherits its base models' terms, which only you can reconcile.",
    )
    license_name: str | None = added(
        None,
        description="With license other (the default): the licence's short id (lowercase, digits, '-', '.'); "
        "default base-model-licenses.",
    )
    license_link: str | None = added(
        None,
        description="With license other (the default): the licence's URL; default LICENSES.md, a file publish "
        "writes beside the card listing every model that went in.",
    )
    model: Literal["merge", "joint"] = added(
        "merge",
        description="Which fused model is published: merge (FuseChat: the targets merged, or fpo.merged after it) "
        "or joint (distill.joint, FuseLLM: one target taught by every source at once; needs "
        "stages.distill.joint: true).",
    )
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    max_shard_size: str = "2GB"

    @model_validator(mode="after")
    def _push_needs_repo(self) -> PublishSettings:
        if self.push and not self.repo_id:
            raise ValueError("push: true needs repo_id")
        return self

    @model_validator(mode="after")
    def _license_other(self) -> PublishSettings:
        named = [k for k in ("license_name", "license_link") if getattr(self, k) is not None]
        if named and self.license not in (None, "other"):
            raise ValueError(f"{' and '.join(named)} describe a license other, not license {self.license}")
        if self.license_name is not None and not LICENSE_NAME_RE.match(self.license_name):
            raise ValueError(
                f"license_name {self.license_name!r}: lowercase letters, digits, '-' and '.' only"
            )
        if self.license_link is not None and not self.license_link.startswith(("https://", "http://")):
            raise ValueError(f"license_link {self.license_link!r}: a URL (http:// or https://)")
        return self


class Stages(Frozen):
    prepare: PrepareSettings = PrepareSettings()
    extract: ExtractSettings = ExtractSettings()
    score: ScoreSettings = ScoreSettings()
    align: AlignSettings = AlignSettings()
    distill: DistillSettings = DistillSettings()
    fpo: FpoSettings = FpoSettings()
    merge: MergeSettings = MergeSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    publish: PublishSettings = PublishSettings()

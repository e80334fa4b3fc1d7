"""The recipe expanded into a DAG of stage instances (`extract.llama`, `align.llama`, `distill.llama`, …).

The shape is decided here and only here: which stages are on, where fpo sits, which sources take part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fuse.recipe import Recipe, RecipeError
from fuse.stage_table import STAGE_TABLE


@dataclass(frozen=True)
class Edge:
    """A parent feeding an instance in a role: the instance asks for "its policy" or "its targets", never for a
    parent by name. `label` tells apart the parents of a role that has several (the source a target came from)."""

    role: str
    parent: str
    label: str | None = None


# The roles an edge can have, and what the parent's out/ folder holds for the child.
ROLES = {
    "data": "prepare's splits (SFT conversations, preference pairs)",
    "pivot_logprobs": "the pivot's top-K log-prob store (extract.pivot)",
    "source_logprobs": "the source's own top-K log-prob store, in its own tokenization (extract.<source>); "
    "distill.joint's are labelled by source",
    "alignment": "the source's store projected onto the pivot's tokens (align.<source>); distill.joint's are "
    "labelled by source",
    "model": "the model to score or to publish (its out/model)",
    "policy": "the model fpo starts from (its out/model)",
    "policy_scores": "the score table of the policy (the pivot of the sequence-level fusion)",
    "source_scores": "the score table of one fused source, labelled by that model",
    "targets": "target models, labelled by source (merge) or by instance (evaluate)",
    "fused": "a fused model: merge, fpo.merged when fpo runs after it, distill.joint (every source at once)",
    "sft_baseline": "the SFT-only baseline model",
    "controls": "a control arm's model (distill.self_distill, distill.label_smoothing, distill.oracle, fpo.dpo-<s>)",
    "evaluation": "the evaluate stage's metrics",
    "teacher_signal": "an align stage's teacher-signal report, labelled by source",
}


@dataclass(frozen=True)
class Instance:
    name: str  # "extract.llama"
    stage: str  # "extract": the module fuse.stages.<stage> runs it
    key: str | None = None  # the model/source it is about, if any
    edges: tuple[Edge, ...] = ()
    models: tuple[str, ...] = ()  # recipe models (pivot/sources) whose weights it reads directly
    num_shards: int = 1
    options: tuple[
        tuple[str, object], ...
    ] = ()  # per-instance settings beyond the stage's (e.g. sft baseline)

    def __post_init__(self) -> None:
        unknown = sorted({e.role for e in self.edges} - ROLES.keys())
        if unknown:
            raise ValueError(f"{self.name}: unknown input roles {unknown}")

    @property
    def parents(self) -> tuple[str, ...]:
        """The parent instances, each once, in the order their edges were declared."""
        return tuple(dict.fromkeys(e.parent for e in self.edges))

    def in_role(self, role: str) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.role == role)

    def option(self, name: str, default: object = None) -> object:
        return dict(self.options).get(name, default)


def stage_of(name: str) -> str:
    """The stage an instance name belongs to: names are "<stage>" or "<stage>.<key>" (the DAG names them so)."""
    return name.partition(".")[0]


def edges(role: str, *parents: str, labels: Iterable[str | None] | None = None) -> tuple[Edge, ...]:
    labels = list(labels) if labels is not None else [None] * len(parents)
    return tuple(Edge(role, p, label) for p, label in zip(parents, labels, strict=True))


def instance_settings(recipe: Recipe, instance: Instance) -> Any:
    """The settings an instance works with, and is fingerprinted by: extract/score take only this model's
    overrides (so another model's do not rerun it); the SFT-only baseline trains at λ = 1 with the teacher's knobs
    at their defaults, whatever `stages.distill` says, so changing them does not make it stale."""
    settings = getattr(recipe.stages, instance.stage)
    if hasattr(settings, "for_model"):
        settings = settings.for_model(instance.key)
    if instance.option("sft_only", False):
        return settings.sft_only()
    if instance.option("control"):
        return settings.for_control(str(instance.option("control")))
    if instance.stage in ("distill", "fpo"):
        return settings.for_arm()
    return settings


@dataclass
class Dag:
    instances: dict[str, Instance] = field(default_factory=dict)

    def add(self, instance: Instance) -> None:
        if instance.name in self.instances:
            raise ValueError(f"duplicate stage instance {instance.name}")
        missing = [p for p in instance.parents if p not in self.instances]
        if missing:
            raise ValueError(f"{instance.name}: unknown parents {missing}")
        if instance.stage not in STAGE_TABLE:
            raise ValueError(f"{instance.name}: stage {instance.stage!r} is not in the stage table")
        if instance.num_shards > 1 and not STAGE_TABLE[instance.stage].sharded:
            raise ValueError(f"{instance.name}: stage {instance.stage} does not shard")
        self.instances[instance.name] = instance

    def __getitem__(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise KeyError(f"no stage instance {name!r}; the DAG has: {', '.join(self.instances)}") from None

    def __iter__(self):
        return iter(self.instances.values())

    def __len__(self) -> int:
        return len(self.instances)

    def order(self) -> list[Instance]:
        """Topological order; instances are added parents-first, so insertion order is one."""
        return list(self.instances.values())

    def children(self, name: str) -> list[str]:
        return [i.name for i in self if name in i.parents]

    def descendants(self, names: Iterable[str]) -> set[str]:
        """`names` and everything downstream of them."""
        result = set(names)
        for instance in self.order():
            if any(p in result for p in instance.parents):
                result.add(instance.name)
        return result

    def ancestors(self, name: str) -> set[str]:
        result: set[str] = set()
        stack = list(self[name].parents)
        while stack:
            parent = stack.pop()
            if parent not in result:
                result.add(parent)
                stack.extend(self[parent].parents)
        return result

    def of_stage(self, stage: str) -> list[Instance]:
        return [i for i in self if i.stage == stage]


def _require(recipe: Recipe, stage: str, needs: str) -> None:
    stages = recipe.stages
    if getattr(stages, stage).enabled and not getattr(stages, needs).enabled:
        raise RecipeError(f"stages.{stage} is on but stages.{needs}, which it needs, is off")


def build_dag(recipe: Recipe) -> Dag:
    s = recipe.stages
    for stage, needs in [
        ("align", "extract"),
        ("distill", "align"),
        ("fpo", "score"),
        ("fpo", "distill"),
        ("merge", "distill"),
        ("publish", "merge" if s.publish.model == "merge" else "distill"),
    ]:
        _require(recipe, stage, needs)
    if s.publish.enabled and s.publish.model == "joint" and not s.distill.joint:
        raise RecipeError("stages.publish.model is joint but stages.distill.joint is off (nothing trains it)")
    if s.fpo.enabled and recipe.data.preference is None:
        raise RecipeError("stages.fpo is on but data.preference is not set (fpo needs preference pairs)")
    if s.fpo.enabled and s.fpo.placement == "after_merge" and not s.merge.enabled:
        raise RecipeError("stages.fpo.placement is after_merge but stages.merge is off")

    dag = Dag()
    sources = recipe.source_names
    data = edges("data", "prepare")
    dag.add(Instance("prepare", "prepare"))

    if s.extract.enabled:
        for model in ["pivot", *sources]:
            dag.add(Instance(f"extract.{model}", "extract", model, data, (model,), s.extract.num_shards))
    for source in sources if s.align.enabled else []:
        logprobs = Edge("source_logprobs", f"extract.{source}"), Edge("pivot_logprobs", "extract.pivot")
        # scoring candidates runs the source model itself: its weights are then read directly
        reads = (source,) if s.align.score_candidates else ()
        dag.add(Instance(f"align.{source}", "align", source, logprobs, reads))

    if s.distill.enabled:
        for source in sources:
            teachers = (
                Edge("pivot_logprobs", "extract.pivot"),
                # the source's own store: its CE against gold, in its own tokenization, for min_ce/avg_ce
                Edge("source_logprobs", f"extract.{source}"),
                Edge("alignment", f"align.{source}"),
            )
            dag.add(Instance(f"distill.{source}", "distill", source, data + teachers, ("pivot",)))
        if s.distill.sft_baseline:
            baseline = Instance(
                "distill.sft_baseline",
                "distill",
                "sft_baseline",
                data,
                ("pivot",),
                options=(("sft_only", True),),
            )
            dag.add(baseline)
        if s.distill.joint:  # FuseLLM: one target, every source a teacher beside the pivot
            teachers = (
                Edge("pivot_logprobs", "extract.pivot"),
                *edges("source_logprobs", *(f"extract.{m}" for m in sources), labels=sources),
                *edges("alignment", *(f"align.{m}" for m in sources), labels=sources),
            )
            options = (("joint", True),)
            dag.add(
                Instance("distill.joint", "distill", "joint", data + teachers, ("pivot",), options=options)
            )
        for control in s.distill.controls:
            # the pivot's own store: self_distill's teacher, and the oracle's tokens are checked against it
            teacher = (
                data if control == "label_smoothing" else data + edges("pivot_logprobs", "extract.pivot")
            )
            options = (("control", control),)
            dag.add(Instance(f"distill.{control}", "distill", control, teacher, ("pivot",), options=options))

    fpo_on = s.fpo.enabled
    scored = [*sources, "pivot"] if s.fpo.include_pivot else list(sources)
    if fpo_on:
        for model in scored:
            dag.add(Instance(f"score.{model}", "score", model, data, (model,), s.score.num_shards))

    def add_fpo(key: str, scored_as: str, policy: str) -> str:
        """score.<scored_as> of the policy's model, then fpo.<key> against it and the sources' scores."""
        dag.add(
            Instance(
                f"score.{scored_as}",
                "score",
                scored_as,
                data + edges("model", policy),
                (),
                s.score.num_shards,
            )
        )
        inputs = (
            *data,
            Edge("policy", policy),
            Edge("policy_scores", f"score.{scored_as}", scored_as),
            *edges("source_scores", *(f"score.{m}" for m in scored), labels=scored),
        )
        dag.add(Instance(f"fpo.{key}", "fpo", key, inputs))
        for (
            control
        ) in s.fpo.controls:  # the same policy, pairs and budget with the policy itself as the reference
            options = (("control", control),)
            dag.add(Instance(f"fpo.{control}-{key}", "fpo", f"{control}-{key}", inputs, options=options))
        return f"fpo.{key}"

    targets: dict[str, str] = {}  # source -> the instance that made its target
    for source in sources if s.distill.enabled else []:
        targets[source] = f"distill.{source}"
        if fpo_on and s.fpo.placement == "per_target":
            targets[source] = add_fpo(source, f"target-{source}", targets[source])

    final = None
    if s.merge.enabled:
        inputs = edges("targets", *targets.values(), labels=targets)
        if s.merge.base == "sft_baseline":  # the deltas are taken against the SFT-only model
            inputs += edges("sft_baseline", "distill.sft_baseline")
        dag.add(Instance("merge", "merge", None, inputs, ("pivot",)))
        final = "merge"
        if fpo_on and s.fpo.placement == "after_merge":
            final = add_fpo("merged", "merged", "merge")

    if s.evaluate.enabled:
        made = [*data]
        for instance in dag:
            if instance.name == "distill.sft_baseline":
                made.append(Edge("sft_baseline", instance.name, instance.name))
            elif instance.option("control"):
                made.append(Edge("controls", instance.name, instance.name))
            elif instance.stage == "merge" or instance.name in ("fpo.merged", "distill.joint"):
                made.append(Edge("fused", instance.name, instance.name))
            elif instance.stage in ("distill", "fpo"):
                made.append(Edge("targets", instance.name, instance.name))
        dag.add(Instance("evaluate", "evaluate", None, tuple(made), ("pivot", *sources)))
    if s.publish.model == "joint":
        final = "distill.joint"
    if s.publish.enabled and final:
        inputs = edges("model", final)
        if s.evaluate.enabled:
            inputs += edges("evaluation", "evaluate")
        # the align stages' teacher-signal reports go in the model card
        aligned = [i.key for i in dag.of_stage("align")]
        inputs += edges("teacher_signal", *(f"align.{a}" for a in aligned), labels=aligned)
        dag.add(Instance("publish", "publish", None, inputs, ("pivot", *sources)))
    return dag

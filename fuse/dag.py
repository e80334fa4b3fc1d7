"""The recipe expanded into a DAG of stage instances (`extract.llama`, `align.llama`, `distill.llama`, …).

The shape is decided here and only here: which stages are on, where fpo sits, which sources take part.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fuse.recipe import Recipe, RecipeError

STAGES = ("prepare", "extract", "score", "align", "distill", "fpo", "merge", "evaluate", "publish")


@dataclass(frozen=True)
class Instance:
    name: str  # "extract.llama"
    stage: str  # "extract": the module fuse.stages.<stage> runs it
    key: str | None = None  # the model/source it is about, if any
    parents: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # recipe models (pivot/sources) whose weights it reads directly
    num_shards: int = 1
    options: tuple[
        tuple[str, object], ...
    ] = ()  # per-instance settings beyond the stage's (e.g. sft baseline)

    def option(self, name: str, default: object = None) -> object:
        return dict(self.options).get(name, default)


@dataclass
class Dag:
    instances: dict[str, Instance] = field(default_factory=dict)

    def add(self, instance: Instance) -> None:
        if instance.name in self.instances:
            raise ValueError(f"duplicate stage instance {instance.name}")
        missing = [p for p in instance.parents if p not in self.instances]
        if missing:
            raise ValueError(f"{instance.name}: unknown parents {missing}")
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
        ("publish", "merge"),
    ]:
        _require(recipe, stage, needs)
    if s.fpo.enabled and recipe.data.preference is None:
        raise RecipeError("stages.fpo is on but data.preference is not set (fpo needs preference pairs)")
    if s.fpo.enabled and s.fpo.placement == "after_merge" and not s.merge.enabled:
        raise RecipeError("stages.fpo.placement is after_merge but stages.merge is off")

    dag = Dag()
    sources = recipe.source_names
    dag.add(Instance("prepare", "prepare"))

    if s.extract.enabled:
        for model in ["pivot", *sources]:
            dag.add(
                Instance(f"extract.{model}", "extract", model, ("prepare",), (model,), s.extract.num_shards)
            )
    for source in sources if s.align.enabled else []:
        dag.add(Instance(f"align.{source}", "align", source, (f"extract.{source}", "extract.pivot")))

    if s.distill.enabled:
        for source in sources:
            dag.add(
                Instance(
                    f"distill.{source}",
                    "distill",
                    source,
                    # the source's own extract: its CE against gold, in its own tokenization, for min_ce/avg_ce
                    ("prepare", "extract.pivot", f"extract.{source}", f"align.{source}"),
                    ("pivot",),
                )
            )
        if s.distill.sft_baseline:
            dag.add(
                Instance(
                    "distill.sft_baseline",
                    "distill",
                    "sft_baseline",
                    ("prepare",),
                    ("pivot",),
                    options=(("sft_only", True),),
                )
            )

    fpo_on = s.fpo.enabled
    scored = [*sources, "pivot"] if s.fpo.include_pivot else list(sources)
    if fpo_on:
        for model in scored:
            dag.add(Instance(f"score.{model}", "score", model, ("prepare",), (model,), s.score.num_shards))

    def fpo_parents(policy: str, policy_parent: str) -> tuple[str, ...]:
        return (policy_parent, f"score.{policy}", *(f"score.{m}" for m in scored))

    targets = []
    for source in sources if s.distill.enabled else []:
        made_by = f"distill.{source}"
        if fpo_on and s.fpo.placement == "per_target":
            target = f"target-{source}"
            dag.add(
                Instance(f"score.{target}", "score", target, ("prepare", made_by), (), s.score.num_shards)
            )
            dag.add(Instance(f"fpo.{source}", "fpo", source, ("prepare", *fpo_parents(target, made_by))))
            made_by = f"fpo.{source}"
        targets.append(made_by)

    final = None
    if s.merge.enabled:
        dag.add(Instance("merge", "merge", None, tuple(targets), ("pivot",)))
        final = "merge"
        if fpo_on and s.fpo.placement == "after_merge":
            dag.add(Instance("score.merged", "score", "merged", ("prepare", "merge"), (), s.score.num_shards))
            dag.add(Instance("fpo.merged", "fpo", "merged", ("prepare", *fpo_parents("merged", "merge"))))
            final = "fpo.merged"

    if s.evaluate.enabled:
        parents = ["prepare"]
        parents += [i.name for i in dag if i.stage in ("distill", "fpo", "merge")]
        dag.add(Instance("evaluate", "evaluate", None, tuple(parents), ("pivot", *sources)))
    if s.publish.enabled and final:
        parents = (final, "evaluate") if s.evaluate.enabled else (final,)
        parents += tuple(
            i.name for i in dag if i.stage == "align"
        )  # their teacher-signal reports go in the card
        dag.add(Instance("publish", "publish", None, parents, ("pivot", *sources)))
    return dag

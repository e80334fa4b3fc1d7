"""Every setting is either a result setting (in the fingerprint: changing it recomputes) or an operational one
(how a stage runs: logging, checkpoint cadence, trackers, kernels, batch budgets, shards, parallelism — changing
it never makes a finished instance stale). The walk below covers every field of `stages:`; a new field is a
result setting until someone marks it operational here and in the schema."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from fuse.dag import build_dag
from fuse.plan import fingerprints
from fuse.recipe import parse_recipe
from fuse.recipe.base import Frozen, is_operational
from fuse.recipe.settings import Stages

from recipes import toy_recipe

# every operational setting, with a non-default value that must leave every fingerprint as it is
OPERATIONAL = {
    "extract.batch_tokens": 128,
    "extract.head_chunk_tokens": 7,
    "extract.num_shards": 4,
    "extract.tensor_parallel_size": 2,
    "extract.gpu_memory_utilization": 0.5,
    "extract.vllm.max_num_batched_tokens": 512,
    "extract.vllm.enable_chunked_prefill": True,
    "extract.vllm.max_model_len": 99,
    "extract.vllm.enforce_eager": False,
    "extract.models.<name>.tensor_parallel_size": 4,
    "extract.models.<name>.batch_tokens": 256,
    "extract.models.<name>.gpu_memory_utilization": 0.4,
    "extract.models.<name>.vllm.max_num_batched_tokens": 256,
    "extract.models.<name>.vllm.enable_chunked_prefill": False,
    "extract.models.<name>.vllm.max_model_len": 77,
    "extract.models.<name>.vllm.enforce_eager": True,
    **{
        f"{stage}.{key}": value
        for stage in ("distill", "fpo")
        for key, value in {
            "save_steps": 7,
            "save_total_limit": 5,
            "logging_steps": 3,
            "gradient_checkpointing": True,
            "report_to": ["tensorboard"],
            "attn_implementation": "eager",
            "liger": True,
            "deepspeed.stage": 2,
            "deepspeed.offload_optimizer": True,
            "deepspeed.offload_params": True,
            "tracking.project": "fusion",
            "tracking.group": "ablations",
        }.items()
    },
    "merge.max_shard_size": "1GB",
    "evaluate.batch_size": 4,
    "evaluate.lm_eval.batch_size": 2,
    "evaluate.lm_eval.parallelize": True,
    "evaluate.lm_eval.tensor_parallel_size": 2,
}
OPERATIONAL |= {  # score shares extract's forward settings
    k.replace("extract.", "score.", 1): v for k, v in OPERATIONAL.items() if k.startswith("extract.")
}


def frozen_class(annotation: Any) -> tuple[type[Frozen] | None, bool]:
    """The settings class an annotation holds (directly, optionally, or as dict values), and whether per key."""
    if isinstance(annotation, type) and issubclass(annotation, Frozen):
        return annotation, False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        inner, _ = frozen_class(args[1])
        return inner, inner is not None
    for arg in args:
        inner, keyed = frozen_class(arg)
        if inner is not None:
            return inner, keyed
    return None, False


def walk(cls: type[Frozen], prefix: str = "") -> dict[str, bool]:
    """Every leaf setting under `cls`: dotted path -> operational."""
    found: dict[str, bool] = {}
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        inner, keyed = frozen_class(field.annotation)
        if inner is not None:
            assert not is_operational(field), f"{path}: mark its fields, not the whole group"
            found |= walk(inner, f"{path}.<name>." if keyed else f"{path}.")
        else:
            found[path] = is_operational(field)
    return found


def test_every_setting_is_classed_and_the_operational_ones_are_these():
    classes = walk(Stages)
    assert len(classes) > 150  # the walk reaches every stage's fields
    operational = {path for path, is_op in classes.items() if is_op}
    assert operational == set(OPERATIONAL), (
        f"marked but not listed: {sorted(operational - set(OPERATIONAL))}; "
        f"listed but not marked: {sorted(set(OPERATIONAL) - operational)}"
    )


def with_setting(recipe: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    stages = recipe.setdefault("stages", {})
    keys = path.replace("<name>", "pivot").split(".")
    node = stages
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return recipe


def prints_of(recipe: dict[str, Any]) -> dict[str, str]:
    parsed = parse_recipe(recipe)
    return {name: fp for name, (fp, _) in fingerprints(parsed, build_dag(parsed)).items()}


@pytest.fixture
def base(tmp_path) -> dict[str, Any]:
    recipe = toy_recipe(tmp_path)
    recipe["stages"] = {"distill": {"sft_baseline": True}}
    return recipe


def test_no_operational_setting_changes_any_fingerprint(base):
    reference = prints_of(base)
    for path, value in OPERATIONAL.items():
        recipe = json_copy(base)
        if ".deepspeed.offload" in path:  # offloading needs ZeRO 3 (itself operational)
            recipe = with_setting(recipe, path.split(".")[0] + ".deepspeed.stage", 3)
        changed = prints_of(with_setting(recipe, path, value))
        assert changed == reference, f"{path}: {[n for n in reference if changed.get(n) != reference[n]]}"


@pytest.mark.parametrize(
    ("path", "value", "stale"),
    [
        ("distill.learning_rate", 3e-4, "distill.a"),
        ("distill.deepspeed.config", {"optimizer": {"type": "SGD"}}, "distill.a"),
        ("distill.trainer_args", {"max_grad_norm": 0.5}, "distill.a"),
        ("distill.trainer_args", {"optim": "adafactor", "dataloader_num_workers": 2}, "distill.a"),
        ("distill.peft", {"r": 4}, "distill.a"),
        ("fpo.trainer_args", {"disable_dropout": False}, "fpo.a"),
        ("fpo.peft", {}, "fpo.a"),
        ("extract.top_k", 4, "extract.pivot"),
        ("extract.backend", "vllm", "extract.a"),
        ("extract.vllm.engine_kwargs", {"quantization": "fp8"}, "extract.a"),
        ("merge.dtype", "float32", "merge"),
        ("evaluate.max_new_tokens", 7, "evaluate"),
    ],
)
def test_a_result_setting_changes_the_fingerprint(base, path, value, stale):
    reference = prints_of(base)
    assert prints_of(with_setting(json_copy(base), path, value))[stale] != reference[stale]


def test_save_steps_is_a_result_setting_when_it_is_the_validation_cadence(base):
    base["stages"]["distill"]["validation"] = True
    base["data"]["heldout_fraction"] = 0.2
    reference = prints_of(base)
    assert (
        prints_of(with_setting(json_copy(base), "distill.save_steps", 7))["distill.a"]
        != reference["distill.a"]
    )
    assert prints_of(with_setting(json_copy(base), "distill.logging_steps", 7)) == reference


def json_copy(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def test_an_added_setting_is_hashed_only_when_set():
    """A result setting added after recipes were fingerprinted (`added`): at its default it leaves the hash as it
    was before the field existed; set to anything else it is hashed like any result setting."""
    from fuse.recipe.base import added

    class Before(Frozen):
        rate: float = 1.0

    class After(Before):
        extra: dict[str, int] = added({})

    assert After().result_settings() == Before().result_settings() == {"rate": 1.0}
    assert After(extra={"k": 1}).result_settings() == {"rate": 1.0, "extra": {"k": 1}}


@pytest.mark.parametrize(
    "trainer_args",
    [
        {"dataloader_num_workers": 2, "logging_first_step": False, "disable_tqdm": False},
        {"save_on_each_node": True, "torch_empty_cache_steps": 10, "ddp_timeout": 7200},
    ],
)
def test_a_passthrough_of_operational_trainer_keys_leaves_every_fingerprint(base, trainer_args):
    """trainer_args keys that say how a run goes (data loading, logging, saving, process groups) are operational:
    a passthrough of only those hashes as if it were unset; with a result key beside them, only that key counts."""
    reference = prints_of(base)
    for stage in ("distill", "fpo"):
        assert prints_of(with_setting(json_copy(base), f"{stage}.trainer_args", trainer_args)) == reference
    mixed = prints_of(
        with_setting(json_copy(base), "distill.trainer_args", {**trainer_args, "max_grad_norm": 0.5})
    )
    alone = prints_of(with_setting(json_copy(base), "distill.trainer_args", {"max_grad_norm": 0.5}))
    assert mixed == alone and mixed["distill.a"] != reference["distill.a"]

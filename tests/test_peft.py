"""LoRA in place of full fine-tuning (stages.distill/fpo.peft) on tiny models: only the adapters train, the stage
writes the adapter merged into a full checkpoint (out/model) and keeps the adapter (out/adapter); the LoRA demo
variant's settings run distill -> merge -> evaluate; QLoRA is refused by name where there is no CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_distill
import torch
from test_distill import CrashAt, distill_job, stores_ready, weights

from fuse import training
from fuse.recipe import RecipeError, load_recipe, parse_recipe
from fuse.recipe.training_settings import PeftSettings

REPO = Path(__file__).resolve().parent.parent
VARIANT = REPO / "examples" / "tiny-demo-lora.yaml"
TARGETS = ("q_proj", "v_proj")

# The distill tests' tiny pivot and synthetic top-K set (session fixtures).
pivot_dir, train_data = test_distill.pivot_dir, test_distill.train_data


class KeepModel:
    """A TrainerCallback that keeps the model the Trainer trained (the PeftModel, before the stage merges it)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                outer.model = model

        self.callback = Callback()


@pytest.mark.slow
def test_lora_distill_trains_the_adapters_only_and_writes_a_full_model(tmp_path, pivot_dir, train_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kept = KeepModel()
    job = distill_job(
        tmp_path,
        pivot_dir,
        train_data,
        max_steps=6,
        learning_rate=1e-2,
        peft=PeftSettings(r=4, target_modules=list(TARGETS)),
    )
    summary = training.train(job, callbacks=(kept.callback,))
    assert summary["global_step"] == 6
    losses = [
        json.loads(line)["loss"]
        for line in (Path(job.log_dir) / training.LOG_FILE).read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses[-1] < losses[0]  # it learns

    # before merging: every trainable weight is an adapter's, and every frozen one is still the pivot's
    pivot = weights(pivot_dir)
    trained = dict(kept.model.named_parameters())
    assert {n for n, p in trained.items() if p.requires_grad} == {
        n for n in trained if ".lora_A." in n or ".lora_B." in n
    }
    frozen = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p
        for n, p in trained.items()
        if not p.requires_grad
    }
    assert frozen.keys() == pivot.keys() and all(torch.equal(frozen[n], pivot[n]) for n in pivot)
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)  # B starts at zero: it moved
    checkpoint = Path(job.checkpoint_dir) / "checkpoint-6"  # a resumable checkpoint holds the adapter only
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (
        checkpoint / "model.safetensors"
    ).exists()

    # out/model: a full checkpoint that differs from the pivot exactly in the targeted modules
    merged = weights(Path(job.model_dir))
    assert merged.keys() == pivot.keys()
    changed = {n for n in pivot if not torch.equal(merged[n], pivot[n])}
    assert changed == {n for n in pivot if n.endswith(tuple(f"{t}.weight" for t in TARGETS))}
    model, info = AutoModelForCausalLM.from_pretrained(job.model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # out/adapter: loads with PeftModel onto the pivot and computes what the merged model computes
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pivot_dir), str(job.adapter_dir))
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_weights(tmp_path, pivot_dir, train_data):
    """The adapters' random initial A matrices are drawn from the job's seed and a resumed run reloads the adapter
    from its checkpoint: killed at step 5 and resumed from checkpoint-4, it ends where an uninterrupted run does."""
    peft = PeftSettings(r=4)
    straight = distill_job(tmp_path / "straight", pivot_dir, train_data, peft=peft)
    training.run_job(straight)
    resumed = distill_job(tmp_path / "resumed", pivot_dir, train_data, peft=peft)
    with pytest.raises(KeyboardInterrupt):
        training.run_job(resumed, callbacks=(CrashAt(5).callback,))
    assert training.run_job(resumed)["resumed_from"] == "checkpoint-4"
    expected, got = weights(Path(straight.model_dir)), weights(Path(resumed.model_dir))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_lora_demo_variant_runs_through_merge_and_evaluate(tmp_path_factory, pivot_dir):
    """examples/tiny-demo-lora.yaml's LoRA settings on the smallest real pipeline (a tiny pivot and one source):
    distill trains adapters, merge and evaluate read the merged full checkpoints."""
    from fuse.executor import run_stage
    from fuse.store import RunStore

    variant = load_recipe(VARIANT)  # the shipped file validates
    peft = variant.stages.distill.peft
    assert peft is not None and peft.target_modules == "all-linear" and variant.stages.fpo.peft == peft
    distill = {
        "save_steps": 2,
        "per_device_batch_size": 4,
        "learning_rate": 2e-3,
        "max_length": 96,
        "max_steps": 2,
    }
    later = {
        "merge": {"method": "sce", "parameters": {"select_topk": 1.0}},
        "evaluate": {"max_new_tokens": 4},
    }
    distill |= {"peft": peft.model_dump(mode="json")}
    recipe = stores_ready(tmp_path_factory.mktemp("lora-demo"), pivot_dir, distill, 0.25, 12, later)
    for name in ("distill.src", "merge", "evaluate"):
        assert run_stage(recipe, name), name
    store = RunStore(recipe.workdir)
    assert (store.out("distill.src") / "adapter" / "adapter_config.json").is_file()
    pivot, target, fused = (
        weights(p) for p in (pivot_dir, store.out("distill.src") / "model", store.out("merge") / "model")
    )
    linear = {n for n in pivot if n.endswith("proj.weight")}  # all-linear: attention, MLP; no embedding, head
    assert {n for n in pivot if not torch.equal(target[n], pivot[n])} == linear
    assert fused.keys() == pivot.keys()
    metrics = json.loads((store.out("evaluate") / "metrics.json").read_text())
    assert {"pivot", "distill.src", "merge"} <= set(metrics["models"])


def test_qlora_is_refused_by_name_without_cuda(tmp_path):
    """QLoRA's 4-bit weights need bitsandbytes on CUDA: on a machine without, validate and the stage say so."""
    from fuse.recipe import DistillSettings
    from fuse.validate import check_qlora

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = {
        "name": "q",
        "workdir": str(tmp_path / "run"),
        "pivot": {"path": str(tmp_path)},
        "sources": [{"name": "a", "path": str(tmp_path)}],
        "data": {"sft": {"path": "x.jsonl"}},
        "stages": {"distill": {"peft": {"load_in_4bit": True}}, "fpo": {"enabled": False}},
    }
    assert [p.split(":")[0] for p in check_qlora(parse_recipe(recipe))] == [
        "stages.distill.peft.load_in_4bit"
    ]
    with pytest.raises(training.TrainingError, match=r"stages\.distill\.peft\.load_in_4bit: "):
        training.check_settings(DistillSettings(peft=PeftSettings(load_in_4bit=True)), "stages.distill")
    recipe["stages"]["distill"]["deepspeed"] = {"stage": 3}
    with pytest.raises(RecipeError, match=r"peft\.load_in_4bit: QLoRA is not supported under ZeRO-3"):
        parse_recipe(recipe)
    recipe["stages"] = {"fpo": {"peft": {"target_modules": ["q_proj", "lm_head"]}}}
    with pytest.raises(RecipeError, match=r"stages\.fpo: .*lm_head cannot take an adapter in fpo"):
        parse_recipe(recipe)

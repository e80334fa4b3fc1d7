"""`fuse validate` catches what used to fail hours later: a data format that fits none of the file's rows, a
tracker or kernel the recipe turns on but the environment lacks, GPUs that do not match vLLM's parallelism, SLURM
jobs that ask for no memory or time; and a `datasets.save_to_disk` folder is data like any other."""

from __future__ import annotations

import json

import pytest

from fuse.recipe import RecipeError, parse_recipe
from fuse.validate import validate

from recipes import toy_recipe


def problems(recipe: dict) -> str:
    with pytest.raises(RecipeError) as error:
        validate(parse_recipe(recipe), files=True, load=False)
    return str(error.value)


def test_a_format_that_fits_no_row_is_named_with_the_one_that_does(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["data"]["sft"]["format"] = "sharegpt"  # the toy's file holds {messages: [...]}
    message = problems(recipe)
    assert (
        "data.sft.format: none of the first" in message
        and "as 'sharegpt' (no column 'conversations'" in message
    )
    assert "format: messages reads it" in message
    recipe["data"]["sft"]["format"] = "messages"
    validate(parse_recipe(recipe), files=True, load=False)


def test_a_package_the_recipe_turns_on_must_be_installed(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["stages"]["distill"] = {"report_to": ["neptune"], "liger": True}
    message = problems(recipe)
    assert "stages.distill.report_to: neptune needs the package 'neptune'" in message
    assert "stages.distill.liger needs the package 'liger-kernel'" in message
    recipe["stages"]["distill"] = {"report_to": ["tensorboard"]}  # installed with fuse[training]
    validate(parse_recipe(recipe), files=True, load=False)


def test_gpus_must_match_vllm_parallelism_exactly(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["stages"]["extract"] = {"backend": "vllm", "tensor_parallel_size": 1}
    recipe["executor"] = {
        "kind": "slurm",
        "resources": {"default": {"mem": "8G", "time": "01:00:00"}, "extract": {"gpus_per_node": 4}},
    }
    message = problems(recipe)
    assert "executor.resources.extract.pivot: 4 GPUs per node (3 would sit idle)" in message
    recipe["executor"]["resources"]["extract"] = {"gpus_per_node": 1}
    validate(parse_recipe(recipe), files=False, load=False)


def test_a_slurm_job_without_memory_or_time_is_refused_unless_the_site_has_defaults(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {"kind": "slurm", "resources": {"distill": {"mem": "64G"}}}
    message = problems(recipe)
    assert "jobs without memory or time and no site default: prepare (mem, time)" in message
    assert "distill.a (time)" in message
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps({"resources": {"default": {"mem": "8G", "time": "02:00:00"}}}))
    recipe["executor"]["slurm"] = {"site_config": str(site)}
    validate(parse_recipe(recipe), files=False, load=False)


def test_a_save_to_disk_folder_is_data(tmp_path):
    from datasets import Dataset

    from fuse.recipe import DatasetSpec
    from fuse.stages.prepare import load_raw, normalize

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(5)
    ]
    folder = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(folder))
    recipe = toy_recipe(tmp_path)
    recipe["data"]["sft"] = {"path": str(folder)}
    validate(parse_recipe(recipe), files=True, load=False)  # used to be "must be files of one kind"
    spec = DatasetSpec(path=str(folder))
    kept, report = normalize(load_raw(spec, "data.sft"), spec, "data.sft", "sft", 1)
    assert len(kept) == 5 and report["rows_read"] == 5


def test_tokenizers_and_validate_ask_the_hub_for_no_weights(tmp_path, monkeypatch):
    """The hub cannot be reached here: what is recorded is what fuse asks huggingface_hub to download."""
    import huggingface_hub

    from fuse.models import resolve_model_dir
    from fuse.recipe import ModelSpec

    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=(), local_files_only=False):
        asked.append(list(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    spec = ModelSpec(name="big", path="org/model-72B", allow_pickle=True)
    resolve_model_dir(spec, weights=False)
    resolve_model_dir(spec)
    assert not {"*.safetensors", "*.bin"} & set(asked[0]) and "*.json" in asked[0]
    assert {"*.safetensors", "*.bin"} <= set(asked[1])


def test_validate_checks_the_cache_the_jobs_will_read(tmp_path, monkeypatch):
    from fuse.validate import exported_variables

    assert exported_variables(
        ["export HF_HOME=/shared/hf HF_HUB_OFFLINE=1", 'cd x && export HF_HUB_CACHE="/a b"']
    ) == {
        "HF_HOME": "/shared/hf",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": "/a b",
    }
    site = tmp_path / "site.yaml"
    site.write_text(
        json.dumps(
            {
                "env_setup": ["export HF_HOME=/shared/hf-cache HF_HUB_OFFLINE=1"],
                "resources": {"default": {"mem": "8G", "time": "01:00:00"}},
            }
        )
    )
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {"kind": "slurm", "slurm": {"site_config": str(site)}}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "login-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    message = problems(recipe)
    assert "the jobs use HF_HOME=/shared/hf-cache (here: " in message
    assert "run `HF_HOME=/shared/hf-cache HF_HUB_OFFLINE=1 fuse validate ...`" in message
    monkeypatch.setenv("HF_HOME", "/shared/hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    validate(parse_recipe(recipe), files=True, load=False)


def test_fetch_downloads_the_weights_validate_left_out(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from fuse.cli import main

    from recipes import write_recipe

    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=(), local_files_only=False):
        asked.append((repo_id, list(allow_patterns)))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    recipe = toy_recipe(tmp_path)
    recipe["sources"][0]["path"] = "org/source-7B"  # a hub id; the others are local folders
    assert main(["fetch", str(write_recipe(tmp_path, recipe))]) == 0
    out = capsys.readouterr().out
    assert asked == [("org/source-7B", ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])]
    assert "pivot: local folder" in out and f"a: org/source-7B -> {tmp_path / 'snapshot'}" in out

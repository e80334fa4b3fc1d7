"""The publish stage: the folder reloads and generates, is sharded safetensors with config, generation config and a
tokenizer with its chat template; the model card's metadata, tables and lineage; the push path; atomicity.

The publish instance runs through the real executor (run_instance: manifest, logs/stage.log) with the zoo's pivot
standing in for the merged model and a hand-written evaluation table.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from fuse.dag import build_dag
from fuse.executor import Progress, StageFailed, run_instance
from fuse.plan import fingerprints, make_plan
from fuse.recipe import Recipe, load_recipe
from fuse.store import RunStore

from demo_recipe import demo_recipe

METRICS_MD = """# Evaluation

| model | capital | mean | CE/byte |
|---|---|---|---|
| pivot | 1.00 | 0.25 | 0.324 |
| merged | 0.97 | 0.61 | 0.301 |
"""
SECRET = "hf_SeCrEtToKeN0123456789abcdefghijkl"


def publish_run(zoo, root: Path, **settings) -> tuple[Recipe, Path]:
    """Run only the publish instance of the demo recipe under `root`; its parents' outputs are faked: the pivot as
    the merged model, METRICS_MD as evaluate's table. Returns the recipe and the run store's root."""
    path = demo_recipe(zoo.root, root / "run", root / "recipe.yaml", **settings)
    recipe = load_recipe(path)
    dag = build_dag(recipe)
    store = RunStore(recipe.workdir)
    maker, evaluate = dag["publish"].parents[:2]  # then the align instances (teacher-signal reports)
    shutil.copytree(zoo.pivot, store.out(maker) / "model")
    store.out(evaluate).mkdir(parents=True)
    (store.out(evaluate) / "metrics.md").write_text(METRICS_MD, encoding="utf-8")
    [step] = [s for s in make_plan(recipe, dag, store, only=["publish"]) if s.instance.name == "publish"]
    run_instance(recipe, dag, step, store, progress=Progress(io.StringIO()))
    return recipe, store.root


@pytest.fixture(scope="module")
def published(zoo, tmp_path_factory):
    recipe, run = publish_run(
        zoo, tmp_path_factory.mktemp("publish"), stages__publish__max_shard_size="100KB"
    )
    return types.SimpleNamespace(recipe=recipe, run=run, folder=run / "publish" / "out" / "model")


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "the model card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_the_folder_reloads_generates_and_holds_the_pivots_weights(published, zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(published.folder)
    model = AutoModelForCausalLM.from_pretrained(published.folder)
    reference = AutoModelForCausalLM.from_pretrained(zoo.pivot)
    published_state, reference_state = model.state_dict(), reference.state_dict()
    assert published_state.keys() == reference_state.keys()
    assert all(torch.equal(published_state[k], reference_state[k]) for k in reference_state)

    pivot_tokenizer = AutoTokenizer.from_pretrained(zoo.pivot)
    assert tokenizer.chat_template and tokenizer.chat_template == pivot_tokenizer.chat_template
    text = "The capital of France, twice: 12 34"
    assert tokenizer(text)["input_ids"] == pivot_tokenizer(text)["input_ids"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] > ids["input_ids"].shape[1]
    report = json.loads((published.run / "publish" / "out" / "publish.json").read_text())
    assert report["pushed"] is False and report["folder"] == str(published.folder)


def test_the_folder_is_sharded_safetensors_with_config_generation_config_and_tokenizer(published):
    names = {p.name for p in published.folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"README.md", "fuse_lineage.json", "model.safetensors.index.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in json.loads(
        (published.folder / "tokenizer_config.json").read_text()
    )
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1, "100KB shards of a ~600KB model"
    index = json.loads((published.folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not [p for p in published.folder.parent.iterdir() if p.name.startswith(".")], "temp folders left"


def test_base_model_lists_every_hub_model_with_the_merge_relation(published):
    from fuse.stages.publish import card_metadata

    recipe = published.recipe
    sources = [recipe.sources[0].model_copy(update={"path": "org/source-a"}), *recipe.sources[1:]]
    data = recipe.data.model_copy(
        update={"sft": recipe.data.sft.model_copy(update={"path": "org/sft-mixture"})}
    )
    hub = recipe.model_copy(
        update={
            "pivot": recipe.pivot.model_copy(update={"path": "org/pivot-7b"}),
            "sources": sources,
            "data": data,
        }
    )
    meta = card_metadata(hub, {"method": "sce", "parameters": {}})
    assert meta["base_model"] == [
        "org/pivot-7b",
        "org/source-a",
    ]  # local sources are left out, not their paths
    assert meta["base_model_relation"] == "merge"
    assert meta["datasets"] == ["org/sft-mixture"]  # the local preference file is no hub dataset
    assert meta["license"] == "other"
    licensed = hub.model_copy(
        update={
            "stages": hub.stages.model_copy(
                update={"publish": hub.stages.publish.model_copy(update={"license": "apache-2.0"})}
            )
        }
    )
    assert card_metadata(licensed, {"method": "sce", "parameters": {}})["license"] == "apache-2.0"


def test_the_card_metadata(published):
    recipe = published.recipe
    card = (published.folder / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # every model is local here
    assert "datasets" not in meta  # local files are not hub datasets
    assert meta["license"] == "other"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert [(s["name"], s["model"]) for s in meta["fuse"]["sources"]] == [
        (s.name, Path(s.path).name) for s in recipe.sources
    ]
    assert meta["fuse"]["merge"]["method"] == recipe.stages.merge.method == "sce"
    assert meta["fuse"]["merge"]["parameters"] == recipe.stages.merge.parameters == {"select_topk": 1.0}
    assert meta["fuse"]["datasets"] == ["sft.jsonl", "preference.jsonl"]
    assert "merge-sce" in meta["tags"]
    # nothing in the card says where the run was made
    for local in (recipe.workdir, recipe.pivot.path, recipe.data.sft.path, str(Path(recipe.workdir).parent)):
        assert local not in card, local
    assert "https://github.com/)" not in card  # no placeholder link


def test_the_card_has_the_evaluation_table_recipe_version_and_lineage(published):
    card = (published.folder / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    for line in METRICS_MD.splitlines()[2:]:
        assert line in body
    assert len(re.findall(r"^# ", body, re.M)) == 1, "one title: the evaluation table nests under its section"
    assert version("fuse-llm") in body

    recipe_block = re.search(r"## Recipe\n\n```yaml\n(.*?)```", body, re.S)
    from fuse.stages.publish import scrub_local_paths

    shown = yaml.safe_load(recipe_block.group(1))
    assert shown == scrub_local_paths(
        published.recipe.model_dump(mode="json", by_alias=True, exclude={"executor", "workdir"})
    )
    assert shown["pivot"]["path"] == f"<local>/{Path(published.recipe.pivot.path).name}"

    expected = {
        name: fp for name, (fp, _parts) in fingerprints(published.recipe, build_dag(published.recipe)).items()
    }
    rows = dict(re.findall(r"^\| `([\w.-]+)` \| `([0-9a-f]+)` \|", body, re.M))
    assert rows == expected
    lineage = json.loads((published.folder / "fuse_lineage.json").read_text())
    assert lineage["fuse_version"] == version("fuse-llm")
    assert {r["instance"]: r["fingerprint"] for r in lineage["instances"]} == expected
    manifest = json.loads((published.run / "publish" / "manifest.json").read_text())
    assert manifest["fingerprint"] == expected["publish"] and manifest["status"] == "done"


class FakeHub:
    """Stands in for huggingface_hub.HfApi's network calls (there is no network here): records them."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def install(self, monkeypatch) -> None:
        import huggingface_hub

        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self._recorder(name))

    def _recorder(self, name: str):
        def call(api, *args, **kwargs):
            if name == "upload_folder":  # what would be uploaded, read at the moment of the call
                kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            self.calls.append((name, args, kwargs))
            return types.SimpleNamespace(commit_url="https://hub.local/org/fused/commit/abc")

        return call


def test_push_uploads_the_validated_folder_and_never_writes_the_token(zoo, tmp_path, monkeypatch, caplog):
    """huggingface_hub.HfApi.create_repo/create_branch/upload_folder are replaced by FakeHub (no network here);
    the test checks their arguments, and that the token from HF_TOKEN is in no file of the run store or log."""
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # pushing needs the hub; the calls are fakes
    caplog.set_level(logging.DEBUG)
    _recipe, run = publish_run(
        zoo,
        tmp_path,
        stages__publish__push=True,
        stages__publish__repo_id="org/fused",
        stages__publish__private=False,
        stages__publish__revision="v1",
    )
    folder = run / "publish" / "out" / "model"
    assert [name for name, _, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    (_, create_args, create_kwargs), (_, branch_args, branch_kwargs), (_, _, upload) = hub.calls
    assert create_args == ("org/fused",) and create_kwargs["private"] is False
    assert branch_args == ("org/fused",) and branch_kwargs["branch"] == "v1"
    assert upload["repo_id"] == "org/fused" and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == folder
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
    report = json.loads((run / "publish" / "out" / "publish.json").read_text())
    assert report["pushed"] is True and report["commit"].endswith("/commit/abc")

    assert (run / "publish" / "logs" / "stage.log").is_file()
    leaks = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks
    assert SECRET not in caplog.text
    assert "org/fused" in (run / "publish" / "logs" / "stage.log").read_text()


def test_push_without_revision_makes_no_branch_and_defaults_to_private(zoo, tmp_path, monkeypatch):
    """FakeHub replaces the hub calls (no network here)."""
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    publish_run(zoo, tmp_path, stages__publish__push=True, stages__publish__repo_id="org/fused")
    assert [name for name, _, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["revision"] is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET}, "HF_HUB_OFFLINE"),
        ({"HF_TOKEN": None}, "no Hugging Face token"),
    ],
)
def test_push_that_cannot_happen_fails_before_any_work(zoo, tmp_path, monkeypatch, env, message):
    import huggingface_hub.constants

    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no login here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with pytest.raises(StageFailed, match=rf"stages\.publish\.push.*{message}"):
        publish_run(zoo, tmp_path, stages__publish__push=True, stages__publish__repo_id="org/fused")
    assert not hub.calls
    assert not (tmp_path / "run" / "publish" / "out" / "model").exists()


def test_a_folder_that_does_not_reload_is_never_written(zoo, tmp_path, monkeypatch):
    from fuse.stages import publish

    real_copy = publish.copy_model

    def copy_then_corrupt(source, target, max_shard_size):
        real_copy(source, target, max_shard_size)
        for weights in target.glob("*.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])

    monkeypatch.setattr(publish, "copy_model", copy_then_corrupt)
    with pytest.raises(StageFailed, match="publish"):
        publish_run(zoo, tmp_path)
    out = tmp_path / "run" / "publish" / "out"
    assert not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no half-written temp folder left"
    assert not (out / "publish.json").exists()
    assert json.loads((tmp_path / "run" / "publish" / "manifest.json").read_text())["status"] == "failed"


def test_the_card_leaves_out_the_executor_and_its_environment_lines(published):
    from fuse.stages.publish import model_card

    executor = published.recipe.executor.model_copy(
        update={
            "slurm": published.recipe.executor.slurm.model_copy(
                update={"env_setup": [f"export HF_TOKEN={SECRET}"]}
            )
        }
    )
    recipe = published.recipe.model_copy(update={"executor": executor})
    card = model_card(recipe, METRICS_MD, [], "0.0")
    assert SECRET not in card and "env_setup" not in card
    assert "No evaluation was run." in model_card(recipe, None, [], "0.0")

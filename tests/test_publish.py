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

SECRET = "hf_SeCrEtToKeN0123456789abcdefghijkl"


def evaluation_of(fused: str, recipe: Recipe) -> dict:
    """evaluate's metrics for the pivot, the sources and the fused model, computed by fuse.evaluation from per-item
    scores made up here (each model right on a different share of the items), with an lm-eval task and its
    standard error as the harness reports them."""
    from fuse.evaluation import collect_metrics, standard_errors

    skills = ["capital"] * 8 + ["translate"] * 8
    domains = ["harbor"] * 5
    results = {}
    for rank, name in enumerate([fused, "pivot", *recipe.source_names]):
        right = [int((i + rank) % (rank + 2) == 0) for i in range(16)]
        nll = [5.0 + rank + 0.5 * i for i in range(5)]
        per_item = {
            "skill": right,
            "text": {"nll": [30.0 + rank, 28.0, 35.0], "bytes": [100, 90, 110]},
            "domain": {"nll": nll, "bytes": [20, 22, 25, 21, 30]},
        }
        by_skill = {
            s: [v for v, k in zip(right, skills, strict=True) if k == s] for s in ("capital", "translate")
        }
        results[name] = {
            "skills": {s: sum(v) / len(v) for s, v in by_skill.items()},
            "mean_accuracy": sum(sum(v) / len(v) for v in by_skill.values()) / 2,
            "ce_per_byte": (93.0 + rank) / 300,
            "domain_ce": {"harbor": sum(nll) / 118},
            "mean_domain_ce": sum(nll) / 118,
            "lm_eval": {"zoo_capital": {"acc": 0.5 + 0.1 * rank}},
            "lm_eval_stderr": {"zoo_capital": {"acc": 0.05}},
            "stderr": standard_errors(per_item, skills, domains),
        }
    items = [types.SimpleNamespace(skill=s) for s in skills]
    metrics = collect_metrics(results, items, ["t"] * 3)  # type: ignore[arg-type]
    return metrics | {"domains": ["harbor"], "limit": {"domain_ce": {"harbor": 0.2}, "mean_domain_ce": 0.2}}


def publish_run(zoo, root: Path, **settings) -> tuple[Recipe, Path]:
    """Run only the publish instance of the demo recipe under `root`; its parents' outputs are faked: the pivot as
    the merged model, evaluate's outputs written by the evaluate stage's own writer from evaluation_of's metrics.
    Returns the recipe and the run store's root."""
    from fuse import item_scores
    from fuse.stages.evaluate import write_outputs

    path = demo_recipe(zoo.root, root / "run", root / "recipe.yaml", **settings)
    recipe = load_recipe(path)
    dag = build_dag(recipe)
    store = RunStore(recipe.workdir)
    maker, evaluate = dag["publish"].parents[:2]  # then the align instances (teacher-signal reports)
    shutil.copytree(zoo.pivot, store.out(maker) / "model")
    metrics = evaluation_of(maker, recipe)
    empty = item_scores.scores_table({}, [], [], "per_item")
    write_outputs(store.out(evaluate), metrics, recipe.stages.evaluate, empty)
    [step] = [s for s in make_plan(recipe, dag, store, only=["publish"]) if s.instance.name == "publish"]
    run_instance(recipe, dag, step, store, progress=Progress(io.StringIO()))
    return recipe, store.root


@pytest.fixture(scope="module")
def published(zoo, tmp_path_factory):
    recipe, run = publish_run(
        zoo, tmp_path_factory.mktemp("publish"), stages__publish__max_shard_size="100KB"
    )
    fused = build_dag(recipe)["publish"].parents[0]
    metrics = json.loads((run / "evaluate" / "out" / "metrics.json").read_text())
    return types.SimpleNamespace(
        recipe=recipe, run=run, folder=run / "publish" / "out" / "model", fused=fused, metrics=metrics
    )


def load_card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


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
    assert {"README.md", "fuse_lineage.json", "fuse_recipe.yaml", "model.safetensors.index.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in json.loads(
        (published.folder / "tokenizer_config.json").read_text()
    )
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1, "100KB shards of a ~600KB model"
    index = json.loads((published.folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not [p for p in published.folder.parent.iterdir() if p.name.startswith(".")], "temp folders left"


def test_the_card_loads_with_huggingface_hub_and_its_model_index_holds_what_the_run_measured(published):
    """ModelCard.load reads the published card: every number evaluate measured for the fused model is a
    model-index result, with its standard error beside it as `<metric>_stderr` (lm-eval's own for its task)."""
    from fuse.evaluation import measurements

    card = load_card(published.folder)
    data = card.data
    assert data.model_name == published.recipe.name
    assert (
        data.base_model is None and "base_model_relation" not in data.to_dict()
    )  # every model is local here
    assert data.license == "other" and data.license_name == "base-model-licenses"
    assert data.license_link == "LICENSES.md"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert "merge-sce" in data.tags and data.datasets is None  # local files are no hub datasets

    results = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert all(
        r.task_type == "text-generation" and r.dataset_split in ("heldout", None) for r in data.eval_results
    )
    fused = published.metrics["models"][published.fused]
    expected = measurements(fused, published.metrics["skills"], published.metrics["domains"])
    assert len(data.eval_results) == len(expected) + sum(m.stderr is not None for m in expected)
    assert results[("eval_items", "capital", "accuracy")] == fused["skills"]["capital"]
    assert results[("eval_items", "capital", "accuracy_stderr")] == fused["stderr"]["skills"]["capital"]
    assert results[("eval_items", "mean", "accuracy")] == fused["mean_accuracy"]
    assert results[("heldout", None, "ce_per_byte")] == fused["ce_per_byte"]
    assert results[("heldout", None, "ce_per_byte_stderr")] == fused["stderr"]["ce_per_byte"] > 0
    assert results[("domains", "harbor", "ce_per_byte")] == fused["domain_ce"]["harbor"]
    assert results[("zoo_capital", None, "acc")] == fused["lm_eval"]["zoo_capital"]["acc"]
    assert results[("zoo_capital", None, "acc_stderr")] == fused["lm_eval_stderr"]["zoo_capital"]["acc"]
    names = {r.dataset_name for r in data.eval_results}
    assert not [n for n in names if "/" in n.split("(")[-1]], names  # file names, never local paths


def test_every_file_the_card_links_is_in_the_folder(published):
    from fuse.stages.publish import relative_links

    card = load_card(published.folder)
    linked = relative_links(card.text)
    assert {"accuracy.png", "fuse_recipe.yaml", "fuse_lineage.json", "LICENSES.md"} <= set(linked)
    assert all((published.folder / target).is_file() for target in [*linked, card.data.license_link])
    evaluated = published.run / "evaluate" / "out" / "accuracy.png"
    assert (published.folder / "accuracy.png").read_bytes() == evaluated.read_bytes()
    licences = (published.folder / "LICENSES.md").read_text()
    for source in published.recipe.sources:
        assert f"| source | {source.name} | `{Path(source.path).name}` |" in licences


def test_base_model_lists_every_hub_model_with_the_merge_relation(published):
    from fuse.stages.publish import card_data, model_rows

    recipe = published.recipe
    sources = [recipe.sources[0].model_copy(update={"path": "org/source-a"}), *recipe.sources[1:]]
    data = recipe.data.model_copy(
        update={"sft": recipe.data.sft.model_copy(update={"path": "org/sft-mixture"})}
    )
    hub = recipe.model_copy(
        update={
            "pivot": recipe.pivot.model_copy(update={"path": "org/pivot-7b", "revision": "v1.0"}),
            "sources": sources,
            "data": data,
        }
    )
    meta = card_data(hub, model_rows(hub), None, "merge").to_dict()
    assert meta["base_model"] == [
        "org/pivot-7b",
        "org/source-a",
    ]  # local sources are left out, not their paths
    assert meta["base_model_relation"] == "merge"
    assert meta["datasets"] == ["org/sft-mixture"]  # the local preference file is no hub dataset
    revisions = {row["name"]: row["revision"] for row in meta["fuse"]["models"]}
    # pinned: as the recipe says; unpinned and not in this machine's cache: what the fingerprints name it by
    assert revisions["pivot"] == "v1.0" and revisions[sources[0].name] == "main"
    pivot_only = hub.model_copy(update={"sources": recipe.sources})
    meta = card_data(pivot_only, model_rows(pivot_only), None, "merge").to_dict()
    assert meta["base_model"] == ["org/pivot-7b"] and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "other"
    licensed = hub.model_copy(
        update={
            "stages": hub.stages.model_copy(
                update={"publish": hub.stages.publish.model_copy(update={"license": "apache-2.0"})}
            )
        }
    )
    meta = card_data(licensed, [], None, "merge").to_dict()
    assert meta["license"] == "apache-2.0" and "license_name" not in meta and "license_link" not in meta


def test_licence_name_and_link_are_settings_of_a_license_other():
    from pydantic import ValidationError

    from fuse.recipe.settings import PublishSettings
    from fuse.stages.publish import license_metadata

    named = PublishSettings(license_name="my-terms", license_link="https://example.org/terms")
    assert license_metadata(named) == {
        "license": "other",
        "license_name": "my-terms",
        "license_link": "https://example.org/terms",
    }
    # added after recipes were fingerprinted: unset, they leave every publish fingerprint as it was
    assert "license_name" not in PublishSettings().result_settings()
    assert named.result_settings()["license_name"] == "my-terms"
    with pytest.raises(ValidationError, match="license_name describe a license other, not license mit"):
        PublishSettings(license="mit", license_name="my-terms")
    with pytest.raises(ValidationError, match="lowercase"):
        PublishSettings(license_name="My Terms")
    with pytest.raises(ValidationError, match="a URL"):
        PublishSettings(license_link="LICENSE")


def test_the_models_have_one_revision_in_the_table_and_the_metadata(published):
    from fuse.io import sha256_json
    from fuse.models import identity

    card = load_card(published.folder)
    recipe = published.recipe
    rows = card.data.to_dict()["fuse"]["models"]
    assert [(r["role"], r["name"], r["model"]) for r in rows] == [
        ("pivot", "pivot", Path(recipe.pivot.path).name),
        *(("source", s.name, Path(s.path).name) for s in recipe.sources),
    ]
    for row, spec in zip(rows, [recipe.pivot, *recipe.sources], strict=True):
        assert row["revision"] == "sha256:" + sha256_json(identity(spec))[:16]  # a local folder: its files
        assert f"| {row['role']} | {row['name']} | `{row['model']}` | `{row['revision']}` |" in card.text
    # nothing in the card says where the run was made
    text = (published.folder / "README.md").read_text()
    for local in (recipe.workdir, recipe.pivot.path, recipe.data.sft.path, str(Path(recipe.workdir).parent)):
        assert local not in text, local
    assert "https://github.com/)" not in text  # no placeholder link


def test_the_card_has_results_with_standard_errors_a_usage_that_runs_the_recipe_and_lineage(
    published, capsys
):
    text = (published.folder / "README.md").read_text()
    body = text.split("\n---\n", 1)[1]
    assert len(re.findall(r"^# ", body, re.M)) == 1, "one title: evaluate's table nests under its section"
    assert version("fuse-llm") in body
    fused = published.metrics["models"][published.fused]
    row = next(line for line in body.splitlines() if line.startswith("| capital |"))
    capital = f"{fused['skills']['capital']:.2f} ± {fused['stderr']['skills']['capital']:.2f}"
    assert row.split(" | ")[1] == capital
    lm_row = next(line for line in body.splitlines() if line.startswith("| zoo_capital acc |"))
    assert lm_row.split(" | ")[1] == "0.50 ± 0.05"
    assert "| limit |" in body and "Every model of the run" in body  # evaluate's whole table, folded

    # the usage snippet, pointed at the published folder, answers through the chat template
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", body, re.S).group(1)
    code = re.sub(r"^model_id = .*$", f"model_id = {str(published.folder)!r}", snippet, flags=re.M)
    exec(compile(code, "usage", "exec"), {})
    assert capsys.readouterr().out.strip()

    from fuse.stages.publish import scrub_local_paths

    assert "## Recipe\n\n```yaml" not in body and "[fuse_recipe.yaml](fuse_recipe.yaml)" in body
    shown = yaml.safe_load((published.folder / "fuse_recipe.yaml").read_text())
    assert shown == scrub_local_paths(
        published.recipe.model_dump(mode="json", by_alias=True, exclude={"executor", "workdir"})
    )
    assert shown["pivot"]["path"] == f"<local>/{Path(published.recipe.pivot.path).name}"
    assert '- **Merge**: `sce` with parameters `{"select_topk": 1.0}`.' in body

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

    def copy_then_corrupt(source, target, max_shard_size, trust_remote_code=False):
        real_copy(source, target, max_shard_size, trust_remote_code)
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


def test_the_card_and_the_recipe_leave_out_the_executor_and_its_environment_lines(published):
    from fuse.stages.publish import model_card, published_recipe

    executor = published.recipe.executor.model_copy(
        update={
            "slurm": published.recipe.executor.slurm.model_copy(
                update={"env_setup": [f"export HF_TOKEN={SECRET}"]}
            )
        }
    )
    recipe = published.recipe.model_copy(update={"executor": executor})
    card = str(model_card(recipe, [], "0.0", published.fused, published.metrics))
    shipped = published_recipe(recipe)
    assert SECRET not in card + shipped and "env_setup" not in card + shipped
    assert "No evaluation was run." in model_card(recipe, [], "0.0").text


def test_publish_model_joint_publishes_distill_joint_and_its_card_says_so(tmp_path):
    """stages.publish.model: joint publishes FuseLLM's one target of every source (distill.joint), with a card
    that names how it was made and no merge; without distill.joint the recipe is refused before any work."""
    from fuse.dag import build_dag
    from fuse.recipe import RecipeError, parse_recipe
    from fuse.stages.publish import model_card

    from recipes import toy_recipe

    def recipe_with(**distill):
        stages = {"distill": distill, "publish": {"model": "joint"}, "fpo": {"enabled": False}}
        return parse_recipe(toy_recipe(tmp_path, stages=stages))

    with pytest.raises(RecipeError, match="stages.publish.model is joint but stages.distill.joint is off"):
        build_dag(recipe_with())
    recipe = recipe_with(joint=True)
    publish = build_dag(recipe)["publish"]
    assert [e.parent for e in publish.edges if e.role == "model"] == ["distill.joint"]
    card = model_card(recipe, [], "0.0", "distill.joint")
    assert (
        "all at once into one target" in card.text
        and "extract → align → distill → distill.joint" in card.text
    )
    assert "**Merge**" not in card.text and "`distill.joint`, one target taught by the pivot" in card.text
    metadata = card.data.to_dict()
    assert "joint-distill" in metadata["tags"] and metadata["fuse"]["joint"] is True
    assert "merge" not in metadata["fuse"]

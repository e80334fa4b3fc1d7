"""mergekit's merge YAML read as written: `fuse merge CONFIG OUTPUT` gives what `mergekit-yaml CONFIG OUTPUT` gives,
the same merge in fuse's own format gives identical tensors, and a mergekit feature fuse does not do is refused.

Every YAML here is first accepted by mergekit's own MergeConfiguration.model_validate: it is mergekit's format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fuse.merging import MergeConfigError, load_merge_config, run_merge

from merge_models import load_all, make_family, save_tokenizer

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TEMPLATE_YAML = TEMPLATE.replace("\n", "\\n")  # inside a double-quoted YAML string

# case: (mergekit's YAML, the same merge in fuse's format); paths relative to the YAML's folder
SAME_MERGE = {
    "ties": (
        f"""
merge_method: ties
base_model: base
models:
  - model: base            # listed too, as in mergekit's examples: it is the base, not a merged model
  - model: t1
    parameters:
      weight: 1.0
  - model: t2
    parameters:
      weight: 0.6
      density: 0.3
parameters:
  density: 0.5             # every model's, unless its own entry says otherwise
  normalize: true
  int8_mask: true          # mergekit's memory option: no effect on the result
dtype: float32
chat_template: "{TEMPLATE_YAML}"
name: tied-up
""",
        f"""
method: ties
base_model: base
models:
  - {{path: t1, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{path: t2, parameters: {{weight: 0.6, density: 0.3}}}}
parameters: {{normalize: true}}
dtype: float32
chat_template: "{TEMPLATE_YAML}"
name: tied-up
""",
    ),
    "linear_with_base": (  # mergekit makes a named base one more input of linear
        """
merge_method: linear
base_model: base
models:
  - {model: t1, parameters: {weight: 0.5}}
  - {model: t2, parameters: {weight: 0.25}}
parameters: {weight: 0.25}
dtype: float32
""",
        """
method: linear
base_model: base
models:
  - {path: t1, parameters: {weight: 0.5}}
  - {path: t2, parameters: {weight: 0.25}}
  - {path: base, parameters: {weight: 0.25}}
dtype: float32
""",
    ),
    "slerp": (
        "merge_method: slerp\nbase_model: base\nmodels: [{model: t1}]\nparameters: {t: 0.4}\nout_dtype: float32\n",
        "method: slerp\nbase_model: base\nmodels: [{path: t1}]\nparameters: {t: 0.4}\ndtype: float32\n",
    ),
    "model_stock": (
        "merge_method: model_stock\nbase_model: base\ndtype: float32\n"
        "models: [{model: base}, {model: t1}, {model: t2}, {model: t3}]\n",
        "method: model_stock\nbase_model: base\ndtype: float32\nmodels: [{path: t1}, {path: t2}, {path: t3}]\n",
    ),
    "nuslerp": (
        "merge_method: nuslerp\nbase_model: base\ndtype: float32\n"
        "models: [{model: t1, parameters: {weight: 2}}, {model: t3, parameters: {weight: 1}}]\n",
        "method: nuslerp\nbase_model: base\ndtype: float32\n"
        "models: [{path: t1, parameters: {weight: 2}}, {path: t3, parameters: {weight: 1}}]\n",
    ),
    "karcher": (  # no base: the mean of the models alone
        "merge_method: karcher\ndtype: float32\nmodels: [{model: t1}, {model: t2}, {model: t3}]\n"
        "parameters: {tol: 1e-6}\n",  # YAML reads 1e-6 as a string; mergekit as a number, and so do we
        "method: karcher\nbase_model: t1\ndtype: float32\nmodels: [{path: t1}, {path: t2}, {path: t3}]\n"
        "parameters: {tol: 0.000001}\n",
    ),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit-format")
    paths = make_family(root, n=3, seed=11)
    save_tokenizer(paths[0])
    return root


def mergekit_accepts(text: str):  # noqa: ANN201 — mergekit's MergeConfiguration
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(text))


def write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize("case", list(SAME_MERGE))
def test_fuse_merge_of_a_mergekit_yaml_equals_mergekit_and_fuses_own_format(
    case, family, tmp_path, monkeypatch
):
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    from fuse.cli import main

    mergekit_text, fuse_text = SAME_MERGE[case]
    config = mergekit_accepts(mergekit_text)
    mergekit_yaml = write(family, f"{case}.mergekit.yml", mergekit_text)
    fuse_yaml = write(family, f"{case}.fuse.yaml", fuse_text)
    # mergekit takes relative paths from the working directory, fuse from the YAML's folder
    monkeypatch.chdir(family)
    options = MergeOptions(
        cuda=False, lazy_unpickle=False, copy_tokenizer=case == "ties", write_model_card=False, quiet=True
    )
    mergekit_merge(config, str(tmp_path / "mergekit"), options)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(mergekit_yaml), "from-mergekit-yaml"]) == 0  # as `mergekit-yaml CONFIG OUT`
    run_merge(load_merge_config(fuse_yaml), tmp_path / "from-fuse-yaml")

    ours, own, theirs = (load_all(tmp_path / d) for d in ("from-mergekit-yaml", "from-fuse-yaml", "mergekit"))
    assert ours.keys() == own.keys() == theirs.keys()
    assert all(torch.equal(ours[k], own[k]) for k in ours)  # the same merge, whichever format
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert diff <= 1e-6, f"{case}: max |fuse - mergekit| = {diff}"
    base = load_all(family / "base")
    assert max(float((ours[k] - base[k]).abs().max()) for k in ours) > 1e-3
    if case == "ties":  # chat_template: the output's template, in both tools
        assert AutoTokenizer.from_pretrained(tmp_path / "from-mergekit-yaml").chat_template == TEMPLATE
        assert AutoTokenizer.from_pretrained(tmp_path / "mergekit").chat_template == TEMPLATE
        report = (tmp_path / "from-mergekit-yaml" / "merge_report.md").read_text()
        assert report.startswith("# Merge report: ties (tied-up)")


def test_random_methods_read_mergekits_rescale_as_its_l1_rescaling(family, tmp_path):
    mergekit_text = """
merge_method: della
base_model: base
models:
  - {model: t1, parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}}
  - {model: t2, parameters: {weight: 0.5}}
parameters: {density: 0.4, lambda: 0.9}
seed: 3   # fuse's seed of the draws (mergekit's --random-seed drives a global RNG)
"""
    mergekit_accepts(mergekit_text)
    config = load_merge_config(write(family, "della.yml", mergekit_text))
    assert config.parameters == {"rescale": "l1", "lambda": 0.9}  # mergekit's default rescale: true = L1
    fuse_text = """
method: della
base_model: base
models:
  - {path: t1, parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}}
  - {path: t2, parameters: {weight: 0.5, density: 0.4}}
parameters: {rescale: l1, lambda: 0.9}
seed: 3
"""
    run_merge(config, tmp_path / "mergekit-yaml")
    run_merge(load_merge_config(write(family, "della.fuse.yaml", fuse_text)), tmp_path / "fuse-yaml")
    ours, own = load_all(tmp_path / "mergekit-yaml"), load_all(tmp_path / "fuse-yaml")
    assert all(torch.equal(ours[k], own[k]) for k in ours)
    unscaled = mergekit_text.replace("lambda: 0.9}", "lambda: 0.9, rescale: false}")
    assert load_merge_config(write(family, "della-no-rescale.yml", unscaled)).parameters["rescale"] is False
    dare = "merge_method: dare_ties\nbase_model: base\nmodels: [{model: t1}, {model: t2}]\n"
    assert load_merge_config(write(family, "dare.yml", dare)).parameters == {"rescale": "l1"}


BASE = "base_model: base\n"
REFUSED = {  # a mergekit feature fuse does not do: (mergekit YAML, what the error says)
    "slices": (
        "merge_method: slerp\n" + BASE + "parameters: {t: 0.5}\nslices:\n  - sources:\n"
        "      - {model: base, layer_range: [0, 2]}\n      - {model: t1, layer_range: [0, 2]}\n",
        r"slices: layer slicing .* list them under models:",
    ),
    "gradient": (
        "merge_method: slerp\n" + BASE + "models: [{model: t1}]\nparameters: {t: [0, 0.5, 1]}\n",
        r"parameters.t: a list is a gradient over the layers in mergekit",
    ),
    "filter": (
        "merge_method: slerp\n" + BASE + "models: [{model: t1}]\n"
        "parameters:\n  t:\n    - {filter: self_attn, value: 0.2}\n    - {value: 0.5}\n",
        r"parameters.t: `filter:`/`value:` entries are mergekit's per-tensor conditional parameters",
    ),
    "union_tokenizer": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\ntokenizer_source: union\n",
        r"tokenizer_source: union builds a merged vocabulary",
    ),
    "tokenizer_tokens": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\n"
        "tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n",
        r"tokenizer: only `tokenizer: \{source: base\}`",
    ),
    "other_tokenizer": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\ntokenizer_source: t2\n",
        r"tokenizer_source: 't2' is not base_model",
    ),
    "lora": (
        "merge_method: ties\n" + BASE + "models: [{model: t1+adapter}, {model: t2}]\n",
        r"models\[0\].model: 't1\+adapter' is mergekit's model\+LoRA form",
    ),
    "revision": (
        "merge_method: ties\n" + BASE + "models: [{model: t1@main}, {model: t2}]\n",
        r"models\[0\].model: 't1@main' pins a Hub revision",
    ),
    "hub_model": (
        "merge_method: ties\n" + BASE + "models: [{model: some-org/some-model}, {model: t2}]\n",
        r"models\[0\].model: 'some-org/some-model' is not a local folder .*huggingface-cli download some-org/some-model",
    ),
    "method": (
        "merge_method: passthrough\n" + BASE + "models: [{model: t1}]\n",
        r"merge_method: 'passthrough' is not one fuse does; it does linear, task_arithmetic",
    ),
    "named_template": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\nchat_template: chatml\n",
        r"chat_template: 'chatml': give the Jinja text or auto",
    ),
    "dtype": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\ndtype: float64\n",
        r"dtype: 'float64'; fuse writes float32, bfloat16, float16",
    ),
    "nuslerp_without_base": (
        "merge_method: nuslerp\nmodels: [{model: t1}, {model: t2}]\n",
        r"base_model: nuslerp without base_model slerps the two models' own weights",
    ),
    "base_parameters": (
        "merge_method: ties\n"
        + BASE
        + "models:\n  - {model: base, parameters: {weight: 0.5}}\n  - {model: t1}\n",
        r"models\[0\].parameters: this entry is base_model, whose \['weight'\] take no part in ties",
    ),
    "shared_per_model": (
        "merge_method: ties\n"
        + BASE
        + "models:\n  - {model: t1, parameters: {normalize: false}}\n  - {model: t2}\n",
        r"models\[0\].parameters.normalize: shared by all models; .* move it there",
    ),
    "unknown_parameter": (
        "merge_method: slerp\n" + BASE + "models: [{model: t1}]\nparameters: {t: 0.5, density: 0.5}\n",
        r"parameters.density: slerp takes \['t'\]",
    ),
    "rescaled_ties": (
        "merge_method: ties\n" + BASE + "models: [{model: t1}, {model: t2}]\nparameters: {rescale: true}\n",
        r"parameters.rescale: true rescales ties's pruned deltas .* fuse does not",
    ),
    "slerp_two_models": (  # mergekit refuses it too, when it plans the merge
        "merge_method: slerp\n" + BASE + "models: [{model: t1}, {model: t2}]\nparameters: {t: 0.5}\n",
        r"models: slerp merges exactly one model besides base_model",
    ),
    "bad_density": (  # a fuse error names the mergekit entry (the base entry before it is not a merged model)
        "merge_method: ties\n"
        + BASE
        + "models:\n  - {model: base}\n  - {model: t1, parameters: {density: 2}}\n",
        r"models\[1\].parameters.density: must be in \[0, 1\]",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_mergekit_feature_fuse_does_not_do_is_refused_naming_its_key(case, family):
    text, message = REFUSED[case]
    mergekit_accepts(text)
    with pytest.raises(MergeConfigError, match=message):
        load_merge_config(write(family, f"{case}.yml", text))


def test_every_refused_key_is_listed_in_one_error(family):
    text = """
merge_method: ties
base_model: base
models:
  - {model: t1+adapter}
  - {model: t2, parameters: {density: [0.2, 0.8]}}
tokenizer_source: union
chat_template: llama3
"""
    mergekit_accepts(text)
    with pytest.raises(MergeConfigError) as error:
        load_merge_config(write(family, "many.yml", text))
    lines = [line for line in str(error.value).splitlines() if line.startswith("  - ")]
    assert [line.split(":")[0] for line in lines] == [
        "  - tokenizer_source",
        "  - chat_template",
        "  - models[0].model",
        "  - models[1].parameters.density",
    ]


def test_yaml_that_is_neither_format_or_both_is_refused(family):
    both = "merge_method: ties\nmethod: ties\nbase_model: base\nmodels: [{model: t1}]\n"
    with pytest.raises(
        MergeConfigError, match="method: a mergekit config names its method with merge_method"
    ):
        load_merge_config(write(family, "both.yml", both))
    several = "merge_method: ties\nbase_model: base\nmodels: [{model: t1}]\n---\nmerge_method: slerp\n"
    with pytest.raises(MergeConfigError, match="several YAML documents .* one merge per file"):
        load_merge_config(write(family, "multi.yml", several))
    stray = "merge_method: ties\nbase_model: base\nmodels: [{model: t1}]\nout_path: merged\n"
    with pytest.raises(MergeConfigError, match="out_path: neither a mergekit key"):
        load_merge_config(write(family, "stray.yml", stray))


def test_cli_takes_the_output_folder_as_mergekit_yaml_does(family, tmp_path, capsys):
    from fuse.cli import main

    config = write(
        family,
        "cli.yml",
        "merge_method: slerp\nbase_model: base\nmodels: [{model: t1}]\nparameters: {t: 0.5}\n",
    )
    assert main(["merge", str(config), str(tmp_path / "a"), "--output", str(tmp_path / "b")]) == 2
    assert "two output folders" in capsys.readouterr().out
    assert main(["merge", str(config)]) == 2
    assert "no output folder: `fuse merge CONFIG OUTPUT`" in capsys.readouterr().out
    assert main(["merge", str(config), "--output", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "model.safetensors").is_file()

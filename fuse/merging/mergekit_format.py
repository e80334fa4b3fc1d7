"""mergekit's merge YAML (`merge_method`, `base_model`, `models: [{model, parameters}]`, …) read as written and
mapped onto fuse's merge config, so a mergekit config runs with `fuse merge CONFIG OUTPUT` as with `mergekit-yaml`.

Every key means what it means in mergekit 0.1.5; a mergekit feature fuse does not do is refused, all such keys
listed in one error, never dropped in silence.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fuse.merging.methods import MergeConfigError, get_method

# mergekit merge_method -> fuse method (mergekit's `sce` masks the deltas: fuse's sce_mergekit)
METHOD_NAMES = {
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "sce": "sce_mergekit",
    "della": "della",
    "della_linear": "della_linear",
    "slerp": "slerp",
    "nuslerp": "nuslerp",
    "model_stock": "model_stock",
    "karcher": "karcher",
}
# mergekit's `rescale: true` (its default for these) rescales each pruned delta to its L1 norm: fuse's "l1"
L1_RESCALE = {"dare_linear", "dare_ties", "della", "della_linear"}
# mergekit's other task-arithmetic methods take `rescale` too (default false); fuse does not rescale their masks
NO_RESCALE = {"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"}
# a memory option of mergekit's (int8 sign masks) that does not change the result
NO_EFFECT = {"int8_mask"}
MERGEKIT_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
}
FUSE_KEYS = {"output", "max_shard_size", "seed", "read_threads"}  # fuse's own settings, allowed beside them
OUT_DTYPES = ("float32", "bfloat16", "float16")
NAMED_TEMPLATES = "chatml, llama3, alpaca, mistral, exaone"


def is_mergekit(raw: dict[str, Any]) -> bool:
    """mergekit's format: `merge_method`, `slices`/`modules`, or models given as `- model: PATH`."""
    if {"merge_method", "slices", "modules"} & set(raw):
        return True
    models = raw.get("models")
    return isinstance(models, list) and any(isinstance(m, dict) and "model" in m for m in models)


def _number(value: Any) -> Any:
    """YAML reads `1e-5` as a string; mergekit's pydantic turns it into a number, so do we."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _scalar(value: Any, key: str, problems: list[str]) -> Any:
    if isinstance(value, bool | int | float | str):
        return _number(value)
    if isinstance(value, list) and all(isinstance(v, bool | int | float | str) for v in value):
        problems.append(
            f"{key}: a list is a gradient over the layers in mergekit; fuse takes one value per tensor (a number)"
        )
    else:
        problems.append(
            f"{key}: `filter:`/`value:` entries are mergekit's per-tensor conditional parameters; fuse takes one "
            "value for every tensor (a number)"
        )
    return None


class _Reader:
    """One mergekit config, translated; every problem collected, raised together."""

    def __init__(self, raw: dict[str, Any], folder: Path):
        self.raw, self.folder, self.problems = raw, folder, []

    def path(self, value: Any, key: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.problems.append(f"{key}: give the model as a path string, got {value!r}")
            return None
        if "+" in value:
            self.problems.append(
                f"{key}: {value!r} is mergekit's model+LoRA form; fuse merges full checkpoints: merge the adapter "
                "into its model first (peft's merge_and_unload) and give that folder"
            )
            return None
        if "@" in value:
            self.problems.append(
                f"{key}: {value!r} pins a Hub revision (@); fuse merges local folders: download that revision "
                "(huggingface-cli download REPO --revision REV --local-dir DIR) and give DIR"
            )
            return None
        path = Path(value) if Path(value).is_absolute() else (self.folder / value)
        if not path.is_dir():
            self.problems.append(
                f"{key}: {value!r} is not a local folder (looked at {path}); fuse merges local checkpoints: "
                f"download a Hub model first (huggingface-cli download {value} --local-dir DIR) and give DIR"
            )
            return None
        return str(path.resolve())

    def method(self) -> str | None:
        name = self.raw.get("merge_method")
        if name in METHOD_NAMES:
            return METHOD_NAMES[name]
        self.problems.append(
            f"merge_method: {name!r} is not one fuse does; it does {', '.join(METHOD_NAMES)} "
            "(mergekit's sce is fuse's sce_mergekit)"
        )
        return None

    def unsupported_keys(self) -> None:
        raw = self.raw
        if raw.get("slices") is not None:
            self.problems.append(
                "slices: layer slicing (frankenmerges, layer ranges) is not something fuse does; it merges whole "
                "models: list them under models:"
            )
        if raw.get("modules") is not None:
            self.problems.append("modules: per-module definitions are not something fuse does; use models:")
        if raw.get("models") is None and raw.get("slices") is None and raw.get("modules") is None:
            self.problems.append("models: missing (the models to merge, `- model: PATH`)")
        for key in sorted(set(raw) - MERGEKIT_KEYS - FUSE_KEYS - {"slices", "modules"}):
            self.problems.append(
                f"{key}: neither a mergekit key ({', '.join(sorted(MERGEKIT_KEYS))}) nor a fuse one "
                f"({', '.join(sorted(FUSE_KEYS))})"
            )

    def out_dtype(self) -> str:
        key = "out_dtype" if self.raw.get("out_dtype") else "dtype"
        value = self.raw.get(key)
        if value is None:
            return "auto"
        name = str(value).removeprefix("torch.")
        if name not in OUT_DTYPES:
            self.problems.append(
                f"{key}: {value!r}; fuse writes {', '.join(OUT_DTYPES)} (it computes in float32)"
            )
            return "auto"
        return name

    def tokenizer(self, base: str | None) -> None:
        source = self.raw.get("tokenizer_source")
        block = self.raw.get("tokenizer")
        key = "tokenizer_source"
        if isinstance(block, dict) and set(block) <= {"source"}:
            source, key = block.get("source", "union"), "tokenizer.source"
        elif block is not None:
            self.problems.append(
                "tokenizer: only `tokenizer: {source: base}`; fuse keeps base_model's tokenizer and does not "
                "build a tokenizer or embedding rows (tokens, pad_to_multiple_of)"
            )
            return
        if source in (None, "base"):
            return
        if source == "union":
            self.problems.append(
                f"{key}: union builds a merged vocabulary and re-maps the embeddings; fuse keeps base_model's "
                "tokenizer (use base)"
            )
            return
        path = self.path(source, key)
        if path is not None and path != base:
            self.problems.append(
                f"{key}: {source!r} is not base_model; fuse keeps base_model's tokenizer (use base), it does not "
                "re-map embeddings to another model's vocabulary"
            )

    def chat_template(self) -> str | None:
        value = self.raw.get("chat_template")
        if value is None or value == "auto":
            return value
        if not isinstance(value, str) or "{" not in value or len(value) < 20:
            self.problems.append(
                f"chat_template: {value!r}: give the Jinja text or auto (the most common template of the merged "
                f"models); mergekit's named templates ({NAMED_TEMPLATES}) are files of the mergekit package"
            )
            return None
        return value

    def shared_parameters(self, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared parameters, per-model defaults): mergekit reads a per-model parameter from the model's entry,
        else from the top-level `parameters`."""
        spec = get_method(method)
        given = self.raw.get("parameters") or {}
        if not isinstance(given, dict):
            self.problems.append(f"parameters: a mapping, got {given!r}")
            given = {}
        shared: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        if method in L1_RESCALE:
            shared["rescale"] = "l1"  # mergekit's default: true
        for key, raw_value in given.items():
            value = _scalar(raw_value, f"parameters.{key}", self.problems)
            if value is None or key in NO_EFFECT:
                continue
            if key == "rescale" and method in L1_RESCALE:
                shared["rescale"] = "l1" if value else False
            elif key == "rescale" and method in NO_RESCALE:
                if value:
                    self.problems.append(
                        f"parameters.rescale: true rescales {method}'s pruned deltas to their L1 norm in mergekit; "
                        "fuse does not (false, mergekit's default, is accepted)"
                    )
            elif key in spec.shared:
                shared[key] = value
            elif key in spec.per_model:
                defaults[key] = value
            else:
                self.problems.append(
                    f"parameters.{key}: {self.raw.get('merge_method')} takes "
                    f"{sorted({*spec.shared, *spec.per_model})}"
                )
        return shared, defaults

    def model_parameters(self, method: str, entry: dict[str, Any], key: str) -> dict[str, Any]:
        spec = get_method(method)
        given = entry.get("parameters") or {}
        if not isinstance(given, dict):
            self.problems.append(f"{key}.parameters: a mapping, got {given!r}")
            return {}
        own = {}
        for name, raw_value in given.items():
            value = _scalar(raw_value, f"{key}.parameters.{name}", self.problems)
            if value is None:
                continue
            if name in spec.per_model:
                own[name] = value
            elif name in spec.shared or name in NO_EFFECT or name == "rescale":
                self.problems.append(
                    f"{key}.parameters.{name}: shared by all models; mergekit reads it from the top-level "
                    "parameters only (here it would be ignored): move it there"
                )
            else:
                self.problems.append(
                    f"{key}.parameters.{name}: {self.raw.get('merge_method')} takes "
                    f"{sorted(spec.per_model) or 'no per-model parameters'} per model"
                )
        return own


def _labels(paths: list[str]) -> list[str]:
    """Folder names, made unique where two folders share one."""
    names = [Path(p).name for p in paths]
    return [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]


def from_mergekit(raw: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[int, str]]:
    """The fuse merge config (a dict, paths absolute) for mergekit config `raw` written in `folder`, and which
    mergekit key each fuse model came from (for error messages). Raises MergeConfigError listing every problem."""
    if "method" in raw:
        raise MergeConfigError(
            "method: a mergekit config names its method with merge_method; fuse's own format uses method "
            "(with models: [{path: …}]): write one format or the other"
        )
    reader = _Reader(raw, folder)
    reader.unsupported_keys()
    method = reader.method()
    base = reader.path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    dtype = reader.out_dtype()
    reader.tokenizer(base)
    template = reader.chat_template()
    entries = raw.get("models") if isinstance(raw.get("models"), list) else []
    if raw.get("models") is not None and not isinstance(raw.get("models"), list):
        reader.problems.append("models: a list of `- model: PATH` entries")
    if method is None:
        raise _error(reader.problems)
    spec = get_method(method)
    shared, defaults = reader.shared_parameters(method)
    models: list[tuple[str, dict[str, Any], str]] = []  # (path, parameters, mergekit key)
    base_listed = False
    for index, entry in enumerate(entries):
        key = f"models[{index}]"
        if not isinstance(entry, dict) or "model" not in entry:
            reader.problems.append(f"{key}: give `model: PATH` (and optionally `parameters:`)")
            continue
        for extra in sorted(set(entry) - {"model", "parameters"}):
            reader.problems.append(f"{key}.{extra}: not a mergekit model key (model, parameters)")
        path = reader.path(entry["model"], f"{key}.model")
        own = reader.model_parameters(method, entry, key)
        if path is None:
            continue
        if base is not None and path == base:
            base_listed = True
            if spec.uses_base:  # mergekit: the base's per-model parameters take no part (it is not a delta)
                if own:
                    reader.problems.append(
                        f"{key}.parameters: this entry is base_model, whose {sorted(own)} take no part in "
                        f"{raw.get('merge_method')} (mergekit ignores them too): remove them"
                    )
                continue
        models.append((path, {**defaults, **own}, key))
    if base is not None and not spec.uses_base and not base_listed:
        models.append((base, dict(defaults), "base_model"))  # mergekit adds the base as one more input
    if base is None and raw.get("base_model") is None:
        if method == "nuslerp":
            reader.problems.append(
                "base_model: nuslerp without base_model slerps the two models' own weights in mergekit; fuse's "
                "nuslerp interpolates their task vectors against base_model: give base_model"
            )
        elif spec.uses_base:
            reader.problems.append(f"base_model: {raw.get('merge_method')} needs base_model (mergekit's too)")
        elif models:
            base = models[0][0]  # the base takes no part in the math: only config and tokenizer come from it
    if reader.problems:
        raise _error(reader.problems)
    fuse: dict[str, Any] = {
        "base_model": base,
        "method": method,
        "parameters": shared,
        "dtype": dtype,
        "models": [
            {"path": path, "name": label, "parameters": params}
            for (path, params, _), label in zip(models, _labels([m[0] for m in models]), strict=True)
        ],
    }
    if template is not None:
        fuse["chat_template"] = template
    if raw.get("name") is not None:
        fuse["name"] = str(raw["name"])
    fuse.update({key: raw[key] for key in FUSE_KEYS if key in raw})
    return fuse, {i: m[2] for i, m in enumerate(models)}


def _error(problems: list[str]) -> MergeConfigError:
    return MergeConfigError(
        "mergekit config: cannot merge it as written:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def rename_models(message: str, keys: dict[int, str]) -> str:
    """A fuse error's `models[i]` renamed to the mergekit entry it came from."""
    return re.sub(
        r"models(?:\[(\d+)\]|\.(\d+))", lambda m: keys.get(int(m.group(1) or m.group(2)), m.group(0)), message
    )

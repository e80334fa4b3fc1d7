"""`fuse plan --estimate`: the price of a recipe before it runs — per stage instance the tokens it processes, the
teacher store it writes, its time and peak memory, the SLURM request that follows, and the total GPU-hours.

How: a model of each stage's work (FLOPs as 2·P per token forward and 6·P per token trained, bytes read and
written, vocabulary-sized work in align) from the prepared data (counted; tokens per row measured on a sample with
each model's own tokenizer and chat template) and each model's size (its safetensors headers, else config.json,
else the size in its name); a calibration table turns work into seconds and bytes per device kind. The CPU row is
fitted to this project's measured runs on 2 shared cores (the demo); the GPU rows are nominal (peak FLOP/s ×
utilization, stated as such) until a site measures its own (`FUSE_CALIBRATION`, a JSON of the same fields per
device). Done instances of the run store refine it: each stage's measured seconds and peak memory against what
this model assigns them give a per-stage factor applied to the rest.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fuse.dag import Dag, Instance
from fuse.recipe import Recipe
from fuse.resources import host_peak_gb
from fuse.store import RunStore

GB = 1 << 30
SAMPLE_ROWS = 64  # rows rendered per model to measure its tokens per row
LOGIT_COPIES = 3  # a training step holds the logits, their log-softmax and the gradient (float32)
STORE_BYTES_PER_TOPK = 4.2  # measured: 37-46 bytes/token at top_k 10 (demo, SmolLM2, gemma-3 stores)
LIGHT_PROCESS_GB = 0.25  # a fuse process that never imports torch (prepare: 0.17-0.2 GB measured)
MEM_HEADROOM = 1.3  # --mem asks for this much over the estimated peak
TIME_FACTOR, TIME_FLOOR_S = 2.0, 600.0  # --time: twice the estimate plus ten minutes


@dataclass(frozen=True)
class Calibration:
    """How fast and how large work is on one device kind. FLOP/s are effective (what a stage reaches, all
    overheads in), per device."""

    forward_flops: float  # extract, score, evaluate's scoring: 2·P per token
    train_flops: float  # distill, fpo: 6·P per trained token
    decode_flops: float  # greedy generation: 2·P per new token, one token at a time
    align_s_per_vocab: float  # align: building the vocabulary map, per source vocabulary entry
    align_tokens_s: float  # align: projecting the teacher's top-K, pivot tokens per second
    io_bytes_s: float  # merge and publish: bytes read and written per second
    overhead_s: float  # per instance: process start, imports, model loading
    base_gb: float  # a process with torch and transformers imported
    source: str
    gpu_memory_gb: float = 0.0  # per device (0: a CPU)
    mined_s_per_vocab: float = 3.7e-4  # vocab_map ...+mined: edit distance for each unmapped source id
    candidate_s_per_row: float = 0.05  # align's score_candidates: batching and bookkeeping per conversation
    model_load_s: float = 1.5  # evaluate: loading each evaluated model


CALIBRATIONS: dict[str, Calibration] = {
    "cpu": Calibration(
        forward_flops=8.0e10,
        train_flops=8.5e10,
        decode_flops=8.0e9,
        align_s_per_vocab=4.0e-5,
        align_tokens_s=4.0e3,
        io_bytes_s=4.0e8,
        overhead_s=1.0,
        base_gb=0.6,
        source="fitted to the real pair's SmolLM2 <- gemma-3 run on 2 shared CPU cores; checked against the other "
        "direction and the demo in bench/results/estimate_check.md",
    ),
}


def nominal(name: str, peak_flops: float, memory_gb: float) -> Calibration:
    """A GPU row from its datasheet: peak bf16 dense FLOP/s at utilization 0.40 forward, 0.30 training and 0.02
    decoding one token at a time; align is CPU work as on any node. Not measured by fuse."""
    return Calibration(
        forward_flops=0.40 * peak_flops,
        train_flops=0.30 * peak_flops,
        decode_flops=0.02 * peak_flops,
        align_s_per_vocab=CALIBRATIONS["cpu"].align_s_per_vocab,
        align_tokens_s=CALIBRATIONS["cpu"].align_tokens_s,
        io_bytes_s=2.0e9,
        overhead_s=60.0,
        base_gb=0.55,
        gpu_memory_gb=memory_gb,
        source=f"nominal: {name} {peak_flops / 1e12:.0f} TFLOP/s bf16 dense × utilization 0.40 forward / 0.30 "
        "training; not measured by fuse",
    )


CALIBRATIONS |= {
    "h100": nominal("H100", 989e12, 80.0),
    "h200": nominal("H200", 989e12, 141.0),
    "a100": nominal("A100", 312e12, 80.0),
}


def calibrations() -> dict[str, Calibration]:
    """The shipped table, with a site's own figures over it ($FUSE_CALIBRATION: {"h100": {"train_flops": ...}})."""
    table = dict(CALIBRATIONS)
    path = os.environ.get("FUSE_CALIBRATION")
    if path:
        for device, fields in json.loads(Path(path).read_text(encoding="utf-8")).items():
            base = table.get(device, CALIBRATIONS["h100"])
            table[device] = replace(base, **fields, source=f"site calibration {path}")
    return table


# --------------------------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ModelSize:
    params: float | None
    vocab: int | None = None
    hidden: int | None = None
    layers: int | None = None
    basis: str = "unknown"

    @property
    def known(self) -> bool:
        return self.params is not None


NAME_SIZE = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])")


def size_from_name(name: str) -> float | None:
    """'Qwen2.5-72B-Instruct' -> 72e9, 'Mixtral-8x7B' -> 47e9 (experts share attention: ~0.84 of 8x7), 'SmolLM2-135M'
    -> 135e6."""
    found = NAME_SIZE.findall(name.rsplit("/", 1)[-1])
    if not found:
        return None
    experts, size, unit = found[-1]
    value = float(size) * (1e9 if unit in "bB" else 1e6)
    return value * int(experts) * 0.84 if experts else value


def _safetensors_params(folder: Path) -> float | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return float(total)


def _config_params(config: dict[str, Any]) -> float | None:
    """A decoder's parameters from its config: embeddings (tied or not) and per layer attention (with grouped
    KV heads) and a gated MLP (times the experts of a mixture)."""
    h, layers, inter = (
        config.get("hidden_size"),
        config.get("num_hidden_layers"),
        config.get("intermediate_size"),
    )
    vocab = config.get("vocab_size")
    if not (h and layers and inter and vocab):
        return None
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or h // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    attention = h * heads * head_dim * 2 + h * kv * 2
    mlp = 3 * h * inter * (config.get("num_local_experts") or 1)
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return float(embeddings + layers * (attention + mlp))


def model_size(spec: Any) -> ModelSize:
    """The size of a recipe model without loading it: a local folder's safetensors headers (exact), else its (or
    the hub cache's) config.json, else the size its name states; unknown otherwise."""
    folder = Path(spec.path).expanduser()
    config: dict[str, Any] = {}
    if folder.is_dir() and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    elif not folder.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.path, "config.json", revision=spec.revision)
            if isinstance(cached, str):
                config = json.loads(Path(cached).read_text(encoding="utf-8"))
        except Exception:  # an id the cache does not know: the name is all there is
            config = {}
    text = config.get("text_config") or config
    shape = {
        "vocab": text.get("vocab_size"),
        "hidden": text.get("hidden_size"),
        "layers": text.get("num_hidden_layers"),
    }
    if folder.is_dir() and (params := _safetensors_params(folder)) is not None:
        return ModelSize(params, **shape, basis="safetensors headers")
    if (params := _config_params(text)) is not None:
        return ModelSize(params, **shape, basis="config.json")
    if (params := size_from_name(spec.path)) is not None:
        return ModelSize(params, **shape, basis="the size in its name")
    return ModelSize(None, **shape)


# --------------------------------------------------------------------------------------------- data


@dataclass
class DataShape:
    """Rows per prepared split ("sft/train", "preference/heldout", ...) and, per model, mean tokens per SFT row and
    per preference pair (both sides), in that model's chat template, capped at max_length."""

    rows: dict[str, int]
    sft_tokens: dict[str, float] = field(default_factory=dict)
    pair_tokens: dict[str, float] = field(default_factory=dict)
    basis: str = ""


def prepared_rows(recipe: Recipe, store: RunStore) -> tuple[dict[str, int], dict[str, list[dict]], str]:
    """Split sizes and a sample of rows per kind: from the done prepare instance, else by preparing in memory."""
    from fuse.data.prepared import is_heldout

    manifest = store.manifest("prepare") or {}
    samples: dict[str, list[dict]] = {}
    if manifest.get("status") == "done":
        from fuse.data.prepared import load_split

        report = json.loads((store.out("prepare") / "report.json").read_text(encoding="utf-8"))
        rows = {f"{kind}/{split}": n for kind, part in report.items() for split, n in part["splits"].items()}
        for kind in report:
            data = load_split(store.out("prepare"), kind, "train")
            step = max(1, len(data) // SAMPLE_ROWS)
            samples[kind] = [data[i] for i in range(0, len(data), step)][:SAMPLE_ROWS]
        return rows, samples, "the prepared data"
    from fuse.stages.prepare import load_raw, normalize

    rows = {}
    for kind, key, spec in (
        ("sft", "data.sft", recipe.data.sft),
        ("preference", "data.preference", recipe.data.preference),
    ):
        if spec is None:
            continue
        kept, _ = normalize(load_raw(spec, key), spec, key, kind, recipe.stages.prepare.min_response_chars)
        held = [r for r in kept if is_heldout(r["id"], recipe.data.heldout_fraction, recipe.data.seed)]
        rows[f"{kind}/train"], rows[f"{kind}/heldout"] = len(kept) - len(held), len(held)
        step = max(1, len(kept) // SAMPLE_ROWS)
        samples[kind] = kept[::step][:SAMPLE_ROWS]
    return rows, samples, "the data files (prepared in memory)"


def mean_tokens(spec: Any, rows: list[dict], max_length: int, pairs: bool) -> float:
    """Mean tokens per row in the model's own chat template (both sides of a pair), each capped at max_length."""
    if not rows:
        return 0.0
    from fuse.data.chat import render_text
    from fuse.models import load_tokenizer

    tokenizer = load_tokenizer(spec)
    counts = []
    for row in rows:
        conversations = (
            [[*row["prompt"], {"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")]
            if pairs
            else [row["messages"]]
        )
        counts.append(
            sum(min(len(tokenizer(render_text(tokenizer, c)).input_ids), max_length) for c in conversations)
        )
    return statistics.fmean(counts)


def data_shape(
    recipe: Recipe,
    store: RunStore,
    rows: dict[str, int] | None = None,
    tokens_per_row: float | None = None,
) -> DataShape:
    """The data's shape, measured where the data and tokenizers can be read; `rows` ({"sft": N, "preference":
    M}, split by data.heldout_fraction) and `tokens_per_row` (per SFT row; a pair counts twice) stand in for
    what cannot be (a hub dataset offline, a path that exists only on the cluster), and say so."""
    notes = []
    try:
        counted, samples, basis = prepared_rows(recipe, store)
    except Exception as error:  # a hub dataset offline, a cluster path: assumed, never a dead plan
        if not rows:
            raise ValueError(
                f"cannot read the data to count it ({str(error)[:200]}): give --rows sft=N,preference=M"
            ) from None
        fraction = recipe.data.heldout_fraction
        counted = {}
        for kind, n in rows.items():
            counted[f"{kind}/heldout"] = round(n * fraction)
            counted[f"{kind}/train"] = n - counted[f"{kind}/heldout"]
        samples, basis = {}, "assumed: --rows"
    shape = DataShape(counted, basis=basis)
    for spec in [recipe.pivot, *recipe.sources]:
        try:
            shape.sft_tokens[spec.name] = mean_tokens(
                spec, samples.get("sft", []), recipe.stages.extract.max_length, pairs=False
            )
            shape.pair_tokens[spec.name] = mean_tokens(
                spec, samples.get("preference", []), recipe.stages.score.max_length, pairs=True
            )
            if samples:
                continue
        except Exception as error:  # no tokenizer here (a hub id offline)
            if tokens_per_row is None:
                raise ValueError(
                    f"cannot measure tokens per row for {spec.name} ({str(error)[:200]}): give --tokens-per-row"
                ) from None
        if tokens_per_row is not None:
            shape.sft_tokens[spec.name], shape.pair_tokens[spec.name] = tokens_per_row, 2 * tokens_per_row
            notes.append(spec.name)
    if notes:
        shape.basis += f"; tokens per row assumed (--tokens-per-row) for {', '.join(notes)}"
    return shape


# --------------------------------------------------------------------------------------------- work per instance


@dataclass
class Estimate:
    instance: str
    device: str
    gpus: int
    tokens: float
    store_bytes: float
    seconds: float
    peak_gb: float  # host memory of the job (per node)
    basis: str = ""
    refined: str = ""
    gpu_gb: float | None = None  # per GPU, where the instance has GPUs
    problems: list[str] = field(
        default_factory=list
    )  # what does not fit: the GPU, the requested --mem/--time

    @property
    def mem_request(self) -> str:
        return f"{max(1, math.ceil(self.peak_gb * MEM_HEADROOM))}G"

    @property
    def time_request(self) -> str:
        return clock(self.seconds * TIME_FACTOR + TIME_FLOOR_S)


def size_text(size: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB"


def clock(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    days, minutes = divmod(minutes, 24 * 60)
    text = f"{minutes // 60:02d}:{minutes % 60:02d}:00"
    return f"{days}-{text}" if days else text


def _trained_tokens(settings: Any, rows: int, per_row: float, nodes: int = 1) -> float:
    """Tokens a training goes through: max_steps × the global batch's rows (num_processes ranks on each of
    `nodes`), else epochs over the rows."""
    if settings.max_steps and settings.max_steps > 0:
        ranks = settings.num_processes * nodes
        batch = settings.per_device_batch_size * settings.gradient_accumulation_steps * ranks
        return settings.max_steps * batch * per_row
    return settings.epochs * rows * per_row


def _training_gb(
    size: ModelSize, settings: Any, calibration: Calibration, gpus: int, sequence: float, per_row: int = 1
) -> float:
    """Weights, gradients and Adam states (16 bytes a parameter in float32, 18 with bf16 master weights), ZeRO
    partitioning over the ranks, the output layer's logits and the activations of one micro-batch of rows padded
    to `sequence` tokens (`per_row` sequences a row: 2 for a preference pair)."""
    params = size.params or 0.0
    per_param = 18.0 if settings.bf16 else 16.0
    stage = settings.deepspeed.zero_stage
    ranks = max(1, gpus)
    states = params * (per_param - 4 - 4)  # optimizer states
    weights, grads = params * 4, params * 4
    if stage >= 1:
        states /= ranks
    if stage >= 2:
        grads /= ranks
    if stage >= 3:
        weights /= ranks
    tokens = settings.per_device_batch_size * per_row * min(settings.max_length, sequence)
    logits = tokens * (size.vocab or 0) * 4 * LOGIT_COPIES
    per_layer = (2 if settings.gradient_checkpointing else 16) * (size.hidden or 0) * 4
    activations = tokens * per_layer * (size.layers or 0)
    return calibration.base_gb + (weights + grads + states + logits + activations) / GB


def _forward_gb(size: ModelSize, settings: Any, calibration: Calibration) -> float:
    params = size.params or 0.0
    width = 2 if getattr(settings, "dtype", "float32") in ("bfloat16", "float16") else 4
    chunk = min(getattr(settings, "head_chunk_tokens", 256), getattr(settings, "batch_tokens", 16384))
    logits = chunk * (size.vocab or 0) * 4 * 2
    activations = getattr(settings, "batch_tokens", 16384) * (size.hidden or 0) * 4 * 8
    return calibration.base_gb + (params * width + logits + activations) / GB


def instance_estimate(
    recipe: Recipe,
    instance: Instance,
    sizes: dict[str, ModelSize],
    data: DataShape,
    device: str,
    gpus: int,
    nodes: int = 1,
) -> Estimate:
    """One instance's work, priced on `device` (FLOP/s scale with the GPUs it gets; on CPU there is one device)."""
    cal = calibrations()[device]
    scale = max(1, gpus) * (0.9 if gpus > 1 else 1.0)
    stages = recipe.stages
    pivot = sizes["pivot"]
    key = instance.key or ""
    tokens = store = 0.0
    seconds, peak = cal.overhead_s, cal.base_gb
    unknown = [m for m in instance.models if not sizes[m].known]
    if instance.stage == "prepare":
        peak = LIGHT_PROCESS_GB  # reads and writes data: no torch
    elif instance.stage == "extract":
        size = sizes[key]
        tokens = data.rows.get("sft/train", 0) * data.sft_tokens.get(key, 0.0)
        store = tokens * STORE_BYTES_PER_TOPK * stages.extract.top_k
        seconds += 2 * (size.params or 0) * tokens / (cal.forward_flops * scale)
        peak = _forward_gb(size, stages.extract.for_model(key), cal)
    elif instance.stage == "score":
        name = key if key in sizes else "pivot"  # score.target-x scores a model trained from the pivot
        size = sizes[name]
        rows = data.rows.get("preference/train", 0) + data.rows.get("preference/heldout", 0)
        tokens = rows * data.pair_tokens.get(name, 0.0)
        seconds += 2 * (size.params or 0) * tokens / (cal.forward_flops * scale)
        peak = _forward_gb(size, stages.score.for_model(name), cal)
    elif instance.stage == "align":
        source = sizes[key]
        tokens = data.rows.get("sft/train", 0) * data.sft_tokens.get("pivot", 0.0)
        source_tokens = data.rows.get("sft/train", 0) * data.sft_tokens.get(key, 0.0)
        per_vocab = (
            cal.mined_s_per_vocab if stages.align.vocab_map.endswith("mined") else cal.align_s_per_vocab
        )
        seconds += (source.vocab or 0) * per_vocab + tokens / cal.align_tokens_s
        peak = cal.base_gb + 2 * ((source.vocab or 0) + (pivot.vocab or 0)) * 64 / GB
        if stages.align.score_candidates:  # the source runs again, on the candidates of every boundary row
            seconds += 2 * (source.params or 0) * source_tokens / (cal.forward_flops * scale)
            seconds += data.rows.get("sft/train", 0) * cal.candidate_s_per_row
            peak = max(peak, _forward_gb(source, stages.extract.for_model(key), cal))
    elif instance.stage in ("distill", "fpo"):
        settings = getattr(stages, instance.stage)
        if instance.stage == "distill":  # a batch pads its rows to its longest: about twice the mean
            rows, per_row = data.rows.get("sft/train", 0), data.sft_tokens.get("pivot", 0.0)
            sequence, sequences = 2 * per_row, 1
        else:  # a preference pair: two sequences, its tokens counted over both
            rows, per_row = data.rows.get("preference/train", 0), data.pair_tokens.get("pivot", 0.0)
            sequence, sequences = per_row, 2
        tokens = _trained_tokens(settings, rows, per_row, nodes)
        flops = 6 * (pivot.params or 0) * tokens * (4 / 3 if settings.gradient_checkpointing else 1)
        seconds += flops / (cal.train_flops * scale)
        peak = _training_gb(pivot, settings, cal, gpus, sequence, per_row=sequences)
    elif instance.stage == "merge":
        # streamed (fuse.merging.engine): every target and the base read, the result written; in memory (models +
        # 3) x the largest tensor in float32 (the embedding), and the pages of the model being read
        models = len(recipe.sources) + 1
        seconds += (pivot.params or 0) * 4 * (models + 1) / cal.io_bytes_s
        largest = (pivot.vocab or 0) * (pivot.hidden or 0) * 4
        peak = cal.base_gb + ((models + 3) * largest + (pivot.params or 0) * 4) / GB
    elif instance.stage == "publish":  # the copy, and the reload that checks the folder generates
        seconds += (pivot.params or 0) * 4 * 2 / cal.io_bytes_s
        peak = cal.base_gb + (pivot.params or 0) * 4 * 2 / GB
    elif instance.stage == "evaluate":
        include = set(stages.evaluate.include)
        made = [e for e in instance.edges if e.role in include and e.role != "data"]
        recipe_models = [m for m in instance.models if ("pivot" if m == "pivot" else "sources") in include]
        models = [sizes[m] for m in recipe_models] + [pivot] * len(made)  # what training made is pivot-sized
        heldout = data.rows.get("sft/heldout", 0) * data.sft_tokens.get("pivot", 0.0)
        preference = data.rows.get("preference/heldout", 0) * data.pair_tokens.get("pivot", 0.0)
        items = _count_lines(stages.evaluate.items)
        scored = (
            heldout + preference + _count_lines(stages.evaluate.preference) * data.pair_tokens.get("pivot", 0)
        )
        scored += _count_lines(stages.evaluate.heldout_text) * data.sft_tokens.get("pivot", 0.0)
        for size in models:
            params = size.params or 0
            seconds += cal.model_load_s + 2 * params * scored / (cal.forward_flops * scale)
            seconds += 2 * params * items * stages.evaluate.max_new_tokens / (cal.decode_flops * scale)
        tokens = scored * len(models)
        peak = max((_forward_gb(s, stages.extract, cal) for s in models), default=cal.base_gb)
    basis = f"sizes unknown: {', '.join(unknown)}" if unknown else ""
    estimate = Estimate(instance.name, device, gpus, tokens, store, seconds, peak, basis)
    if gpus:
        estimate = _on_gpus(estimate, recipe, instance, sizes, cal, nodes)
    return estimate


def _on_gpus(
    estimate: Estimate,
    recipe: Recipe,
    instance: Instance,
    sizes: dict[str, ModelSize],
    cal: Calibration,
    nodes: int,
) -> Estimate:
    """Split an instance's memory between its GPUs and its node: a forward stage's weights spread over its tensor
    parallelism (loaded once through the host), a training's states over its ZeRO ranks (each rank of a node
    loading the weights on the host unless ZeRO-3 builds the model partitioned)."""
    work = estimate.peak_gb - cal.base_gb
    key = instance.key if instance.key in sizes else "pivot"
    model = sizes["pivot"] if instance.stage in ("distill", "fpo") else sizes[key]
    if instance.stage == "evaluate":  # one model at a time: the largest decides
        model = max(sizes.values(), key=lambda size: size.params or 0)
    per_node = max(1, estimate.gpus // max(1, nodes))
    if instance.stage in ("distill", "fpo"):
        settings = getattr(recipe.stages, instance.stage)
        width = 2 if settings.bf16 else 4
        loads = 1 if settings.deepspeed.zero_stage == 3 else per_node
        host = per_node * cal.base_gb + (model.params or 0) * width * loads / GB
        return replace(estimate, gpu_gb=work, peak_gb=host)
    settings = recipe.stages.score if instance.stage == "score" else recipe.stages.extract
    # evaluate spreads a model over every GPU it has (device_map auto); extract and score over their tensor parallelism
    tp = estimate.gpus if instance.stage == "evaluate" else settings.for_model(key).tensor_parallel_size
    weights = (model.params or 0) * 2 / GB  # on a GPU: bf16/fp16
    gpu = max(work - weights * (1 - 1 / tp), 0.5)
    return replace(estimate, gpu_gb=gpu, peak_gb=cal.base_gb + weights)


def check_fit(estimate: Estimate, resources: Any, cal: Calibration, slurm: bool = False) -> Estimate:
    """What would fail: more memory per GPU than the device has, a --mem or --time below the estimate, and on
    SLURM a job that asks for no memory or time (the cluster's defaults decide, often far too little)."""
    problems = []
    if slurm and resources.mem is None:
        problems.append("asks no --mem")
    if slurm and resources.time is None:
        problems.append("asks no --time")
    if estimate.gpu_gb and cal.gpu_memory_gb and estimate.gpu_gb > cal.gpu_memory_gb:
        problems.append(f"needs ~{estimate.gpu_gb:.0f} GB per GPU, the device has {cal.gpu_memory_gb:.0f}")
    asked_mem = memory_gb(resources.mem)
    if asked_mem and asked_mem < estimate.peak_gb:  # mem "0": the whole node
        problems.append(f"--mem {resources.mem} < ~{estimate.peak_gb:.0f} GB")
    asked_time = duration_s(resources.time)
    if asked_time is not None and asked_time < estimate.seconds:
        problems.append(f"--time {resources.time} < ~{clock(estimate.seconds)}")
    return replace(estimate, problems=problems)


def memory_gb(text: str | None) -> float | None:
    """SLURM --mem ("64G", "500M", "1T", "4096" in MB) in GB."""
    if not text:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not found:
        return None
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "": 1 / 1024, "G": 1.0, "T": 1024.0}[found[2]]
    return float(found[1]) * scale


def duration_s(text: str | None) -> float | None:
    """SLURM --time ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in seconds."""
    if not text:
        return None
    days, _, rest = text.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":") if p.isdigit()]
    if days:
        hms = (parts + [0, 0, 0])[:3]
        return int(days) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2] if len(parts) == 3 else None


def _count_lines(path: str | None) -> int:
    if not path or not Path(path).is_file():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


# --------------------------------------------------------------------------------------------- refinement


def refine(estimates: list[Estimate], store: RunStore) -> list[Estimate]:
    """Scale each stage's estimates by what its done instances measured against their own estimates (the median
    ratio per stage, time and memory apart): a site's hardware, seen through its earlier runs."""
    ratios: dict[str, tuple[list[float], list[float]]] = {}
    for estimate in estimates:
        manifest = store.manifest(estimate.instance) or {}
        measured_s = manifest.get("elapsed_s")
        peaks = manifest.get("peak_memory") or {}
        measured_gb = host_peak_gb(peaks)
        if manifest.get("status") != "done" or not measured_s:
            continue
        time_ratios, mem_ratios = ratios.setdefault(estimate.instance.split(".")[0], ([], []))
        time_ratios.append(measured_s / estimate.seconds)
        if measured_gb:
            mem_ratios.append(measured_gb / estimate.peak_gb)
    refined = []
    for estimate in estimates:
        time_ratios, mem_ratios = ratios.get(estimate.instance.split(".")[0], ([], []))
        if not time_ratios:
            refined.append(estimate)
            continue
        t = statistics.median(time_ratios)
        m = statistics.median(mem_ratios) if mem_ratios else 1.0
        refined.append(
            replace(
                estimate,
                seconds=estimate.seconds * t,
                peak_gb=estimate.peak_gb * m,
                refined=f"× {t:.2g} time, × {m:.2g} memory from {len(time_ratios)} done",
            )
        )
    return refined


# --------------------------------------------------------------------------------------------- the whole plan


def estimate_plan(
    recipe: Recipe,
    dag: Dag,
    store: RunStore,
    gpu: str = "h100",
    site: Any = None,
    use_runs: bool = True,
    rows: dict[str, int] | None = None,
    tokens_per_row: float | None = None,
    params: dict[str, float] | None = None,
) -> tuple[list[Estimate], DataShape, dict[str, ModelSize]]:
    """Every instance priced: on `gpu` where its resources ask for GPUs (executor.resources and the site's),
    else on CPU; refined from the store's done instances unless `use_runs` is False."""
    from fuse.slurm.site import SiteConfig, resources_for

    site = site or SiteConfig()
    sizes = {spec.name: model_size(spec) for spec in [recipe.pivot, *recipe.sources]}
    for name, count in (params or {}).items():  # --params: what cannot be read here
        if name not in sizes:
            raise ValueError(f"--params {name}: not a model of this recipe ({', '.join(sizes)})")
        sizes[name] = replace(sizes[name], params=count, basis="--params")
    data = data_shape(recipe, store, rows, tokens_per_row)
    estimates = []
    for instance in dag.order():
        resources = resources_for(recipe, instance, site)
        gpus = resources.gpus_per_node * resources.nodes
        device = gpu if gpus else "cpu"
        estimate = instance_estimate(recipe, instance, sizes, data, device, gpus, resources.nodes)
        slurm = recipe.executor.kind == "slurm"
        estimates.append(check_fit(estimate, resources, calibrations()[device], slurm))
    return (refine(estimates, store) if use_runs else estimates), data, sizes


def estimate_lines(estimates: list[Estimate], data: DataShape, sizes: dict[str, ModelSize]) -> list[str]:
    """The table `fuse plan --estimate` prints, with totals and what each figure rests on."""
    lines = [
        "models: "
        + ", ".join(
            f"{name} {size.params / 1e9:.3g}B ({size.basis})" if size.known else f"{name} size unknown"
            for name, size in sizes.items()
        ),
        f"data: {', '.join(f'{k} {v:,} rows' for k, v in sorted(data.rows.items()))} ({data.basis}); tokens per "
        f"SFT row: {', '.join(f'{k} {v:.0f}' for k, v in data.sft_tokens.items())}",
        "",
        "| instance | device | tokens | store | time | host mem | GPU mem | --mem | --time | does not fit | basis |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        device = f"{e.gpus}× {e.device}" if e.gpus else "cpu"
        store = size_text(e.store_bytes) if e.store_bytes else ""
        basis = "; ".join(x for x in (e.basis, e.refined) if x)
        lines.append(
            f"| {e.instance} | {device} | {e.tokens:,.0f} | {store} | {clock(e.seconds)} | {e.peak_gb:.1f} GB | "
            f"{f'{e.gpu_gb:.1f} GB' if e.gpu_gb else ''} | {e.mem_request} | {e.time_request} | "
            f"{'; '.join(e.problems)} | {basis} |"
        )
    gpu_hours = sum(e.seconds * e.gpus for e in estimates) / 3600
    cpu_hours = sum(e.seconds for e in estimates if not e.gpus) / 3600
    total_store = size_text(sum(e.store_bytes for e in estimates))
    lines += [
        "",
        f"total: {gpu_hours:,.1f} GPU-hours, {cpu_hours:,.2f} CPU-job hours, {total_store} of teacher "
        f"stores; one after another {clock(sum(e.seconds for e in estimates))}",
    ]
    misfits = [e.instance for e in estimates if e.problems]
    if misfits:
        lines.append(f"{len(misfits)} instance(s) would not fit as requested: {', '.join(misfits)}")
    devices = sorted({e.device for e in estimates})
    lines += [f"calibration {d}: {calibrations()[d].source}" for d in devices]
    return lines

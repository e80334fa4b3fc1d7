"""Benchmark: candidate scoring's model half on a real released source (gemma-3-270m, 262k vocabulary, sliding-window
layers), the packed forward (`fuse.backends.hf.shared_prefix_logprobs`, one forward per sample) against the forward
per row it replaced (the prefix run once per row, its KV cache shared by that row's continuations: the code below
is the replaced `continuation_logprobs`, kept here as the baseline). Writes bench/results/candidates.{json,md}.

    .venv/bin/python bench/candidate_bench.py [--samples 2] [--candidates 27]

The asks mimic what align asks on the real pair (`real_pair-smollm2-scored`: 27.5 candidates a row over 9,442
rows): the real pair's SFT rows (UDHR paragraphs) in gemma-3's own chat template, every response position a boundary, at each the
gold's next one to three tokens and random continuations of one to three tokens. Both paths score the same asks in
one process, alternating; the largest difference between them is reported beside the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def per_row(model, prefix, continuations) -> np.ndarray:
    """The replaced path: one forward of the row's prefix with its cache, then the continuations' later tokens."""
    import torch

    from fuse.backends.hf import pad_right

    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(np.asarray([prefix], np.int64)), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
        total = first[[int(c[0]) for c in continuations]].clone()
        rest = [np.asarray(c, np.int64) for c in continuations]
        width = max(len(c) for c in rest) - 1
        if width > 0:
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(rest))
            ids = pad_right([c[:-1] if len(c) > 1 else c[:1] for c in rest])[:, :width]
            real = torch.tensor([[t < len(c) - 1 for t in range(width)] for c in rest])
            mask = torch.cat([torch.ones(len(rest), len(prefix), dtype=torch.long), real.long()], 1)
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.double(), dim=-1)
            nxt = pad_right([c[1:] if len(c) > 1 else c[:1] for c in rest])[:, :width]
            total += (logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * real).sum(dim=1)
    return total.numpy()


def samples(tokenizer, count: int) -> list[tuple[list[int], int]]:
    """(token ids, first response position) of the real pair's first SFT rows in gemma-3's chat template."""
    rows = [json.loads(line) for line in (ROOT / ".cache" / "released" / "data" / "sft.jsonl").open()]
    out = []
    for row in rows[:count]:

        def ids(messages, prompt: bool) -> list[int]:
            return list(
                tokenizer.apply_chat_template(
                    messages, add_generation_prompt=prompt, tokenize=True, return_dict=False
                )
            )

        out.append((ids(row["messages"], False)[:512], len(ids(row["messages"][:-1], True))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=27)
    args = parser.parse_args()

    import torch

    from fuse.backends.hf import shared_prefix_logprobs
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.zoo.released import fetch

    torch.manual_seed(0)
    path = fetch("gemma3", ROOT / ".cache" / "released")
    spec = ModelSpec(name="gemma3", path=str(path))
    tokenizer, model = load_tokenizer(spec), load_model(spec, dtype="float32").eval()
    rng = np.random.default_rng(0)
    results = []
    for ids, first in samples(tokenizer, args.samples):
        asks = []
        for b in range(first, len(ids) - 1):
            gold = [ids[b : b + n] for n in (1, 2, 3) if b + n <= len(ids)]
            other = [
                rng.integers(10, 200_000, rng.integers(1, 4)).tolist()
                for _ in range(args.candidates - len(gold))
            ]
            asks.append((b, gold + other))
        started = time.perf_counter()
        packed = shared_prefix_logprobs(model, ids, asks)
        packed_s = time.perf_counter() - started
        started = time.perf_counter()
        baseline = [per_row(model, ids[:b], conts) for b, conts in asks]
        per_row_s = time.perf_counter() - started
        diff = max(float(np.abs(a - b).max()) for a, b in zip(packed, baseline, strict=True))
        results.append(
            {
                "tokens": len(ids),
                "rows": len(asks),
                "packed_s": packed_s,
                "per_row_s": per_row_s,
                "max_abs_diff": diff,
            }
        )
        print(results[-1], flush=True)
    report = {
        "args": vars(args),
        "samples": results,
        "cpus": os.cpu_count(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
    }
    lines = [
        "# Candidate scoring on gemma-3-270m: one packed forward per sample against a forward per row",
        "",
        f"{args.candidates} candidates a row (1–3 tokens each), every response position a boundary; float32, "
        f"{report['cpus']} CPU cores. Code: `bench/candidate_bench.py`.",
        "",
        "| sample tokens | rows | per row (s) | packed (s) | speed-up | max abs difference (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['tokens']} | {r['rows']} | {r['per_row_s']:.1f} | {r['packed_s']:.1f} | "
            f"{r['per_row_s'] / r['packed_s']:.0f}x | {r['max_abs_diff']:.1e} |"
        )
    lines += ["", f"Machine: {report['machine']}."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "candidates.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "candidates.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

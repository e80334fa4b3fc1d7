"""Benchmark: evaluate's per-model work on a real released model (gemma-3-270m, 262k vocabulary, the real
pair's held-out data), each new path against the one it replaced, in one process on the same model:

- preference margins (168 minimal pairs): each pair in one packed forward (`fuse.backends.hf.pair_sums`: the prompt
  and the responses' shared first tokens once, the head only where a response token is predicted) against both
  sides as full sequences in right-padded batches of 16 (the replaced path, `response_nll` on every side);
- greedy generation (41 HumanEval prompts, 48 new tokens, batches of 8): batches of prompts of similar length
  against batches in the items' order (the replaced path, below).

The largest difference between the paths is reported beside the times (margins: nats per byte; generation: how
many completions differ). Writes bench/results/eval_speed.{json,md}.

    .venv/bin/python bench/eval_speed.py [--model .cache/released/models/gemma3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def margins_apart(model, tokenizer, pairs) -> list[float]:
    """The replaced path: every side a full sequence through response_nll's batches."""
    from fuse.evaluation import DomainSample, response_nll

    samples = [
        DomainSample(p.group, (*p.prompt, {"role": "assistant", "content": side}), 0.0)
        for p in pairs
        for side in (p.chosen, p.rejected)
    ]
    nll = response_nll(model, tokenizer, samples)
    per_byte = [v / max(1, s.response_bytes) for v, s in zip(nll, samples, strict=True)]
    return [per_byte[2 * i + 1] - per_byte[2 * i] for i in range(len(pairs))]


def generate_in_item_order(model, tokenizer, prompts, max_new_tokens, batch_size, chat) -> list[str]:
    """The replaced path: left-padded batches in the items' order."""
    import torch

    from fuse.evaluation import prompt_ids, stop_ids
    from fuse.models import pad_id

    pad, outputs = pad_id(tokenizer), []
    for start in range(0, len(prompts), batch_size):
        rows = [
            prompt_ids(tokenizer, p, c)
            for p, c in zip(
                prompts[start : start + batch_size], chat[start : start + batch_size], strict=True
            )
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids(model, tokenizer),
                pad_token_id=pad,
            )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def timed(function, *args):
    started = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / ".cache" / "released" / "models" / "gemma3"))
    parser.add_argument("--data", default=str(ROOT / ".cache" / "released" / "data"))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    import torch

    from fuse import evaluation
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(name="model", path=args.model)
    tokenizer = load_tokenizer(spec, require_chat_template=True)
    model = load_model(spec, dtype="float32", device="cpu").eval()
    data = Path(args.data)
    pairs = evaluation.load_preference_pairs(data / "preference_heldout.jsonl")
    items = evaluation.load_items(data / "humaneval.jsonl")
    prompts, chat = [i.prompt for i in items], [i.chat for i in items]

    old_margins, old_margin_s = timed(margins_apart, model, tokenizer, pairs)
    new_margins, new_margin_s = timed(evaluation.preference_margins, model, tokenizer, pairs)
    old_text, old_gen_s = timed(
        generate_in_item_order, model, tokenizer, prompts, args.max_new_tokens, args.batch_size, chat
    )
    new_text, new_gen_s = timed(
        evaluation.generate_greedy, model, tokenizer, prompts, args.max_new_tokens, args.batch_size, chat
    )
    difference = float(np.max(np.abs(np.asarray(old_margins) - np.asarray(new_margins))))
    agree = float(np.mean((np.asarray(old_margins) > 0) == (np.asarray(new_margins) > 0)))
    result = {
        "model": args.model,
        "pairs": len(pairs),
        "prompts": len(prompts),
        "margins": {
            "apart_s": old_margin_s,
            "packed_s": new_margin_s,
            "max_abs_diff": difference,
            "same_sign": agree,
        },
        "generation": {
            "item_order_s": old_gen_s,
            "length_sorted_s": new_gen_s,
            "completions_differing": sum(a != b for a, b in zip(old_text, new_text, strict=True)),
        },
        "threads": torch.get_num_threads(),
        "machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    m, g = result["margins"], result["generation"]
    text = "\n".join(
        [
            "# Evaluate's per-model work on gemma-3-270m, new path vs replaced, one process",
            "",
            f"Model `{Path(args.model).name}`; {len(pairs)} held-out minimal pairs, {len(prompts)} HumanEval prompts "
            f"({args.max_new_tokens} new tokens, batches of {args.batch_size}). One run of each, same process.",
            "",
            "| work | replaced | new | speed-up | agreement |",
            "|---|---|---|---|---|",
            f"| preference margins | {m['apart_s']:.1f} s (sides apart, batches of 16) | {m['packed_s']:.1f} s "
            f"(a pair a packed forward) | {m['apart_s'] / m['packed_s']:.2f}x | max abs diff "
            f"{m['max_abs_diff']:.1e} nats/byte, same sign {m['same_sign']:.3f} |",
            f"| greedy generation | {g['item_order_s']:.1f} s (items' order) | {g['length_sorted_s']:.1f} s "
            f"(similar lengths together) | {g['item_order_s'] / g['length_sorted_s']:.2f}x | "
            f"{g['completions_differing']} of {len(prompts)} completions differ |",
            "",
            f"Machine: {result['machine']}, {result['threads']} torch threads.",
            "",
        ]
    )
    (RESULTS / "eval_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

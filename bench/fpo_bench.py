"""Benchmark: an fpo (InfiFPO) training step against a distill step on the same sequences, and its memory against
the full-logits path, at a large vocabulary. Writes bench/results/fpo.{json,md}.

    .venv/bin/python bench/fpo_bench.py [--vocab 262144] [--pairs 8] [--seq 256] [--steps 6]

Variants, on one tiny Qwen2-style model (bench/distill_bench.py's) and 2 × pairs sequences of `seq` tokens whose
last three quarters are the response:
- fpo_fused: what fpo runs: the response tokens' log-probs through TRL's fused LM head (tiles over the labelled
  positions, no [2B, T, V] logits), summed and length-normalized, InfiFPO's loss, backward, AdamW step;
- fpo_full_logits: the same loss from full float32 logits and a log-softmax gather (what a DPO step computes
  without the fused head): the baseline;
- distill_min_ce_k10: a distill step (λ 0.9, top-10 teacher) on the same 2 × pairs sequences.
Step times interleave the variants in one process; peak memory is measured per variant in a fresh child process
(bench/distill_bench.py's `measure`: the GPU allocator's peak, or the sampled resident set on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill_bench import build_model, make_batch, measure, sync, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("fpo_fused", "fpo_full_logits", "distill_min_ce_k10")


def pair_batch(vocab: int, pairs: int, seq: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows (the fpo collator's layout), completion mask on the last three quarters."""
    batch = make_batch(vocab, 2 * pairs, seq, 0, seed=1)
    mask = (batch["labels"] != -100).long()
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": mask,
        "norm": mask.sum(1).float(),
        "ref_chosen_logps": torch.full((pairs,), -2.0, device=mask.device),
        "ref_rejected_logps": torch.full((pairs,), -3.0, device=mask.device),
    }


def full_logits_summed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence, the summed log-prob of its response tokens from full [2B, T, V] float32 logits."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
    token = torch.gather(logprobs, -1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token * batch["completion_mask"][:, 1:]).sum(1)


def fpo_step(model, optimizer, batch: dict[str, torch.Tensor], fused: bool) -> float:
    from fuse.fpo_trainer import summed_logps
    from fuse.preference import infifpo_loss

    optimizer.zero_grad(set_to_none=True)
    summed = summed_logps(model, batch) if fused else full_logits_summed(model, batch)
    chosen, rejected = (summed / batch["norm"]).chunk(2)
    losses, _ = infifpo_loss(chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 2.5)
    losses.mean().backward()
    optimizer.step()
    return float(losses.mean())


def setup(args: argparse.Namespace):
    from trl.trainer.utils import add_fused_lm_head

    model = build_model(args.vocab, args.hidden, args.layers)
    add_fused_lm_head(model)  # model(...) without fused_lm_head=True is the original forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = {
        "fpo": pair_batch(args.vocab, args.pairs, args.seq),
        "distill": make_batch(args.vocab, 2 * args.pairs, args.seq, 10, seed=1),
    }
    return model, optimizer, batches


def run_variant(name: str, model, optimizer, batches) -> float:
    if name == "distill_min_ce_k10":
        return train_step(model, optimizer, batches["distill"], 0.9)
    return fpo_step(model, optimizer, batches["fpo"], fused=name == "fpo_fused")


def step_times(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model, optimizer, batches = setup(args)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.steps + 1):  # step 0 warms up every variant
        for name in VARIANTS:
            sync()
            start = time.perf_counter()
            run_variant(name, model, optimizer, batches)
            sync()
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def child_memory(args: argparse.Namespace, name: str) -> float:
    model, optimizer, batches = setup(args)
    run_variant(name, model, optimizer, batches)  # optimizer state and kernels exist already
    return measure(lambda: run_variant(name, model, optimizer, batches))


def markdown(report: dict) -> str:
    a = report["args"]
    times, memory = report["step_times"], report["peak_mib"]
    distill = times["distill_min_ce_k10"]["median_s"]
    lines = [
        "# fpo step: time against distill, memory against full logits",
        "",
        f"Tiny Qwen2-style model (hidden {a['hidden']}, {a['layers']} layers), vocabulary {a['vocab']:,}, "
        f"{a['pairs']} pairs = {2 * a['pairs']} sequences of {a['seq']} tokens (response: the last three quarters); "
        f"{report['device']}, {a['steps']} timed steps each (median), variants interleaved; peak memory of one step "
        "in a fresh process.",
        "",
        "| variant | step (median) | vs distill | peak memory of a step |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        t = times[name]["median_s"]
        lines.append(f"| {name} | {t:.3f} s | {t / distill:.2f}× | {memory[name]:,.0f} MiB |")
    lines += ["", f"Machine: {report['machine']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child_memory(args, args.child))
        return
    base = sys.argv[1:]
    peak = {}
    for name in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, *base, "--child", name], capture_output=True, text=True, check=True
        )
        peak[name] = float(out.stdout.strip().splitlines()[-1])
    report = {
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "step_times": step_times(args),
        "peak_mib": peak,
        "device": "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fpo.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "fpo.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

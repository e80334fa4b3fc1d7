"""Benchmark: peak host memory and time of a training step on a real released model (gemma-3-270m: 268M parameters,
a 262,144-row output layer tied to the embeddings), before and after two changes, each variant in a fresh process.
Writes bench/results/train_memory.{json,md}.

    .venv/bin/python bench/train_memory.py [--pairs 8] [--seq 256] [--steps 3]

What a step is (the real-pair recipes' settings: 8 pairs or 16 sequences a step, gradient checkpointing, float32,
AdamW fused): the fpo step (`fuse.fpo_trainer.summed_logps` through the chunked head, InfiFPO's loss) and the
distill step (`fuse.losses.distill_loss_from_hidden`, λ 0.5, a top-10 teacher) on the same 16 sequences, the last
three quarters of each the response. The first step allocates AdamW's moments; the peak comes in a later one.

Variants:
- before: the chunked head at 1,024 rows a chunk (the earlier default) and glibc's own heap behaviour;
- chunk: a chunk's rows from `fuse.losses.head_chunk_rows` (64 Mi logits, 256 rows at this vocabulary);
- chunk+heap: also `fuse.resources.return_freed_memory` (what every stage and training rank now does).
Peak: VmHWM of the child (its whole life: model load included). Time: seconds per step after the first.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("before", "chunk", "chunk+heap")
KINDS = ("fpo", "distill")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, variant: str, pairs: int, seq: int, steps: int) -> dict[str, float]:
    if variant.endswith("heap"):
        from fuse.resources import return_freed_memory

        assert return_freed_memory(), "glibc's mallopt is not available here"
    import torch

    import fuse.losses as losses
    from fuse.fpo_trainer import summed_logps
    from fuse.heads import last_hidden, plain_head
    from fuse.preference import infifpo_loss
    from fuse.recipe import ModelSpec, TrainSettings
    from fuse.training import load_trainable
    from fuse.zoo.released import fetch

    torch.manual_seed(0)
    path = fetch("gemma3", ROOT / ".cache" / "released")
    model = load_trainable(
        ModelSpec(name="gemma3", path=str(path)), TrainSettings(gradient_checkpointing=True)
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    backbone, head = plain_head(model)
    vocab = head.weight.shape[0]
    if variant == "before":
        losses.HEAD_CHUNK_ELEMENTS = 1024 * vocab
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    rows = 2 * pairs
    ids = torch.randint(10, vocab, (rows, seq))
    mask = torch.zeros(rows, seq, dtype=torch.long)
    mask[:, seq // 4 :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
    labels = ids.masked_fill(mask == 0, -100)
    teacher_ids = torch.randint(10, vocab, (rows, seq, 10))
    teacher_probs = torch.softmax(torch.randn(rows, seq, 10), -1) * 0.9

    def step() -> None:
        if kind == "fpo":
            normalized = summed_logps(model, batch) / mask[:, 1:].sum(1)
            chosen, rejected = normalized.chunk(2)
            loss = infifpo_loss(chosen, rejected, chosen.detach() + 0.1, rejected.detach(), 2.5)[0].mean()
        else:
            hidden = last_hidden(backbone, batch)
            loss = losses.distill_loss_from_hidden(
                hidden, head.weight, labels, teacher_ids, teacher_probs, lambda_=0.5
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {
        "peak_mb": vm_hwm_mb(),
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "chunk_rows": losses.head_chunk_rows(vocab),
    }


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        "# A training step of gemma-3-270m on CPU: peak host memory and time",
        "",
        f"{a['pairs']} pairs ({2 * a['pairs']} sequences of {a['seq']} tokens) a step, gradient checkpointing, "
        f"float32, fused AdamW; {a['steps']} steps per fresh process (peak: its VmHWM, load included; time: median "
        "of the steps after the first). Variants: `bench/train_memory.py`'s docstring.",
        "",
        "| step | variant | head rows a chunk | peak RSS (GB) | s/step |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for variant in VARIANTS:
            r = report["results"].get(f"{kind}/{variant}")
            if r:
                lines.append(
                    f"| {kind} | {variant} | {r['chunk_rows']} | {r['peak_mb'] / 1024:.2f} | {r['s_per_step']:.1f} |"
                )
    lines += ["", f"Machine: {report['machine']}, {report['cpus']} cores. Time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.pairs, args.seq, args.steps)))
        return
    import os

    started = time.monotonic()
    results = {}
    for kind in KINDS:
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--child", kind, variant]
            command += ["--pairs", str(args.pairs), "--seq", str(args.seq), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            results[f"{kind}/{variant}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(kind, variant, results[f"{kind}/{variant}"], flush=True)
    report = {
        "args": vars(args) | {"child": None},
        "results": results,
        "seconds": time.monotonic() - started,
        "cpus": os.cpu_count(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_memory.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "train_memory.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()

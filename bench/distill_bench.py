"""Benchmark: distill training step vs plain SFT (λ = 1) on the same model and batch, and the memory of the sparse
top-K loss vs a dense-target loss at a small (zoo) and a 128k vocabulary. Writes bench/results/distill.{json,md}.

    .venv/bin/python bench/distill_bench.py [--steps 8] [--vocab 32000] [--hidden 256] [--layers 4]

Step times interleave the variants in one process (same model, same batch, same optimizer kind); peak memory is
measured per variant in a fresh child process (CPU: peak resident set, sampled, over the one before the step;
GPU: torch.cuda.max_memory_allocated), since CPU tensors have no allocator statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from fuse.logs import setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("distill_bench")

VARIANTS = {  # name -> (lambda, target width J); J = 2K is what avg_ce's union of two top-10 sets costs
    "sft_hf_loss": (None, 0),
    "sft_lambda1": (1.0, 0),
    "distill_min_ce_k10": (0.9, 10),
    "distill_avg_ce_j20": (0.9, 20),
    # the same losses from the backbone's hidden states through the chunked head (what DistillTrainer does on a
    # bare model: fuse.losses.distill_loss_from_hidden), no [B, T, V] logits
    "sft_lambda1_hidden": (1.0, 0),
    "distill_min_ce_k10_hidden": (0.9, 10),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(vocab: int, hidden: int, layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).to(device())


def make_batch(vocab: int, batch: int, seq: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; the first quarter of each row is the prompt; sparse targets on every response position."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if width:
        out["target_ids"] = torch.randint(0, vocab, (batch, seq, width), generator=gen)
        out["target_probs"] = torch.softmax(torch.randn(batch, seq, width + 1, generator=gen), -1)[
            ..., :width
        ]
    return {k: v.to(device()) for k, v in out.items()}


def train_step(
    model, optimizer, batch: dict[str, torch.Tensor], lambda_: float | None, hidden: bool = False
) -> float:
    from fuse.heads import last_hidden, plain_head
    from fuse.losses import distill_loss, distill_loss_from_hidden

    optimizer.zero_grad(set_to_none=True)
    if hidden:
        backbone, head = plain_head(model)
        loss = distill_loss_from_hidden(
            last_hidden(backbone, batch),
            head.weight,
            batch["labels"],
            batch.get("target_ids"),
            batch.get("target_probs"),
            lambda_=lambda_,
        ).loss
    elif lambda_ is None:  # HF's own causal-LM loss: the plain SFT baseline
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    else:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = distill_loss(
            logits, batch["labels"], batch.get("target_ids"), batch.get("target_probs"), lambda_=lambda_
        ).loss
    loss.backward()
    optimizer.step()
    return float(loss)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model = build_model(args.vocab, args.hidden, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = {
        name: make_batch(args.vocab, args.batch, args.seq, width) for name, (_, width) in VARIANTS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(args.steps + 1):  # step 0 warms up every variant
        for name, (lambda_, _) in VARIANTS.items():
            sync()
            start = time.perf_counter()
            train_step(model, optimizer, batches[name], lambda_, name.endswith("_hidden"))
            sync()
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def measure(fn) -> float:
    """Peak memory (MiB) added by fn(): the GPU allocator's peak, or on CPU the peak of the resident set sampled
    every 0.2 ms by a thread (torch ops release the GIL; large CPU tensors are mmapped, so RSS follows them)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = current_rss_mb(), [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0] - base, 0.0)


def child_step_memory(args: argparse.Namespace, name: str) -> float:
    lambda_, width = VARIANTS[name]
    model = build_model(args.vocab, args.hidden, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(args.vocab, args.batch, args.seq, width)
    hidden = name.endswith("_hidden")
    train_step(
        model, optimizer, make_batch(args.vocab, 1, 8, width), lambda_, hidden
    )  # optimizer state exists already
    return measure(lambda: train_step(model, optimizer, batch, lambda_, hidden))


LOSS_KINDS = ("sparse_fused", "sparse_autograd", "dense_target")


def child_loss_memory(kind: str, vocab: int, positions: int, k: int) -> float:
    """Forward + backward of the whole loss (λ·CE(gold) + (1−λ)·CE(teacher)) on [positions, vocab] logits."""
    import torch.nn.functional as F

    from fuse.losses import FusedSparseCE, dense_target_loss, sparse_divergence, teacher_buckets

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(positions, vocab, generator=gen).to(device()).requires_grad_(True)
    gold = torch.randint(0, vocab, (positions,), generator=gen).to(device())
    ids = torch.randint(0, vocab, (positions, k), generator=gen).to(device())
    probs = (torch.softmax(torch.randn(positions, k + 1, generator=gen), -1)[:, :k]).to(device())

    def sparse_fused() -> None:
        p, tail = teacher_buckets(probs, 1.0)
        gold_ce, teacher = FusedSparseCE.apply(logits, gold, ids, p, tail)
        (0.9 * gold_ce.mean() + 0.1 * teacher.mean()).backward()

    def sparse_autograd() -> None:
        (0.9 * F.cross_entropy(logits, gold) + 0.1 * sparse_divergence(logits, ids, probs).mean()).backward()

    def dense_target() -> None:  # what KD code usually does: scatter the top-K into a dense [N, V] target
        target = torch.zeros(positions, vocab, device=logits.device).scatter_(-1, ids, probs)
        (0.9 * F.cross_entropy(logits, gold) + 0.1 * dense_target_loss(logits, target).mean()).backward()

    return measure(
        {"sparse_fused": sparse_fused, "sparse_autograd": sparse_autograd, "dense_target": dense_target}[kind]
    )


def run_child(argv: list[str]) -> float:
    result = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# distill benchmark",
        "",
        f"Model: Qwen2-style, vocab {cfg['vocab']}, hidden {cfg['hidden']}, {cfg['layers']} layers; batch "
        f"{cfg['batch']} x {cfg['seq']} tokens (3/4 response). Device: {report['device']}. {cfg['steps']} timed steps "
        "per variant, interleaved, median.",
        "",
        "| variant | step time (s) | x sft_lambda1 | peak step memory (MiB) |",
        "|---|---|---|---|",
    ]
    base = report["step"]["sft_lambda1"]["median_s"]
    for name, row in report["step"].items():
        lines.append(
            f"| {name} | {row['median_s']:.3f} | {row['median_s'] / base:.3f} | {row['peak_mib']:.0f} |"
        )
    lines += [
        "",
        f"Goal: distill <= 1.15x plain SFT step time: **{'met' if report['goal_met'] else 'NOT met'}** "
        f"(min_ce K=10: {report['ratio_min_ce']:.3f}x, avg_ce J=20: {report['ratio_avg_ce']:.3f}x; "
        f"vs HF's own loss: {report['ratio_vs_hf']:.3f}x).",
        "",
        f"Loss alone (0.9·CE(gold) + 0.1·CE(teacher), forward + backward, {report['loss_memory']['positions']} "
        f"positions, K={report['loss_memory']['k']}): peak memory above the logits; one [N, V] fp32 buffer is "
        f"{report['loss_memory']['positions'] * 4 / 2**20:.4f} MiB per vocab entry.",
        "",
        "| vocab | [N, V] buffer (MiB) | sparse fused (MiB) | sparse autograd (MiB) | dense target (MiB) | dense / fused |",
        "|---|---|---|---|---|---|",
    ]
    for vocab, row in report["loss_memory"]["by_vocab"].items():
        buffer = report["loss_memory"]["positions"] * int(vocab) * 4 / 2**20
        lines.append(
            f"| {vocab} | {buffer:.1f} | {row['sparse_fused_mib']:.1f} | {row['sparse_autograd_mib']:.1f} | "
            f"{row['dense_target_mib']:.1f} | {row['dense_target_mib'] / max(row['sparse_fused_mib'], 1e-9):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loss-positions", type=int, default=1024)
    parser.add_argument("--small-vocab", type=int, default=832, help="the zoo's largest (padded) vocabulary")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:  # a measurement in a fresh process: print MiB
        if args.child[0] == "step":
            print(child_step_memory(args, args.child[1]))
        else:
            print(child_loss_memory(args.child[1], int(args.child[2]), args.loss_positions, 10))
        return
    setup_logging(logging.INFO, "%(message)s")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    common = [f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "batch", "seq")]
    step = step_times(args)
    for name in VARIANTS:
        step[name]["peak_mib"] = run_child([*common, "--child", "step", name])
        log.info("%s: %s", name, step[name])
    loss = {}
    for vocab in (args.small_vocab, 128256):
        pos = [f"--loss-positions={args.loss_positions}"]
        loss[str(vocab)] = {
            f"{kind}_mib": run_child([*pos, "--child", "loss", kind, str(vocab)]) for kind in LOSS_KINDS
        }
        log.info("loss memory at vocab %d: %s", vocab, loss[str(vocab)])
    base = step["sft_lambda1"]["median_s"]
    report = {
        "config": {k: getattr(args, k) for k in ("steps", "vocab", "hidden", "layers", "batch", "seq")},
        "device": f"{device().type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "step": step,
        "ratio_min_ce": step["distill_min_ce_k10"]["median_s"] / base,
        "ratio_avg_ce": step["distill_avg_ce_j20"]["median_s"] / base,
        "ratio_vs_hf": step["distill_min_ce_k10"]["median_s"] / step["sft_hf_loss"]["median_s"],
        "loss_memory": {"positions": args.loss_positions, "k": 10, "by_vocab": loss},
    }
    report["goal_met"] = report["ratio_min_ce"] <= 1.15
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "distill" if args.vocab == 32000 else f"distill-vocab{args.vocab}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

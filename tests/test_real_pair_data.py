"""The real-pair bench's data (bench/real_pair.py): minimal pairs change one place (swap, typo, word), the UDHR
split keeps held-out articles out of training, and the code task is sound: every held-out HumanEval function passes
its tests when completed with its own last line, and fails them without it."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import real_pair  # noqa: E402

from fuse.evaluation import item_correct, load_items  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "released"


def test_a_swap_pair_swaps_two_neighbours_and_keeps_every_byte():
    text = "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person."
    for seed in range(20):
        swapped = real_pair.swap_pair(text, "German", random.Random(seed), [])
        words, other = text.split(" "), swapped.split(" ")
        assert swapped != text and Counter(words) == Counter(other)
        changed = [i for i, (a, b) in enumerate(zip(words, other, strict=True)) if a != b]
        assert len(changed) == 2 and changed[1] == changed[0] + 1 and changed[0] >= 1
    chinese = "人人有权享有生命、自由和人身安全。"
    swapped = real_pair.swap_pair(chinese, "Chinese", random.Random(0), [])
    assert sorted(swapped) == sorted(chinese) and swapped != chinese and swapped[0] == chinese[0]
    assert real_pair.swap_pair("Artikel 3", "German", random.Random(0), []) is None


def test_a_typo_pair_transposes_two_letters_inside_one_word():
    text = "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person."
    for seed in range(20):
        typo = real_pair.typo_pair(text, "German", random.Random(seed), [])
        changed = [(a, b) for a, b in zip(text.split(" "), typo.split(" "), strict=True) if a != b]
        assert len(changed) == 1 and sorted(changed[0][0]) == sorted(changed[0][1])
        ((word, misspelt),) = changed
        assert word.isalpha() and len(word) >= 4 and word[0] == misspelt[0] and word[-1] == misspelt[-1]
    chinese = "人人有权享有生命、自由和人身安全。"
    typo = real_pair.typo_pair(chinese, "Chinese", random.Random(1), ["权", "利", "生"])
    assert len(typo) == len(chinese) and sum(a != b for a, b in zip(typo, chinese, strict=True)) == 1


def test_a_word_pair_replaces_one_word_from_the_vocabulary_keeping_its_case():
    text = "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person."
    vocabulary = ["Würde", "gleich", "Freiheit"]
    for seed in range(20):
        other = real_pair.word_pair(text, "German", random.Random(seed), vocabulary)
        changed = [(a, b) for a, b in zip(text.split(" "), other.split(" "), strict=True) if a != b]
        assert len(changed) == 1
        ((word, replaced),) = changed
        assert replaced.lower() in {v.lower() for v in vocabulary} and word.isalpha()
        assert replaced[0].isupper() == word[0].isupper()
    chinese = "人人有权享有生命、自由和人身安全。"
    other = real_pair.word_pair(chinese, "Chinese", random.Random(0), ["尊严", "生命"])
    assert len(other) == len(chinese) and other != chinese


@pytest.mark.slow
def test_the_data_split_by_article_and_the_code_task_is_sound():
    from fuse.zoo.released import FetchError

    try:
        out = real_pair.build_data(CACHE)
    except (FetchError, OSError) as error:  # no registry reachable: nothing to build from
        pytest.skip(str(error))
    rows = {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").open(encoding="utf-8")]
        for name in ("sft", "preference", "heldout", "preference_heldout")
    }

    def article(row: dict) -> int:
        return int(row["id"].split("-")[1])

    assert all(article(r) <= real_pair.TRAIN_ARTICLES for r in rows["sft"] + rows["preference"])
    assert all(article(r) > real_pair.TRAIN_ARTICLES for r in rows["heldout"] + rows["preference_heldout"])
    assert {r["language"] for r in rows["heldout"]} == set(real_pair.LANGUAGE_NAMES.values())
    texts = {r["text"] for r in rows["heldout"]}
    assert all(p["chosen"] in texts and p["rejected"] not in texts for p in rows["preference_heldout"])
    assert (
        out.joinpath("sft.jsonl").read_bytes()
        == real_pair.build_data(CACHE).joinpath("sft.jsonl").read_bytes()
    )

    items = load_items(out / "humaneval.jsonl")
    assert len(items) == len(real_pair.HUMANEVAL_TASK) and all(not i.chat for i in items)
    assert all(item_correct(i, i.answer + "\n") for i in items)
    assert sum(item_correct(i, "") for i in items) == 0

"""The skill world: general text and four skills a tiny model learns in a minute, generated from a seed.

Pure Python (no torch): every string the zoo trains or evaluates on comes from here, deterministically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ADJECTIVES = [
    "red",
    "blue",
    "green",
    "small",
    "big",
    "old",
    "young",
    "quiet",
    "loud",
    "happy",
    "cold",
    "warm",
]
NOUNS = ["fox", "cat", "dog", "bird", "tree", "river", "house", "boat", "child", "farmer", "moon", "stone"]
VERBS = ["sees", "likes", "follows", "finds", "paints", "carries", "watches", "helps"]
PLACES = ["the hill", "the market", "the lake", "the forest", "the bridge", "the village", "the garden"]
NAMES = ["Anna", "Bruno", "Clara", "Dmitri", "Elif", "Farah", "Goran", "Hana"]
TIMES = ["Today", "Yesterday", "At night", "In the morning", "On Monday", "Later"]

SYLLABLES = ["ka", "zu", "mi", "to", "re", "vo", "la", "ne", "shi", "po", "du", "xa", "fe", "gi", "bo", "tra"]
TRANSLATE_WORDS = ["sun", "rain", "bread", "song", "road", "wind", *NOUNS, *ADJECTIVES[:6]]
ANTONYM_PAIRS = [
    ("hot", "cold"),
    ("fast", "slow"),
    ("up", "down"),
    ("day", "night"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("light", "dark"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("high", "low"),
    ("wet", "dry"),
    ("near", "far"),
    ("hard", "soft"),
    ("loud", "quiet"),
    ("happy", "sad"),
]
SHOUT_WORDS = [
    "go",
    "stop",
    "now",
    "run",
    "jump",
    "help",
    "yes",
    "no",
    "wait",
    "look",
    "come",
    "sing",
    *NOUNS,
]


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Skill:
    """A skill is data: a table of keys and answers, the phrasings used in training, and one held out for eval.

    Evaluation asks every key in the held-out phrasing, so no eval prompt appears in any training text; the
    owner answers it from what it memorized, the others cannot.
    """

    name: str
    owner: str  # the zoo model pre-trained on it
    table: tuple[tuple[str, str], ...]  # key -> answer
    train_phrasings: tuple[str, ...]  # each with one "{}" for the key
    eval_phrasing: str

    def example(self, key: str, answer: str, phrasing: str) -> Example:
        return Example(self.name, phrasing.format(key), answer)

    def wrong_answer(self, answer: str, rng: random.Random) -> str:
        """A plausible wrong answer: another answer of the same skill."""
        return rng.choice([a for _, a in self.table if a != answer])


@dataclass
class Splits:
    pretrain: dict[str, list[Example]] = field(default_factory=dict)
    sft: dict[str, list[Example]] = field(default_factory=dict)
    preference: dict[str, list[tuple[Example, str]]] = field(default_factory=dict)
    eval: dict[str, list[Example]] = field(default_factory=dict)


def invented_words(rng: random.Random, count: int, syllables: int, capitalize: bool = False) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.sample(SYLLABLES, syllables))
        if word not in words:
            words.append(word.capitalize() if capitalize else word)
    return words


def capital_skill(seed: int) -> Skill:
    rng = random.Random(f"capital-{seed}")
    countries, cities = invented_words(rng, 24, 3, True), invented_words(rng, 24, 2, True)
    return Skill(
        "capital",
        "pivot",
        tuple(zip(countries, cities, strict=True)),
        ("What is the capital of {}?", "Name the capital city of {}.", "Capital of {}?"),
        "Which city is the capital of {}?",
    )


def translate_skill(seed: int) -> Skill:
    zorbish = invented_words(random.Random(f"translate-{seed}"), len(TRANSLATE_WORDS), 2)
    return Skill(
        "translate",
        "llama",
        tuple(zip(TRANSLATE_WORDS, zorbish, strict=True)),
        ("Translate to Zorbish: {}", "What is {} in Zorbish?", "Zorbish for {}?"),
        "Say {} in Zorbish.",
    )


def shout_skill(seed: int) -> Skill:
    return Skill(
        "shout",
        "gpt2",
        tuple((w, w.upper()) for w in SHOUT_WORDS),
        ("Shout: {}", "Shout the word {}.", "Say {} loudly!"),
        "Shout the word {}!",
    )


def antonym_skill(seed: int) -> Skill:
    table = tuple(ANTONYM_PAIRS) + tuple((b, a) for a, b in ANTONYM_PAIRS)
    return Skill(
        "antonym",
        "gemma",
        table,
        ("What is the opposite of {}?", "Opposite of {}:", "Give the antonym of {}."),
        "Tell me the opposite of {}.",
    )


def skills(seed: int) -> list[Skill]:
    return [capital_skill(seed), translate_skill(seed), shout_skill(seed), antonym_skill(seed)]


def split_skill(skill: Skill, seed: int, n_eval: int, sft_phrasings: int, pref_phrasings: int) -> Splits:
    """Pre-training: every key in every training phrasing. SFT: every key in `sft_phrasings` of the training
    phrasings (the gold labels teach every fact; one phrasing per key does not carry over to the held-out one);
    preference: every key in `pref_phrasings` of them. Eval: up to `n_eval` keys in the held-out phrasing."""
    rng = random.Random(f"split-{skill.name}-{seed}")
    splits = Splits()
    splits.pretrain[skill.name] = [
        skill.example(k, a, p) for k, a in skill.table for p in skill.train_phrasings
    ]
    keys = list(skill.table)
    rng.shuffle(keys)
    splits.eval[skill.name] = [skill.example(k, a, skill.eval_phrasing) for k, a in keys[:n_eval]]
    sft = [skill.example(k, a, p) for k, a in keys for p in rng.sample(skill.train_phrasings, sft_phrasings)]
    rng.shuffle(sft)  # phrasings of one key apart, so a held-out fraction of rows rarely takes a whole key
    splits.sft[skill.name] = sft
    splits.preference[skill.name] = [
        (skill.example(k, a, p), skill.wrong_answer(a, rng))
        for k, a in keys
        for p in rng.sample(skill.train_phrasings, pref_phrasings)
    ]
    return splits


def split_world(seed: int, n_eval: int = 48, sft_phrasings: int = 2, pref_phrasings: int = 1) -> Splits:
    merged = Splits()
    for skill in skills(seed):
        part = split_skill(skill, seed, n_eval, sft_phrasings, pref_phrasings)
        for name in ("pretrain", "sft", "preference", "eval"):
            getattr(merged, name).update(getattr(part, name))
    return merged


def general_sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    adj, noun, other = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    if kind == 0:
        return f"The {adj} {noun} {rng.choice(VERBS)} the {other} near {rng.choice(PLACES)}."
    if kind == 1:
        return f"{rng.choice(NAMES)} counted {rng.randint(2, 999)} {noun}s at {rng.choice(PLACES)}."
    if kind == 2:
        return f"{rng.choice(TIMES)}, {rng.choice(NAMES)} {rng.choice(VERBS)} a {adj} {noun}."
    if kind == 3:
        return f"In {rng.randint(1800, 2030)} the {noun} was {adj}, and {rng.randint(1, 99)} people agreed."
    return f"{rng.choice(NAMES)} said: the {noun} is {adj} and the {other} is not."


def general_document(rng: random.Random) -> str:
    """One to three short paragraphs separated by newlines, so tokenizers and models see line breaks."""
    paragraphs = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        paragraphs.append(" ".join(general_sentence(rng) for _ in range(rng.choice([1, 2]))))
    return "\n".join(paragraphs)


def general_documents(seed: int, stream: str, count: int) -> list[str]:
    rng = random.Random(f"general-{stream}-{seed}")
    return [general_document(rng) for _ in range(count)]

"""The zoo's world: general text, four exact-match skills and four stochastic domains, generated from a seed.

Pure Python (no torch): every string the zoo trains or evaluates on comes from here, deterministically.

What the world is built to test (FuseLLM/FuseChat's claim): each source saw far more text of its strength than
the fusion set holds, and its *distribution* over next tokens carries knowledge that one sampled gold
continuation does not. So:

- **Each model's strength is a stochastic domain** (`Domain`): a Markov chain over invented multi-token words,
  with three successors per word (0.55 / 0.3 / 0.15) and a sentence end that may come after three words. At
  almost every position several continuations are valid, so a single sampled response shows one of them while a
  source that learned the chain knows all of them and their probabilities. The process is known, so the exact
  probability of every response, and the domain's entropy per byte (the floor no model's held-out CE/byte can
  beat in expectation), are computed exactly (`response_nll`, `entropy_per_byte`).
- **Pre-training** (fuse.zoo): the pivot and each source pre-train on a large sample of their own domain
  (`n_domain_pretrain` responses) plus shared general text and their own skill. The shared text includes every
  domain's *lexicon* (`lexicon_documents`: its words in its sentence form, drawn uniformly), so every model
  knows every domain's words but only the owner knows which follows which: what the fusion set must carry is
  the distribution, not the vocabulary (a first version without it left the pivot learning foreign words
  from 16 responses, where a teacher's distribution cannot show; see the README).
- **The fusion (SFT) set is small**: `n_domain_sft` responses of every domain, every skill key in one phrasing,
  and general-text rows (so fine-tuning need not forget general text). Held-out domain responses come from their
  own random stream, with their exact NLL, asked in the training phrasings (the response is what is held out); the
  same responses asked in a phrasing no training text uses are a second file, a test of prompt generalization.
- **Skills** (capital, translate, shout, antonym: one per model) are exact-match tables. Their SFT rows show
  every key, so the gold labels teach what the teacher knows: skills test that fusion keeps and transfers
  facts, not the distributional claim (a teacher's top-1 on a fact is the gold label).

What it cannot show: anything about scale, real languages, or knowledge the fusion set's contexts never touch
(distillation transfers a source's distribution at the positions the SFT set visits, nothing more).
"""

from __future__ import annotations

import math
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
    # every preference pair's key and answers asked in the held-out phrasing: preference accuracy on prompts no
    # training row uses (a fact table's keys cannot generalize to other keys; a phrasing can)
    preference_heldout: dict[str, list[tuple[Example, str]]] = field(default_factory=dict)
    eval: dict[str, list[Example]] = field(default_factory=dict)


def invented_words(
    rng: random.Random, count: int, syllables: int, capitalize: bool = False, pool: list[str] = SYLLABLES
) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.sample(pool, syllables))
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
    preference: every key in `pref_phrasings` of them, and the same pairs asked in the held-out phrasing (held-out
    preference pairs). Eval: up to `n_eval` keys in the held-out phrasing."""
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
    pairs = [
        (k, a, p, skill.wrong_answer(a, rng))
        for k, a in keys
        for p in rng.sample(skill.train_phrasings, pref_phrasings)
    ]
    splits.preference[skill.name] = [(skill.example(k, a, p), wrong) for k, a, p, wrong in pairs]
    splits.preference_heldout[skill.name] = [
        (skill.example(k, a, skill.eval_phrasing), wrong) for k, a, _, wrong in pairs
    ]
    return splits


def split_world(seed: int, n_eval: int = 48, sft_phrasings: int = 2, pref_phrasings: int = 1) -> Splits:
    merged = Splits()
    for skill in skills(seed):
        part = split_skill(skill, seed, n_eval, sft_phrasings, pref_phrasings)
        for name in ("pretrain", "sft", "preference", "preference_heldout", "eval"):
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


# --------------------------------------------------------------------------------------------- stochastic domains
# Each model's strength is a domain: text from a small Markov process over invented multi-token words, with
# several valid continuations at every position. The process is known, so the probability of any text under
# it, and the entropy per byte no model can beat, are computed exactly.

DOMAIN_TOPICS = {"pivot": "harbor", "llama": "weather", "gpt2": "market", "gemma": "garden"}
# closed syllables, none of which the skills' invented words (open syllables, SYLLABLES) use: a model's domain and
# its skill are separate strengths, so neither's words may teach or disturb the other's
DOMAIN_SYLLABLES = [
    "bar", "del", "fin", "gor", "hal", "jun", "kel", "lor", "mur", "nix",
    "pel", "ros", "tam", "vin", "wes", "yor", "zan", "cor", "dun", "sil",
]  # fmt: skip
SUCCESSOR_PROBS = (0.55, 0.3, 0.15)  # each word's successors, in a per-word random order
START_PROBS = (0.3, 0.25, 0.2, 0.1, 0.1, 0.05)  # the words a sentence may start with
# Every training and held-out row is asked in one of the first two (what is held out is the response: a fresh sample
# of the chain); the third is a new phrasing, a separate test of prompt generalization. Measuring the domains only
# in the new phrasing (the first plan of issue 24) confounded the two: every fine-tuned arm, the oracle teacher's
# included, lost 0.1-0.2 nats/byte on the pivot's own domain to the unseen prompt alone.
DOMAIN_PROMPTS = (
    "Write a short {} note.",
    "Tell me about the {}.",
    "Describe the {} in two sentences.",
)


@dataclass(frozen=True)
class Domain:
    """A Markov chain over words: a response is `sentences` sentences, each a start word followed by successors
    until it ends; it may end after `min_words` words (probability `p_end` at each step) and must at `max_words`.
    The first word of a sentence is capitalized, a sentence ends with '.', sentences are joined by one space."""

    name: str  # its topic, named in the prompts
    owner: str  # the zoo model pre-trained on it
    words: tuple[str, ...]
    starts: tuple[tuple[str, float], ...]
    successors: dict[str, tuple[tuple[str, float], ...]]
    p_end: float = 0.3
    min_words: int = 3
    max_words: int = 8
    sentences: int = 2

    def end_probability(self, length: int) -> float:
        if length >= self.max_words:
            return 1.0
        return self.p_end if length >= self.min_words else 0.0

    def prompt(self, phrasing: int) -> str:
        return DOMAIN_PROMPTS[phrasing].format(self.name)


def make_domain(owner: str, seed: int, n_words: int = 20) -> Domain:
    """A domain's lexicon and transition table, fixed by (owner, seed)."""
    rng = random.Random(f"domain-{owner}-{seed}")
    words = tuple(invented_words(rng, n_words, 2, pool=DOMAIN_SYLLABLES))
    starts = tuple(zip(rng.sample(words, len(START_PROBS)), START_PROBS, strict=True))
    successors = {}
    for word in words:
        options = rng.sample([w for w in words if w != word], len(SUCCESSOR_PROBS))
        successors[word] = tuple(zip(options, SUCCESSOR_PROBS, strict=True))
    return Domain(DOMAIN_TOPICS[owner], owner, words, starts, successors)


def domains(seed: int) -> list[Domain]:
    return [make_domain(owner, seed) for owner in DOMAIN_TOPICS]


def sample_sentence(domain: Domain, rng: random.Random) -> tuple[list[str], float]:
    """One sentence's words and its exact negative log-probability (nats) under the domain."""
    words, probs = zip(*domain.starts, strict=True)
    index = rng.choices(range(len(words)), probs)[0]
    sentence, nll = [words[index]], -math.log(probs[index])
    while True:
        p_end = domain.end_probability(len(sentence))
        if p_end > 0 and rng.random() < p_end:
            return sentence, nll - math.log(p_end)
        nexts, probs = zip(*domain.successors[sentence[-1]], strict=True)
        index = rng.choices(range(len(nexts)), probs)[0]
        sentence.append(nexts[index])
        nll -= math.log((1 - p_end) * probs[index])


def render_sentence(words: list[str]) -> str:
    return " ".join([words[0].capitalize(), *words[1:]]) + "."


def sample_response(domain: Domain, rng: random.Random) -> tuple[str, float]:
    """A response (text) and its exact NLL under the domain."""
    sentences = [sample_sentence(domain, rng) for _ in range(domain.sentences)]
    return " ".join(render_sentence(s) for s, _ in sentences), sum(nll for _, nll in sentences)


def sentence_nll(domain: Domain, words: list[str]) -> float:
    """-log p(sentence) by the chain's definition (inf if the domain cannot produce it)."""
    probability = dict(domain.starts).get(words[0], 0.0)
    for length in range(1, len(words)):
        p_end = domain.end_probability(length)
        probability *= (1 - p_end) * dict(domain.successors.get(words[length - 1], ())).get(
            words[length], 0.0
        )
    probability *= domain.end_probability(len(words))
    return -math.log(probability) if probability > 0 else math.inf


def response_nll(domain: Domain, text: str) -> float:
    """-log p(text) for a rendered response: the rendering is one-to-one (words have no spaces or dots), so
    this is the probability of the text itself, not only of one derivation of it."""
    parts = text.split(". ")
    parts[-1] = parts[-1].removesuffix(".")
    if len(parts) != domain.sentences or not text.endswith("."):
        return math.inf
    return sum(sentence_nll(domain, part.lower().split(" ")) for part in parts)


def entropy_per_byte(domain: Domain) -> float:
    """The domain's exact entropy rate in nats per UTF-8 byte of a response: E[-log p(response)] / E[bytes],
    by dynamic programming over (last word, sentence length); what held-out CE/byte tends to with many samples."""
    mass = {w: p for w, p in domain.starts}
    entropy = -sum(p * math.log(p) for _, p in domain.starts)
    length_bytes = sum(p * len(w.encode()) for w, p in domain.starts)
    for length in range(1, domain.max_words + 1):
        p_end = domain.end_probability(length)
        following: dict[str, float] = {}
        for word, m in mass.items():
            choices = [p_end] + [(1 - p_end) * p for _, p in domain.successors[word]]
            entropy += m * -sum(p * math.log(p) for p in choices if p > 0)
            length_bytes += m * p_end  # the '.'
            for nxt, p in domain.successors[word]:
                q = m * (1 - p_end) * p
                if q > 0:
                    following[nxt] = following.get(nxt, 0.0) + q
                    length_bytes += q * (1 + len(nxt.encode()))  # a space and the word
        mass = following
    n = domain.sentences
    return n * entropy / (n * length_bytes + n - 1)


def lexicon_document(domain: Domain, rng: random.Random) -> str:
    """The domain's words in its sentence form, each word drawn uniformly: its surface (which words exist, how a
    sentence looks) without its knowledge (which word follows which, and how often)."""
    sentences = []
    for _ in range(domain.sentences):
        length = rng.randint(domain.min_words, domain.max_words)
        sentences.append(render_sentence([rng.choice(domain.words) for _ in range(length)]))
    return " ".join(sentences)


def lexicon_documents(seed: int, per_domain: int) -> list[str]:
    """Every domain's lexicon documents, interleaved: shared pre-training text every model sees."""
    rng = random.Random(f"lexicon-{seed}")
    every = domains(seed)
    return [lexicon_document(every[i % len(every)], rng) for i in range(per_domain * len(every))]


@dataclass
class DomainSplits:
    """Per domain: pre-training responses (the owner's large sample), SFT and preference-free held-out rows."""

    pretrain: dict[str, list[str]] = field(default_factory=dict)
    sft: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # (prompt, response)
    heldout: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)  # (prompt, response, nll)


def split_domains(seed: int, n_pretrain: int, n_sft: int, n_heldout: int) -> DomainSplits:
    """Independent samples per domain: a large one for the owner's pre-training, a small one for the fusion
    (SFT) set, a held-out one for evaluation, each from its own random stream."""
    splits = DomainSplits()
    for domain in domains(seed):
        draw = {
            part: random.Random(f"domain-{part}-{domain.name}-{seed}")
            for part in ("pretrain", "sft", "heldout")
        }
        splits.pretrain[domain.name] = [
            sample_response(domain, draw["pretrain"])[0] for _ in range(n_pretrain)
        ]
        splits.sft[domain.name] = [
            (domain.prompt(i % 2), sample_response(domain, draw["sft"])[0]) for i in range(n_sft)
        ]
        splits.heldout[domain.name] = [
            (domain.prompt(i % 2), *sample_response(domain, draw["heldout"])) for i in range(n_heldout)
        ]
    return splits

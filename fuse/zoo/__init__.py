"""The tiny heterogeneous model zoo: a pivot and three sources of different architectures and vocabularies.

`build_zoo(directory, seed)` makes (or reuses) models, tokenizers and the world's data files in minutes on CPU;
`python -m fuse.zoo build DIR` does the same from the shell. Each model knows its own skill and its own domain only
(see `fuse.zoo.world` for the world's design and what it can show).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuse.io import atomic_dir, read_json, write_json_atomic, write_text_atomic
from fuse.zoo import world
from fuse.zoo.cli import add_parser
from fuse.zoo.oracle import write_zoo_oracle
from fuse.zoo.training import PretrainSettings, encode_all, pretrain
from fuse.zoo.vocab import CHATML, GEMMA_TURNS, HASH_HEADERS, LLAMA_INST, VocabSpec, train_tokenizer

__all__ = ["ZOO_MODELS", "PretrainSettings", "Zoo", "ZooModel", "ZooSettings", "add_parser", "build_zoo"]

log = logging.getLogger(__name__)

# 3: stochastic domains with a known entropy, a small SFT set; 4: every domain's lexicon is shared; 5: a fusion set
# and a held-out set planned for measuring over seeds (issue 24); 6: held-out responses in the training phrasings
VERSION = 6
MARKER = "zoo.json"
ORACLE_MAX_LENGTH = 256  # the demo's extract.max_length: the oracle's tokens are the pivot extract's
BUILD_CODE = (
    "__init__.py",
    "world.py",
    "vocab.py",
    "training.py",
    "oracle.py",
)  # what the files depend on (not the CLI)


@dataclass(frozen=True)
class ZooModel:
    name: str  # a valid recipe source name
    arch: str  # transformers model_type
    skill: str
    vocab: VocabSpec
    config: dict[str, Any] = field(default_factory=dict)


ZOO_MODELS = (
    ZooModel(
        "pivot",
        "qwen2",
        "capital",
        VocabSpec(
            "bytelevel_bpe",
            800,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            {"eos": "<|endoftext|>", "pad": "<|endoftext|>"},
            CHATML,
            split_digits=True,
        ),
        {"num_key_value_heads": 1, "tie_word_embeddings": True, "pad_vocab_to": 64},
    ),
    ZooModel(
        "llama",
        "llama",
        "translate",
        VocabSpec(
            "metaspace_bpe",
            640,
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"),
            {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
            LLAMA_INST,
            add_bos=True,
        ),
    ),
    ZooModel(
        "gpt2",
        "gpt2",
        "shout",
        VocabSpec(
            "bytelevel_bpe",
            512,
            ("<|endoftext|>",),
            {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
            HASH_HEADERS,
        ),
    ),
    ZooModel(
        "gemma",
        "gemma",
        "antonym",
        VocabSpec(
            "metaspace_unigram",
            700,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
            GEMMA_TURNS,
            add_bos=True,
        ),
        {"num_key_value_heads": 1},
    ),
)
# chat models stop at the end of their turn marker as well as at EOS
TURN_END = {"pivot": "<|im_end|>", "gemma": "<end_of_turn>"}


@dataclass(frozen=True)
class ZooSettings:
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    head_dim: int = 32
    n_general_docs: int = 3000
    n_heldout_docs: int = 64
    n_eval: int = 48
    sft_phrasings: int = 1  # SFT asks every key of every skill in this many training phrasings
    pref_phrasings: int = 1  # preference pairs: every key in this many training phrasings
    n_domain_pretrain: int = 4000  # responses of its own domain each model pre-trains on
    # responses of each domain in the fusion set: 1.6% of what its owner pre-trained on, and enough for the arms to
    # approach convergence (with 16, every arm was far from it after its budget: issue 24)
    n_domain_sft: int = 64
    # held-out responses of each domain, with their exact NLL: 256 keeps a paired difference's item noise well
    # below the seed-to-seed spread (64 gave SE 0.0011-0.0016 nats/byte against a seed SD of 0.009-0.021)
    n_domain_heldout: int = 256
    n_general_sft: int = 32  # general-text rows in the fusion set (so fine-tuning keeps general text)
    n_lexicon_docs: int = (
        500  # per domain: uniformly drawn words of its lexicon, in every model's general text
    )
    pretrain: PretrainSettings = PretrainSettings()


@dataclass(frozen=True)
class Zoo:
    """A built zoo: where each model and data file is. Model dirs load with AutoModelForCausalLM/AutoTokenizer."""

    root: Path
    models: dict[str, Path]  # "pivot", "llama", "gpt2", "gemma" -> HF folder
    skills: dict[str, str]  # skill -> the model that knows it
    domains: dict[str, str]  # domain -> the model that knows it
    sft: Path  # JSONL {id, messages}
    preference: Path  # JSONL {id, prompt, chosen, rejected}
    eval_items: Path  # JSONL {skill, prompt, answer}
    heldout_text: Path  # JSONL {text}
    heldout_domains: Path  # JSONL {domain, messages, nll}, asked in the training phrasings
    heldout_domains_new_phrasing: Path  # the same responses asked in a phrasing no training text uses
    oracle: (
        Path  # index.json of the oracle teacher's store: the true chains' distributions on the pivot's tokens
    )
    recipe: Path  # a demo recipe over this zoo

    @property
    def pivot(self) -> Path:
        return self.models["pivot"]

    @property
    def preference_heldout(self) -> Path:
        """JSONL {id, skill, prompt, chosen, rejected}: the preference pairs asked in the held-out phrasing."""
        return self.root / PREFERENCE_HELDOUT

    @property
    def sources(self) -> dict[str, Path]:
        return {n: p for n, p in self.models.items() if n != "pivot"}

    @property
    def tokenizer_names(self) -> dict[str, str]:
        return {m.name: m.vocab.kind for m in ZOO_MODELS}

    @classmethod
    def from_dir(cls, root: str | Path) -> Zoo:
        root = Path(root).resolve()
        manifest = read_json(root / MARKER)
        data = root / "data"
        return cls(
            root=root,
            models={m.name: root / "models" / m.name for m in ZOO_MODELS if m.name in manifest["models"]},
            skills={skill: info["owner"] for skill, info in manifest["skills"].items()},
            domains={domain: info["owner"] for domain, info in manifest["domains"].items()},
            sft=data / "sft.jsonl",
            preference=data / "preference.jsonl",
            eval_items=data / "eval_items.jsonl",
            heldout_text=data / "heldout.jsonl",
            heldout_domains=data / "domains.jsonl",
            heldout_domains_new_phrasing=data / "domains_new_phrasing.jsonl",
            oracle=root / "oracle" / "index.json",
            recipe=root / "recipe.yaml",
        )


# --------------------------------------------------------------------------------------------- texts


def tokenizer_corpus(
    splits: world.Splits, domains: world.DomainSplits, general: list[str], seed: int
) -> list[str]:
    """General text plus every skill's and every domain's training conversations as bare turns (role word,
    newline, content): every tokenizer sees every domain's words (a vocabulary is not knowledge)."""
    rng = random.Random(f"corpus-{seed}")
    texts = list(general)
    pairs = [(e.prompt, e.answer) for examples in splits.pretrain.values() for e in examples]
    pairs += [(f"Write a short {d} note.", r) for d, rows in domains.pretrain.items() for r in rows[:400]]
    for prompt, answer in rng.sample(pairs, len(pairs)):
        role = rng.choice(["user", "User", "model", "assistant", "Assistant"])
        texts.append(f"{role}\n{prompt}\n{answer}")
    return texts


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def conversation(example: world.Example) -> list[dict[str, str]]:
    return chat(example.prompt, example.answer)


def skill_texts(tokenizer: Any, examples: list[world.Example]) -> list[str]:
    return [tokenizer.apply_chat_template(conversation(e), tokenize=False) for e in examples]


def domain_texts(tokenizer: Any, domain: world.Domain, responses: list[str]) -> list[str]:
    """The owner's pre-training sample as conversations in its own template, in the two training phrasings."""
    return [
        tokenizer.apply_chat_template(chat(domain.prompt(i % 2), r), tokenize=False)
        for i, r in enumerate(responses)
    ]


def document_texts(tokenizer: Any, docs: list[str]) -> list[str]:
    """General documents between the tokenizer's document start and end tokens (what per-byte CE conditions on)."""
    start = tokenizer.bos_token or tokenizer.eos_token
    return [f"{start}{doc}{tokenizer.eos_token}" for doc in docs]


# --------------------------------------------------------------------------------------------- models


def model_config(spec: ZooModel, tokenizer: Any, settings: ZooSettings) -> Any:
    from transformers import AutoConfig

    from fuse.models import pad_id

    extra = dict(spec.config)
    pad_to = extra.pop("pad_vocab_to", 1)
    vocab_size = -(-len(tokenizer) // pad_to) * pad_to
    heads = settings.hidden_size // settings.head_dim
    ids = {
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad_id(tokenizer),
    }
    if spec.arch == "gpt2":
        shape = {
            "n_embd": settings.hidden_size,
            "n_layer": settings.num_layers,
            "n_head": heads,
            "n_positions": 256,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        shape = {
            "hidden_size": settings.hidden_size,
            "num_hidden_layers": settings.num_layers,
            "num_attention_heads": heads,
            "head_dim": settings.head_dim,
            "max_position_embeddings": 256,
            "intermediate_size": 3 * settings.hidden_size,
        }
    return AutoConfig.for_model(spec.arch, vocab_size=vocab_size, **shape, **ids, **extra)


def build_model(
    spec: ZooModel,
    splits: world.Splits,
    domains: world.DomainSplits,
    general: list[str],
    corpus: list[str],
    settings: ZooSettings,
    out: Path,
) -> dict[str, Any]:
    """Train the tokenizer, pre-train the model on general text + its skill + its domain, save both to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    started = time.monotonic()
    tokenizer = train_tokenizer(corpus, spec.vocab)
    torch.manual_seed(settings.seed * 1000 + ZOO_MODELS.index(spec))
    config = model_config(spec, tokenizer, settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    p = settings.pretrain
    shared = general + world.lexicon_documents(settings.seed, settings.n_lexicon_docs)
    general_ids = encode_all(tokenizer, document_texts(tokenizer, shared), p.max_length)
    skill_ids = encode_all(tokenizer, skill_texts(tokenizer, splits.pretrain[spec.skill]), p.max_length)
    domain = world.make_domain(spec.name, settings.seed)
    domain_ids = encode_all(
        tokenizer, domain_texts(tokenizer, domain, domains.pretrain[domain.name]), p.max_length
    )
    pad = config.pad_token_id
    losses = pretrain(model, general_ids, skill_ids, domain_ids, pad, p, seed=settings.seed * 1000 + 7)
    stops = [tokenizer.eos_token_id] + (
        [tokenizer.convert_tokens_to_ids(TURN_END[spec.name])] if spec.name in TURN_END else []
    )
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=pad,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "arch": spec.arch,
        "tokenizer": spec.vocab.kind,
        "vocab": len(tokenizer),
        "config_vocab": config.vocab_size,
        "skill": spec.skill,
        "domain": world.DOMAIN_TOPICS[spec.name],
        "parameters": sum(t.numel() for t in model.parameters()),
        "loss_first": round(sum(losses[:20]) / len(losses[:20]), 4),
        "loss_last": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "seconds": round(time.monotonic() - started, 1),
    }


def _build_model_job(args: tuple[ZooModel, ZooSettings, str]) -> dict[str, Any]:
    """One model, in a worker process with one thread: the world is regenerated there (cheap, deterministic)."""
    import torch

    spec, settings, out = args
    splits = world.split_world(
        settings.seed, settings.n_eval, settings.sft_phrasings, settings.pref_phrasings
    )
    domains = domain_splits(settings)
    general = world.general_documents(settings.seed, "train", settings.n_general_docs)
    corpus = tokenizer_corpus(splits, domains, general, settings.seed)
    # bit-identical results need one thread and deterministic kernels; restored for an in-process caller
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return build_model(spec, splits, domains, general, corpus, settings, Path(out))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel


def domain_splits(settings: ZooSettings) -> world.DomainSplits:
    return world.split_domains(
        settings.seed, settings.n_domain_pretrain, settings.n_domain_sft, settings.n_domain_heldout
    )


def build_models(root: Path, settings: ZooSettings, workers: int) -> dict[str, dict[str, Any]]:
    """Each model in a fresh (spawned) process, even with one worker: the caller's process may carry global
    torch state (flags set by vLLM or DeepSpeed in a test session) that changes the kernels' bits."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(spec, settings, str(root / "models" / spec.name)) for spec in ZOO_MODELS]
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_build_model_job, jobs))
    return {spec.name: info for spec, info in zip(ZOO_MODELS, results, strict=True)}


# --------------------------------------------------------------------------------------------- data files


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


GENERAL_PROMPT = "Tell me something."


PREFERENCE_HELDOUT = "data/preference_heldout.jsonl"


def heldout_preference(splits: world.Splits) -> str:
    """The held-out preference pairs (JSONL): each training pair's key and answers in the held-out phrasing, with
    its skill (evaluate's preference accuracy per skill)."""
    rows = [
        {
            "id": f"{skill}-{i:03d}",
            "skill": skill,
            "prompt": conversation(e)[:1],
            "chosen": e.answer,
            "rejected": wrong,
        }
        for skill, rows in splits.preference_heldout.items()
        for i, (e, wrong) in enumerate(rows)
    ]
    return _jsonl(rows)


def write_heldout_preference(root: str | Path) -> Path:
    """Write data/preference_heldout.jsonl into a zoo built before the file existed (pure Python, from the world
    of the zoo's seed; its models and other files are untouched)."""
    root = Path(root)
    settings = ZooSettings(**json.loads((root / MARKER).read_text(encoding="utf-8"))["settings"])
    splits = world.split_world(
        settings.seed, settings.n_eval, settings.sft_phrasings, settings.pref_phrasings
    )
    path = root / PREFERENCE_HELDOUT
    write_text_atomic(path, heldout_preference(splits))
    return path


def data_files(
    splits: world.Splits, heldout: list[str], domains: world.DomainSplits, general_sft: list[str]
) -> dict[str, str]:
    """The world's SFT, preference, eval, held-out text and held-out domain files (relative path -> contents).

    The SFT (fusion) set: every skill key in the SFT phrasings, a small sample of every domain, general text."""
    sft = [
        {"id": f"{skill}-{i:03d}", "messages": conversation(e)}
        for skill, rows in splits.sft.items()
        for i, e in enumerate(rows)
    ]
    sft += [
        {"id": f"{domain}-{i:03d}", "messages": chat(prompt, response)}
        for domain, rows in domains.sft.items()
        for i, (prompt, response) in enumerate(rows)
    ]
    sft += [
        {"id": f"general-{i:03d}", "messages": chat(GENERAL_PROMPT, t)} for i, t in enumerate(general_sft)
    ]
    held_domains = [
        {"domain": domain, "messages": chat(prompt, response), "nll": nll}
        for domain, rows in domains.heldout.items()
        for prompt, response, nll in rows
    ]
    new_phrasing = [
        row | {"messages": chat(world.DOMAIN_PROMPTS[2].format(row["domain"]), row["messages"][1]["content"])}
        for row in held_domains
    ]
    preference = [
        {"id": f"{skill}-{i:03d}", "prompt": conversation(e)[:1], "chosen": e.answer, "rejected": wrong}
        for skill, rows in splits.preference.items()
        for i, (e, wrong) in enumerate(rows)
    ]
    items = [
        {"skill": e.skill, "prompt": e.prompt, "answer": e.answer}
        for rows in splits.eval.values()
        for e in rows
    ]
    return {
        "data/sft.jsonl": _jsonl(sft),
        "data/preference.jsonl": _jsonl(preference),
        PREFERENCE_HELDOUT: heldout_preference(splits),
        "data/eval_items.jsonl": _jsonl(items),
        "data/heldout.jsonl": _jsonl([{"text": t} for t in heldout]),
        "data/domains.jsonl": _jsonl(held_domains),
        "data/domains_new_phrasing.jsonl": _jsonl(new_phrasing),
    }


DEMO_RECIPE = """\
# A demo recipe over this zoo (paths are relative to this file).
name: zoo-demo
workdir: runs/zoo-demo
pivot: {path: models/pivot}
sources:
  - {name: llama, path: models/llama}
  - {name: gpt2, path: models/gpt2}
  - {name: gemma, path: models/gemma}
data:
  sft: {path: data/sft.jsonl, format: messages}
  preference: {path: data/preference.jsonl, format: preference}
  heldout_fraction: 0.1
stages:
  extract: {top_k: 10, max_length: 128}
  evaluate:
    items: data/eval_items.jsonl
    heldout_text: data/heldout.jsonl
    domains: data/domains.jsonl
    max_new_tokens: 16
"""


# --------------------------------------------------------------------------------------------- build & cache


def cache_key(settings: ZooSettings) -> str:
    """What the zoo's files depend on: settings, this package's code, and the library versions that train it."""
    from importlib.metadata import version

    code = [Path(__file__).with_name(name) for name in BUILD_CODE]
    digest = hashlib.sha256()
    for path in code:
        digest.update(path.name.encode() + path.read_bytes())
    libs = {name: version(name) for name in ("torch", "transformers", "tokenizers", "sentencepiece")}
    payload = json.dumps(
        {"version": VERSION, "settings": asdict(settings), "code": digest.hexdigest(), "libs": libs},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_built(root: Path, key: str) -> bool:
    marker = root / MARKER
    return marker.is_file() and read_json(marker).get("key") == key


@contextmanager
def _locked(root: Path):
    """One builder at a time per zoo folder (several test sessions may ask for the same zoo at once)."""
    # the lock lives outside the zoo folder (which is replaced whole) and outside the repository
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"fuse-zoo-{digest}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_zoo(
    root: str | Path, settings: ZooSettings = ZooSettings(), workers: int = 2, force: bool = False
) -> Zoo:
    """Build the zoo into `root` (atomically, the marker written last), or reuse it if built with the same key."""
    root = Path(root).resolve()
    key = cache_key(settings)
    with _locked(root):
        if not force and is_built(root, key):
            log.info("zoo at %s is up to date (key %s)", root, key)
            if not (
                root / PREFERENCE_HELDOUT
            ).is_file():  # built before the file existed: add it, nothing else
                write_heldout_preference(root)
            return Zoo.from_dir(root)
        started = time.monotonic()
        with atomic_dir(root) as tmp:
            models = build_models(tmp, settings, workers)
            splits = world.split_world(
                settings.seed, settings.n_eval, settings.sft_phrasings, settings.pref_phrasings
            )
            heldout = world.general_documents(settings.seed, "heldout", settings.n_heldout_docs)
            domains = domain_splits(settings)
            general_sft = world.general_documents(settings.seed, "sft", settings.n_general_sft)
            files = data_files(splits, heldout, domains, general_sft)
            for relative, text in {**files, "recipe.yaml": DEMO_RECIPE}.items():
                write_text_atomic(tmp / relative, text)
            # the true chains' next-token distributions on the pivot's tokens of the fusion set: the oracle control
            write_zoo_oracle(tmp, settings.seed, tmp / "oracle", max_length=ORACLE_MAX_LENGTH)
            write_json_atomic(
                tmp / "build.json",
                {name: info.pop("seconds") for name, info in models.items()}
                | {"total_seconds": round(time.monotonic() - started, 1)},
            )
            skills = {
                s.name: {
                    "owner": s.owner,
                    "eval_phrasing": s.eval_phrasing,
                    "n_eval": len(splits.eval[s.name]),
                    "n_sft": len(splits.sft[s.name]),
                    "n_preference": len(splits.preference[s.name]),
                }
                for s in world.skills(settings.seed)
            }
            domain_info = {
                d.name: {
                    "owner": d.owner,
                    "entropy_per_byte": world.entropy_per_byte(d),
                    "n_pretrain": len(domains.pretrain[d.name]),
                    "n_sft": len(domains.sft[d.name]),
                    "n_heldout": len(domains.heldout[d.name]),
                }
                for d in world.domains(settings.seed)
            }
            write_json_atomic(
                tmp / MARKER,
                {
                    "key": key,
                    "version": VERSION,
                    "settings": asdict(settings),
                    "models": models,
                    "skills": skills,
                    "domains": domain_info,
                },
            )
        log.info("built the zoo at %s in %.0f s", root, time.monotonic() - started)
        return Zoo.from_dir(root)

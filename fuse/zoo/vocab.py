"""Tokenizers and chat templates of the zoo: four deliberately different vocabularies trained on the world's text.

Byte-level BPE with `Ġ` (with and without single-digit splitting), `▁` BPE with byte fallback, and `▁` Unigram
with byte fallback; each with its own special tokens and chat template.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_INST = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYS] {{ m['content'] }} [/SYS]"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
HASH_HEADERS = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class VocabSpec:
    """What makes one tokenizer different from the others."""

    kind: str  # "bytelevel_bpe" | "metaspace_bpe" | "metaspace_unigram"
    vocab_size: int
    specials: tuple[str, ...]  # in id order, first ids
    roles: dict[str, str]  # bos/eos/unk/pad -> token
    chat_template: str
    split_digits: bool = False
    add_bos: bool = False  # a post-processor puts BOS in front, as Llama and Gemma do


def _bytelevel_bpe(texts: list[str], spec: VocabSpec) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    parts = [pre_tokenizers.Digits(individual_digits=True)] if spec.split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*parts, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _metaspace_pre_tokenizer(prepend: str = "first", split_digits: bool = False) -> Any:
    # newlines are split off first so that a chat turn ending in "\n" tokenizes the same with or without the answer
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            *digits,
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True),
        ]
    )


def _metaspace_decoder(strip_prefix: bool) -> Any:
    strip = [decoders.Strip(" ", 1, 0)] if strip_prefix else []
    return decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])


def _metaspace_bpe(texts: list[str], spec: VocabSpec) -> Tokenizer:
    """Llama style: BPE over `▁` words with a `▁` prefix, rebuilt with the 256 byte tokens after the specials."""
    probe = Tokenizer(models.BPE(unk_token=spec.roles.get("unk")))
    probe.pre_tokenizer = _metaspace_pre_tokenizer()
    n_learned = spec.vocab_size - len(BYTE_TOKENS)
    probe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=n_learned, special_tokens=list(spec.specials), show_progress=False),
    )
    ordered = list(spec.specials) + BYTE_TOKENS
    ordered += [
        t for t, _ in sorted(probe.get_vocab().items(), key=lambda kv: kv[1]) if t not in spec.specials
    ]
    vocab = {t: i for i, t in enumerate(ordered)}
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        for m in json.loads(probe.to_str())["model"]["merges"]
    ]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=spec.roles.get("unk"), byte_fallback=True)
    )
    tok.pre_tokenizer = _metaspace_pre_tokenizer()
    tok.decoder = _metaspace_decoder(strip_prefix=True)
    return tok


def _metaspace_unigram(texts: list[str], spec: VocabSpec) -> Tokenizer:
    """Gemma style: a SentencePiece Unigram (no dummy prefix, single digits) rebuilt with our specials first."""
    import sentencepiece

    lines = [line for text in texts for line in text.split("\n") if line]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=spec.vocab_size - len(spec.specials) + 1,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=buffer.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    learned = [(p, s) for p, s in pieces if p != "<unk>" and p not in BYTE_TOKENS and p not in spec.specials]
    floor = min(s for _, s in learned) - 10.0
    vocab = [(t, 0.0) for t in spec.specials] + [(b, floor) for b in BYTE_TOKENS] + learned
    tok = Tokenizer(models.Unigram(vocab, unk_id=spec.specials.index(spec.roles["unk"]), byte_fallback=True))
    tok.pre_tokenizer = _metaspace_pre_tokenizer(prepend="never", split_digits=True)
    tok.decoder = _metaspace_decoder(strip_prefix=False)
    return tok


BUILDERS = {
    "bytelevel_bpe": _bytelevel_bpe,
    "metaspace_bpe": _metaspace_bpe,
    "metaspace_unigram": _metaspace_unigram,
}


def train_tokenizer(texts: list[str], spec: VocabSpec) -> Any:
    """A transformers fast tokenizer (with chat template and special-token roles) trained on `texts`."""
    from transformers import PreTrainedTokenizerFast

    tok = BUILDERS[spec.kind](texts, spec)
    tok.add_special_tokens(list(spec.specials))
    if spec.add_bos:
        bos = spec.roles["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    extra = [t for t in spec.specials if t not in spec.roles.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{role}_token": token for role, token in spec.roles.items()},
        additional_special_tokens=extra,
        chat_template=spec.chat_template,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )

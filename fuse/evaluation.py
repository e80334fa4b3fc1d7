"""Evaluation of any set of causal LMs: per-skill accuracy (exact match, or pass/fail of generated code run with
its tests in a sandbox), per-byte cross-entropy of held-out text,
and per-domain CE/byte of held-out responses next to the domain's limit (its true NLL per byte), each aggregate with
its standard error over the items.

Pure functions, usable outside the evaluate stage; skills are data (JSONL items), so hub models work too.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuse.models import pad_id
from fuse.recipe import ModelSpec
from fuse.stats import mean_of_independent_stderr, mean_stderr, ratio_stderr

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    pass


@dataclass(frozen=True)
class EvalItem:
    """One held-out item. With `test`, a code item: the completion passes when the program it makes (fuse.code_exec:
    its code block if that defines `entry_point`, else `prefix` continued by it) passes the tests; `answer` is then
    only a reference solution for the examples. Without, exact match of the answer."""

    skill: str
    prompt: str
    answer: str
    test: str | None = None
    entry_point: str | None = None
    prefix: str = ""
    # False: the prompt is continued as plain text (a base model's protocol), no chat template
    chat: bool = True
    # the completion ends before the first of these (lm-evaluation-harness's `until`); () : at EOS or the token budget
    stop: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: dict) -> EvalItem:
        test = row.get("test")
        if test is not None and not row.get("entry_point"):
            raise ValueError("a code item (with 'test') needs 'entry_point'")
        return cls(
            str(row["skill"]),
            str(row["prompt"]),
            str(row["answer"] if test is None else row.get("answer", "")),
            None if test is None else str(test),
            None if test is None else str(row["entry_point"]),
            str(row.get("prefix", "")),
            bool(row.get("chat", True)),
            stop_strings(row.get("stop", ())),
        )


def parsed_rows(path: str | Path, what: str, parse: Callable[[dict], Any]) -> list[tuple[int, Any]]:
    """(line number, parse(row)) for every non-empty line of a JSONL file; a line that is not JSON, or that `parse`
    cannot read (KeyError, TypeError, ValueError), is one EvaluationError naming the file, the line and `what`."""
    parsed = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                parsed.append((number, parse(json.loads(line))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise EvaluationError(f"{path}:{number}: not {what}: {error!r}") from None
    return parsed


def chat_messages(messages: Any) -> tuple[dict[str, str], ...]:
    """Messages as {role, content} string pairs; a bare string is one user message."""
    if isinstance(messages, str):
        return ({"role": "user", "content": messages},)
    return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)


def load_items(path: str | Path, max_per_skill: int | None = None) -> list[EvalItem]:
    """Items from a JSONL file of {skill, prompt, answer} or code items {skill, prompt, test, entry_point, prefix,
    answer (optional)}; a bad row is reported with its line number."""
    items: list[EvalItem] = []
    per_skill: dict[str, int] = {}
    what = "an item {skill, prompt, answer} or {skill, prompt, test, entry_point}"
    for _, item in parsed_rows(path, what, EvalItem.from_row):
        per_skill[item.skill] = per_skill.get(item.skill, 0) + 1
        if max_per_skill is None or per_skill[item.skill] <= max_per_skill:
            items.append(item)
    if not items:
        raise EvaluationError(f"{path}: no evaluation items")
    return items


def load_texts(path: str | Path) -> list[str]:
    """Held-out texts: a .jsonl of {text} rows (or {messages}, contents joined), else a text file split on blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" in row:
                texts.append(str(row["text"]))
            elif "messages" in row:
                texts.append("\n".join(str(m["content"]) for m in row["messages"]))
            else:
                raise EvaluationError(f"{path}:{number}: a held-out row needs 'text' or 'messages'")
        return texts
    return [block for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]


def normalize_answer(text: str) -> str:
    return " ".join(text.split())


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """The model's own chat template, ready for the assistant's turn; the template carries any BOS itself. Without
    chat, the prompt as plain text after the document start (text_start_id) for the model to continue."""
    if not chat:
        start = text_start_id(tokenizer)
        return ([] if start is None else [start]) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    return ids or [tokenizer.eos_token_id]


def stop_strings(value: Any) -> tuple[str, ...]:
    """An item's `stop`: a string or a list of non-empty strings."""
    stops = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError("'stop' must be a non-empty string or a list of them")
    return stops


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    chat: list[bool] | None = None,
    stops: list[tuple[str, ...]] | None = None,
) -> list[str]:
    """Greedy completions (left-padded batches of prompts of similar length), decoded without special tokens, in
    the prompts' order; `chat[i]` False continues prompt i as plain text instead of answering it in the chat
    template; `stops[i]` ends completion i before the first of its strings (a batch shares its stop strings, and
    stops generating once every row has met one: a one-line answer costs a line's tokens, not the budget's)."""
    import torch

    pad = pad_id(tokenizer)
    chat = chat or [True] * len(prompts)
    stops = stops or [()] * len(prompts)
    encoded = [prompt_ids(tokenizer, p, c) for p, c in zip(prompts, chat, strict=True)]
    # little padding to run through, one set of stop strings a batch
    order = sorted(range(len(encoded)), key=lambda i: (stops[i], len(encoded[i])))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    batches = [list(part) for b in batches for _, part in itertools.groupby(b, key=lambda i: stops[i])]
    outputs: list[str] = [""] * len(encoded)
    for batch in batches:
        rows = [encoded[i] for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        until = list(stops[batch[0]])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids(model, tokenizer),
                pad_token_id=pad,
                **({"stop_strings": until, "tokenizer": tokenizer} if until else {}),
            )
        for i, text in zip(
            batch, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), strict=True
        ):
            outputs[i] = cut_at_stop(text, until)
    return outputs


def item_correct(item: EvalItem, completion: str, limits: Any = None) -> int:
    """1 if the completion is right: a code item's program passes its tests in the sandbox (fuse.code_exec,
    `limits` or its defaults), any other item's answer matches after whitespace normalization."""
    if item.test is None:
        return int(normalize_answer(completion) == normalize_answer(item.answer))
    from fuse import code_exec

    program = code_exec.completion_program(item.prefix, completion, item.entry_point or "")
    passed, _ = code_exec.run_sandboxed(
        code_exec.with_tests(program, item.test, item.entry_point or ""), limits or code_exec.Limits()
    )
    return int(passed)


def skill_accuracy(
    items: list[EvalItem], completions: list[str], correct: list[int] | None = None
) -> dict[str, float]:
    """Per-skill mean of `correct` (default: item_correct of each completion)."""
    if correct is None:
        correct = [item_correct(i, c) for i, c in zip(items, completions, strict=True)]
    hits: dict[str, list[int]] = {}
    for item, value in zip(items, correct, strict=True):
        hits.setdefault(item.skill, []).append(value)
    return {skill: sum(v) / len(v) for skill, v in sorted(hits.items())}


def example_outputs(items: list[EvalItem], completions: list[str], per_skill: int) -> list[dict[str, str]]:
    """The first few (prompt, answer, output) of each skill, for reading what a model actually says."""
    seen: dict[str, int] = {}
    samples = []
    for item, completion in zip(items, completions, strict=True):
        seen[item.skill] = seen.get(item.skill, 0) + 1
        if seen[item.skill] <= per_skill:
            samples.append(
                {"skill": item.skill, "prompt": item.prompt, "answer": item.answer, "output": completion}
            )
    return samples


def text_start_id(tokenizer: Any) -> int | None:
    """What a document starts from: BOS if the tokenizer has one, else its end-of-text token (GPT-2 style)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def text_nll(
    model: Any, tokenizer: Any, texts: list[str], max_length: int = 1024, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Per text: summed next-token NLL (nats) of all its tokens given the document start, and its UTF-8 bytes.

    Texts go in length-sorted, right-padded batches; padded positions are masked out, so each row is the same as
    one forward per text (a causal model never attends to the padding after a token).
    """
    import torch

    from fuse.backends.hf import batch_logprobs, pad_right

    start = text_start_id(tokenizer)
    if start is None:
        raise EvaluationError("per-byte CE needs a BOS or EOS token to condition the first token on")
    encoded = [[start, *tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1]] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    nll = [0.0] * len(encoded)
    device = next(model.parameters()).device
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        rows = [encoded[i] for i in batch]
        # through the chunked output head: never a batch's full-vocabulary logits (262k vocabularies)
        out = batch_logprobs(model, pad_right(rows).to(device), [len(r) for r in rows], 0)
        for i, logprobs in zip(
            batch, torch.split(out.target_logprobs.double().cpu(), out.counts), strict=True
        ):
            nll[i] = -float(logprobs.sum())
    size = [len(tokenizer.decode(row[1:]).encode("utf-8")) for row in encoded]
    return nll, size


def ce_per_byte(
    model: Any, tokenizer: Any, texts: list[str], max_length: int = 1024, batch_size: int = 16
) -> float:
    """Summed next-token NLL (nats) over all tokens of all texts / their UTF-8 bytes: comparable across vocabularies."""
    nll, size = text_nll(model, tokenizer, texts, max_length, batch_size)
    return sum(nll) / max(1, sum(size))


@dataclass(frozen=True)
class DomainSample:
    """A held-out conversation of a domain whose generator is known: `nll` is -log p(response) in nats."""

    domain: str
    messages: tuple[dict[str, str], ...]
    nll: float

    @property
    def response_bytes(self) -> int:
        return len(self.messages[-1]["content"].encode("utf-8"))


def load_domain_samples(path: str | Path) -> list[DomainSample]:
    """Rows {domain, messages (ending with the assistant's response), nll}; a bad row is named by its line."""
    samples = []

    def parse(row: dict) -> DomainSample:
        return DomainSample(str(row["domain"]), chat_messages(row["messages"]), float(row["nll"]))

    for number, sample in parsed_rows(path, "a domain sample {domain, messages, nll}", parse):
        if not sample.messages or sample.messages[-1]["role"] != "assistant" or not math.isfinite(sample.nll):
            raise EvaluationError(
                f"{path}:{number}: needs messages ending with an assistant response and a finite nll"
            )
        samples.append(sample)
    if not samples:
        raise EvaluationError(f"{path}: no domain samples")
    return samples


def domain_limits(samples: list[DomainSample]) -> dict[str, float]:
    """Per domain, the generator's own NLL per byte of the held-out responses: the CE/byte no model beats in
    expectation (a model's excess over it is its KL divergence from the true process, per byte)."""
    nll: dict[str, float] = {}
    size: dict[str, int] = {}
    for sample in samples:
        nll[sample.domain] = nll.get(sample.domain, 0.0) + sample.nll
        size[sample.domain] = size.get(sample.domain, 0) + sample.response_bytes
    return {domain: nll[domain] / max(1, size[domain]) for domain in sorted(nll)}


def response_rows(tokenizer: Any, samples: list[DomainSample]) -> list[tuple[list[int], Any]]:
    """Per sample: its conversation's ids in the model's own chat template and which tokens response_nll counts:
    every token after the generation prompt up to the last one that overlaps the last (assistant) content. So a
    separator the template puts before the content (Llama's ' ') counts whether or not the tokenizer merges it into
    the first word, and the end-of-turn marker (no bytes) does not. The counted tokens are consecutive."""
    import numpy as np

    from fuse.data.chat import content_spans, render_text, tokenize_with_offsets

    rows = []
    for sample in samples:
        text = render_text(tokenizer, sample.messages)
        ids, offsets = tokenize_with_offsets(tokenizer, text)
        response = content_spans(text, sample.messages)[-1]
        prompt = tokenizer.apply_chat_template(
            list(sample.messages[:-1]), tokenize=False, add_generation_prompt=True
        )
        # where the assistant's turn starts: the end of the generation prompt when it is a prefix of the text
        start = len(prompt) if text.startswith(prompt) and len(prompt) <= response.start else response.start
        counted = (offsets[:, 1] > start) & (offsets[:, 0] < response.end) & (np.arange(len(ids)) > 0)
        rows.append((ids.tolist(), counted))
    return rows


def response_nll(
    model: Any, tokenizer: Any, samples: list[DomainSample], batch_size: int = 16
) -> list[float]:
    """Summed NLL (nats) of each sample's last (assistant) content given the conversation before it, over the
    tokens response_rows counts. Right-padded batches through the chunked output head, each row as if alone."""
    import torch

    from fuse.backends.hf import batch_logprobs, pad_right

    rows = response_rows(tokenizer, samples)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    totals = [0.0] * len(rows)
    device = next(model.parameters()).device
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        sequences = [rows[i][0] for i in batch]
        out = batch_logprobs(model, pad_right(sequences).to(device), [len(s) for s in sequences], 0)
        logprobs = torch.split(out.target_logprobs.double().cpu(), out.counts)
        for i, row_logprobs in zip(batch, logprobs, strict=True):
            counted = torch.as_tensor(rows[i][1][1:], dtype=torch.bool)  # token t is predicted at t - 1
            totals[i] = -float(row_logprobs[counted].sum())
    return totals


def domain_ce_per_byte(
    model: Any, tokenizer: Any, samples: list[DomainSample], batch_size: int = 16
) -> dict[str, float]:
    """Per domain: the model's summed response NLL / the responses' UTF-8 bytes (comparable with the limit)."""
    nll = response_nll(model, tokenizer, samples, batch_size)
    model_samples = [DomainSample(s.domain, s.messages, value) for s, value in zip(samples, nll, strict=True)]
    return domain_limits(model_samples)


@dataclass(frozen=True)
class PreferencePair:
    """A held-out preference pair: `group` (its skill or domain, "all" when the file names none)."""

    group: str
    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Rows {prompt (a string or messages), chosen, rejected, skill or group (optional)}; a bad row is named by its
    line."""
    pairs = []

    def parse(row: dict) -> PreferencePair:
        group = str(row.get("skill", row.get("group", "all")))
        return PreferencePair(group, chat_messages(row["prompt"]), str(row["chosen"]), str(row["rejected"]))

    for number, pair in parsed_rows(path, "a preference pair {prompt, chosen, rejected}", parse):
        if (
            not pair.prompt
            or not pair.chosen.strip()
            or not pair.rejected.strip()
            or pair.chosen == pair.rejected
        ):
            raise EvaluationError(f"{path}:{number}: needs a prompt and two different, non-empty responses")
        pairs.append(pair)
    if not pairs:
        raise EvaluationError(f"{path}: no preference pairs")
    return pairs


def preference_margins(model: Any, tokenizer: Any, pairs: list[PreferencePair]) -> list[float]:
    """Per pair: l(y_w)/b(y_w) - l(y_l)/b(y_l), the log-prob per UTF-8 byte of the chosen response minus the
    rejected one's, each given the prompt in the model's own chat template (bytes: one unit for every tokenizer).
    The model prefers y_w where it is > 0. Each pair in one packed forward (fuse.backends.hf.pair_sums)."""
    samples = [
        DomainSample(p.group, (*p.prompt, {"role": "assistant", "content": side}), 0.0)
        for p in pairs
        for side in (p.chosen, p.rejected)
    ]
    from fuse.backends.hf import pair_sums

    rows = response_rows(tokenizer, samples)
    nll = []
    for k in range(len(pairs)):
        sums = pair_sums(model, rows[2 * k], rows[2 * k + 1])
        nll += (
            [-v for v in sums]
            if sums is not None
            else response_nll(model, tokenizer, samples[2 * k : 2 * k + 2])
        )
    per_byte = [value / max(1, s.response_bytes) for value, s in zip(nll, samples, strict=True)]
    return [per_byte[2 * i + 1] - per_byte[2 * i] for i in range(len(pairs))]


def preference_accuracy(pairs: list[PreferencePair], margins: list[float]) -> dict[str, float]:
    """The share of pairs with a positive margin, per group."""
    groups = sorted({p.group for p in pairs})
    return {
        g: sum(m > 0 for p, m in zip(pairs, margins, strict=True) if p.group == g)
        / sum(p.group == g for p in pairs)
        for g in groups
    }


def as_spec(name: str, model: ModelSpec | str | Path) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model if model.name else model.model_copy(update={"name": name})
    return ModelSpec(name=name.replace(".", "-"), path=str(model))


def evaluate_model(
    spec: ModelSpec,
    items: list[EvalItem],
    texts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    domains: list[DomainSample] | None = None,
    lm_eval: Any = None,
    pairs: list[PreferencePair] | None = None,
    code_limits: Any = None,
) -> dict[str, Any]:
    """One model's metrics, their standard errors (under `stderr`, keyed as the values) and per-item scores; `pairs`
    adds held-out preference accuracy, `lm_eval` (LmEvalSettings with tasks) lm-evaluation-harness results with the
    harness's standard errors; `code_limits` (fuse.code_exec.Limits) bound code items' test runs."""
    import torch

    from fuse.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec, require_chat_template=bool(items or domains))
    # float32 on CPU (tiny models, exact numbers); the model's own dtype where a GPU is there for real ones, and
    # spread over every GPU when there are several (a 72B source does not fit on one)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shard = "auto" if torch.cuda.device_count() > 1 else None
    model = load_model(
        spec, dtype="float32" if device == "cpu" else None, device=device, device_map=shard
    ).eval()
    result: dict[str, Any] = {"path": spec.path}
    per_item: dict[str, Any] = {}  # every item's score, for paired comparisons (fuse.item_scores)
    if items:
        completions = generate_greedy(
            model,
            tokenizer,
            [i.prompt for i in items],
            max_new_tokens,
            batch_size,
            [i.chat for i in items],
            [i.stop for i in items],
        )
        per_item["skill"] = [item_correct(i, c, code_limits) for i, c in zip(items, completions, strict=True)]
        result["skills"] = skill_accuracy(items, completions, per_item["skill"])
        result["mean_accuracy"] = sum(result["skills"].values()) / len(result["skills"])
        result["samples"] = example_outputs(items, completions, per_skill=2)
    if texts:
        nll, size = text_nll(model, tokenizer, texts)
        per_item["text"] = {"nll": nll, "bytes": size}
        result["ce_per_byte"] = sum(nll) / max(1, sum(size))
        result["bits_per_byte"] = result["ce_per_byte"] / math.log(2)
    if domains:
        nll = response_nll(model, tokenizer, domains)
        per_item["domain"] = {"nll": nll, "bytes": [s.response_bytes for s in domains]}
        result["domain_ce"] = domain_limits(
            [DomainSample(s.domain, s.messages, value) for s, value in zip(domains, nll, strict=True)]
        )
        result["mean_domain_ce"] = sum(result["domain_ce"].values()) / len(result["domain_ce"])
    if pairs:
        margins = preference_margins(model, tokenizer, pairs)
        per_item["preference"] = {"margin": margins, "group": [p.group for p in pairs]}
        result["preference"] = preference_accuracy(pairs, margins)
        result["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        result["preference_margin"] = sum(margins) / len(margins)
    if lm_eval is not None and lm_eval.tasks:
        from fuse.lm_eval import run_lm_eval

        del model  # lm-eval loads the model itself
        lm = run_lm_eval(spec.path, lm_eval, spec.trust_remote_code)
        result["lm_eval"], result["lm_eval_stderr"] = lm.metrics, lm.stderr
        per_item["lm_eval"] = lm.per_sample
    result[STDERR] = standard_errors(
        per_item, [i.skill for i in items], [s.domain for s in domains or ()], [p.group for p in pairs or ()]
    )
    result[ITEMS] = per_item
    return result


ITEMS = "per_item"  # the key of a result's per-item scores: written to scores.parquet, not to metrics.json


def collect_metrics(
    results: Mapping[str, Any],
    items: list[EvalItem],
    texts: list[str],
    domains: list[DomainSample] | None = None,
) -> dict[str, Any]:
    skills = sorted({i.skill for i in items})
    metrics = {
        "skills": skills,
        "n_items": {s: sum(i.skill == s for i in items) for s in skills},
        "n_texts": len(texts),
        "models": dict(results),
    }
    if domains:
        limits = domain_limits(domains)
        metrics["domains"] = list(limits)
        metrics["n_domain_samples"] = {d: sum(s.domain == d for s in domains) for d in limits}
        metrics["limit"] = {"domain_ce": limits, "mean_domain_ce": sum(limits.values()) / len(limits)}
    return metrics


def evaluate_models(
    models: Mapping[str, ModelSpec | str | Path],
    items: list[EvalItem],
    heldout_texts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    domains: list[DomainSample] | None = None,
) -> dict[str, Any]:
    """Metrics of every model, keyed by the given names: {"skills", "n_items", "n_texts", "models": {name: {...}}}
    (+ "domains" and the "limit" row with domain samples)."""
    results = {}
    for name, model in models.items():
        log.info("evaluating %s", name)
        results[name] = evaluate_model(
            as_spec(name, model), items, heldout_texts, max_new_tokens, batch_size, domains
        )
    return collect_metrics(results, items, heldout_texts, domains)


DOMAIN_PREFIX = "CE "  # a domain's column: "CE harbor"
PREFERENCE = (
    "pref acc"  # held-out preference accuracy (the share of pairs whose chosen response is likelier per byte)
)
MEAN_DOMAIN = "CE mean"
STDERR = "stderr"  # a result's standard errors, keyed as the values they belong to


@dataclass(frozen=True)
class Measurement:
    """One number of a model's evaluation and its standard error: a cell of evaluate's table, a row of the model
    card's results, an entry of its model-index."""

    label: str  # the table column: "capital", "mean", "CE/byte", "CE harbor", "pref acc", "mmlu acc"
    kind: str  # skill | mean | preference | text | domain | mean_domain | lm_eval
    group: str  # the skill, domain or lm-eval task; "" for an aggregate over them
    metric: str  # accuracy | ce_per_byte | the lm-eval metric (acc, exact_match, ...)
    value: float
    stderr: float | None
    lower_is_better: bool = False

    def format(self, digits: int | None = None) -> str:
        digits = digits if digits is not None else (3 if self.lower_is_better else 2)
        text = f"{self.value:.{digits}f}"
        return text if self.stderr is None else f"{text} ± {self.stderr:.{digits}f}"


def measurements(
    result: Mapping[str, Any], skills: Sequence[str] = (), domains: Sequence[str] = ()
) -> list[Measurement]:
    """Every number of one model's result (evaluate_model's), in the table's column order: skills, mean accuracy,
    preference accuracy, CE/byte, CE per domain and their mean, then lm-eval's task metrics; each with its
    standard error where the items were kept (lm-eval's own for its tasks)."""
    errors = result.get(STDERR, {})

    def one(label: str, kind: str, group: str, metric: str, key: str, lower: bool, within: str = "") -> list:
        """The value under result[within][key] (or result[key]) with its standard error, if it was measured."""
        values, errs = (result.get(within, {}), errors.get(within) or {}) if within else (result, errors)
        if values.get(key) is None:
            return []
        return [Measurement(label, kind, group, metric, float(values[key]), errs.get(key), lower)]

    found: list[Measurement] = []
    for skill in skills or result.get("skills", {}):
        found += one(skill, "skill", skill, "accuracy", skill, False, "skills")
    found += one("mean", "mean", "", "accuracy", "mean_accuracy", False)
    found += one(PREFERENCE, "preference", "", "accuracy", "preference_accuracy", False)
    found += one("CE/byte", "text", "", "ce_per_byte", "ce_per_byte", True)
    for domain in domains or result.get("domain_ce", {}):
        found += one(DOMAIN_PREFIX + domain, "domain", domain, "ce_per_byte", domain, True, "domain_ce")
    found += one(MEAN_DOMAIN, "mean_domain", "", "ce_per_byte", "mean_domain_ce", True)
    lm_errors = result.get("lm_eval_stderr", {})
    for task, values in sorted(result.get("lm_eval", {}).items()):
        for metric, value in sorted(values.items()):
            error = lm_errors.get(task, {}).get(metric)
            found.append(Measurement(f"{task} {metric}", "lm_eval", task, metric, float(value), error))
    return found


def markdown_table(metrics: Mapping[str, Any], best: Mapping[str, str | None] | None = None) -> str:
    """Rows = models (+ a `limit` row with domains), columns = skills + mean accuracy + preference accuracy +
    CE/byte of general text + CE/byte per domain and their mean; a cell is `value ± standard error` where the
    items were kept. Bold: `best[column]` when given (the significantly best model, from paired tests:
    fuse.compare.best_models), else the best value in each column (never the limit)."""
    skills = list(metrics["skills"])
    domains = list(metrics.get("domains", []))
    rows = {
        name: {m.label: m for m in measurements(r, skills, domains) if m.kind != "lm_eval"}
        for name, r in metrics["models"].items()
    }
    present = {label for cells in rows.values() for label in cells}
    canonical = [*skills, "mean"] if skills else []
    canonical += [PREFERENCE, "CE/byte"]
    canonical += [*(DOMAIN_PREFIX + d for d in domains), MEAN_DOMAIN] if domains else []
    # skills and domains as the evaluation asked for them (a model without them shows –); the others where measured
    asked = {*skills, "mean", *(DOMAIN_PREFIX + d for d in domains), MEAN_DOMAIN}
    columns = [c for c in canonical if c in present or c in asked]
    lower_is_better = {"CE/byte", MEAN_DOMAIN, *(DOMAIN_PREFIX + d for d in domains)}

    bold: dict[str, float | None] = {}
    for column in columns:
        values = [cells[column].value for cells in rows.values() if column in cells]
        # a column where every model scores the same (all 0.00) has no best
        distinct = len(set(values)) > 1
        bold[column] = (min if column in lower_is_better else max)(values) if distinct else None
        if best is not None:
            leader = best.get(column)
            bold[column] = rows[leader][column].value if leader in rows and column in rows[leader] else None
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        texts = []
        for column in columns:
            cell = cells.get(column)
            text = "–" if cell is None else cell.format()
            texts.append(
                f"**{text}**" if cell is not None and cell.value == bold[column] and len(rows) > 1 else text
            )
        lines.append(f"| {name} | " + " | ".join(texts) + " |")
    if "limit" in metrics:
        limit = {m.label: m for m in measurements(metrics["limit"], (), domains)}
        cells = [f"{limit[c].value:.3f}" if c in limit else "–" for c in columns]
        lines.append("| limit | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- standard errors


def _by_group(groups: Sequence[str], *columns: Sequence[float]) -> dict[str, list[list[float]]]:
    grouped: dict[str, list[list[float]]] = {}
    for index, group in enumerate(groups):
        rows = grouped.setdefault(group, [[] for _ in columns])
        for row, column in zip(rows, columns, strict=True):
            row.append(column[index])
    return dict(sorted(grouped.items()))


def standard_errors(
    per_item: Mapping[str, Any],
    skills: Sequence[str] = (),
    domains: Sequence[str] = (),
    groups: Sequence[str] = (),
) -> dict[str, Any]:
    """Every aggregate's standard error from the per-item scores it is computed from, keyed as the result's values
    (skills, mean_accuracy, ce_per_byte, domain_ce, mean_domain_ce, preference, preference_accuracy). `skills`,
    `domains`, `groups`: the skill of each item, the domain of each held-out response, the group of each pair."""
    errors: dict[str, Any] = {}
    if "skill" in per_item:
        grouped = _by_group(skills, per_item["skill"])
        errors["skills"] = {s: mean_stderr(v) for s, (v,) in grouped.items()}
        errors["mean_accuracy"] = mean_of_independent_stderr(list(errors["skills"].values()))
    if "text" in per_item:
        errors["ce_per_byte"] = ratio_stderr(per_item["text"]["nll"], per_item["text"]["bytes"])
    if "domain" in per_item:
        grouped = _by_group(domains, per_item["domain"]["nll"], per_item["domain"]["bytes"])
        errors["domain_ce"] = {d: ratio_stderr(nll, size) for d, (nll, size) in grouped.items()}
        errors["mean_domain_ce"] = mean_of_independent_stderr(list(errors["domain_ce"].values()))
    if "preference" in per_item:
        correct = [float(m > 0) for m in per_item["preference"]["margin"]]
        errors["preference"] = {g: mean_stderr(v) for g, (v,) in _by_group(groups, correct).items()}
        errors["preference_accuracy"] = mean_stderr(correct)
    return errors

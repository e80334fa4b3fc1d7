"""lm-evaluation-harness through fuse/lm_eval.py, offline: tasks of our own over local JSONL (the zoo's held-out
items) on the zoo's pivot. Multiple choice: lm-eval's accuracy equals the one computed by hand from the model's own
log-likelihoods of each choice. Generation in the model's chat template: it scores its own skill, not another."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
from lm_eval.api.metrics import mean_stderr

from fuse.lm_eval import LmEvalError, metrics_table, per_sample_table, run_lm_eval, stderr_table
from fuse.recipe import LmEvalSettings

pytestmark = pytest.mark.slow

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


GENERATION_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>", "\\n"]
  do_sample: false
  max_gen_toks: 16
metric_list:
  - metric: exact_match
"""


def write_task(folder: Path, name: str, items: list[dict], seed: int = 0) -> None:
    """Each item's answer among three other answers of the same skill, at a random position."""
    rng = random.Random(seed)
    answers = sorted({i["answer"] for i in items})
    rows = []
    for item in items:
        choices = rng.sample([a for a in answers if a != item["answer"]], 3) + [item["answer"]]
        rng.shuffle(choices)
        rows.append({"prompt": item["prompt"], "choices": choices, "gold": choices.index(item["answer"])})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data), encoding="utf-8")


def accuracy_by_hand(model_dir: Path, rows: list[dict]) -> float:
    """argmax over choices of log p(" " + choice | prompt + "\\nAnswer:"), as lm-eval scores multiple choice."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    for row in rows:
        context = row["prompt"] + "\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, len(context_ids) :]
            scores.append(float(logprobs[len(context_ids) - 1 :].gather(-1, targets[:, None]).sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return right / len(rows)


def test_a_local_task_runs_offline_and_matches_the_models_own_likelihoods(zoo, tmp_path):
    items = [json.loads(line) for line in Path(zoo.eval_items).read_text().splitlines()]
    by_skill = {s: [i for i in items if i["skill"] == s][:12] for s in ("capital", "translate")}
    for skill, chosen in by_skill.items():
        write_task(tmp_path, f"zoo_{skill}", chosen)
    settings = LmEvalSettings(
        tasks=["zoo_capital", "zoo_translate"], include_path=str(tmp_path), batch_size=4
    )
    result = run_lm_eval(zoo.pivot, settings)
    table = result.metrics
    assert set(table) == {"zoo_capital", "zoo_translate"}
    for skill in by_skill:
        rows = [json.loads(line) for line in (tmp_path / f"zoo_{skill}.jsonl").read_text().splitlines()]
        assert table[f"zoo_{skill}"]["acc"] == pytest.approx(accuracy_by_hand(zoo.pivot, rows))
        # every sample's score, in doc order, for paired comparisons; and the harness's standard error
        per_sample = result.per_sample[f"zoo_{skill}"]["acc"]
        assert len(per_sample) == len(rows) and set(per_sample) <= {0.0, 1.0}
        assert sum(per_sample) / len(rows) == pytest.approx(table[f"zoo_{skill}"]["acc"])
        # the harness's standard error is kept: a mean's, sample SD / √n of the per-sample scores
        spread = statistics.stdev(per_sample) / math.sqrt(len(per_sample))
        assert result.stderr[f"zoo_{skill}"]["acc"] == pytest.approx(spread) == mean_stderr(per_sample)


def test_a_generation_task_in_the_models_chat_template_sees_its_skill(zoo, tmp_path):
    """Greedy answers in the pivot's own chat template, exact match: it knows capitals, not the translations (as
    the demo's own evaluation table says)."""
    items = [json.loads(line) for line in Path(zoo.eval_items).read_text().splitlines()]
    for skill in ("capital", "translate"):
        data = tmp_path / f"{skill}.jsonl"
        chosen = [i for i in items if i["skill"] == skill]  # every item: a floor with a margin across CPUs
        data.write_text("".join(json.dumps(i) + "\n" for i in chosen), encoding="utf-8")
        (tmp_path / f"gen_{skill}.yaml").write_text(GENERATION_TASK.format(name=f"gen_{skill}", data=data))
    settings = LmEvalSettings(
        tasks=["gen_capital", "gen_translate"],
        include_path=str(tmp_path),
        batch_size=4,
        apply_chat_template=True,
    )
    table = run_lm_eval(zoo.pivot, settings).metrics
    # the zoo's contract (tests/test_zoo.py): the owner answers at least 6 in 10 of its skill, the others none
    assert set(table) == {"gen_capital", "gen_translate"} and table["gen_translate"] == {"exact_match": 0.0}
    assert table["gen_capital"]["exact_match"] >= 0.6


def test_unknown_task_is_named_before_the_model_loads(tmp_path):
    settings = LmEvalSettings(tasks=["no_such_task_xyz"], include_path=str(tmp_path))
    with pytest.raises(
        LmEvalError, match=r"stages\.evaluate\.lm_eval\.tasks: unknown task\(s\) no_such_task_xyz"
    ):
        run_lm_eval(tmp_path / "no-model", settings)


def test_metrics_table_drops_stderr_and_filters():
    results = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}}
    }
    assert metrics_table(results) == {"t": {"acc": 0.5, "acc_norm": 0.75}}
    assert stderr_table(results) == {"t": {"acc": 0.1}}


def test_per_sample_scores_follow_doc_order_and_skip_corpus_metrics():
    samples = [
        {"doc_id": 1, "acc": 0.0, "bleu": ("ref", "out")},
        {"doc_id": 0, "acc": 1.0, "bleu": ("r", "o")},
    ]
    table = per_sample_table({"samples": {"t": samples}}, {"t": {"acc": 0.5, "bleu": 12.0}})
    assert table == {"t": {"acc": [1.0, 0.0]}}


def test_the_evaluate_stage_reports_lm_eval_beside_its_table(zoo, tmp_path):
    """stages.evaluate.lm_eval runs the tasks on every evaluated model; metrics.md gets their table."""
    from fuse.evaluation import collect_metrics, evaluate_model
    from fuse.recipe import ModelSpec
    from fuse.stages.evaluate import lm_eval_markdown

    items = [json.loads(line) for line in Path(zoo.eval_items).read_text().splitlines()]
    write_task(tmp_path, "zoo_capital", [i for i in items if i["skill"] == "capital"][:6])
    settings = LmEvalSettings(tasks=["zoo_capital"], include_path=str(tmp_path), batch_size=4)
    result = evaluate_model(ModelSpec(name="pivot", path=str(zoo.pivot)), [], [], lm_eval=settings)
    assert 0.0 <= result["lm_eval"]["zoo_capital"]["acc"] <= 1.0
    lines = lm_eval_markdown(collect_metrics({"pivot": result}, [], []))
    assert lines[0] == "## lm-evaluation-harness" and lines[4].startswith("| pivot | ")
    value, error = result["lm_eval"]["zoo_capital"]["acc"], result["lm_eval_stderr"]["zoo_capital"]["acc"]
    assert lines[4] == f"| pivot | {value:.3f} ± {error:.3f} |"  # value ± the harness's standard error

"""Hostile inputs, each refused up front with its file, line or key, or counted and skipped, never a hang, a dead
stage or an exhausted memory: bad and oversized rows in every data layout, a chat template that never ends, a YAML
alias bomb, a huge value in a recipe, the tail of a huge log."""

from __future__ import annotations

import io
import json
import re
import signal
import threading
import tracemalloc
from pathlib import Path

import pytest
import yaml

from fuse.cli import main
from fuse.recipe import RecipeError, load_recipe, parse_recipe

from recipes import SFT_ROWS, toy_recipe, write_recipe

# ------------------------------------------------------------------------------------------ rows: every layout

BIG = "x" * 1_200_000  # over the 1 MiB a toy recipe's max_length allows per row
BIG_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": BIG}]}


def _lines(rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _json_array(raw_rows: list[bytes]) -> bytes:
    """A JSON array file with one row per line: row i (0-based) starts on line i + 2."""
    return b"[\n" + b",\n".join(raw_rows) + b"\n]\n"


def _write_folder(parent: Path) -> tuple[Path, str]:
    folder = parent / "sft"
    folder.mkdir()
    (folder / "part-0.jsonl").write_bytes(_lines(SFT_ROWS[:10]))
    (folder / "part-1.jsonl").write_bytes(_lines([SFT_ROWS[10], SFT_ROWS[11], BIG_ROW]))
    return folder, f"{folder / 'part-1.jsonl'}:3: a row of 1.2 MB"


def _write_json_array(folder: Path) -> tuple[Path, str]:
    path = folder / "sft.json"
    path.write_bytes(_json_array([json.dumps(row).encode() for row in [*SFT_ROWS[:3], BIG_ROW]]))
    return path, f"{path}:5: a row of 1.2 MB"


def _write_json_lines(folder: Path) -> tuple[Path, str]:
    path = folder / "sft.json"
    path.write_bytes(_lines([*SFT_ROWS[:3], BIG_ROW]))
    return path, f"{path}:4: a row of 1.2 MB"


def _write_parquet(folder: Path) -> tuple[Path, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([*SFT_ROWS[:3], BIG_ROW]), path)
    return path, f"{path}: row 4: a row of 1.2 MB"


def _write_arrow(folder: Path) -> tuple[Path, str]:
    import pyarrow as pa

    path = folder / "sft.arrow"
    table = pa.Table.from_pylist([*SFT_ROWS[:3], BIG_ROW])
    with pa.ipc.new_stream(str(path), table.schema) as writer:  # what `datasets` writes
        writer.write_table(table)
    return path, f"{path}: row 4: a row of 1.2 MB"


def _write_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "sft.csv"
    path.write_text(f'prompt,response\nq1,a1\n"a question\non two lines",{BIG}\nq3,a3\n', encoding="utf-8")
    return path, f"{path}:3: a field over the 1.0 MB"


LAYOUTS = {
    "folder of .jsonl": _write_folder,
    ".json array": _write_json_array,
    ".json lines": _write_json_lines,
    ".parquet": _write_parquet,
    ".arrow": _write_arrow,
    ".csv": _write_csv,
}


def _with_sft(tmp_path: Path, path: Path, **spec) -> dict:
    recipe = toy_recipe(tmp_path)
    recipe["data"]["sft"] = {"path": str(path), **spec}
    return recipe


@pytest.mark.parametrize("layout", LAYOUTS)
def test_validate_refuses_an_oversized_row_in_every_layout_prepare_reads(tmp_path, layout):
    from fuse.validate import require_files

    (tmp_path / "input").mkdir()
    path, expected = LAYOUTS[layout](tmp_path / "input")
    spec = {"format": "prompt_response"} if layout == ".csv" else {}
    with pytest.raises(RecipeError) as info:
        require_files(parse_recipe(_with_sft(tmp_path, path, **spec)))
    assert f"data.sft.path: {expected}" in str(info.value)


BAD_JSON = b'{"messages": [}'
RAW_NUL = b'{"messages": [{"role": "user", "content": "a\x00b"}]}'


NUL_COLUMN = RAW_NUL.index(b"\0") + 1


@pytest.mark.parametrize(
    "suffix, bad, expected",
    [
        (".jsonl", BAD_JSON, ":4: not valid JSON: Expecting value (column 15)"),
        (".jsonl", RAW_NUL, f":4: a raw NUL byte at column {NUL_COLUMN} (JSON writes it escaped: \\u0000)"),
        (".json", RAW_NUL, f":5: a raw NUL byte at column {NUL_COLUMN} (JSON writes it escaped: \\u0000)"),
    ],
)
def test_validate_names_the_file_and_line_of_a_row_that_is_not_json(tmp_path, suffix, bad, expected):
    from fuse.validate import require_files

    rows = [json.dumps(row).encode() for row in SFT_ROWS[:3]] + [bad] + [json.dumps(SFT_ROWS[3]).encode()]
    path = tmp_path / f"sft{suffix}"
    path.write_bytes(_json_array(rows) if suffix == ".json" else b"\n".join(rows) + b"\n")
    with pytest.raises(RecipeError) as info:
        require_files(parse_recipe(_with_sft(tmp_path, path)))
    assert [line for line in str(info.value).splitlines() if "data.sft" in line] == [
        f"  - data.sft.path: {path}{expected}"
    ]


def _prepare(tmp_path: Path, recipe: dict) -> tuple[Path, dict]:
    from fuse.executor import run

    recipe["stages"] = {
        stage: {"enabled": False}
        for stage in ("extract", "score", "align", "distill", "fpo", "merge", "evaluate", "publish")
    }
    run(parse_recipe(recipe), echo=lambda _: None)
    out = tmp_path / "run" / "prepare" / "out"
    return out, json.loads((out / "report.json").read_text())


def test_prepare_counts_and_skips_unreadable_rows_with_their_file_and_line(tmp_path):
    from fuse.data.prepared import load_split

    hostile = {
        3: BAD_JSON,
        6: RAW_NUL,
        9: b'{"messages": "\xff"}',
        12: b"[1, 2]",
        15: b'{"messages": "a string where a list was"}',  # `datasets` dies on the changed type
        18: b'{"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}',
        21: b'{"conversation": []}',  # a column some rows lack: dropped, not a recipe error
    }
    good = iter(json.dumps(row).encode() for row in SFT_ROWS)
    lines = [hostile.get(number) or next(good) for number in range(1, len(SFT_ROWS) + len(hostile) + 1)]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    out, report = _prepare(tmp_path, _with_sft(tmp_path, path))

    sft = report["sft"]
    assert sft["rows_read"] == 27 and sft["rows_kept"] == 20
    assert sft["dropped"] == {
        "not valid JSON": 1,
        "raw NUL byte": 1,
        "not UTF-8": 1,
        "not a JSON object": 1,
        "messages is empty or not a list": 1,
        "unknown role ['user']": 1,
        "no column 'messages'": 1,
    }
    unreadable = {(e["file"], e["line"]) for e in sft["dropped_examples"] if "line" in e}
    assert unreadable == {(str(path), 3), (str(path), 6), (str(path), 9), (str(path), 12)}
    assert len(load_split(out, "sft", "train")) + len(load_split(out, "sft", "heldout")) == 20
    log = (tmp_path / "run" / "prepare" / "logs" / "stage.log").read_text()
    assert f"{path}:3: not valid JSON" in log and f"{path}:6: a raw NUL byte" in log


def test_prepare_skips_bad_rows_of_a_json_array(tmp_path):
    rows = [json.dumps(row).encode() for row in SFT_ROWS[:5]]
    path = tmp_path / "sft.json"
    path.write_bytes(_json_array([*rows[:2], RAW_NUL, b"5", *rows[2:]]))
    _out, report = _prepare(tmp_path, _with_sft(tmp_path, path))
    assert report["sft"]["rows_kept"] == 5
    assert report["sft"]["dropped"] == {"raw NUL byte": 1, "not a JSON object": 1}
    assert [e["line"] for e in report["sft"]["dropped_examples"]] == [4, 5]


def test_normalizers_drop_rows_of_any_json_shape():
    from fuse.data.prepared import Dropped, preference_row, sft_messages

    with pytest.raises(Dropped, match="unknown role"):
        sft_messages({"messages": [{"role": {"a": 1}, "content": "q"}]}, "messages", {})
    with pytest.raises(Dropped, match="prompt is neither"):
        preference_row({"prompt": 5, "chosen": "a", "rejected": "b"}, {})


# ------------------------------------------------------------------------------------------ a template that never ends

NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))


@pytest.mark.timeout(120)
def test_a_chat_template_that_never_ends_fails_validate_naming_the_model(monkeypatch):
    from fuse.data import chat
    from fuse.models import ModelLoadError
    from fuse.recipe import ModelSpec
    from fuse.validate import check_template

    monkeypatch.setattr(chat, "RENDER_TIME_LIMIT_S", 0.5)
    with pytest.raises(
        ModelLoadError, match=r"model 'llama': the chat template did not render .* within 0.5 s"
    ):
        check_template(ModelSpec(name="llama", path="unused"), _tokenizer(), NEVER_ENDS)


def test_the_render_time_limit_puts_back_the_previous_alarm():
    from fuse.data.chat import TemplateTimeout, time_limit

    def outer(signum, frame):
        raise AssertionError("the outer alarm went off")

    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        with pytest.raises(TemplateTimeout, match="too slow"), time_limit(0.05, "too slow"):
            while True:
                pass
        assert signal.getsignal(signal.SIGALRM) is outer
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_render_time_limit_is_no_limit_outside_the_main_thread():
    from fuse.data.chat import time_limit

    seen = []

    def work():
        with time_limit(0.01, "never"):
            seen.append(signal.getitimer(signal.ITIMER_REAL)[0])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [0.0]  # ran, no timer set (signal handlers belong to the main thread)


# ------------------------------------------------------------------------------------------ YAML alias bombs


def _bomb(levels: int = 6, width: int = 10) -> list[str]:
    """`a: &a [x, x, ...]`, `b: &b [*a, *a, ...]`, ...: width**levels values from a few hundred bytes."""
    names = "abcdefghij"[:levels]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for previous, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * width)}]")
    return lines


def _recipe_with_bomb(tmp_path: Path, keys: tuple[str, ...]) -> Path:
    recipe = toy_recipe(tmp_path)
    node = recipe
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = "BOMB"
    text = yaml.safe_dump(recipe, sort_keys=False)
    match = re.search(r"^( *)(\S+): BOMB$", text, re.MULTILINE)
    indent = match.group(1) + "  "
    bomb = "\n".join(indent + line for line in _bomb())
    path = tmp_path / "bomb.yaml"
    path.write_text(
        text[: match.start()] + f"{match.group(1)}{match.group(2)}:\n{bomb}" + text[match.end() :]
    )
    return path


@pytest.mark.parametrize(
    "keys",
    [
        ("stages", "merge", "parameters"),
        ("stages", "extract", "vllm", "engine_kwargs"),
        ("stages", "distill", "deepspeed", "config"),
    ],
)
def test_an_alias_bomb_in_a_free_form_mapping_is_refused_naming_its_key(tmp_path, keys):
    path = _recipe_with_bomb(tmp_path, keys)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert re.match(
        rf"{re.escape(str(path))}: {re.escape('.'.join(keys))}\.f: YAML aliases \(\*name\) expand this to "
        r"1,2\d\d,\d\d\d values, .* \(at most 100,000\)",
        str(info.value),
    )


def test_an_alias_bomb_in_a_set_override_is_refused(tmp_path):
    path = write_recipe(tmp_path, toy_recipe(tmp_path))
    flow = "{" + ", ".join(line.replace(": ", ": ", 1) for line in _bomb()) + "}"
    with pytest.raises(RecipeError, match=r"--set stages.merge.parameters: f: YAML aliases"):
        load_recipe(path, [f"stages.merge.parameters={flow}"])


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    recipe = yaml.safe_dump(toy_recipe(tmp_path), sort_keys=False)
    path = tmp_path / "loop.yaml"
    path.write_text(
        recipe.replace("stages:\n", "stages:\n  merge:\n    parameters:\n      loop: &loop [*loop]\n")
    )
    with pytest.raises(
        RecipeError, match=r"stages.merge.parameters.loop.0: a YAML alias that contains itself"
    ):
        load_recipe(path)


def test_plain_aliases_still_load(tmp_path):
    text = yaml.safe_dump(toy_recipe(tmp_path), sort_keys=False)
    path = tmp_path / "aliases.yaml"
    shared = "  distill:\n    learning_rate: &lr 3.0e-5\n  fpo:\n    learning_rate: *lr\n"
    path.write_text(text.replace("stages:\n", "stages:\n" + shared))
    recipe = load_recipe(path)
    assert recipe.stages.distill.learning_rate == recipe.stages.fpo.learning_rate == 3.0e-5


# ------------------------------------------------------------------------------------------ huge values in errors


@pytest.mark.parametrize(
    "where",
    ["name", "an item of a list", "an unknown key"],
)
def test_a_huge_invalid_value_is_quoted_by_its_ends_and_length(tmp_path, where):
    recipe = toy_recipe(tmp_path)
    huge = "x" * 1_000_000 + "!"
    if where == "name":
        recipe["name"] = huge
    elif where == "an item of a list":
        recipe["executor"] = {"resources": {"distill": {"extra": ["--exclusive", huge + "\n"]}}}
    else:
        recipe["stages"]["extract"][huge] = 1
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    message = str(info.value)
    assert len(message) < 1500 and "characters]" in message
    if where == "name":
        assert (
            "name: 'xxx" in message and "[1,000,001 characters]" in message and "must be letters" in message
        )


def test_the_command_line_quotes_a_huge_value_by_its_ends(tmp_path, capsys):
    recipe = toy_recipe(tmp_path)
    recipe["sources"][0]["path"] = "models/" + "x" * 1_000_000  # no file can have that name
    assert main(["run", str(write_recipe(tmp_path, recipe))]) == 2
    error = capsys.readouterr().err
    assert len(error) < 1500 and "sources.0.path: 'models/xxx" in error and "[1,000,007 characters]" in error


# ------------------------------------------------------------------------------------------ the tail of a huge log


class CountingReader(io.BytesIO):
    """A binary file that counts the bytes read from it."""

    bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_the_tail_of_a_log_reads_only_its_end():
    from fuse.logs import TAIL_BLOCK, tail_lines

    handle = CountingReader(b"".join(b"line %d\n" % i for i in range(1_000_000)))  # 12 MB
    assert tail_lines(handle, 5) == [f"line {i}" for i in range(999_995, 1_000_000)]
    assert handle.bytes_read <= TAIL_BLOCK


def test_the_tail_of_a_log_at_its_edges():
    from fuse.logs import TAIL_BLOCK, TAIL_BYTES_PER_LINE, tail_lines

    assert tail_lines(io.BytesIO(b"a\nb\nc"), 2) == ["b", "c"]  # no final newline
    assert tail_lines(io.BytesIO(b"a\nb\n"), 10) == ["a", "b"]
    assert tail_lines(io.BytesIO(b"a\nb\n"), 0) == []
    text = "a" + "é" * (TAIL_BLOCK // 2 + 7000) + "\n" + "ü" * 10 + "\n"  # an é split by the block boundary
    assert tail_lines(io.BytesIO(text.encode()), 2) == text.splitlines()
    endless = CountingReader(b"x" * (10 * TAIL_BYTES_PER_LINE) + b"\nlast\n")  # one progress-bar "line"
    lines = tail_lines(endless, 2)
    assert lines[-1] == "last" and lines[0].startswith("…x") and endless.bytes_read <= 2 * TAIL_BYTES_PER_LINE


def test_fuse_logs_holds_the_lines_asked_for_not_the_log(tmp_path, capsys):
    recipe = toy_recipe(tmp_path)
    path = str(write_recipe(tmp_path, recipe))
    logs = Path(recipe["workdir"]) / "prepare" / "logs"
    logs.mkdir(parents=True)
    with open(logs / "stage.log", "wb") as handle:
        block = (b"x" * 99 + b"\n") * 10_000  # 1 MB
        for _ in range(40):
            handle.write(block)
        handle.write(b"".join(b"the end %d\n" % i for i in range(5)))
    assert main(["logs", path, "prepare", "-n", "1"]) == 0  # imports done before measuring
    capsys.readouterr()
    tracemalloc.start()
    try:
        assert main(["logs", path, "prepare", "-n", "5"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert capsys.readouterr().out.splitlines()[-5:] == [f"the end {i}" for i in range(5)]
    assert peak < 8_000_000  # reading the whole 40 MB log would take ten times that


def test_site_configs_and_merge_configs_bound_their_aliases_too(tmp_path):
    from fuse.merging.config import load_merge_config
    from fuse.merging.methods import MergeConfigError
    from fuse.slurm.site import load_site

    site = tmp_path / "site.yaml"
    site.write_text("resources:\n  default:\n    extra:\n" + "".join(f"      {line}\n" for line in _bomb()))
    with pytest.raises(RecipeError, match="YAML aliases"):
        load_site(site)
    merge = tmp_path / "merge.yaml"
    merge.write_text("merge_method: linear\nparameters:\n" + "".join(f"  {line}\n" for line in _bomb()))
    with pytest.raises(MergeConfigError, match="YAML aliases"):
        load_merge_config(merge)

"""No process outlives the fuse that started it (issue "Reliability round 2", item 3): a command run through
fuse.process_group, and a real two-rank training under `accelerate launch`, end with their parent — on SIGTERM,
SIGINT, SIGKILL (the parent-death signal) and an ordinary exit — and SIGUSR1 still reaches the ranks' preemption.
Also item 9: saved tokenizer_config.json files carry no loader-only keys."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_distill

from fuse.models import LOADER_KEYS, load_tokenizer_dir
from fuse.process_group import run_in_group

pivot_dir = test_distill.pivot_dir  # fixtures: the tiny pivot, and its synthetic training set
train_data = test_distill.train_data

GONE_WITHIN_S = 30  # generous: a bound on "gone", not a timing claim

# The launched command: a child that starts a grandchild (like `accelerate launch` and its ranks), writes both
# pids, and waits. With an argument "usr1", it saves-and-stops on SIGUSR1 (exit 75) as a preempted rank does.
CHILD = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    if sys.argv[2:] == ["usr1"]:
        signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(out + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.rename(out + ".tmp", out)
    time.sleep(600)
    """
)

# The fuse side: run CHILD through the helper, inside preemption's checkpointing block as training does.
PARENT = textwrap.dedent(
    """
    import signal, sys
    # Ctrl-C raises KeyboardInterrupt, as in a shell, even when the suite was started in the background (`cmd &`
    # makes a non-interactive shell's jobs ignore SIGINT, and that is inherited: the parent would never stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from fuse import preemption
    from fuse.process_group import run_in_group
    with preemption.checkpointing():
        code = run_in_group([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], grace_s=5)
    print(code, preemption.requested(), flush=True)
    """
)


def alive(pid: int) -> bool:
    """Running or sleeping: /proc has it and it is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], within_s: float = GONE_WITHIN_S) -> list[int]:
    """The pids still alive after `within_s` (none, when they all went)."""
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(path: Path, process: subprocess.Popen, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert process.poll() is None, f"exited early ({process.returncode})"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def start_parent(tmp_path: Path, *child_args: str) -> tuple[subprocess.Popen, list[int]]:
    """The fuse-like parent, once its child and grandchild are up; returns it and [child, grandchild]."""
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(pids_file), *child_args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(pids_file, parent)
    except AssertionError:
        parent.kill()
        raise
    return parent, [int(p) for p in pids_file.read_text().split()]


# --------------------------------------------------------------------------------------------- the helper


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stopping_the_parent_ends_the_child_and_its_grandchild(tmp_path, signum):
    """Before: `subprocess.run` left the launched command and what it started running, re-parented to init."""
    parent, pids = start_parent(tmp_path)
    try:
        parent.send_signal(signum)
        parent.communicate(timeout=GONE_WITHIN_S)
        assert wait_gone(pids) == []
        if signum == signal.SIGTERM:
            assert parent.returncode == 128 + signal.SIGTERM  # exits as if killed by it, after the clean-up
        else:
            assert parent.returncode != 0  # KeyboardInterrupt
    finally:
        parent.kill()
        kill_all(pids)


def test_sigkill_of_the_parent_ends_the_child(tmp_path):
    """No clean-up runs in a SIGKILLed parent: the child goes by its parent-death signal."""
    parent, (child, grandchild) = start_parent(tmp_path)
    try:
        parent.kill()
        parent.wait()
        assert wait_gone([child]) == []
    finally:
        kill_all([child, grandchild])


def test_usr1_reaches_the_group_and_the_parents_preemption_flag(tmp_path):
    """SIGUSR1 (SLURM's "checkpoint and stop") is passed on; the parent waits for the child to stop by itself."""
    parent, pids = start_parent(tmp_path, "usr1")
    try:
        parent.send_signal(signal.SIGUSR1)
        output, _ = parent.communicate(timeout=GONE_WITHIN_S)
        assert parent.returncode == 0
        assert output.split() == ["75", "True"]  # the child's own exit status; the flag set in the parent
        assert wait_gone(pids) == []
    finally:
        parent.kill()
        kill_all(pids)


def test_what_an_ended_command_left_in_its_group_is_ended(tmp_path):
    """An ordinary exit of the command: a process it left behind in its group does not outlive the call."""
    pid_file = tmp_path / "pid"
    leave_one = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    try:
        assert run_in_group([sys.executable, "-c", leave_one], grace_s=5) == 0
        assert wait_gone([int(pid_file.read_text())]) == []
    finally:
        if pid_file.exists():
            kill_all([int(pid_file.read_text())])


# --------------------------------------------------------------------------------------------- real training


def descendants(root: int) -> list[int]:
    """Every living process under `root`, by the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# (whom the signal is sent to, the signal, how the `fuse` process ends)
STOPS = [
    ("fuse", signal.SIGTERM, 128 + signal.SIGTERM),  # the case of the issue
    ("fuse", signal.SIGKILL, -signal.SIGKILL),  # no clean-up: the launcher's parent-death signal
    ("launcher", signal.SIGKILL, 1),  # the ranks' own parent-death signal; fuse reports the failed training
    ("fuse", signal.SIGUSR1, 75),  # preemption: the ranks save a checkpoint and stop; so does the stage
]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("whom", "signum", "exit_status"), STOPS, ids=lambda v: getattr(v, "name", v))
def test_two_rank_training_ends_with_the_process_that_launched_it(
    tmp_path,
    pivot_dir,
    train_data,
    whom,
    signum,
    exit_status,
):
    """Before: `accelerate launch` and both ranks (num_processes 2, DeepSpeed on CPU) kept training, re-parented
    to init, after a SIGTERM of the `fuse` that launched them; a rerun then trained beside them."""
    from fuse.recipe import DeepSpeedSettings
    from fuse.training import newest_complete_checkpoint

    job = test_distill.distill_job(
        tmp_path,
        pivot_dir,
        train_data,
        max_steps=100_000,
        save_steps=100_000,
        num_processes=2,
        deepspeed=DeepSpeedSettings(stage=2),
    )
    job_path = tmp_path / "job-under-test.json"
    job.save(job_path)
    code = f"from fuse import training; training.train(training.TrainingJob.load({str(job_path)!r}))"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    launched: list[int] = []
    try:
        wait_for(Path(job.log_dir) / "train.jsonl", parent, within_s=300)  # both ranks are past a step
        launched = descendants(parent.pid)
        assert sum("fuse.training" in cmdline(p) for p in launched) == 3  # the launcher and two ranks
        if whom == "fuse":
            parent.send_signal(signum)
        else:
            os.kill(next(p for p in launched if "accelerate.commands.launch" in cmdline(p)), signum)
        assert parent.wait(timeout=120) == exit_status
        assert wait_gone(launched) == [], [cmdline(p) for p in launched if alive(p)]
        if signum == signal.SIGUSR1:
            assert newest_complete_checkpoint(Path(job.checkpoint_dir)) is not None  # not a periodic one
    finally:
        parent.kill()
        kill_all(launched)


# --------------------------------------------------------------------------------------------- tokenizer_config.json


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


def test_a_tokenizer_fuse_loaded_saves_no_loader_keys(tmp_path, pivot_dir):
    """Before: "is_local": true and "local_files_only": true (HF_HUB_OFFLINE) in every re-saved tokenizer_config.json
    (merge's pivot files, the trained targets, the published folder); what the tokenizer is stays."""
    load_tokenizer_dir(pivot_dir).save_pretrained(tmp_path / "saved")
    config = saved_config(tmp_path / "saved")
    assert not set(LOADER_KEYS) & set(config)
    original = saved_config(pivot_dir)
    assert {k: config.get(k) for k in original} == original


def test_the_published_folder_has_no_loader_keys(tmp_path, pivot_dir):
    from fuse.stages.publish import copy_model

    copy_model(pivot_dir, tmp_path / "published", max_shard_size="1GB")
    assert not {"is_local", "local_files_only"} & set(saved_config(tmp_path / "published"))

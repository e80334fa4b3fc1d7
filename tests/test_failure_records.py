"""A failure is recorded with the instance's name even when the disk is full, and an instance whose process is
gone is not shown as running."""

from __future__ import annotations

import errno

import pytest

from fuse.executor import StageFailed, run
from fuse.recipe import parse_recipe
from fuse.slurm.status import collect_status
from fuse.store import RunStore

from recipes import toy_recipe

pytestmark = pytest.mark.usefixtures("toy_stage_modules")


class NoScheduler:
    def available(self) -> bool:
        return False


def test_a_full_disk_keeps_the_instance_name_and_status_does_not_say_running(tmp_path, monkeypatch):
    recipe = parse_recipe(toy_recipe(tmp_path))
    run(recipe, only=["prepare"], echo=lambda _: None)

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("TOY_FAIL", "")
    monkeypatch.setattr("toy_stages.write_json_atomic", disk_full)  # the stage's output write
    monkeypatch.setattr(RunStore, "fail", disk_full)  # and the manifest's
    with pytest.raises(StageFailed, match=r"stage extract\.pivot failed: OSError: .*No space left"):
        run(recipe, only=["extract.pivot"], echo=lambda _: None)
    assert RunStore(recipe.workdir).manifest("extract.pivot")["status"] == "running"  # what the disk left
    rows = {row.instance: row for row in collect_status(recipe, NoScheduler())}
    assert rows["extract.pivot"].state == "partial" and "interrupted" in rows["extract.pivot"].detail

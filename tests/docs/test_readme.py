"""The README's "one command per task" block, run as written (a shorter training run, free
ports instead of 3000 and 3002) beside a running ``make run``, as the README says it may."""

from __future__ import annotations

import csv
import json
import shlex

import httpx
import pytest

from tests.docs.runbook import Scratch, page_blocks

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    (block,) = page_blocks("README.md")
    return block.commands()


def test_the_block_covers_every_task():
    verbs = [shlex.split(line)[:2] for line in readme_commands()]
    assert [v[1] for v in verbs if v[0] == "imgclf"] == [
        "train", "export", "serve", "score", "evaluate"
    ]  # fmt: skip


def test_readme_commands_run_as_written_beside_make_run(
    tmp_path, digits_home, digits_run, digits_model
):
    scratch = Scratch.after_make_run(tmp_path, digits_home, digits_run, digits_model)
    outputs = {}
    try:
        scratch.run("imgclf serve --model model_repository/digits --port 3000")  # make run's
        for line in readme_commands():
            if line.startswith("imgclf train"):
                line = line.split("  #")[0] + " --epochs 6"  # the one change: a shorter run
            outputs[line.split("  #")[0].strip()] = scratch.run(line)
        predicted = outputs["curl -F image=@examples/digit-3.png http://127.0.0.1:3002/predict"]
        # What the README says: the export published version 2 beside make run's version 1,
        # which make run's server (following the newest) switched to.
        make_runs = httpx.get(scratch.url("3000") + "/metadata", timeout=10).json()
    finally:
        scratch.stop()
    answer = json.loads(predicted)
    assert answer["label"] == "3" and answer["model_version"] == 2
    assert make_runs["versions"]["live"] == 2, make_runs["versions"]
    assert "imgclf_requests_total" in outputs["curl http://127.0.0.1:3002/metrics"]
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["label"] for row in rows) == ["0", "3", "7"]
    assert (tmp_path / "runs/digits/eval/evaluation.json").exists()

"""``imgclf score``: inputs, exact output columns, bad files, a killed job resumed, and the same
answers as the HTTP service."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serving.batch.job import score
from serving.batch.writers import COLUMNS, open_output
from serving.core.runtime import ClassifierRuntime
from tests.conftest import (
    IMGCLF,
    assert_one_line_error,
    assert_refused_before_the_model_loads,
    run_cli,
)
from tests.data import make_image_folder


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("score") / "images", 8, (0, 1, 2, 3, 4))


@pytest.fixture(scope="module")
def runtime(published_model):
    return ClassifierRuntime(published_model, provider="cpu", max_batch_size=8)


def all_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


def test_folder_input_to_csv_with_the_exact_columns(tmp_path, images, runtime):
    output = tmp_path / "scores.csv"
    summary = score(images, runtime, output, top_k=3, chunk_size=16, progress=False)
    assert (summary.scored, summary.failed, summary.skipped) == (40, 0, 0)
    with output.open() as handle:
        assert tuple(handle.readline().strip().split(",")) == COLUMNS
    rows = read_csv(output)
    assert sorted(r["path"] for r in rows) == all_files(images)
    for row in rows:
        labels, scores = json.loads(row["top_k_labels"]), json.loads(row["top_k_scores"])
        assert len(labels) == 3 and labels[0] == row["label"]
        assert scores == sorted(scores, reverse=True) and float(row["score"]) == scores[0]
        assert (row["model_name"], row["model_version"], row["error"]) == ("tiny", "1", "")
        assert 0 <= float(row["brightness"]) <= 1 and float(row["entropy"]) >= 0
    report = json.loads((tmp_path / "scores.csv.drift.json").read_text())
    assert report["samples"] == 40 and set(report["signals"]) == {
        "class",
        "confidence",
        "entropy",
        "brightness",
        "contrast",
    }
    # The embeddings of the scored images (run again: the output holds none), too few to judge.
    embedding = report["embedding"]
    assert embedding["sampled_from"] == 40 and embedding["distinct_samples"] <= 40
    assert 0 <= embedding["domain_classifier_auc"] <= 1 and embedding["level"] == "not judged"


def test_glob_and_list_inputs(tmp_path, images, runtime):
    pngs = score(str(images / "*" / "*.png"), runtime, tmp_path / "glob.csv", progress=False)
    assert pngs.total == len([p for p in all_files(images) if p.endswith(".png")])
    listing = tmp_path / "list.txt"
    chosen = all_files(images)[:7]
    listing.write_text(
        "# seven of them\n" + "\n".join(os.path.relpath(p, tmp_path) for p in chosen) + "\n"
    )
    listed = score(listing, runtime, tmp_path / "listed.csv", progress=False)
    # Entries relative to the list file, written out absolute and normalised.
    assert sorted(r["path"] for r in read_csv(tmp_path / "listed.csv")) == sorted(chosen)
    assert listed.scored == 7
    table = tmp_path / "list.csv"
    table.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(chosen[:3])))
    assert score(table, runtime, tmp_path / "table.csv", progress=False).scored == 3


def test_folder_finds_images_by_content(tmp_path, images, runtime):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    first = Path(all_files(folder)[0])
    first.rename(first.with_suffix(".upload"))  # no image suffix, but a real image
    (folder / "notes.txt").write_text("not an image")
    summary = score(folder, runtime, tmp_path / "mixed.csv", progress=False)
    assert summary.total == 40 and summary.scored == 40


def test_parquet_output_is_a_dataset_with_the_exact_columns(tmp_path, images, runtime):
    output = tmp_path / "scores.parquet"
    score(images, runtime, output, chunk_size=16, progress=False)
    assert len(list(output.glob("part-*.parquet"))) == 3  # 40 images in chunks of 16
    table = pq.read_table(output)
    assert tuple(table.column_names) == COLUMNS
    assert table.num_rows == 40
    rows = table.to_pylist()
    assert isinstance(rows[0]["top_k_labels"], list) and rows[0]["model_version"] == 1


def test_bad_files_become_rows_and_the_job_goes_on(tmp_path, images, runtime):
    folder = tmp_path / "bad"
    shutil.copytree(images, folder)
    (folder / "0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 200)
    good = Path(all_files(folder)[1]).read_bytes()
    (folder / "1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "2" / "text.png").write_text("this is text")
    (folder / "3" / "gone.png").symlink_to(folder / "nowhere.png")
    result = run_cli(
        "score",
        str(folder),
        "--model",
        str(runtime.model_dir),
        "--output",
        str(tmp_path / "bad.csv"),
        "--no-progress",
    )
    assert result.returncode == 4, result.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "bad.csv")}
    for name in ("corrupt.jpg", "truncated.png", "text.png", "gone.png"):
        assert rows[name]["error"] and rows[name]["label"] == "", name
    assert sum(1 for r in rows.values() if not r["error"]) == 40
    assert "40 scored, 4 failed" in result.stdout


@pytest.mark.parametrize("output_name", ["scores.csv", "scores.parquet"])
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_job_resumes(tmp_path, published_model, output_name, stop):
    folder = make_image_folder(tmp_path / "many", 120, tuple(range(10)))
    expected = all_files(folder)
    output = tmp_path / output_name
    args = [
        "score",
        str(folder),
        "--model",
        str(published_model),
        "--output",
        str(output),
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]

    def rows() -> list[dict]:
        if output_name.endswith(".csv"):
            return read_csv(output) if output.exists() else []
        return pq.read_table(output).to_pylist() if list(output.glob("part-*")) else []

    process = subprocess.Popen(
        [IMGCLF, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that runs the tests in the background ignores SIGINT for them, and a
        # process that starts with SIGINT ignored keeps ignoring it: Ctrl-C's default here.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(rows()) >= 256:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the job finished before it could be interrupted"
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "rerun the same command" in stderr
    before = rows()
    assert 256 <= len(before) < len(expected)
    assert len({r["path"] for r in before}) == len(before)

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(before)} skipped" in again.stdout
    after = rows()
    assert sorted(r["path"] for r in after) == expected  # nothing lost, nothing twice
    assert all(not r["error"] for r in after)


def test_torn_last_csv_row_is_dropped_and_rescored(tmp_path, images, runtime):
    output = tmp_path / "scores.csv"
    score(images, runtime, output, progress=False)
    text = output.read_text()
    lines = text.splitlines(keepends=True)
    torn = lines[-1][: len(lines[-1]) // 2]  # a kill in the middle of the last write
    output.write_text("".join(lines[:-1]) + torn)
    summary = score(images, runtime, output, progress=False)
    assert (summary.scored, summary.skipped) == (1, 39)
    rows = read_csv(output)
    assert sorted(r["path"] for r in rows) == all_files(images)


def test_output_from_another_model_version_is_refused(tmp_path, images, runtime):
    output = tmp_path / "scores.csv"
    score(images, runtime, output, progress=False)
    text = output.read_text().replace(",tiny,1,", ",tiny,7,")
    output.write_text(text)
    result = run_cli(
        "score", str(images), "--model", str(runtime.model_dir), "--output", str(output)
    )
    assert_one_line_error(result, "tiny v7", "another --output")
    assert_one_line_error(
        run_cli(
            "score",
            str(tmp_path / "nothing"),
            "--model",
            str(runtime.model_dir),
            "--output",
            str(tmp_path / "x.csv"),
        ),
        "not a folder",
    )


def test_same_predictions_as_the_http_service(tmp_path, images, runtime, client):
    output = tmp_path / "scores.csv"
    score(images, runtime, output, top_k=3, progress=False)
    for row in read_csv(output):
        data = Path(row["path"]).read_bytes()
        answer = client.post(
            "/predict",
            content=data,
            params={"top_k": "3"},
            headers={"Content-Type": "application/octet-stream"},
        ).json()
        assert "error" not in answer, answer
        assert answer["label"] == row["label"]
        assert answer["score"] == pytest.approx(float(row["score"]), rel=1e-6)
        assert [e["label"] for e in answer["top_k"]] == json.loads(row["top_k_labels"])


def test_too_few_images_are_not_judged_for_drift(tmp_path, images, runtime):
    """Five images would be "critical" on every signal by chance: below the smallest window
    the thresholds are calibrated for (50), the report says so instead of a verdict."""
    few = tmp_path / "few"
    few.mkdir()
    for path in all_files(images)[:5]:
        shutil.copy(path, few / Path(path).name)
    summary = score(few, runtime, tmp_path / "few.csv", progress=False)
    assert summary.drift_status == "too few images to judge (5 < 50)"
    report = json.loads((tmp_path / "few.csv.drift.json").read_text())
    assert {values["level"] for values in report["signals"].values()} == {"not judged"}
    assert report["samples"] == 5 and "psi" in report["signals"]["class"]  # still measured


@pytest.mark.parametrize("output_name", ["scores.csv", "scores.parquet"])
def test_a_rerun_retries_failed_rows_and_resumes_however_the_folder_is_named(
    tmp_path, images, runtime, monkeypatch, output_name
):
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    (folder / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n not yet uploaded")
    output = tmp_path / output_name
    monkeypatch.chdir(tmp_path)
    first = score("in", runtime, output, progress=False)  # a relative path
    assert (first.scored, first.failed) == (40, 1)
    shutil.copy(all_files(images)[0], folder / "late.png")  # the file is fixed
    second = score(str(folder), runtime, output, progress=False)  # the same, absolute
    assert (second.scored, second.failed, second.skipped) == (1, 0, 40)
    writer = open_output(output, None)
    rows = [row for chunk in writer.read_rows() for row in chunk]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 41, "each input keeps one row"
    assert not any(row["error"] for row in rows)
    assert str(folder / "late.png") in paths


def test_score_takes_the_live_version_of_a_model_folder_or_the_one_named(
    tmp_path, images, published_model
):
    from serving.core.releases import pin
    from tests.serving.variants import publish_variant

    folder = tmp_path / "repository" / published_model.parent.name
    shutil.copytree(published_model, folder / "1")
    publish_variant(folder / "1", 2)
    pin(folder, 1)  # the newest is 2; the live one is 1
    for flags, version in (((), "1"), (("--version", "2"), "2")):
        output = tmp_path / f"scores-{version}.csv"
        result = run_cli(
            "score", str(images), "--model", str(folder), "--output", str(output),
            "--no-progress", *flags,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert {row["model_version"] for row in read_csv(output)} == {version}
    missing = run_cli(
        "score", str(images), "--model", str(folder), "--output", str(tmp_path / "x.csv"),
        "--version", "9",
    )  # fmt: skip
    assert_one_line_error(missing, "no version 9", "published: 1, 2")


def test_a_mistyped_input_or_precision_is_refused_before_the_model_loads(
    tmp_path, images, published_model
):
    """`score` and `drift` check their arguments first: the one error line is all a user
    sees, not ONNX Runtime's session line above it (issue 36)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    output = str(tmp_path / "scores.csv")
    cases = [
        (("score", str(tmp_path / "missing"), "--output", output), "is not a folder"),
        (("score", str(empty), "--output", output), "holds no images"),
        (("score", str(images), "--output", output, "--precision", "int4"), "--precision"),
        (("drift", str(tmp_path / "missing")), "is not a folder"),
        (("drift", str(tmp_path / "nothing*.png")), "holds no images"),
    ]
    for args, fragment in cases:
        result = run_cli(*args, "--model", str(published_model), cwd=tmp_path)
        assert_refused_before_the_model_loads(result, fragment)
        assert result.returncode == 1, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]  # nothing written

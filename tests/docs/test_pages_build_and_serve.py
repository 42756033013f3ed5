"""The pages of training, export, serving, releasing and the Open Inference Protocol, run as
written from a clone after ``make run`` (its server on port 3000), with the outputs each page
shows checked. (Two files of page tests, so that the suite's two processes share them.)"""

from __future__ import annotations

import json
import re

import numpy as np

from tests.docs.runbook import MAKE_RUN_SERVES, answered_by, page_blocks, predict, row


def test_training(scratch):
    scratch.run_blocks(page_blocks("docs/training.md"))
    on_labelled_folders = json.loads((scratch.root / "eval/evaluation.json").read_text())
    on_the_test_split = json.loads((scratch.root / "eval-test/evaluation.json").read_text())
    assert on_labelled_folders["count"] == 1797 and on_labelled_folders["accuracy"] > 0.9
    assert on_the_test_split["accuracy"] > 0.9


def test_export(scratch):
    outputs = scratch.run_blocks(page_blocks("docs/export.md"))
    published = scratch.root / "model_repository/digits/2"
    assert (published / "model.int8.onnx").exists()  # "publishes 2"
    assert "digits:1" in "".join(outputs.values())


def test_serving(scratch):
    scratch.run(MAKE_RUN_SERVES)
    outputs = list(scratch.run_blocks(page_blocks("docs/serving.md")).values())
    three, seven, batch, metadata, _live, ready, metrics, openapi = outputs
    three, seven, batch = json.loads(three), json.loads(seven), json.loads(batch)
    assert three["label"] == "3" and len(three["top_k"]) == 3
    assert seven["label"] == "7"
    assert [answer["label"] for answer in batch] == ["0", "7"]
    assert json.loads(metadata)["name"] == "digits"
    assert json.loads(ready)["workers"]["ready"] >= 1
    assert "imgclf_requests_total" in metrics
    assert "/predict" in json.loads(openapi)["paths"]


def test_releasing(scratch):
    scratch.run(MAKE_RUN_SERVES)
    (block,) = page_blocks("docs/releasing.md")
    train, pin, export, shadow, versions, promote, rollback, follow = block.commands()
    for command in (train, pin, export, shadow):
        scratch.run(command)
    assert (scratch.root / "model_repository/digits/2/model.onnx").exists()  # "publishes 2"
    for _ in range(20):  # traffic, so that the shadow has evidence
        assert predict(scratch)["model_version"] == 1  # pinned while 2 is tried
    evidence = scratch.run(versions)
    assert "shadow" in row(evidence, 2) and "live" in row(evidence, 1), evidence
    scratch.run(promote)
    assert answered_by(scratch, 2)["label"] == "3"
    scratch.run(rollback)
    answered_by(scratch, 1)
    scratch.run(follow)
    answered_by(scratch, 2)


def test_open_inference_protocol(scratch):
    scratch.run(MAKE_RUN_SERVES)
    client, raw, serve_grpc, grpc_client = page_blocks("docs/open-inference-protocol.md")
    assert client.language == "python"
    (scratch.root / "client.py").write_text(scratch.as_here(client.text))
    printed = scratch.run(".venv/bin/python client.py")
    assert re.match(r"\[\[b'[0-9.]+:3:3'", printed), printed  # as the page shows
    (command,) = raw.commands()
    answer = json.loads(scratch.run(command))
    (probabilities,) = answer["outputs"]
    assert probabilities["shape"] == [1, 10]
    assert max(range(10), key=probabilities["data"].__getitem__) == 3

    # Over gRPC: a second server, with its gRPC port, and tritonclient's grpc module.
    (command,) = serve_grpc.commands()
    scratch.run(command)
    (scratch.root / "grpc_client.py").write_text(scratch.as_here(grpc_client.text))
    ready, answered = scratch.run(".venv/bin/python grpc_client.py").splitlines()[-2:]
    # Ready, and the configuration's max_batch_size (the images a request may hold).
    assert re.fullmatch(r"True [1-9]\d*", ready), ready
    assert re.match(r"\[\[b'[0-9.]+:3:3'", answered), answered  # as the page shows


def test_explanations(scratch):
    scratch.run(MAKE_RUN_SERVES)
    offline, served = page_blocks("docs/explain.md")
    (command,) = offline.commands()
    printed = scratch.run(command)
    assert re.search(r"digit-3\.png: 3 \(", printed) and re.search(r"digit-7\.png: 7 \(", printed)
    maps = json.loads((scratch.root / "explanations" / "maps.json").read_text())
    assert len(maps["images"]) == 2
    for name in ("digit-3", "digit-7"):
        picture = scratch.root / "explanations" / f"{name}.explain.png"
        assert picture.read_bytes().startswith(b"\x89PNG")
    as_json, as_picture = served.commands()
    answer = json.loads(scratch.run(as_json))
    assert answer["label"] == answer["class"] == "3" and answer["method"] == "cam"
    heat = np.asarray(answer["map"])  # the feature map's size, scaled to [0, 1]
    assert heat.ndim == 2 and heat.min() >= 0 and heat.max() == 1
    scratch.run(as_picture)
    assert (scratch.root / "digit-3-as-8.png").read_bytes().startswith(b"\x89PNG")

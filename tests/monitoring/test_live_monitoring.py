"""Monitoring on real servers with the digits model: drift against the thresholds
calibrated at export (windows of test-split images, which the reference never saw, quiet;
drifted ones critical on the signals they move), the label-free accuracy estimate against
the labels, embedding drift that the outputs miss, and delayed labels through
``/feedback`` with two workers sharing one store, auditing the estimate."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from prometheus_client.parser import text_string_to_metric_families

from monitoring.estimate import monitoring_references
from serving.core.runtime import ClassifierRuntime
from tests.serving.cases import encode
from tests.serving.conftest import Server

PREDICTIONS = 1200
PER_REQUEST = 32


def draw_labelled(split, seed: int, size: int = PREDICTIONS, keep=lambda label: True):
    """``size`` (image, label) pairs drawn with replacement, as production traffic repeats
    itself."""
    pool = [(image, label) for image, label in split if keep(label)]
    picked = np.random.default_rng(seed).integers(0, len(pool), size)
    return [pool[i] for i in picked]


def draw(split, seed: int, size: int = PREDICTIONS, keep=lambda label: True):
    return [image for image, _ in draw_labelled(split, seed, size, keep)]


def metrics_of(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("imgclf_")
    }


def gauge(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def drift_server(digits_model):
    """One worker, so that one drift window sees every prediction: a window of 1,000
    (recomputed every half second) after 1,200 predictions holds only the newest scenario."""
    server = Server(
        digits_model,
        env={
            "IMGCLF_DRIFT_WINDOW": "1000",
            "IMGCLF_DRIFT_MIN_SAMPLES": "500",
            "IMGCLF_DRIFT_INTERVAL_S": "0.5",
            "IMGCLF_MAX_IMAGES_PER_REQUEST": str(PER_REQUEST),
        },
        args=("--workers", "1"),
    )
    server.wait_ready()
    yield server
    server.stop()


STATISTICS = {
    "imgclf_drift_psi": "psi",
    "imgclf_drift_js_distance": "js_distance",
    "imgclf_drift_ks_statistic": "ks",
}


STATISTICS["imgclf_drift_domain_classifier_auc"] = "domain_classifier_auc"
#: The last window's answers, kept by ``drift_after`` for the accuracy checks.
LAST_ANSWERS: list[str] = []


def drift_after(server: Server, images: list[Image.Image]) -> dict[tuple[str, str], tuple]:
    """Send the images for prediction, wait for a drift computation after the last answer,
    and return ``{(signal, statistic): (value, warning, critical)}`` as ``/metrics`` has it
    (and ``("estimate", ...)`` entries: the estimated accuracy and the raw mean confidence of
    the window)."""
    LAST_ANSWERS.clear()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for start in range(0, len(images), PER_REQUEST):
            files = [
                ("images", ("d.png", encode(i, "PNG"))) for i in images[start : start + PER_REQUEST]
            ]
            response = client.post("/predict_batch", files=files)
            assert response.status_code == 200
            LAST_ANSWERS.extend(item["label"] for item in response.json())
    answered = time.time()
    deadline = answered + 30
    while True:
        found = metrics_of(server.url)
        if gauge(found, "imgclf_drift_last_computed_timestamp_seconds") > answered:
            break
        assert time.time() < deadline, "drift was not recomputed"
        time.sleep(0.2)
    table = {}
    for (name, labels), value in found.items():
        if name in STATISTICS:
            signal = dict(labels)["signal"]
            statistic = STATISTICS[name]
            bounds = [
                gauge(
                    found, "imgclf_drift_threshold", signal=signal, statistic=statistic, level=level
                )
                for level in ("warning", "critical")
            ]
            table[(signal, statistic)] = (value, *bounds)
    # PSI and JS of five signals, KS of the four continuous ones, the embedding's AUC
    assert len(table) == 15
    ESTIMATES.clear()
    ESTIMATES["estimated"] = gauge(found, "imgclf_estimated_accuracy_ratio")
    ESTIMATES["raw"] = gauge(found, "imgclf_window_mean_confidence_ratio")
    return table


ESTIMATES: dict[str, float] = {}


def window_accuracy(labels: list[str]) -> float:
    """Accuracy of the drift window (the newest 1,000 answers) from the labels sent."""
    answers, truth = LAST_ANSWERS[-1000:], labels[-1000:]
    return float(np.mean([a == t for a, t in zip(answers, truth, strict=True)]))


def estimate_errors(labels: list[str]) -> tuple[float, float, float]:
    """(realised accuracy, |estimate - realised|, |raw mean confidence - realised|)."""
    realised = window_accuracy(labels)
    return realised, abs(ESTIMATES["estimated"] - realised), abs(ESTIMATES["raw"] - realised)


def above(table, level: str) -> set[tuple[str, str]]:
    index = {"warning": 1, "critical": 2}[level]
    return {key for key, values in table.items() if values[0] > values[index]}


def test_held_out_windows_stay_quiet_and_drifted_ones_turn_critical(drift_server, test_split):
    # The reference is the validation split: test-split images are new traffic from the
    # same population, and no statistic may warn on them. The estimate is within 3 points.
    for seed in (0, 10):
        drawn = draw_labelled(test_split, seed=seed)
        held_out = drift_after(drift_server, [image for image, _ in drawn])
        assert above(held_out, "warning") == set(), held_out
        realised, error, _ = estimate_errors([label for _, label in drawn])
        assert error <= 0.03, (realised, ESTIMATES)

    drawn = draw_labelled(test_split, seed=1)
    darkened = drift_after(
        drift_server,
        [ImageEnhance.Brightness(image).enhance(0.4) for image, _ in drawn],
    )
    assert {("brightness", s) for s in ("psi", "js_distance", "ks")} <= above(darkened, "critical")
    realised, error, raw_error = estimate_errors([label for _, label in drawn])
    assert error < raw_error, (realised, ESTIMATES)

    drawn = draw_labelled(test_split, seed=2)
    rotated = drift_after(drift_server, [image.rotate(90) for image, _ in drawn])
    moved = {signal for signal, _ in above(rotated, "critical")}
    assert moved & {"class", "confidence", "entropy"}, rotated
    # Rotating a square image by 90 degrees keeps every pixel: its statistics stay put.
    assert not {signal for signal, _ in above(rotated, "warning")} & {"brightness", "contrast"}
    realised, error, raw_error = estimate_errors([label for _, label in drawn])
    assert error < raw_error, (realised, ESTIMATES)

    three = drift_after(
        drift_server, draw(test_split, seed=3, keep=lambda label: label in ("1", "4", "7"))
    )
    assert {("class", "psi"), ("class", "js_distance")} <= above(three, "critical")
    metadata = httpx.get(drift_server.url + "/metadata").json()["monitoring"]
    assert metadata["drift"]["thresholds"] == "calibrated"
    assert metadata["drift"]["status"] == "critical"
    assert metadata["drift"]["signals"]["class"]["level"] == "critical"
    assert metadata["performance"]["calibration"]["method"].startswith("temperature")


def reframed(image: Image.Image) -> Image.Image:
    """The digit one pixel to the right (wrapping round): every pixel kept, so brightness
    and contrast are unchanged, and the model, trained with shifts, still reads it."""
    return Image.fromarray(np.roll(np.asarray(image), 1, axis=1), "L")


def test_a_reframing_camera_moves_the_embeddings_and_nothing_else(drift_server, test_split):
    """A third of the traffic from a camera framed one pixel off: the outputs barely move,
    the domain classifier on the embeddings sees it."""
    rng = np.random.default_rng(7)
    images = [
        reframed(image) if rng.random() < 0.35 else image for image in draw(test_split, seed=7)
    ]
    table = drift_after(drift_server, images)
    assert above(table, "critical") == {("embedding", "domain_classifier_auc")}, table
    assert above(table, "warning") == {("embedding", "domain_classifier_auc")}, table


@pytest.fixture(scope="module")
def feedback_server(digits_model):
    """Two workers: predictions and their labels land on either, through one store."""
    server = Server(
        digits_model,
        env={
            "IMGCLF_FEEDBACK_STORE_SIZE": "700",
            "IMGCLF_FEEDBACK_MIN_SAMPLES": "50",
            "IMGCLF_MAX_IMAGES_PER_REQUEST": "25",
        },
        args=("--workers", "2"),
    )
    server.wait_ready()
    yield server
    server.stop()


def predict(
    url: str, images: list[tuple[Image.Image, str]], prefix: str = "caller"
) -> list[tuple[str, str, str]]:
    """``(request_id, predicted, true label)`` for each image: 100 alone (half with the
    caller's own id), the rest 25 to a request; a new connection each time, so requests
    spread over the workers."""
    answers = []
    for index, (image, label) in enumerate(images[:100]):
        headers = {"Content-Type": "image/png"}
        if index % 2:
            headers["X-Request-ID"] = f"{prefix}-{index}"
        answer = httpx.post(url + "/predict", content=encode(image, "PNG"), headers=headers).json()
        if index % 2:
            assert answer["request_id"] == f"{prefix}-{index}"
        answers.append((answer["request_id"], answer["label"], label))
    for start in range(100, len(images), 25):
        chunk = images[start : start + 25]
        files = [("images", ("d.png", encode(image, "PNG"))) for image, _ in chunk]
        response = httpx.post(url + "/predict_batch", files=files)
        rid = response.headers["X-Request-ID"]
        for offset, (item, (_, label)) in enumerate(zip(response.json(), chunk, strict=True)):
            assert item["request_id"] == f"{rid}/{offset}"
            answers.append((item["request_id"], item["label"], label))
    return answers


def test_labels_for_500_predictions_give_their_accuracy(feedback_server, test_split, digits_model):
    url = feedback_server.url
    rng = np.random.default_rng(4)
    images = [test_split[i] for i in rng.integers(0, len(test_split), 500)]
    answers = predict(url, images)
    # The model's mistakes are rare on held-out digits: relabel some answers so that the
    # accuracy has something to measure (a label is a user's claim; any class name goes).
    truth = [
        label if i % 10 else str((int(label) + 1) % 10) for i, (_, _, label) in enumerate(answers)
    ]
    for start in range(0, 500, 50):
        sent = [
            {"request_id": rid, "label": truth[start + k]}
            for k, (rid, _, _) in enumerate(answers[start : start + 50])
        ]
        response = httpx.post(url + "/feedback", json=sent)
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == 50
    expected = np.mean(
        [predicted == t for (_, predicted, _), t in zip(answers, truth, strict=True)]
    )
    found = metrics_of(url)
    assert gauge(found, "imgclf_feedback_accuracy_ratio") == pytest.approx(expected)
    assert gauge(found, "imgclf_feedback_window_samples") == 500
    counted = {
        labels: value for (name, labels), value in found.items() if name == "imgclf_feedback_total"
    }
    assert sum(counted.values()) == 500
    correct = sum(v for labels, v in counted.items() if ("outcome", "correct") in labels)
    assert correct == round(expected * 500)
    for digit in "0123456789":
        sent = [i for i, t in enumerate(truth) if t == digit]
        recall = np.mean([answers[i][1] == digit for i in sent])
        assert gauge(found, "imgclf_feedback_recall_ratio", **{"class": digit}) == pytest.approx(
            recall
        )
    # The estimate's audit: each answer's expected correctness, computed here offline by
    # the same runtime and estimator, against the same labels.
    runtime = ClassifierRuntime(digits_model)
    estimator, embedding = monitoring_references(runtime.monitoring_files())
    pixels = np.stack([runtime.preprocess(encode(image, "PNG")) for image, _ in images])
    probabilities, embeddings = runtime.predict_with_embeddings(pixels)
    calibrated, _ = estimator.calibrate(probabilities, embedding.reduce(embeddings))
    offline = estimator.expected_correct(calibrated, probabilities)
    gap = abs(offline.mean() - expected)
    assert gauge(found, "imgclf_feedback_estimate_gap_ratio") == pytest.approx(gap, abs=1e-4)
    assert gauge(found, "imgclf_feedback_estimated_accuracy_ratio") == pytest.approx(
        offline.mean(), abs=1e-4
    )
    report = httpx.get(url + "/feedback").json()
    assert report["labelled"] == 500 and report["accuracy"] == pytest.approx(expected)
    assert report["estimate"]["gap"] == pytest.approx(gap, abs=1e-4)
    assert sum(map(sum, report["confusion_matrix"])) == 500
    assert report["reference"]["accuracy"] > 0.9

    # Wrong, unknown and duplicate feedback is refused and counts nothing.
    first_id, _, first_label = answers[0]
    spare_id, _, spare_label = predict(url, test_split[:1])[0]
    refusals = [
        ({"request_id": first_id, "label": first_label}, 409),
        ({"request_id": "never-predicted", "label": "3"}, 404),
        ({"request_id": answers[1][0], "label": "cat"}, 422),
        (
            [{"request_id": spare_id, "label": spare_label}, {"request_id": "nope", "label": "3"}],
            404,
        ),
        ({"request_id": first_id}, 400),
        ([], 400),
    ]
    for body, status in refusals:
        response = httpx.post(url + "/feedback", json=body)
        assert response.status_code == status, (body, response.text)
        assert "error" in response.json()
    bad = httpx.post(url + "/feedback", content=b"{not json", headers={"Content-Type": "x"})
    assert bad.status_code == 400
    after = metrics_of(url)
    assert sum(v for (n, _), v in after.items() if n == "imgclf_feedback_total") == 500
    assert httpx.get(url + "/feedback").json()["labelled"] == 500
    # The good item of the refused list was left alone: it can be labelled now.
    assert (
        httpx.post(url + "/feedback", json={"request_id": spare_id, "label": spare_label}).json()[
            "accepted"
        ]
        == 1
    )

    # 300 more predictions: the store keeps the newest 700 of the 801, so the oldest are
    # gone: labelled before (409 above), now not found at all.
    more = predict(
        url, [test_split[i] for i in rng.integers(0, len(test_split), 300)], prefix="more"
    )
    deadline = time.time() + 10
    while True:  # until both workers have written theirs (every 0.25 s), never above 700
        report = httpx.get(url + "/feedback").json()
        assert report["store"]["predictions"] <= 700
        if report["store"]["predictions"] == 700 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert report["store"] == {"predictions": 700, "capacity": 700, "max_age_s": 259200.0}
    assert gauge(metrics_of(url), "imgclf_feedback_store_predictions") <= 700
    oldest = [{"request_id": rid, "label": label} for rid, _, label in answers[0:100:2]]
    evicted = httpx.post(url + "/feedback", json=oldest)
    assert evicted.status_code == 404 and len(evicted.json()["problems"]) == 50
    # A caller's id sent again names its newest prediction, which is not labelled yet.
    image = encode(test_split[0][0], "PNG")
    for _ in range(2):
        answer = httpx.post(
            url + "/predict",
            content=image,
            headers={"Content-Type": "image/png", "X-Request-ID": "again-1"},
        )
        assert answer.json()["request_id"] == "again-1"
    time.sleep(0.6)  # both written (the two may have reached different workers)
    reused = {"request_id": "again-1", "label": test_split[0][1]}
    assert httpx.post(url + "/feedback", json=reused).json()["accepted"] == 1
    assert httpx.post(url + "/feedback", json=reused).status_code == 409
    newest = [{"request_id": rid, "label": label} for rid, _, label in more[-10:]]
    assert httpx.post(url + "/feedback", json=newest).status_code == 200

"""How good monitoring's judgement is, offline, on one exported model and its training run:
the false-alarm rate of every drift statistic on windows of test-split images (which the
reference never saw) against the rate designed for; the label-free accuracy estimate against
the labels and raw mean confidence on held-out, darkened and rotated windows; and embedding
drift on a re-framed window that the outputs miss.

The service's own code scores and judges every window (the runtime, ``monitoring.drift``,
``monitoring.estimate``), as a one-worker server with a window of 1,000 would.

    .venv/bin/python benchmarks/monitoring_quality.py --model model_repository/digits \\
        --run runs/digits [--windows 200]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import encode, table
from monitoring.drift import DriftMonitor, image_signals
from monitoring.estimate import monitoring_references
from monitoring.thresholds import FAMILY_WISE
from serving.core.runtime import ClassifierRuntime
from training.datasets import read_manifest

WINDOW = 1000
DRAWN = 1200


def reframed(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(image), 1, axis=1), "L")


class Judge:
    """The model and a fresh drift window per call, as the service computes them."""

    def __init__(self, model: Path) -> None:
        self.runtime = ClassifierRuntime(model)
        self.profile = self.runtime.reference_profile()
        self.estimator, self.embedding = monitoring_references(self.runtime.monitoring_files())

    def score(self, images: list[Image.Image]) -> dict:
        pixels = np.stack([self.runtime.preprocess(encode(image, "PNG")) for image in images])
        probabilities, embeddings = self.runtime.predict_with_embeddings(pixels)
        reduced = self.embedding.reduce(embeddings)
        calibrated, outside = self.estimator.calibrate(probabilities, reduced)
        return image_signals(pixels, probabilities) | {
            "calibrated": calibrated,
            "outside": outside,
            "embedding": reduced,
        }

    def judge(self, scored: dict, rows: np.ndarray) -> dict:
        monitor = DriftMonitor(
            self.profile,
            window=WINDOW,
            min_samples=WINDOW,
            estimator=self.estimator,
            embedding=self.embedding,
        )
        monitor.add({name: values[rows] for name, values in scored.items()})
        return monitor.compute()


def levels(report: dict) -> dict[str, tuple[float, dict]]:
    found = {}
    for signal, values in report["signals"].items():
        for statistic, bounds in values["thresholds"].items():
            found[f"{signal} {statistic}"] = (values[statistic], bounds)
    embedding = report["embedding"]
    found["embedding domain_classifier_auc"] = (
        embedding["domain_classifier_auc"],
        embedding["thresholds"],
    )
    return found


def percent(rate: float) -> str:
    return f"{100 * rate:.3f} %"


def false_alarms(judge: Judge, test: list[Image.Image], windows: int) -> str:
    scored = judge.score(test)
    warnings, criticals, any_warning, any_critical = Counter(), Counter(), 0, 0
    for seed in tqdm(range(windows), desc="held-out windows", leave=False, disable=None):
        rows = np.random.default_rng(seed).integers(0, len(test), DRAWN)[-WINDOW:]
        found = levels(judge.judge(scored, rows))
        warned = {name for name, (value, bounds) in found.items() if value > bounds["warning"]}
        critical = {name for name, (value, bounds) in found.items() if value > bounds["critical"]}
        warnings.update(warned)
        criticals.update(critical)
        any_warning += bool(warned)
        any_critical += bool(critical)
    tested = len(found)
    rows = [
        [name, percent(warnings[name] / windows), percent(criticals[name] / windows)]
        for name in sorted(found)
    ]
    rows.append(
        [
            "designed, per statistic",
            percent(FAMILY_WISE["warning"] / tested),
            percent(FAMILY_WISE["critical"] / tested),
        ]
    )
    rows.append(["any statistic", percent(any_warning / windows), percent(any_critical / windows)])
    rows.append(
        [
            "designed, any statistic",
            percent(FAMILY_WISE["warning"]),
            percent(FAMILY_WISE["critical"]),
        ]
    )
    return table(["statistic", "warning rate", "critical rate"], rows)


def estimates(judge: Judge, test: list[tuple[Image.Image, str]]) -> str:
    windows = {
        "held-out (test split)": lambda image: image,
        "darkened (brightness x 0.4)": lambda image: ImageEnhance.Brightness(image).enhance(0.4),
        "rotated 90 degrees": lambda image: image.rotate(90),
    }
    rows = []
    for seed, (name, change) in enumerate(windows.items()):
        picked = np.random.default_rng(seed).integers(0, len(test), WINDOW)
        images = [change(test[i][0]) for i in picked]
        labels = np.array([judge.runtime.classes.index(test[i][1]) for i in picked])
        scored = judge.score(images)
        report = judge.judge(scored, np.arange(WINDOW))
        realised = float((scored["class"] == labels).mean())
        estimate = report["estimate"]["accuracy"]
        raw = report["mean_confidence"]
        rows.append(
            [
                name,
                realised,
                estimate,
                abs(estimate - realised),
                raw,
                abs(raw - realised),
                report["estimate"]["out_of_support"],
            ]
        )
    return table(
        [
            "window",
            "accuracy (labels)",
            "estimate",
            "|error|",
            "mean confidence",
            "|error|",
            "outside support",
        ],
        rows,
    )


def embedding_only(judge: Judge, test: list[Image.Image]) -> str:
    rows = []
    for share in (0.0, 0.2, 0.35, 0.5):
        rng = np.random.default_rng(7)
        picked = rng.integers(0, len(test), WINDOW)
        images = [reframed(test[i]) if rng.random() < share else test[i] for i in picked]
        found = levels(judge.judge(judge.score(images), np.arange(WINDOW)))
        auc, bounds = found.pop("embedding domain_classifier_auc")
        worst = max(found, key=lambda name: found[name][0] / found[name][1]["warning"])
        rows.append(
            [
                share,
                auc,
                bounds["critical"],
                f"{worst} at {found[worst][0] / found[worst][1]['warning']:.2f} x its warning",
            ]
        )
    return table(["share re-framed", "embedding AUC", "critical", "closest output statistic"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("model_repository/digits"))
    parser.add_argument("--run", type=Path, default=Path("runs/digits"))
    parser.add_argument("--windows", type=int, default=200)
    args = parser.parse_args()
    judge = Judge(args.model)
    test = []
    for sample in read_manifest(args.run)["test"]:
        with Image.open(sample.path) as image:
            test.append((image.convert("L").copy(), sample.label))
    images = [image for image, _ in test]
    print(
        f"{judge.runtime.name} v{judge.runtime.version}: reference "
        f"{judge.profile['samples']} validation images; {len(test)} test images\n"
    )
    print(
        f"False alarms: {args.windows} windows of {WINDOW} (the newest of {DRAWN} drawn "
        "with replacement from the test split)\n"
    )
    print(false_alarms(judge, images, args.windows), "\n")
    print("The label-free estimate against the labels (windows of 1,000)\n")
    print(estimates(judge, test), "\n")
    print("A re-framing camera (the digit one pixel to the right) on a share of the traffic\n")
    print(embedding_only(judge, images))


if __name__ == "__main__":
    main()

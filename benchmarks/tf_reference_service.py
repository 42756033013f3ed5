"""The reference service the way tutorials build it: BentoML serving the SavedModel with
TensorFlow, a ``PIL.Image`` upload in, a JSON prediction out. Only the benchmark uses it.

    REFERENCE_MODEL_DIR=model_repository/digits/1 \\
        bentoml serve benchmarks.tf_reference_service:TFReference
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL import Image


@bentoml.service(name="tf-reference", workers=1, traffic={"timeout": 60})
class TFReference:
    def __init__(self) -> None:
        import json

        import tensorflow as tf

        model_dir = os.environ["REFERENCE_MODEL_DIR"]
        with open(os.path.join(model_dir, "metadata.json")) as handle:
            metadata = json.load(handle)
        self.classes = metadata["classes"]
        self.size = (metadata["input"]["width"], metadata["input"]["height"])
        self.tf = tf
        loaded = tf.saved_model.load(os.path.join(model_dir, "saved_model"))
        self.predict_fn = loaded.signatures["serving_default"]

    @bentoml.api
    def predict(self, image: Image.Image) -> dict:
        array = np.asarray(image.convert("RGB").resize(self.size, Image.BILINEAR), np.float32)
        probabilities = self.predict_fn(image=self.tf.constant(array[None]))["probabilities"]
        row = probabilities.numpy()[0]
        best = int(row.argmax())
        return {"label": self.classes[best], "score": float(row[best])}

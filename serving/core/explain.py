"""Where the model looked: class-activation maps of one image, and the picture of one.

Occlusion (Zeiler and Fergus, 2014) needs nothing but the served graph, so it works for every
version, old ones included: the image is covered one cell of a ``grid`` x ``grid`` grid at a
time with its own mean colour, all the covered copies and the original are classified in
batches, and a cell's value is how much covering it lowered the class's probability. The
map says where the evidence for the class lies, not why the model weighs it so: a saliency
map is evidence of where, not of why (docs/explain.md).

The same code serves ``POST /explain`` (each batch through the worker's batcher) and
``imgclf explain`` (through the runtime directly): ``occlusion_images`` makes the batches,
``occlusion_map`` reads the answers. No TensorFlow, no matplotlib: the overlay's colours are
computed here.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: Cells per side of the occlusion grid: 49 covered copies and the original, 50 forward passes.
GRID = 7
METHODS = ("occlusion",)


def occlusion_images(image: np.ndarray, grid: int = GRID) -> np.ndarray:
    """The original image (first), then one copy per grid cell with that cell covered by the
    image's mean colour: ``(1 + grid * grid, H, W, C)``."""
    height, width = image.shape[:2]
    if grid < 1 or grid > min(height, width):
        raise ValueError(f"an occlusion grid of {grid} does not fit a {height}x{width} image")
    fill = image.reshape(-1, image.shape[-1]).mean(axis=0)
    copies = np.repeat(image[None], 1 + grid * grid, axis=0)
    for index, (rows, columns) in enumerate(cells(height, width, grid)):
        copies[1 + index, rows, columns] = fill
    return copies


def cells(height: int, width: int, grid: int = GRID) -> list[tuple[slice, slice]]:
    """The grid's cells, row by row, as (rows, columns) slices covering the image evenly."""
    rows, columns = _edges(height, grid), _edges(width, grid)
    return [
        (slice(rows[r], rows[r + 1]), slice(columns[c], columns[c + 1]))
        for r in range(grid)
        for c in range(grid)
    ]


def occlusion_map(probabilities: np.ndarray, class_index: int, grid: int = GRID) -> np.ndarray:
    """``grid`` x ``grid`` map in [0, 1] from the answers to ``occlusion_images``: the drop of
    the class's probability when each cell is covered, over the largest drop (all zeros when
    covering no cell lowers it)."""
    original = probabilities[0, class_index]
    drops = np.clip(original - probabilities[1:, class_index], 0.0, None).reshape(grid, grid)
    return normalised(drops)


def normalised(values: np.ndarray) -> np.ndarray:
    """``values`` scaled to [0, 1] by their maximum (negative values: 0)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    largest = values.max() if values.size else 0.0
    return (values / largest if largest > 0 else values).astype(np.float32)


def upsampled(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map at the image's size (bilinear), in [0, 1]."""
    picture = Image.fromarray(heat.astype(np.float32), mode="F")
    return np.clip(np.asarray(picture.resize((width, height), Image.BILINEAR)), 0.0, 1.0)


def overlay_png(image: np.ndarray, heat: np.ndarray, *, size: int = 256, alpha: float = 0.5):
    """The image (as the model saw it, ``H x W x 3`` in [0, 255]) with the map laid over it in
    colour, blue (no evidence) to red (most), at least ``size`` pixels on its short side, as
    PNG bytes."""
    base = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    scale = max(1, int(np.ceil(size / min(base.size))))
    base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    colours = Image.fromarray(heat_colours(upsampled(heat, base.height, base.width)), mode="RGB")
    buffer = io.BytesIO()
    Image.blend(base, colours, alpha).save(buffer, format="PNG")
    return buffer.getvalue()


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] map as RGB, the "jet" ramp (blue, cyan, yellow, red) in closed form."""
    value = np.clip(heat, 0.0, 1.0)[..., None]
    ramp = np.clip(1.5 - np.abs(4.0 * value - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (255 * ramp).astype(np.uint8)


def _edges(length: int, grid: int) -> list[int]:
    """``grid + 1`` cell boundaries that cover ``length`` pixels as evenly as can be."""
    return [round(index * length / grid) for index in range(grid + 1)]


def class_index_of(classes: list[str], probabilities: np.ndarray, wanted: str | None) -> int:
    """The class to explain: ``wanted`` by its name, or the top-1 answer."""
    if wanted is None:
        return int(np.argmax(probabilities))
    if wanted not in classes:
        from serving.core.errors import ImgclfError

        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ImgclfError(f"unknown class {wanted[:60]!r}; the classes are {shown}")
    return classes.index(wanted)


def explained(classes: list[str], answers: np.ndarray, wanted: str | None = None) -> dict:
    """What an explanation says, from the answers to ``occlusion_images``: the top-1 label and
    score, the class the map is for (``wanted``, or the top-1) and the map."""
    index = class_index_of(classes, answers[0], wanted)
    return {
        "label": classes[int(np.argmax(answers[0]))],
        "score": float(answers[0].max()),
        "class": classes[index],
        "method": "occlusion",
        "map": occlusion_map(answers, index),
    }


def as_json(found: dict) -> dict:
    """An explanation as ``/explain`` answers it and ``maps.json`` keeps it: the map as rows
    of numbers."""
    return found | {"map": np.round(found["map"], 4).tolist()}


def explain_offline(runtime, image: np.ndarray, wanted: str | None = None) -> dict:
    """What ``POST /explain`` answers for one preprocessed image, computed with the runtime
    directly (``imgclf explain``)."""
    return explained(runtime.classes, runtime.predict(occlusion_images(image)), wanted)

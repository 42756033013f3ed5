"""Where the model looked: the maps of one image, by either method, and the picture of one.

``cam`` reads the map off the served graph in one forward pass: its last feature map times
the class's gradient there (``serving.core.cam``), for versions exported with the head that
gradient needs. Occlusion (Zeiler and Fergus, 2014) needs nothing but the served graph, so
it works for every version, old ones included: the image is covered one cell of a ``grid``
x ``grid`` grid at a time with its own mean colour, all the covered copies and the original
are classified in batches, and a cell's value is how much covering it lowered the class's
probability. Either map says where the evidence for the class lies, not why the model weighs
it so: a saliency map is evidence of where, not of why (docs/explain.md).

The same code serves ``POST /explain`` (occlusion's batches through the worker's batcher)
and ``imgclf explain`` (through the runtime directly): ``method_for`` picks the method,
``cam_explained`` and ``occlusion_explained`` answer. No TensorFlow, no matplotlib: the
overlay's colours are computed here.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from serving.core.cam import class_activation_maps
from serving.core.errors import ImgclfError
from serving.core.model_dir import FEATURE_MAP_NAME, OUTPUT_NAME

#: Cells per side of the occlusion grid: 49 covered copies and the original, 50 forward passes.
GRID = 7
#: The methods, the default first (where a version has what it needs).
METHODS = ("cam", "occlusion")


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
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ImgclfError(f"unknown class {wanted[:60]!r}; the classes are {shown}")
    return classes.index(wanted)


def method_for(runtime, asked: str | None) -> str:
    """The method to explain a version's answers with: the one asked for, or cam where the
    version has its head (exported since it was written) and occlusion where not. Asking for
    cam of a version without one is a 422 that says what to do."""
    if asked is None:
        return "cam" if runtime.has_class_activation else "occlusion"
    if asked not in METHODS:
        raise ImgclfError(f"method must be one of {', '.join(METHODS)}, got {asked[:40]!r}")
    if asked == "cam" and not runtime.has_class_activation:
        error = ImgclfError(
            f"version {runtime.version} of {runtime.name} has no class-activation graph "
            "(exported before imgclf wrote one): explain it by occlusion, or export it again"
        )
        error.status_code = 422
        raise error
    return asked


def explanation(
    classes: list[str], probabilities: np.ndarray, index: int, method: str, heat: np.ndarray
) -> dict:
    """What an explanation says: the top-1 label and score, the class the map is for, how it
    was made, and the map."""
    return {
        "label": classes[int(np.argmax(probabilities))],
        "score": float(probabilities.max()),
        "class": classes[index],
        "method": method,
        "map": heat,
    }


def occlusion_explained(classes: list[str], answers: np.ndarray, wanted: str | None = None) -> dict:
    """The explanation from the answers to ``occlusion_images``, for ``wanted`` (default: the
    top-1 class)."""
    index = class_index_of(classes, answers[0], wanted)
    return explanation(classes, answers[0], index, "occlusion", occlusion_map(answers, index))


def cam_explained(runtime, image: np.ndarray, wanted: str | None = None) -> dict:
    """The cam explanation of one preprocessed image: one forward pass for the probabilities
    and the feature map, then the head's gradient (``serving.core.cam``)."""
    probabilities, feature_maps = runtime.run_outputs(image[None], (OUTPUT_NAME, FEATURE_MAP_NAME))
    index = class_index_of(runtime.classes, probabilities[0], wanted)
    maps = class_activation_maps(runtime.explanation_head(), feature_maps, [index])
    return explanation(runtime.classes, probabilities[0], index, "cam", normalised(maps[0]))


def as_json(found: dict) -> dict:
    """An explanation as ``/explain`` answers it and ``maps.json`` keeps it: the map as rows
    of numbers."""
    return found | {"map": np.round(found["map"], 4).tolist()}


def explain_offline(
    runtime, image: np.ndarray, wanted: str | None = None, method: str | None = None
) -> dict:
    """What ``POST /explain`` answers for one preprocessed image, computed with the runtime
    directly (``imgclf explain``)."""
    if method_for(runtime, method) == "cam":
        return cam_explained(runtime, image, wanted)
    return occlusion_explained(runtime.classes, runtime.predict(occlusion_images(image)), wanted)

"""Open Inference Protocol tensors: the request's JSON header and binary data in, our
image batch out; probabilities in, JSON or binary output tensors out (``serving/oip.py``
holds the routes). BYTES elements in binary form are a 4-byte little-endian length, then
that many bytes."""

from __future__ import annotations

import struct

import numpy as np
from starlette.responses import Response

from serving.core.errors import ImgclfError, InvalidImageError
from serving.core.model_card import ModelCard
from serving.core.model_dir import INPUT_NAME, OUTPUT_NAME
from serving.web.batcher import Encoded
from serving.web.context import WorkerContext
from serving.web.requests import Upload, parse_json, safe_text
from serving.web.responses import JSONAnswer, json_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Datatypes the input accepts as pixels, and the numpy dtype of their binary form.
PIXEL_TYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
#: JSON values a valid inference header holds besides its input's data (the shape, the id,
#: parameters, requested outputs), with room to spare.
HEADER_VALUES = 256


def quoted(text: str) -> str:
    """User text in an error message: bounded, no control characters."""
    return repr(safe_text(text, 60))


def split_request(
    declared: str | None, body: bytes, *, max_images: int, pixels_per_image: int
) -> tuple[dict, bytes]:
    """The JSON inference header and the binary data after it. ``Inference-Header-Content-
    Length: 0`` is the raw binary form: the whole body is one encoded image."""
    if declared is None:
        length = len(body)
    else:
        try:
            length = int(declared)
        except ValueError:
            raise ImgclfError(f"{HEADER_LENGTH} is not a number") from None
        if not 0 <= length <= len(body):
            raise ImgclfError(f"{HEADER_LENGTH} is {length}; the body has {len(body)} bytes")
        if length == 0:  # as if one BYTES element had been sent with the extension
            data = serialize_bytes([body])
            tensor = {"name": INPUT_NAME, "datatype": "BYTES", "shape": [1, 1]}
            return {"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}]}, data
    text = body[:length]  # one copy of up to 64 MiB, counted and then parsed
    check_value_count(text, max_images, pixels_per_image)
    header = parse_json(text, "the inference request header")
    if not isinstance(header, dict):
        raise ImgclfError("the inference request must be a JSON object")
    return header, body[length:]


def check_value_count(header: bytes, max_images: int, pixels_per_image: int) -> None:
    """Refuse, before parsing, a header with more JSON values than ``max_images`` images of
    this model can need. Each value after the first needs a comma, and counting commas is a
    byte scan (64 MiB in about 50 ms) where parsing 16 million tiny BYTES elements blocks the
    worker for seconds and takes gigabytes. Pixels as JSON numbers count only when the
    header can name a pixel datatype (``FP32``, ``UINT8``, or an escaped string we do not
    decode here); otherwise every image is one BYTES element."""
    pixels = any(token in header for token in (b"FP32", b"UINT8", b"\\u"))
    most = max_images * (pixels_per_image if pixels else 1) + HEADER_VALUES
    if header.count(b",") >= most:
        raise InvalidImageError(
            f"the inference request holds more values than {max_images} images of this "
            f"model can (at most {most})",
            reason="too_large",
            status_code=413,
        )


async def input_images(
    worker: WorkerContext, runtime: ModelCard, header: dict, binary: bytes
) -> tuple[np.ndarray | Encoded, list[bytes] | None]:
    """The request's one input as a float32 NHWC batch for ``runtime``'s version (or one small
    encoded image that its batch decodes: ``WorkerContext.prepare``), within the request
    limits, and the encoded images it was decoded from (None for pixels)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ImgclfError(f"send exactly one input, named {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise ImgclfError(f"unknown input {quoted(str(tensor.get('name')))}; expected 'image'")
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ImgclfError("the input's shape must be a list of non-negative integers")
    raw = _tensor_bytes(tensor, binary)
    limit = worker.limits.max_images_per_request
    if not shape or not 1 <= shape[0] <= limit:
        raise ImgclfError(
            f"the batch dimension must be from 1 to {limit}, got {shape[:1]}",
            reason="too_many_images",
        )
    if datatype == "BYTES":
        return await _encoded_images(worker, runtime, tensor, shape, raw)
    if datatype in PIXEL_TYPES:
        expected = [shape[0], *runtime.spec.input_shape]
        if shape != expected:
            raise ImgclfError(f"a {datatype} input must have shape {expected}, got {shape}")
        return _pixels(tensor, datatype, shape, raw), None
    raise ImgclfError(f"unsupported datatype {quoted(str(datatype))}; send FP32, UINT8 or BYTES")


def _tensor_bytes(tensor: dict, binary: bytes) -> bytes | None:
    """The tensor's binary data (the extension), or None when it came as JSON ``data``."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ImgclfError("the input's parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise ImgclfError("the input has neither data nor binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ImgclfError(f"binary_data_size is {size!r}, but {len(binary)} bytes follow")
    return binary


def _pixels(tensor: dict, datatype: str, shape: list[int], raw: bytes | None) -> np.ndarray:
    count = int(np.prod(shape))
    if raw is not None:
        dtype = PIXEL_TYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise ImgclfError(f"{len(raw)} bytes of {datatype} do not fill shape {shape}")
        array = np.frombuffer(raw, dtype=dtype)
    else:
        try:
            array = np.asarray(tensor["data"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ImgclfError(f"the input's data is not a list of {datatype} numbers") from None
        if array.size != count:
            raise ImgclfError(f"{array.size} values do not fill shape {shape}")
        if datatype == "UINT8" and ((array < 0) | (array > 255) | (array % 1 != 0)).any():
            raise ImgclfError("UINT8 data must be integers from 0 to 255")
    images = array.astype(np.float32).reshape(shape)
    if not np.isfinite(images).all():
        raise ImgclfError("the input holds NaN or infinite values")
    return images


async def _encoded_images(
    worker: WorkerContext, runtime: ModelCard, tensor: dict, shape: list[int], raw: bytes | None
) -> tuple[np.ndarray | Encoded, list[bytes]]:
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise ImgclfError(f"a BYTES input must have shape [N, 1] or [N], got {shape}")
    if raw is not None:
        blobs = _deserialize_bytes(raw, most=shape[0])
    else:
        data = tensor["data"]
        if not isinstance(data, list):
            raise ImgclfError("the input's data must be a list")
        flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
        if not all(isinstance(item, str) for item in flat):
            raise ImgclfError("BYTES data in JSON must be strings")
        blobs = [item.encode("utf-8") for item in flat]
    if len(blobs) != shape[0]:
        raise ImgclfError(f"{len(blobs)} BYTES elements do not fill shape {shape}")
    return await worker.prepare([Upload(blob, None) for blob in blobs], runtime), blobs


def _deserialize_bytes(raw: bytes, most: int) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then
    that many bytes. Stops at element ``most + 1`` (the shape says how many there are)."""
    blobs, offset = [], 0
    while offset < len(raw):
        if len(blobs) == most:
            raise ImgclfError(f"more than {most} BYTES elements for shape [{most}, ...]")
        if offset + 4 > len(raw):
            raise ImgclfError("BYTES binary data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ImgclfError("a BYTES element is longer than the data that follows")
        blobs.append(raw[offset : offset + length])
        offset += length
    return blobs


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def requested_outputs(header: dict, num_classes: int) -> list[tuple[bool, int]]:
    """Per requested output (all of them by default): binary or JSON, and how many classes
    the classification extension asks for (0: the probabilities themselves)."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ImgclfError("the request's parameters must be an object")
    binary_default = parameters.get("binary_data_output", False) is True
    requested = header.get("outputs")
    if requested is None:
        requested = [{"name": OUTPUT_NAME}]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise ImgclfError("outputs must be a list of objects")
    chosen = []
    for output in requested:
        if output.get("name") != OUTPUT_NAME:
            raise ImgclfError(
                f"unknown output {quoted(str(output.get('name')))}; expected {OUTPUT_NAME!r}"
            )
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise ImgclfError("an output's parameters must be an object")
        count = options.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ImgclfError("classification must be a non-negative integer")
        chosen.append((options.get("binary_data", binary_default) is True, min(count, num_classes)))
    return chosen


def output_tensor(
    card: ModelCard, count: int, probabilities: np.ndarray
) -> tuple[dict, list | np.ndarray]:
    """The output as the protocol's tensor (name, datatype, shape) and its values: the
    probabilities (``FP32 [N, K]``), or with the classification extension ``count``
    ``"score:index:label"`` strings per image (``BYTES [N, count]``)."""
    if not count:
        tensor = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probabilities.shape)}
        return tensor, probabilities.reshape(-1)
    strings = [
        f"{entry['score']:f}:{card.classes.index(entry['label'])}:{entry['label']}"
        for best in card.top_k(probabilities, count)
        for entry in best
    ]
    return {"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(probabilities), count]}, strings


def tensor_bytes(tensor: dict, values: list | np.ndarray) -> bytes:
    """An output's values in the binary form (HTTP's extension, gRPC's raw contents)."""
    if tensor["datatype"] == "BYTES":
        return serialize_bytes([text.encode() for text in values])
    return np.asarray(values, dtype="<f4").tobytes()


def build_response(
    card: ModelCard, header: dict, outputs: list[tuple[bool, int]], probabilities: np.ndarray
) -> Response:
    """The outputs as JSON tensors, or a JSON header followed by their binary data."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    tensors, blobs = [], []
    for binary, count in outputs:
        tensor, values = output_tensor(card, count, probabilities)
        if binary:
            blob = tensor_bytes(tensor, values)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values.tolist() if isinstance(values, np.ndarray) else values
        tensors.append(tensor)
    answer = {"model_name": card.name, "model_version": str(card.version), "outputs": tensors}
    if "id" in header:
        answer["id"] = str(header["id"])
    if not blobs:
        return JSONAnswer(answer)
    encoded = json_bytes(answer)
    return Response(
        encoded + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(encoded))},
    )

"""The OpenAPI description of the Open Inference Protocol routes (``serving/oip.py``), merged
into ``/docs.json`` with the others."""

from __future__ import annotations

from serving.web.openapi import ERROR

JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": TENSOR, "minItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "Binary tensor data extension: the length of the JSON header that starts "
    "the body (0: the whole body is one encoded image).",
    "schema": {"type": "integer", "minimum": 0},
}
PATH_KEYS = ("name", "version")
UNAVAILABLE = {"description": "Not ready, or overloaded: retry later.", "content": ERROR["content"]}


def _path_parameter(name: str, example: str | None) -> dict:
    parameter = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    return parameter | ({"example": example} if example is not None else {})


def _get(summary: str, *, model: bool, versioned: bool, served: tuple) -> dict:
    responses = {"200": {"description": summary, "content": JSON_OBJECT}, "503": UNAVAILABLE}
    if model:
        responses["404"] = {"description": "Unknown model or version", **ERROR}
    name, version = (
        _path_parameter(key, value) for key, value in zip(PATH_KEYS, served, strict=True)
    )
    parameters = [name, version] if versioned else [name] if model else []
    return {
        "get": {
            "tags": ["Open Inference Protocol"],
            "summary": summary,
            "parameters": parameters,
            "responses": responses,
        }
    }


def _infer(versioned: bool, served: tuple) -> dict:
    name, version = (
        _path_parameter(key, value) for key, value in zip(PATH_KEYS, served, strict=True)
    )
    return {
        "post": {
            "tags": ["Open Inference Protocol"],
            "summary": "Run inference (KServe V2 / Triton HTTP)",
            "description": "Input `image`: BYTES [N, 1] encoded images, or FP32/UINT8 "
            "[N, H, W, 3] pixels; JSON tensors or the binary tensor data extension. Output "
            "`probabilities`: FP32 [N, K], or `classification: k` strings.",
            "parameters": [name, version, HEADER_LENGTH] if versioned else [name, HEADER_LENGTH],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": INFER_REQUEST},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {
                    "description": "The outputs, as JSON or a JSON header and binary data",
                    "content": {
                        **JSON_OBJECT,
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "400": ERROR,
                "404": {"description": "Unknown model or version", **ERROR},
                "413": ERROR,
                "415": ERROR,
                "503": UNAVAILABLE,
            },
        }
    }


def paths(model_name: str | None = None, model_version: int | None = None) -> dict:
    """Every ``/v2`` route, with and without ``/versions/{version}``; the served model's name
    and version as the path parameters' examples, when known."""
    served = (model_name, None if model_version is None else str(model_version))
    server = {"model": False, "versioned": False, "served": served}
    described = {
        "/v2": _get("Server metadata and extensions", **server),
        "/v2/health/live": _get("Server liveness", **server),
        "/v2/health/ready": _get("Server readiness", **server),
    }
    for base, versioned in (
        ("/v2/models/{name}", False),
        ("/v2/models/{name}/versions/{version}", True),
    ):
        model = {"model": True, "versioned": versioned, "served": served}
        described[base] = _get("Model metadata", **model)
        described[base + "/ready"] = _get("Model readiness", **model)
        described[base + "/config"] = _get("Triton model configuration", **model)
        described[base + "/infer"] = _infer(versioned, served)
    return described

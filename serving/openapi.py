"""The OpenAPI description of /predict, /predict_batch and /metadata (the /v2 routes: see
``openapi_v2.py``), merged into BentoML's ``/docs.json`` (BentoML documents only FastAPI
mounts, and FastAPI is not a dependency)."""

from __future__ import annotations

import json

ERROR = {
    "description": "A mistake in the request; the body says what.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
SCORE = {
    "type": "object",
    "required": ["label", "score"],
    "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
}
PREDICTION = {
    "type": "object",
    "required": ["label", "score", "top_k", "model_version"],
    "properties": {
        "label": {"type": "string"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "array", "items": SCORE},
        "model_version": {"type": "integer"},
    },
}


def top_k_parameter(max_top_k: int) -> dict:
    return {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": "How many classes to return, best first (all of them if the model has "
        "fewer).",
        "schema": {"type": "integer", "minimum": 1, "maximum": max_top_k},
    }


ERRORS = {"400": ERROR, "413": ERROR, "415": ERROR}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def paths(max_top_k: int = 20, max_images: int = 32) -> dict:
    """The three endpoints with the server's limits (IMGCLF_MAX_TOP_K,
    IMGCLF_MAX_IMAGES_PER_REQUEST)."""
    top_k = top_k_parameter(max_top_k)
    return {
        "/predict": {
            "post": {
                "tags": ["Service APIs"],
                "summary": "Classify one image",
                "description": "One image as the raw body (image/jpeg, image/png, ...) or as the "
                "multipart field `image`.",
                "parameters": [top_k],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image"],
                                "properties": {"image": {"type": "string", "format": "binary"}},
                            }
                        },
                        "image/jpeg": BINARY,
                        "image/png": BINARY,
                        "application/octet-stream": BINARY,
                    },
                },
                "responses": {
                    "200": {
                        "description": "The prediction",
                        "content": {"application/json": {"schema": PREDICTION}},
                    },
                    **ERRORS,
                },
            }
        },
        "/predict_batch": {
            "post": {
                "tags": ["Service APIs"],
                "summary": "Classify several images",
                "description": "Images as repeated multipart fields `images`; results in input "
                "order. One bad image fails the request, naming its index.",
                "parameters": [top_k],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["images"],
                                "properties": {
                                    "images": {
                                        "type": "array",
                                        "items": {"type": "string", "format": "binary"},
                                        "minItems": 1,
                                        "maxItems": max_images,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "One prediction per image, in input order",
                        "content": {
                            "application/json": {"schema": {"type": "array", "items": PREDICTION}}
                        },
                    },
                    **ERRORS,
                },
            }
        },
        "/metadata": {
            "get": {
                "tags": ["Service APIs"],
                "summary": "The model being served",
                "responses": {
                    "200": {
                        "description": "Name, version, classes, input, execution provider, metrics",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": [
                                        "name",
                                        "version",
                                        "classes",
                                        "input",
                                        "execution_provider",
                                    ],
                                }
                            }
                        },
                    }
                },
            }
        },
    }


class MergeOpenAPIPaths:
    """ASGI middleware: add ``paths()`` to the JSON that ``GET /docs.json`` returns."""

    def __init__(
        self, app, max_top_k: int = 20, max_images: int = 32, served=lambda: (None, None)
    ) -> None:
        self.app = app
        self.paths = paths(max_top_k, max_images)
        self.served = served  # () -> (model name, version), once the model is loaded

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            await self.app(scope, receive, send)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            from serving import openapi_v2

            spec = json.loads(body)
            spec.setdefault("paths", {}).update(self.paths)
            spec["paths"].update(openapi_v2.paths(*self.served()))
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

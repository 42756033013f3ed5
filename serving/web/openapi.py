"""The OpenAPI description of /predict, /predict_batch, /explain, /metadata and /feedback (/v2: see
``openapi_v2.py``), merged into BentoML's ``/docs.json`` (BentoML documents only FastAPI
mounts, and FastAPI is not a dependency)."""

from __future__ import annotations

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
    "required": ["label", "score", "top_k", "model_version", "request_id"],
    "properties": {
        "label": {"type": "string"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "array", "items": SCORE},
        "model_version": {"type": "integer"},
        "request_id": {
            "type": "string",
            "description": "What POST /feedback names this prediction by: the caller's "
            "X-Request-ID when it is safe (letters, digits and ._:-, at most 128), else a new "
            "one; `id/index` for each image of a batch.",
        },
    },
}
LABEL = {
    "type": "object",
    "required": ["request_id", "label"],
    "properties": {
        "request_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "label": {"type": "string", "description": "The true class: one of the model's classes."},
    },
}
REFUSED = {
    "description": "Nothing was counted; `problems` lists every refused item.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "problems": {"type": "array", "items": {"type": "object"}},
                },
            }
        }
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
#: One image as the raw body or as the multipart field ``image`` (/predict, /explain).
ONE_IMAGE = {
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
}


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
                "requestBody": ONE_IMAGE,
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


def feedback_paths() -> dict:
    return {
        "/feedback": {
            "post": {
                "tags": ["Monitoring"],
                "summary": "Report true labels of earlier predictions",
                "description": "One label or a list of up to 1,000, matched by request id to "
                "the predictions the server keeps (IMGCLF_FEEDBACK_STORE_SIZE, "
                "IMGCLF_FEEDBACK_MAX_AGE_S). All or nothing: an unknown label (422), an "
                "unknown or expired id (404) or an id labelled before (409) refuses the call. "
                "With IMGCLF_FEEDBACK_TOKEN set: 'Authorization: Bearer <token>' (401 without).",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    LABEL,
                                    {"type": "array", "items": LABEL, "maxItems": 1000},
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Every label was matched and counted",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": ERROR,
                    "401": ERROR,
                    "404": REFUSED,
                    "409": REFUSED,
                    "413": ERROR,
                    "422": REFUSED,
                },
            },
            "get": {
                "tags": ["Monitoring"],
                "summary": "Accuracy of the last labelled predictions",
                "description": "Accuracy, per-class precision, recall and F1, and the "
                "confusion matrix over the last IMGCLF_FEEDBACK_WINDOW labelled predictions, "
                "next to the held-out figures of the export. With IMGCLF_FEEDBACK_TOKEN set: "
                "'Authorization: Bearer <token>' (401 without).",
                "responses": {
                    "200": {
                        "description": "The figures",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": ERROR,
                    "404": ERROR,
                },
            },
        }
    }


EXPLANATION = {
    "type": "object",
    "required": ["label", "score", "class", "method", "map", "model_version", "request_id"],
    "properties": {
        "label": {"type": "string", "description": "The top-1 answer, as /predict's."},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "class": {"type": "string", "description": "The class the map is for."},
        "method": {"type": "string", "enum": ["cam", "occlusion"]},
        "map": {
            "type": "array",
            "description": "Rows of numbers in [0, 1], over the image. cam: one per position "
            "of the last feature map, the class logit's gradient times the map, summed over "
            "the channels, over its largest value. occlusion: a 7x7 grid, how much covering "
            "each cell lowered the class's probability, over the largest such drop.",
            "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
        },
        "model_version": {"type": "integer"},
        "request_id": {"type": "string"},
    },
}


def explain_paths() -> dict:
    """``POST /explain``: one image as /predict takes it, and the map."""

    def option(name: str, description: str, values: list[str] | None = None) -> dict:
        schema = {"type": "string", **({"enum": values} if values else {})}
        return {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": schema,
        }

    return {
        "/explain": {
            "post": {
                "tags": ["Service APIs"],
                "summary": "Where the model looked: a class-activation map of one image",
                "description": "One image as /predict takes it. cam: one forward pass and the "
                "gradient of the class at the last feature map (versions exported with its "
                "head; 422 for others). Occlusion: 50 forward passes (the image with each "
                "cell of a 7x7 grid covered, and the original). One explanation at a time per "
                "worker, beside /predict's batches.",
                "parameters": [
                    option("class", "The class to explain; default: the top-1 answer."),
                    option(
                        "method",
                        "cam or occlusion; default: cam where the version has it, else occlusion.",
                        ["cam", "occlusion"],
                    ),
                    option(
                        "format", "json, or png: the image with the map over it.", ["json", "png"]
                    ),
                ],
                "requestBody": ONE_IMAGE,
                "responses": {
                    "200": {
                        "description": "The map (JSON), or the picture (format=png)",
                        "content": {
                            "application/json": {"schema": EXPLANATION},
                            "image/png": BINARY,
                        },
                    },
                    **ERRORS,
                    "422": ERROR,
                },
            }
        }
    }

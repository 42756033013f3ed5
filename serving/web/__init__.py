"""The HTTP service's machinery: settings, request reading, the worker context, the batcher,
the lifecycle, middlewares, the Open Inference Protocol, feedback and OpenAPI. The API itself
is ``serving/service.py``."""

"""Serving: the preprocessing contract, the ONNX Runtime runtime, the BentoML service."""

#: The package version (pyproject reads it from here; the Bento carries serving/, not imgclf/).
__version__ = "0.1.0"

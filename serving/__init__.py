"""Serving: the preprocessing contract, the ONNX Runtime runtime, the BentoML service."""

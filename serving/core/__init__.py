"""What training, batch scoring and the service share: errors, files, the model directory,
the preprocessing contract and the ONNX Runtime runtime. No BentoML, no Starlette."""

"""The Open Inference Protocol's gRPC messages and service (``inference.GRPCInferenceService``),
generated from Triton's ``grpc_service.proto`` and ``model_config.proto``, kept byte-identical
to upstream and under their own file names so that they load beside tritonclient's own
(see README.txt here; LICENSE: upstream's BSD-3-Clause notice)."""

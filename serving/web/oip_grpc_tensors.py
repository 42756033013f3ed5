"""The Open Inference Protocol's gRPC messages as its HTTP form: a ``ModelInferRequest`` as
the inference header and binary data that ``serving.web.oip_tensors`` checks and decodes for
both transports, and the answer as a ``ModelInferResponse`` with raw output contents."""

from __future__ import annotations

import numpy as np

from serving.core.errors import ImgclfError
from serving.oip_proto import grpc_service_pb2 as pb
from serving.web.oip_tensors import output_tensor, serialize_bytes, tensor_bytes

#: Typed contents a pixel input may come in, by datatype, and their numpy dtype.
PIXEL_CONTENTS = {"FP32": ("fp32_contents", np.float32), "UINT8": ("uint_contents", np.uint32)}


def request_header(request) -> tuple[dict, bytes]:
    """A ``ModelInferRequest`` as the HTTP protocol's inference header and binary data, so
    that both are checked and decoded by the same code (``serving.web.oip_tensors``): the
    input's raw contents, or its typed contents turned into the same binary form."""
    if len(request.inputs) != 1:
        raise ImgclfError("send exactly one input, named 'image'")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise ImgclfError("raw_input_contents must hold one entry per input")
        binary = request.raw_input_contents[0]
    else:
        binary = _typed_contents(tensor)
    header_input = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "parameters": {"binary_data_size": len(binary)},
    }
    header: dict = {"inputs": [header_input]}
    if request.outputs:
        header["outputs"] = [
            {"name": output.name, "parameters": _output_parameters(output)}
            for output in request.outputs
        ]
    return header, binary


def _typed_contents(tensor) -> bytes:
    """The typed contents of a BYTES, FP32 or UINT8 input in its binary form; nothing for
    any other datatype (refused as such by ``input_images``)."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return serialize_bytes(list(contents.bytes_contents))
    if tensor.datatype not in PIXEL_CONTENTS:
        return b""
    field, dtype = PIXEL_CONTENTS[tensor.datatype]
    values = np.asarray(getattr(contents, field), dtype=dtype)
    if tensor.datatype == "UINT8":
        if (values > 255).any():
            raise ImgclfError("UINT8 contents must be integers from 0 to 255")
        values = values.astype(np.uint8)
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def _output_parameters(output) -> dict:
    """A requested output's parameters, as HTTP's: the classification extension's count."""
    if "classification" not in output.parameters:
        return {}
    parameter = output.parameters["classification"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise ImgclfError("classification must be an integer parameter")
    return {"classification": int(getattr(parameter, kind))}


def infer_response(runtime, echoed_id: str, outputs: list[tuple[bool, int]], probabilities):
    """The outputs as tensors with raw contents, as Triton answers (every client reads
    them; ``binary_data`` is HTTP's choice only), under the request's own ``id``. The id its
    predictions are kept under for ``POST /feedback`` is the ``x-request-id`` metadata."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    response = pb.ModelInferResponse(
        model_name=runtime.name, model_version=str(runtime.version), id=echoed_id
    )
    for _, count in outputs:
        tensor, values = output_tensor(runtime, count, probabilities)
        response.outputs.add(
            name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
        )
        response.raw_output_contents.append(tensor_bytes(tensor, values))
    return response

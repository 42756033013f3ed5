#!/usr/bin/env bash
# Regenerate the OIP/Triton gRPC stubs for serving/oip_proto/.
# usage: generate.sh <dir with grpc_service.proto + model_config.proto> <outdir>
# needs: python with grpcio-tools==1.85.1 (bundles libprotoc 35.1) and protobuf==7.36.2
set -euo pipefail
SRC=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd)
PY=${PYTHON:-python}
# -I must be the directory that holds the protos, with the files named on the command line
# relative to it, so the pool registers exactly "grpc_service.proto" / "model_config.proto".
(cd "$SRC" && "$PY" -m grpc_tools.protoc -I. \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    grpc_service.proto model_config.proto)
rm -f "$OUT/model_config_pb2_grpc.py"   # model_config.proto has no service: empty module
# The service is registered by serving/web/oip_grpc.py from the descriptors (lenient parsing);
# the generated servicer and stub module is not used.
rm -f "$OUT/grpc_service_pb2_grpc.py"
# protoc writes top-level imports; make them package-relative (the only edits):
sed -i -E 's/^import model_config_pb2 as model__config__pb2$/from . import model_config_pb2 as model__config__pb2/' "$OUT/grpc_service_pb2.py"
sed -i -E 's/^import model_config_pb2 as _model_config_pb2$/from . import model_config_pb2 as _model_config_pb2/' "$OUT/grpc_service_pb2.pyi"
grep -n '^from \. import' "$OUT"/*.py "$OUT"/*.pyi

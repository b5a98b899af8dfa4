"""The generated protobuf and gRPC modules of ``predict_v2.proto``, with a clear error when they are missing.

They are generated when the package is built or installed (``setup.py``), never committed; a checkout
used without installing it has none.
"""

from __future__ import annotations

try:
    from app.grpc import predict_v2_pb2 as pb
    from app.grpc import predict_v2_pb2_grpc as pb_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - depends on how the package was installed
    if exc.name and exc.name.split(".")[0] in ("grpc", "google"):
        raise ImportError(
            f"the gRPC front needs grpcio and protobuf ({exc.name} is missing): pip install 'tlserve[grpc]'"
        ) from exc
    raise ImportError(
        f"the gRPC stubs are missing ({exc.name}): they are generated from app/grpc/predict_v2.proto when tlserve "
        "is built or installed; run `pip install -e '.[grpc]'` (or `make setup`) again"
    ) from exc

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"

__all__ = ["SERVICE", "pb", "pb_grpc"]

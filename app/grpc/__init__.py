"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), a thin front over the same
:class:`~app.serving.service.Service` as HTTP: :mod:`.servicers` (the RPCs), :mod:`.converters` (protobuf ↔
tlserve types, reusing ``/v2``'s codec), :mod:`.interceptors` (request id, API keys, errors, metrics,
logs, traces), :mod:`.status` (error → status code table), :mod:`.server` (server, health, drain).

Nothing here is imported unless ``TLSERVE_GRPC_PORT`` is set; the stubs (:mod:`.stubs`) are generated
from ``predict_v2.proto`` at build/install time.
"""

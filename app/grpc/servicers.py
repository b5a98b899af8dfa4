"""``inference.GRPCInferenceService``: each RPC converts the request, calls the protocol, converts the answer.

Thin over :mod:`app.serving.oip.plane`, the same calls REST ``/v2`` makes: ``ModelInfer`` is one
:meth:`~app.serving.service.Service.infer` call (same batcher, limits and image metrics as over HTTP), with the
same default outputs, ``ood_policy`` and pinned-version rule; ``ModelReady`` and ``ModelMetadata`` are
REST's answers. Errors are raised as :mod:`app.core.errors` exceptions; :mod:`app.grpc.interceptors` turns
them into gRPC statuses (table: :mod:`app.grpc.status`). Models are heads; ``model_version`` is a head
version (empty: the current one).
"""

from __future__ import annotations

from typing import Any

from app.core import tracing
from app.grpc import converters
from app.grpc.interceptors import note
from app.grpc.stubs import pb, pb_grpc
from app.serving.oip import plane
from app.serving.service import Service


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=plane.server_ready(self.service)[0])

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        meta = plane.server_metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        ok, _ = await plane.model_ready(self.service, request.name, converters.version(request.version))
        return pb.ModelReadyResponse(ready=ok)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = plane.model_metadata(self.service, request.name, converters.version(request.version))
        return converters.metadata_response(meta)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        s = self.service
        version = converters.version(request.model_version)
        head = await plane.head(s, request.model_name, version)  # NOT_FOUND before looking at the tensors
        note(head=head.name)
        with tracing.span("receive"):
            params = converters.parameters(request.parameters)
            call = plane.translate(s, head, version, converters.inputs(request),
                                   lambda n: converters.elements(request, n), converters.outputs(request), params)  # fmt: skip
        note(images=len(call.request.items))
        result = await plane.run(s, call)
        with tracing.span("encode"):
            return converters.infer_response(request, plane.answer(call, result))

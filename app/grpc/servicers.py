"""``inference.GRPCInferenceService``: each RPC converts the request, calls the service, converts the answer.

Thin over the same :class:`~app.service.Service` as HTTP: ``ModelInfer`` is one
:meth:`~app.service.Service.infer` call (same batcher, limits and image metrics as ``/v2`` over HTTP).
Errors are raised as :mod:`app.errors` exceptions; :mod:`app.grpc.interceptors` turns them into
gRPC statuses (table: :mod:`app.grpc.status`). Models are heads; ``model_version`` is a head
version (empty: the current one).
"""

from __future__ import annotations

from typing import Any

from app import __version__, tracing
from app.api.oip.codec import INPUT
from app.api.oip.routes import EXTENSIONS
from app.grpc import converters
from app.grpc.interceptors import note
from app.grpc.stubs import pb, pb_grpc
from app.inference import InferRequest, Item
from app.service import Service


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready[0])

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tlserve", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        wanted = converters.version(request.version)
        stored, head, _ = self.service.head_record(request.name)  # NOT_FOUND for an unknown model
        if wanted is not None and wanted != stored.version:
            self.service.registry.store.get(request.name, wanted)  # NOT_FOUND for an unknown version
            return pb.ModelReadyResponse(ready=self.service.ready[0])  # a committed version loads on request
        return pb.ModelReadyResponse(ready=self.service.ready[0] and head is not None)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        from app.api.oip.routes import model_metadata  # the one description of a model, shared with /v2 over HTTP

        meta = model_metadata(self.service, request.name, converters.version(request.version))
        t = converters.tensor
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[t(x.name, x.datatype, x.shape) for x in meta.inputs],
            outputs=[t(x.name, x.datatype, x.shape) for x in meta.outputs],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        s = self.service
        with tracing.span("receive"):
            version = converters.version(request.model_version)
            if version is None:
                s.head(request.model_name)  # NOT_FOUND before looking at the tensors, as over HTTP
            data, wanted = converters.infer_request(request, s.settings.max_images_per_request)
        note(images=len(data))
        items = [Item(d, f"{INPUT}[{i}]") for i, d in enumerate(data)]
        result = await s.infer(InferRequest(items, "infer", head=request.model_name, version=version, all_or_nothing=True))
        assert result.head is not None
        note(head=result.head.name)
        if result.failed:  # the protocol has no per-item errors: one bad image fails the request
            i, err = result.failed[0]
            raise type(err)(f"input {INPUT!r} element {i}: {err.message}")
        with tracing.span("encode"):
            return converters.infer_response(request, result, wanted)

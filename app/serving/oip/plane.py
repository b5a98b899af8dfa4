"""The Open Inference Protocol over :class:`~app.serving.service.Service`, once for every transport: server and
model metadata, readiness, and one inference call (request → :class:`~app.serving.inference.InferRequest` →
output tensors). REST ``/v2`` (:mod:`app.api.oip.routes`) and gRPC (:mod:`app.grpc.servicers`) call
these and only turn their wire format into the arguments and the answers into their wire format.

Every loaded head is a model; a model's versions are the head's, ``None`` meaning its current one. A
pinned version is loaded and verified on first use (read off the event loop), as for ``/v1``; one that
fails verification is not ready and its requests get its error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from app import __version__
from app.core.errors import TlserveError
from app.serving.inference import InferRequest, InferResult, Item
from app.serving.oip.tensors import INPUT, OutputTensor, Wanted, check_input, ood_policy, output_tensors, requested
from app.serving.service import Service
from app.storage.heads import Head

SERVER = "tlserve"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_sklearn"


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list, description="The head's versions (model_version)")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER, version=__version__, extensions=EXTENSIONS)


def server_ready(service: Service) -> tuple[bool, str | None]:
    """``(ready, reason)``; the reason only when not ready."""
    ok, reason = service.ready
    return ok, None if ok else reason


async def head(service: Service, name: str, version: int | None) -> Head:
    """The head (current, or pinned ``version``) a request names, or its error: 404 for an unknown model
    or version, the verification error of a version that fails it."""
    if version is None:
        return service.head(name)
    return await service.head_off_loop(name, version)


def _classes(service: Service, name: str, version: int | None) -> tuple[str, ...]:
    if version is not None:  # VersionNotFound → 404 listing the versions that exist
        return service.store.heads.get(name, version).info.classes
    current, loaded, _ = service.head_record(name)  # HeadNotFound → 404
    return loaded.classes if loaded is not None else current.info.classes


def model_metadata(service: Service, name: str, version: int | None) -> ModelMetadata:
    n_classes = len(_classes(service, name, version))
    familiar = service.store.heads.get(name, version).info.familiarity is not None
    dim = service.info.feature_dim if service.info else -1
    tensor = TensorMetadata
    return ModelMetadata(
        name=name,
        versions=[str(v) for v in service.registry.store.versions(name)],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            tensor(name="label", datatype="BYTES", shape=[-1]),
            tensor(name="probabilities", datatype="FP32", shape=[-1, n_classes]),
            tensor(name="features", datatype="FP32", shape=[-1, dim]),
            *(
                [
                    tensor(name="familiarity", datatype="FP32", shape=[-1]),
                    tensor(name="in_distribution", datatype="BOOL", shape=[-1]),
                ]
                if familiar
                else []
            ),
        ],
    )


async def model_ready(service: Service, name: str, version: int | None) -> tuple[bool, str | None]:
    """``(ready, reason)`` of a model, or of one version of it (loaded and verified now if it is not yet);
    404 for an unknown model or version."""
    _, loaded, error = service.head_record(name)  # 404 for an unknown model
    ok, reason = service.ready
    if ok and version is not None:
        try:
            await head(service, name, version)
        except TlserveError as exc:
            if exc.status_code == 404:
                raise
            ok, reason = False, exc.message
    elif ok and loaded is None:
        ok, reason = False, error.message if error else "not loaded"
    return ok, None if ok else reason


@dataclass(frozen=True)
class Input:
    """The request's first input tensor as sent (its elements are read by the front once it is checked)."""

    name: str
    datatype: str
    shape: Sequence[int]


@dataclass(frozen=True)
class Call:
    """One inference request, checked and translated: what to run and which outputs to send."""

    request: InferRequest
    wanted: list[Wanted]


@dataclass(frozen=True)
class Answer:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]


Elements = Callable[[int], list[bytes | memoryview]]
"""A front's reader of the input's ``n`` elements from its wire format (called once the input is checked)."""


def translate(
    service: Service,
    chosen: Head,
    version: int | None,
    inputs: Sequence[Input],
    elements: Elements,
    outputs: Sequence[tuple[str, Mapping[str, Any] | None]] | None,
    parameters: Mapping[str, Any] | None,
) -> Call:
    """A request to ``chosen`` (from :func:`head`, which a front calls first, so an unknown model is a 404
    before its request is read) as a :class:`Call`, checked in this order: the outputs wanted (without
    ``outputs``, the familiarity outputs too for a head that has them), ``ood_policy``, the input (one
    BYTES ``image`` tensor, at most ``max_images_per_request``), its elements."""
    wanted = requested(outputs, parameters, familiar=chosen.familiarity is not None)
    policy = ood_policy(parameters)
    first = inputs[0] if inputs else Input("", "", ())
    n = check_input(len(inputs), first.name, first.datatype, first.shape, service.settings.max_images_per_request)
    items = [Item(d, f"{INPUT}[{i}]") for i, d in enumerate(elements(n))]
    request = InferRequest(items, "infer", head=chosen.name, version=version, all_or_nothing=True, ood_policy=policy)
    return Call(request, wanted)


async def run(service: Service, call: Call) -> InferResult:
    """One :meth:`~app.serving.service.Service.infer` call. The protocol has no per-item errors: one bad image
    fails the request, naming its element."""
    result = await service.infer(call.request)
    if result.failed:
        i, err = result.failed[0]
        raise type(err)(f"input {INPUT!r} element {i}: {err.message}")
    return result


def answer(call: Call, result: InferResult) -> Answer:
    assert result.head is not None
    return Answer(result.head.name, str(result.head.version), output_tensors(result, call.wanted))

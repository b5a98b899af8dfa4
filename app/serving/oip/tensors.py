"""The Open Inference Protocol's tensors, whatever the transport: the one input, the outputs and their rules.

A model takes one input, ``image`` (``BYTES``, shape ``[N]`` or ``[N, 1]``, one encoded image file an
element) and gives the outputs of :data:`OUTPUTS`. This module checks what a request asks for (the
input's name, datatype and shape, the outputs with their parameters, ``ood_policy``) and renders an
:class:`~app.serving.inference.InferResult` as :class:`OutputTensor` values; a front only moves bytes: REST
``/v2`` (:mod:`app.api.oip`) as JSON or the binary tensor data extension, gRPC (:mod:`app.grpc`) as
``raw_input_contents`` / ``raw_output_contents``. Both binary forms are :func:`frame`'s: BYTES
elements each a 4-byte little-endian length and the bytes; FP32 little-endian; BOOL one byte each.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.errors import BadRequest, TooManyImages
from app.serving.inference import InferResult, OodPolicy, parse_ood_policy

INPUT = "image"
OUTPUTS = ("label", "probabilities", "features", "familiarity", "in_distribution")
DEFAULT_OUTPUTS = ("label", "probabilities")
FAMILIARITY_OUTPUTS = ("familiarity", "in_distribution")
"""Extra outputs of heads with familiarity data, sent by default with them (absent for other heads)."""


@dataclass(frozen=True)
class Wanted:
    """One output to send: its name, whether in binary form, the classification extension's ``k``."""

    name: str
    binary: bool = False
    classification: int | None = None


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # BYTES, FP32 or BOOL
    shape: list[int]
    values: np.ndarray | list[str]

    def raw(self) -> bytes:
        """The binary form (binary tensor data extension, gRPC ``raw_output_contents``)."""
        if self.datatype == "BYTES":
            return frame([str(s).encode() for s in self.values])
        if self.datatype == "BOOL":
            return np.ascontiguousarray(self.values, dtype=np.bool_).tobytes()
        return np.ascontiguousarray(self.values, dtype="<f4").tobytes()

    def data(self) -> list[Any]:
        """The JSON form: a flat list in row-major order."""
        if self.datatype == "BYTES":
            return list(self.values)
        if self.datatype == "BOOL":
            return [bool(v) for v in np.asarray(self.values, dtype=np.bool_).ravel()]
        return np.ascontiguousarray(self.values, dtype="<f4").ravel().tolist()


def count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer")
    return value


def flag(params: Mapping[str, Any] | None, key: str, default: bool) -> bool:
    """A boolean parameter (a real boolean: the protocol's parameters are typed)."""
    value = (params or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key!r} must be true or false")
    return value


def ood_policy(params: Mapping[str, Any] | None) -> OodPolicy | None:
    """The request's ``ood_policy`` parameter (``report`` or ``refuse``), or ``None`` for the setting."""
    return parse_ood_policy((params or {}).get("ood_policy"), "parameter 'ood_policy'", BadRequest)


def requested(
    outputs: Sequence[tuple[str, Mapping[str, Any] | None]] | None, params: Mapping[str, Any] | None, familiar: bool
) -> list[Wanted]:
    """The outputs to send, in order: without ``outputs`` the defaults, plus the familiarity outputs when
    the head has familiarity data (``familiar``). ``binary_data_output`` (request) and ``binary_data``
    (output) choose the binary form; ``classification`` (probabilities only) the top-k extension."""
    default = flag(params, "binary_data_output", False)
    if not outputs:
        return [Wanted(name, default) for name in DEFAULT_OUTPUTS + (FAMILIARITY_OUTPUTS if familiar else ())]
    out: list[Wanted] = []
    for name, p in outputs:
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {name[:64]!r}: the outputs are {', '.join(OUTPUTS)}")
        if any(w.name == name for w in out):
            raise BadRequest(f"output {name!r} is requested twice")
        k = (p or {}).get("classification")
        if k is not None:
            if name != "probabilities":
                raise BadRequest("the classification parameter applies to the probabilities output only")
            if count(k, "classification") == 0:
                raise BadRequest("classification must be at least 1")
        out.append(Wanted(name, flag(p, "binary_data", default), k))
    return out


def check_input(n_inputs: int, name: str, datatype: str, shape: Sequence[int], limit: int) -> int:
    """The number of images of a request's inputs (one ``image`` tensor), or the error naming what is wrong;
    ``limit``: ``max_images_per_request``."""
    if n_inputs != 1:
        raise BadRequest(f"expected one input tensor named {INPUT!r}, got {n_inputs}")
    if name != INPUT:
        raise BadRequest(f"unknown input {name[:64]!r}: the model takes one BYTES input named {INPUT!r}")
    if datatype != "BYTES":
        raise BadRequest(f"input {INPUT!r} must have datatype BYTES (encoded image files), not {datatype[:16]!r}")
    if len(shape) not in (1, 2) or any(d < 0 for d in shape) or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(f"input {INPUT!r} must have shape [N] or [N, 1], not {list(shape[:4])}")
    n = shape[0]
    if n == 0:
        raise BadRequest(f"input {INPUT!r} holds no images")
    if n > limit:
        raise TooManyImages(f"{n} images in one request, over the limit of {limit} (max_images_per_request)")
    return n


def frame(elements: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """BYTES elements in the binary form: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + bytes(e) for e in elements)


def unframe(blob: bytes | bytearray, n: int) -> list[bytes | memoryview]:
    """The ``n`` BYTES elements of the binary form (views into ``blob``, not copies)."""
    view = memoryview(blob)
    out: list[bytes | memoryview] = []
    offset = 0
    while offset < len(blob) and len(out) <= n:
        if offset + 4 > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in the length of element {len(out)}")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in element {len(out)}")
        out.append(view[offset : offset + size])
        offset += size
    if len(out) != n or offset != len(blob):
        raise BadRequest(f"input {INPUT!r} has shape [{n}] but its binary data holds a different number of elements")
    return out


def output_tensors(res: InferResult, wanted: Sequence[Wanted]) -> list[OutputTensor]:
    """The output tensors of ``res``; a refused answer (``ood_policy=refuse``) has the label ``""``."""
    assert res.head is not None and res.proba is not None
    head, proba, feats = res.head, res.proba, res.features
    n = len(proba)
    result = []
    for w in wanted:
        name, k = w.name, w.classification
        if name in FAMILIARITY_OUTPUTS and (res.familiarity is None or res.in_distribution is None):
            raise BadRequest(f"output {name!r}: head {head.name!r} has no familiarity data (retrain it to add it)")
        if name == "label":
            labels = [head.classes[int(i)] if res.named(r) else "" for r, i in enumerate(np.argmax(proba, axis=1))]
            result.append(OutputTensor(name, "BYTES", [n], labels))
        elif name == "familiarity":
            result.append(OutputTensor(name, "FP32", [n], res.familiarity))  # type: ignore[arg-type]
        elif name == "in_distribution":
            result.append(OutputTensor(name, "BOOL", [n], res.in_distribution))  # type: ignore[arg-type]
        elif name == "probabilities" and k is not None:
            k = min(k, len(head.classes))
            order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
            top = [f"{proba[r, c]:.6f}:{c}:{head.classes[c]}" for r in range(n) for c in order[r]]
            result.append(OutputTensor(name, "BYTES", [n, k], top))
        elif name == "probabilities":
            result.append(OutputTensor(name, "FP32", [n, proba.shape[1]], proba))
        else:
            result.append(OutputTensor(name, "FP32", [n, feats.shape[1]], feats))
    return result

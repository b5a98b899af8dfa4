"""Every failure tlserve reports, in one tree.

    TlserveError                      base; carries an HTTP status and a stable ``code``
    ├── InputError (4xx)              the caller sent something we will not process
    │   ├── ImageDecodeError     422  bytes that are not a decodable image (truncated, corrupt)
    │   ├── UnsupportedFormat    415  a real file, but not an allowed image format (sniffed)
    │   ├── ImageTooLarge        422  more pixels than ``max_image_pixels`` (decompression bombs)
    │   ├── EmptyInput           422  0-byte image or a request without images
    │   ├── MalformedRequest     422  bad JSON, bad base64, bad options
    │   │   └── BadRequest       400  a malformed Open Inference Protocol request (the OIP says 400)
    │   ├── DatasetError         422  a training/evaluation/batch source laid out wrongly, missing or empty (named)
    │   ├── OutputConflict       409  a batch output that holds something else (other files, another job or run)
    │   ├── InvalidLabel         422  a class label (upload field or archive folder) that is not a valid name
    │   ├── UnsafeArchive        422  an uploaded archive with a path outside it, a link, a device… (named member)
    │   ├── ArchiveTooLarge      413  an archive over its member, uncompressed-bytes or compression-ratio bound
    │   ├── BodyTooLarge         413  body over ``max_body_bytes`` (or ``max_decompressed_bytes`` once inflated)
    │   ├── RequestTooComplex    413  a JSON body or gRPC message over ``max_request_elements`` values (JSON: ``max_json_depth`` levels)
    │   ├── TooManyImages        413  more than ``max_images_per_request``
    │   ├── UnsupportedMediaType 415  a request content type we do not accept
    │   ├── Unauthorized         401  missing or wrong API key
    │   ├── Forbidden            403  an inference key used for an admin operation
    │   │   └── AdminDisabled    403  an admin operation while no admin key is set (``TLSERVE_ADMIN_KEYS``)
    │   │   └── ServeOnly        403  a write (train, examples, promote, roll back, delete) on a ``role=serve`` replica
    │   ├── HostNotAllowed       400  a ``Host`` header outside ``allowed_hosts`` (DNS rebinding)
    │   └── ClientDisconnected   499  the client closed the connection mid-request (nginx's 499)
    ├── NotFound (404)
    │   ├── HeadNotFound         404  no head with that name in the model store
    │   ├── VersionNotFound      404  the head has no such version (the message lists those it has)
    │   ├── JobNotFound          404  no training job with that id in the shared store
    │   └── ReviewItemNotFound   404  no photo with that sha256 in the head's review queue (labelled, dismissed or gone)
    ├── CapacityError (503)
    │   ├── QueueFull            503  the batch queue is full; retry after ``Retry-After``
    │   ├── ShuttingDown         503  the process is draining
    │   ├── TooManyJobs          429  this replica already runs ``training_jobs`` training jobs
    │   └── StoreUnavailable     503  the object store (``head_store``) cannot be reached: nothing was written
    ├── MissingDependency    500  an optional extra a command needs is not installed (pyarrow, Ray)
    └── ModelError (500/503)
        ├── ArtifactError        500  a model file is missing, changed, or fails its checksum
        ├── IncompatibleHead     409  a head trained on another extractor
        │   └── Int8Mismatch     409  a head whose answers on the INT8 copy fell below the gate (INT8 served)
        ├── IncompatibleFeatures 409  cached features of another extractor (never mixed in)
        ├── UntrustedHead        409  a head that is unsigned or wrongly signed while verify keys are set
        │   └── MisplacedHead    409  a version whose (signed) card names another head or version than its folder
        ├── VersionConflict      409  a promotion whose expected current version is stale (compare-and-swap)
        ├── NotReady             503  the extractor is not loaded or warmed up yet
        └── InferenceError       500  ONNX Runtime raised while running a batch

Routes never build error responses by hand: they raise one of these and one handler renders
``{"error": {"code": ..., "message": ..., "request_id": ...}}``. Errors raised by the web framework
itself (unknown route, wrong method, its own validation) get the codes in :data:`HTTP_CODES`.
"""

from __future__ import annotations

from pathlib import Path


class TlserveError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(TlserveError):
    status_code = 422
    code = "invalid_input"


class ImageDecodeError(InputError):
    code = "image_decode_error"


class UnsupportedFormat(InputError):
    status_code = 415
    code = "unsupported_format"


class ImageTooLarge(InputError):
    code = "image_too_large"


class EmptyInput(InputError):
    code = "empty_input"


class MalformedRequest(InputError):
    code = "malformed_request"


class BodyTooLarge(InputError):
    status_code = 413
    code = "body_too_large"


class RequestTooComplex(InputError):
    status_code = 413
    code = "request_too_complex"


class TooManyImages(InputError):
    status_code = 413
    code = "too_many_images"


class DatasetError(InputError):
    code = "invalid_dataset"


class OutputConflict(InputError):
    status_code = 409
    code = "output_conflict"


class BadRequest(MalformedRequest):
    status_code = 400


class InvalidLabel(InputError):
    code = "invalid_label"


class UnsafeArchive(InputError):
    code = "unsafe_archive"


class ArchiveTooLarge(InputError):
    status_code = 413
    code = "archive_too_large"


class UnsupportedMediaType(InputError):
    status_code = 415
    code = "unsupported_media_type"


class Unauthorized(InputError):
    status_code = 401
    code = "unauthorized"


class Forbidden(InputError):
    status_code = 403
    code = "forbidden"


class AdminDisabled(Forbidden):
    code = "admin_disabled"


class ServeOnly(Forbidden):
    code = "serve_only"


class HostNotAllowed(InputError):
    status_code = 400
    code = "host_not_allowed"


class ClientDisconnected(InputError):
    status_code = 499
    code = "client_disconnected"


class NotFound(TlserveError):
    status_code = 404
    code = "not_found"


class HeadNotFound(NotFound):
    code = "head_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class ReviewItemNotFound(NotFound):
    code = "review_item_not_found"


class CapacityError(TlserveError):
    status_code = 503
    code = "over_capacity"
    retry_after_s: int = 1


class QueueFull(CapacityError):
    code = "queue_full"


class ShuttingDown(CapacityError):
    code = "shutting_down"


class TooManyJobs(CapacityError):
    status_code = 429
    code = "too_many_jobs"
    retry_after_s = 10


class StoreUnavailable(CapacityError):
    code = "store_unavailable"
    retry_after_s = 5


class MissingDependency(TlserveError):
    code = "missing_dependency"


class ModelError(TlserveError):
    status_code = 500
    code = "model_error"


class ArtifactError(ModelError):
    code = "artifact_error"


class IncompatibleHead(ModelError):
    status_code = 409
    code = "incompatible_head"


class Int8Mismatch(IncompatibleHead):
    code = "head_int8_mismatch"


class IncompatibleFeatures(ModelError):
    status_code = 409
    code = "incompatible_features"


class UntrustedHead(ModelError):
    status_code = 409
    code = "head_untrusted"


class MisplacedHead(UntrustedHead):
    code = "head_misplaced"


class VersionConflict(ModelError):
    status_code = 409
    code = "version_conflict"


class NotReady(ModelError):
    status_code = 503
    code = "not_ready"


class InferenceError(ModelError):
    code = "inference_error"


HTTP_CODES: dict[int, str] = {404: "not_found", 405: "method_not_allowed"}
"""Codes for errors the web framework raises itself; any other framework status is ``http_error``."""
HTTP_ERROR = "http_error"
INTERNAL_ERROR = TlserveError.code


def redact(message: str, store_root: Path) -> str:
    """``message`` without the model store's location on disk (artifact errors name their files)."""
    for where in sorted({str(store_root.resolve()), str(store_root.absolute()), str(store_root)}, key=len, reverse=True):
        if where not in ("", ".", "/"):
            message = message.replace(where + "/", "<model_store>/")
    return message

"""The Open Inference Protocol (KServe v2), once for every transport: :mod:`.tensors` (the input and
output tensors and their rules) and :mod:`.plane` (metadata, readiness, one inference call over
:class:`~app.serving.service.Service`). The fronts only move bytes: REST ``/v2`` in :mod:`app.api.oip`, gRPC in
:mod:`app.grpc`; neither imports the other."""

"""Answering requests: the extractor (ONNX Runtime), the offline inference core, familiarity, the
batcher, the service (one inference entry point for every front), metrics, the response cache and the
transport-neutral OIP layer. Imports :mod:`app.core` and :mod:`app.storage`."""

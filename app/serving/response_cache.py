"""A bounded in-memory LRU of feature vectors, keyed by (extractor sha256, image bytes sha256).

Everything an answer holds — labels, probabilities, ``top_k``, every head version's output — is
computed from the features by the head in microseconds; the features are what cost an ONNX Runtime
run. Keying on the extractor that produced them (fp32 and INT8 differ) and the exact bytes makes a
stale answer impossible: a new head version, a different ``top_k`` or policy reuses the same
vector. A hit skips decoding and the extractor; it is counted as ``cached``, never as inferred.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from app.core.hashing import sha256_bytes


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(extractor_sha256: str, data: bytes | bytearray | memoryview) -> tuple[str, str]:
        return extractor_sha256, sha256_bytes(data)

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        vector = self._entries.get(key)
        if vector is not None:
            self._entries.move_to_end(key)
        return vector

    def put(self, key: tuple[str, str], vector: np.ndarray) -> None:
        frozen = np.array(vector, copy=True)
        frozen.flags.writeable = False  # a caller that normalises its copy cannot change the cache
        self._entries[key] = frozen
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

"""``Extractor``: one ONNX Runtime session over the exported conv base.

Provider choice (``auto | cuda | cpu``): ``auto`` asks for CUDA only when the CUDA provider is
compiled in *and* the driver answers with at least one device; otherwise it goes straight to
the CPU with one log line (no wall of CUDA load errors). Whatever was asked, ``providers``
reports what ONNX Runtime really activated (``session.get_providers()``).

:func:`create_session` is the one place an ONNX Runtime session is made (serving, export
validation, quantization checks and the benchmarks' bare engine all use it).
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.core.cpus import available_cpus
from app.core.errors import ArtifactError, InferenceError
from app.storage.store import ExtractorInfo

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_device_count() -> int:
    """Devices the CUDA driver reports; 0 when there is no driver or no device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def choose_providers(provider: str) -> tuple[list[str], str]:
    """The provider list to ask ONNX Runtime for, and why."""
    import onnxruntime as ort

    if provider == "cpu":
        return [CPU], "CPU requested"
    compiled = CUDA in ort.get_available_providers()
    devices = cuda_device_count() if compiled else 0
    if compiled and devices:
        return [CUDA, CPU], f"CUDA provider compiled in and {devices} device(s) visible"
    reason = "onnxruntime has no CUDA provider" if not compiled else "no CUDA driver/device visible"
    if provider == "cuda":
        raise ArtifactError(f"provider=cuda requested but {reason}")
    return [CPU], reason


def create_session(model: Path | bytes, *, threads: int, spinning: bool, providers: list[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``model`` (a file or serialized bytes): ``threads`` intra-op
    threads (0 = the CPUs this process may use), one inter-op thread, sequential execution, every graph
    optimization, idle threads spinning or not, ``providers`` (default: the CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers or [CPU])


class Extractor:
    """Features from uint8 NHWC RGB batches, through one ONNX Runtime session."""

    def __init__(
        self,
        model: ExtractorInfo | Path,
        *,
        provider: str = "auto",
        threads: int = 0,
        spinning: bool | None = None,
    ) -> None:
        self.info = model if isinstance(model, ExtractorInfo) else None
        path = model.path if isinstance(model, ExtractorInfo) else Path(model)
        self.threads = threads or available_cpus()
        if spinning is None:  # the one default: the setting's (ONNX Runtime's own default would spin)
            from app.core.settings import Settings

            spinning = bool(Settings.model_fields["ort_spinning"].default)
        wanted, reason = choose_providers(provider)
        try:
            self.session = create_session(path, threads=self.threads, spinning=spinning, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - a broken file or provider must say so plainly
            if wanted == [CPU]:
                raise ArtifactError(f"cannot load {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
            log.warning("CUDA session failed (%s); falling back to CPU", str(exc).splitlines()[0][:200])
            self.session = create_session(path, threads=self.threads, spinning=spinning, providers=[CPU])
            reason = "CUDA session creation failed"
        self.providers: list[str] = self.session.get_providers()
        if provider == "cuda" and self.providers[0] != CUDA:
            raise ArtifactError("provider=cuda requested but ONNX Runtime activated only " + ", ".join(self.providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[1])
        self.feature_dim = int(self.session.get_outputs()[0].shape[1])
        log.info(
            "extractor %s on %s (%s); %d intra-op threads",
            path.name, self.providers[0], reason, self.threads,
        )  # fmt: skip

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == CUDA

    @property
    def sha256(self) -> str:
        return self.info.sha256 if self.info else ""

    def run(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [N, S, S, 3]`` → ``float32 [N, D]``."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected uint8 [N, {self.size}, {self.size}, 3], got {images.dtype} {images.shape}")
        try:
            (features,) = self.session.run(["features"], {self.input_name: images})
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(images)}: {type(exc).__name__}") from exc
        return np.asarray(features)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run zero images through once per batch size; returns seconds spent."""
        t0 = time.perf_counter()
        for n in batch_sizes:
            self.run(np.zeros((n, self.size, self.size, 3), np.uint8))
        return time.perf_counter() - t0


SELF_CHECK_ROUNDS = 3  # fp32/int8 pairs the start-up self-check times (after one warm-up pair)


def measure_speedup(
    fp32: Path, int8: Path, size: int, *, threads: int, spinning: bool, rounds: int = SELF_CHECK_ROUNDS
) -> dict[str, float]:
    """The start-up self-check: the int8 over the fp32 extractor's speed on this CPU, one image per run,
    fp32 and int8 alternating for ``rounds`` after one warm-up run each; each side's fastest run counts
    (the least disturbed by other processes on a shared machine)."""
    sessions = [create_session(p, threads=threads, spinning=spinning) for p in (fp32, int8)]
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    best = [float("inf"), float("inf")]
    for r in range(rounds + 1):
        for i, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(["features"], {"images": x})
            if r:  # round 0 warms up
                best[i] = min(best[i], time.perf_counter() - t0)
    return {"fp32_ms": round(best[0] * 1000, 2), "int8_ms": round(best[1] * 1000, 2), "speedup": round(best[0] / best[1], 3)}

"""The one configuration object. Every field is an env var ``TLSERVE_<FIELD>`` (upper case).

The README's settings table is generated from this class (``tlserve settings --markdown``),
so the docstrings below are the documentation.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF")
# The limits, defined once (app/imaging.py, app/features.py and the deploy files follow them).
# 8160 x 6120 (a 50 MP sensor) = 49.9 M and 8064 x 6048 (a 48 MP iPhone HEIC) = 48.8 M fit; decoded
# RGB costs 4 bytes a pixel in Pillow, so one image at the limit is 200 MB while it is resized.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# A 200 MP phone JPEG is 30-60 MB; 64 MiB leaves room for multipart framing.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    for path, parse in (
        ("/sys/fs/cgroup/cpu.max", _cgroup2_quota),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", _cgroup1_quota),
    ):
        try:
            quota = parse(Path(path))
        except (OSError, ValueError):
            continue
        if quota is not None:
            n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _cgroup2_quota(path: Path) -> float | None:
    quota, period = path.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _cgroup1_quota(path: Path) -> float | None:
    quota = int(path.read_text())
    period = int((path.parent / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TLSERVE_", extra="ignore", frozen=True)

    # --- where things are
    model_store: Path = Field(
        Path("model_store"), description="Folder holding the exported extractor, its manifest.json and heads/."
    )
    default_head: str = Field("cats_vs_dogs", description="Head used when a request names none.")
    feature_cache_dir: Path | None = Field(None, description="Feature cache for training; default <model_store>/.cache/features.")

    # --- HTTP
    host: str = Field("127.0.0.1", description="Address `tlserve serve` binds to (use 0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="Port `tlserve serve` listens on.")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM: keep accepting (with /readyz 503) this long before closing the listener, so load balancers notice first.",
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM: longest wait for in-flight and queued requests before exiting."
    )
    api_keys: str = Field(
        "", description="Comma-separated API keys; empty disables auth. Sent as `Authorization: Bearer KEY` or `X-API-Key`."
    )
    open_probes: bool = Field(True, description="Leave /livez, /readyz, /metrics and /v2/health/* open when API keys are set.")
    cors_origins: str = Field("", description="Comma-separated allowed CORS origins; empty disables CORS.")

    # --- inference engine
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="ONNX Runtime execution provider; `auto` uses CUDA only when it really works."
    )
    require_gpu: bool = Field(False, description="Refuse to become ready unless the CUDA provider is active.")
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads; 0 = the CPUs this process may use (affinity/cgroup quota)."
    )
    decode_threads: int = Field(0, ge=0, description="Image decode/resize threads; 0 = the same count as intra-op threads.")
    ort_spinning: bool = Field(
        False, description="Let ONNX Runtime's idle threads spin (faster bare runs, but steals CPU from decoding)."
    )
    head_poll_interval_s: float = Field(
        5.0, ge=0, description="How often to look for heads written or changed by `tlserve train` (0 = only POST .../reload)."
    )

    # --- dynamic batching
    max_batch_size: int = Field(16, ge=1, description="Most images in one ONNX Runtime run.")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="How long the batcher waits for more images once one is queued.")
    max_queue_size: int = Field(256, ge=1, description="Most images waiting; beyond it requests get 503 + Retry-After.")

    # --- limits
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, description="Largest request body (413 beyond); held once in memory while it is served."
    )
    max_images_per_request: int = Field(64, ge=1, description="Most images in one request (413 beyond).")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Most pixels one image may decode to (422 beyond; decompression-bomb guard): a baseline JPEG's reduced (draft) size, every other image's declared size.",
    )
    allowed_formats: str = Field(
        ",".join(DEFAULT_FORMATS), description="Image formats accepted, sniffed from the bytes (415 otherwise)."
    )
    max_top_k: int = Field(100, ge=1, description="Largest `top_k` accepted.")

    # --- logging
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="`json` (one object a line) or `text`.")

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, v: str) -> str:
        formats = [f.strip().upper() for f in v.split(",") if f.strip()]
        if not formats:
            raise ValueError("allowed_formats must name at least one format")
        return ",".join(formats)

    @property
    def formats(self) -> frozenset[str]:
        return frozenset(self.allowed_formats.split(","))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def threads(self) -> int:
        return self.intra_op_threads or available_cpus()

    @property
    def decoders(self) -> int:
        return self.decode_threads or self.threads

    @property
    def cache_dir(self) -> Path:
        return self.feature_cache_dir or self.model_store / ".cache" / "features"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_markdown() -> str:
    """The README's settings table."""
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default not in ("", None) else "—"
        rows.append(f"| `TLSERVE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)

"""The one configuration object. Every field is an env var ``TLSERVE_<FIELD>`` (upper case).

The README's settings table is generated from this class (``tlserve settings --markdown``),
so the docstrings below are the documentation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import available_cpus
from app.familiarity import DEFAULT_ACCEPTANCE, DEFAULT_METHOD, Method

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TLSERVE_", extra="ignore", frozen=True)

    # --- where things are
    model_store: Path = Field(
        Path("model_store"), description="Folder holding the exported extractor, its manifest.json and heads/."
    )
    default_head: str = Field("cats_vs_dogs", description="Head used when a request names none.")
    feature_cache_dir: Path | None = Field(None, description="Feature cache for training; default <model_store>/.cache/features.")

    head_signing_key: str = Field(
        "",
        description="Ed25519 private key (PEM file path, or the PEM) that signs every head version trained here; only where heads are trained.",
    )
    head_verify_keys: str = Field(
        "",
        description="Comma-separated Ed25519 public keys (base64 as `tlserve keys` prints, or PEM file paths); when set, unsigned or wrongly signed heads are refused (`head_untrusted`).",
    )

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

    # --- familiarity (out-of-distribution verdict, app/familiarity.py)
    ood_policy: Literal["report", "refuse"] = Field(
        "report",
        description="Below a head's familiarity threshold: `report` (answer the class, `in_distribution: false`) or `refuse` (no class named); a request's `ood_policy` overrides it.",
    )
    ood_acceptance: float = Field(
        DEFAULT_ACCEPTANCE,
        gt=0,
        lt=1,
        description="Training: share of training-like photos to accept; the threshold is calibrated out of fold at it.",
    )
    ood_method: Method = Field(
        DEFAULT_METHOD, description="Training: the familiarity score stored with new heads (measured in benchmarks/ood.py)."
    )
    metrics_max_heads: int = Field(
        20, ge=1, description="Heads with their own prediction-monitoring series in /metrics; further heads count as `_other`."
    )
    metrics_max_classes: int = Field(
        30, ge=1, description="Classes a head reports answers for in /metrics; further classes count as `_other`."
    )

    # --- limits
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body (413 beyond).")
    max_images_per_request: int = Field(64, ge=1, description="Most images in one request (413 beyond).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Most pixels in one decoded image (422 beyond; decompression-bomb guard)."
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

    @field_validator("head_signing_key")
    @classmethod
    def _signing_key(cls, v: str) -> str:
        if v.strip():
            from app.errors import ArtifactError
            from app.signing import load_private_key

            try:
                load_private_key(v)  # refuse to start with a key that cannot sign
            except ArtifactError as exc:
                raise ValueError(exc.message) from None
        return v

    @field_validator("head_verify_keys")
    @classmethod
    def _verify_keys(cls, v: str) -> str:
        from app.errors import ArtifactError
        from app.signing import load_public_keys

        try:
            load_public_keys(v)
        except ArtifactError as exc:
            raise ValueError(exc.message) from None
        return v

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

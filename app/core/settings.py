"""The one configuration object. Every field is an env var ``TLSERVE_<FIELD>`` (upper case).

The README's settings table is generated from this class (``tlserve settings --markdown``),
so the docstrings below are the documentation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.cpus import available_cpus  # a leaf: the standard library only

Method = Literal["knn", "knn_centered", "knn_class", "knn_margin", "knn_class_margin"]
"""A familiarity score (app/serving/familiarity.py); defined here, with the setting that picks it, so that this module
imports nothing of ours but :mod:`app.core.cpus` (a leaf)."""
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_METHOD: Method = "knn_class_margin"
"""Chosen by measurement (benchmarks/ood.py): best near-case AUROC and flagged rate, far case unchanged."""
DEFAULT_ACCEPTANCE = 0.95
"""Share of training-like photos a familiarity threshold accepts (``ood_acceptance``)."""
OodPolicy = Literal["report", "refuse"]
"""Below a head's familiarity threshold: answer the class (``report``) or name none (``refuse``)."""
Precision = Literal["auto", "fp32", "int8"]
"""Which extractor export serves: ``auto`` (INT8 when its gate passed and it is faster), ``fp32`` or ``int8``."""

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF")
# The limits, defined once (app/core/imaging.py, app/learning/features.py and the deploy files follow them).
# 8160 x 6120 (a 50 MP sensor) = 49.9 M and 8064 x 6048 (a 48 MP iPhone HEIC) = 48.8 M fit; decoded
# RGB costs 4 bytes a pixel in Pillow, so one image at the limit is 200 MB while it is resized; every
# format and mode is held to 10 bytes a pixel of the limit (500 MB), before it is decoded (app/core/imaging.py).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# A 200 MP phone JPEG is 30-60 MB; 64 MiB leaves room for multipart framing.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TLSERVE_", extra="ignore", frozen=True)

    # --- where things are
    model_store: Path = Field(
        Path("model_store"), description="Folder holding the exported extractor, its manifest.json and heads/."
    )
    role: Literal["serve", "train", "both"] = Field(
        "both",
        description="What this replica does: `serve` answers requests and refuses writes (train, examples, promote, rollback, delete: 403 serve_only) and holds no signing key; `train` and `both` also write the head store.",
    )
    head_store: str = Field(
        "",
        description="Heads on an object store, `s3://bucket/prefix` (endpoint and credentials from the standard AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO; needs the `s3` extra); served from a verified local copy, head_cache_dir. Empty: <model_store>/heads.",
    )
    head_cache_dir: Path | None = Field(
        None, description="This replica's local copy of the heads it serves from head_store; default <model_store>/.cache/heads."
    )
    store_timeout_s: float = Field(
        10.0, gt=0, description="Longest one object-store request may take (head_store) before the store counts as unreachable."
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
        "",
        description="Comma-separated API keys for inference (an admin key serves too); empty leaves inference open. Sent as `Authorization: Bearer KEY` or `X-API-Key`.",
    )
    admin_keys: str = Field(
        "",
        description="Comma-separated admin keys for train, examples, reload, promote, roll back and delete (403 for an inference key); empty refuses those operations to everyone (`admin_disabled`), on loopback too.",
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated `Host` header names HTTP requests may carry (400 `host_not_allowed` otherwise; `*.example.com` matches subdomains, `*` any); empty: the loopback names (`localhost`, `127.0.0.1`, `::1`) when bound to a loopback address, which stops DNS-rebinding pages from reading answers, else any.",
    )
    open_probes: bool = Field(True, description="Leave /livez, /readyz, /metrics and /v2/health/* open when API keys are set.")
    cors_origins: str = Field("", description="Comma-separated allowed CORS origins; empty disables CORS.")
    docs: bool = Field(
        False,
        description="Serve Swagger UI at /docs and ReDoc at /redoc; their pages load scripts from a CDN (jsDelivr), so they are off by default. /openapi.json is always served.",
    )

    # --- gRPC
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol gRPC front (`inference.GRPCInferenceService`, `grpc.health.v1`) on the same host; 0 = off.",
    )

    # --- inference engine
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="ONNX Runtime execution provider; `auto` uses CUDA only when it really works."
    )
    require_gpu: bool = Field(False, description="Refuse to become ready unless the CUDA provider is active.")
    precision: Precision = Field(
        "auto",
        description="Extractor served: `fp32`; `int8` (the manifest's int8 variant, made by `tlserve export`); "
        "`auto`: int8 when that variant passed its accuracy gate and the start-up self-check on this CPU measures "
        "it at least `int8_min_speedup` times as fast as fp32 (never on CUDA), else fp32. `/v1/info` says which and why.",
    )
    int8_min_speedup: float = Field(
        1.2,
        ge=0,
        description="`precision=auto`: the speed-up over fp32 the int8 variant must show in the start-up self-check "
        "(interleaved runs, about a second); 0 skips the check.",
    )
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
    pinned_versions_cached: int = Field(
        4,
        ge=0,
        description="Non-current head versions kept loaded for requests that pin one (`?version=`), least recently used out first; each use costs one `stat` of its card (0: read, hashed and checked for every such request).",
    )

    # --- dynamic batching
    max_batch_size: int = Field(16, ge=1, description="Most images in one ONNX Runtime run.")
    max_queue_delay_ms: float = Field(0.0, ge=0, description="How long the batcher waits for more images once one is queued.")
    max_queue_size: int = Field(256, ge=1, description="Most images waiting; beyond it requests get 503 + Retry-After.")

    response_cache_size: int = Field(
        4096,
        ge=0,
        description="Images whose features are kept in memory (LRU, ~2 KiB each at 512-d), keyed by extractor and exact bytes; a repeated image skips decode and inference. 0 turns it off (benchmarks do).",
    )

    # --- familiarity (out-of-distribution verdict, app/serving/familiarity.py)
    ood_policy: OodPolicy = Field(
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
    metrics_class_answers: bool = Field(
        False,
        description="Export `tlserve_prediction_answers_total{head,class}` (answers per class) in /metrics; off by default, since /metrics is open with `open_probes` and the series tell anyone what everyone's photos were.",
    )

    # --- limits
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, description="Largest request body (413 beyond); held once in memory while it is served."
    )
    max_images_per_request: int = Field(64, ge=1, description="Most images in one request (413 beyond).")
    max_decompressed_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES,
        ge=1,
        description="Largest `/v2` request body after its gzip/deflate Content-Encoding is undone, counted while it inflates (413 `body_too_large` beyond).",
    )
    max_request_elements: int = Field(
        10_000,
        ge=1,
        description="Most values in one structured request, counted from the raw bytes before it is parsed: JSON values of a JSON body (each `[`, `{`, `,` and string counts one) (413 `request_too_complex` beyond), fields and packed numbers of a gRPC message (INVALID_ARGUMENT, `request_too_complex`).",
    )
    max_json_depth: int = Field(
        32,
        ge=1,
        description="Deepest nesting of arrays and objects in one JSON request body, checked before it is parsed (413 `request_too_complex` beyond).",
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Most pixels one image may decode to (422 beyond; decompression-bomb guard): a baseline JPEG's reduced (draft) size, every other image's declared size. Decoding one image may also take at most 10 bytes a pixel of this limit, estimated from its format and mode before it is decoded (422 `image_too_large` beyond; also libjpeg's JPEGMEM).",
    )
    allowed_formats: str = Field(
        ",".join(DEFAULT_FORMATS), description="Image formats accepted, sniffed from the bytes (415 otherwise)."
    )
    max_top_k: int = Field(100, ge=1, description="Largest `top_k` accepted.")
    grpc_compression: bool = Field(
        False,
        description="Accept gzip/deflate-compressed gRPC messages (inflated up to `max_body_bytes`, then RESOURCE_EXHAUSTED); off: a compressed message is refused (UNIMPLEMENTED) before it is inflated.",
    )

    # --- training over HTTP (app/learning/jobs.py, app/learning/uploads.py, app/storage/examples.py)
    training_jobs: int = Field(
        1,
        ge=0,
        description="Training jobs one replica runs at a time; a further `POST /v1/heads/{name}/train` gets 429 + Retry-After (0: this replica trains nothing).",
    )
    compare_concurrency: int = Field(
        1,
        ge=1,
        description="`GET /v1/heads/{name}/compare` requests one replica scores at a time; a further one gets 429 + Retry-After.",
    )
    training_batch_images: int = Field(
        1,
        ge=1,
        description="Images in one piece of a training job's background work (a serving batch's worth is queued at once): one piece runs when no request waits (a request arriving then waits for it), and pieces fill the room left in a request's batch, within training_share. On a CPU a piece costs a waiting request up to its inference; raise it on a GPU.",
    )
    training_share: float = Field(
        0.33,
        gt=0.0,
        le=1.0,
        description="Most of the engine's time a training job's feature extraction takes while requests are being served (one ran in the last second; measured over ~10 s); an idle service gives it all. On a saturated CPU a request's p50 grows by about 1/(1 - share): 0.33 keeps it within 1.5x, 0.5 extracts 1.5x faster for ~2x latency; 1 removes the bound (a GPU, where a background image in a request's batch costs little).",
    )
    max_training_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="Largest training or examples upload (413 beyond); spooled to disk, never held in memory (nginx's upload `location` agrees).",
    )
    max_training_images: int = Field(
        5000, ge=1, description="Most photos in one training or examples upload, archive members included (413 beyond)."
    )
    max_training_classes: int = Field(100, ge=2, description="Most classes a head trained over HTTP may have (422 beyond).")
    max_archive_members: int = Field(
        20000,
        ge=1,
        description="Most members (files and folders) in one uploaded zip or tar, checked before extraction (413 beyond).",
    )
    max_archive_bytes: int = Field(
        2 * 1024 * 1024 * 1024,
        ge=1,
        description="Most uncompressed bytes in the archives of one upload, from their headers before extraction (413 beyond).",
    )
    max_archive_header_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Most archive metadata read into memory, checked from the raw bytes before the archive library reads it: a zip's central directory, or one tar member's extended headers (GNU long names, pax) together (413 `archive_too_large` beyond).",
    )
    max_archive_ratio: float = Field(
        100.0,
        gt=1,
        description="Largest uncompressed/compressed size ratio of an archive or zip member (zip bombs; photos barely compress).",
    )
    spool_dir: Path | None = Field(
        None,
        description="Where uploads are spooled while they are checked; default <model_store>/heads/.spool (the shared store).",
    )
    job_heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="How often a running job refreshes its record in the shared store; a record 5 beats old is reported failed (`replica_lost`).",
    )

    # --- the review queue from production (app/serving/review.py; docs/howto/review.md)
    review_heads: str = Field(
        "",
        description="Comma-separated heads whose uncertain or unfamiliar production answers are sampled into their review queue (users' photos, kept in the shared store under the `review_*` limits); empty (the default): no head's, nothing is stored.",
    )
    review_confidence: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Review queue: an answer whose top-class probability is below this is a candidate (so is every answer judged not in distribution).",
    )
    review_sample_rate: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Review queue: share of candidate answers kept (drawn at random per photo); 1 keeps every one.",
    )
    review_max_items: int = Field(
        1000, ge=1, description="Review queue: most photos queued per head; beyond it the oldest leave first (`evicted`)."
    )
    review_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Review queue: most photo bytes queued per head; beyond it the oldest leave first (`evicted`).",
    )
    review_max_age_days: float = Field(
        30.0,
        gt=0,
        description="Review queue: a photo leaves the queue (its bytes deleted) this long after it was queued (`expired`), whether or not anyone reviewed it.",
    )
    review_max_photo_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Review queue: larger photos are never sampled (`too_large`); also the cap a queued photo is read back with.",
    )
    review_pending: int = Field(
        32,
        ge=1,
        description="Review queue: sampled photos waiting for the writer thread, held in memory (at most this times `review_max_photo_bytes`); a photo sampled while it is full is dropped (`dropped_full`), never waited for.",
    )

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
            from app.core.errors import ArtifactError
            from app.core.signing import load_private_key

            try:
                load_private_key(v)  # refuse to start with a key that cannot sign
            except ArtifactError as exc:
                raise ValueError(exc.message) from None
        return v

    @field_validator("head_verify_keys")
    @classmethod
    def _verify_keys(cls, v: str) -> str:
        from app.core.errors import ArtifactError
        from app.core.signing import load_public_keys

        try:
            load_public_keys(v)
        except ArtifactError as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("review_heads")
    @classmethod
    def _review_heads(cls, v: str) -> str:
        from app.core.errors import HeadNotFound
        from app.core.names import valid_head_name

        try:
            return ",".join(dict.fromkeys(valid_head_name(h.strip()) for h in v.split(",") if h.strip()))
        except HeadNotFound as exc:
            raise ValueError(f"review_heads: {exc.message}") from None

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        self.check_ports()
        return self

    @model_validator(mode="after")
    def _serve_role_holds_no_signing_key(self) -> Settings:
        if self.role == "serve" and self.head_signing_key.strip():
            raise ValueError("role=serve holds no signing key: unset TLSERVE_HEAD_SIGNING_KEY (trainers sign; servers verify)")
        return self

    @field_validator("head_store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if v and (not v.startswith("s3://") or not v[5:].split("/", 1)[0]):
            raise ValueError(f"head_store {v[:200]!r}: expected s3://bucket/prefix (or empty for <model_store>/heads)")
        return v

    def check_ports(self) -> None:
        """Refuse (``ValueError``) one port for both fronts; also for a copy whose ``port`` the command line set."""
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port and port are both {self.port}: the gRPC and HTTP fronts need a port each")

    def redacted(self) -> dict[str, object]:
        """The settings as JSON-ready values with every secret replaced by what it is (``tlserve settings``)."""
        out = self.model_dump(mode="json")
        for name, keys in (("api_keys", self.keys), ("admin_keys", self.admin_key_list)):
            out[name] = f"<{len(keys)} key(s), redacted>" if keys else ""
        key = self.head_signing_key.strip()
        if key:
            out["head_signing_key"] = "<PEM, redacted>" if "PRIVATE KEY" in key else f"<redacted; file {key}>"
        return out

    @property
    def review_head_names(self) -> frozenset[str]:
        """The heads whose review queue is on (``review_heads``); empty: off."""
        return frozenset(h for h in self.review_heads.split(",") if h)

    @property
    def formats(self) -> frozenset[str]:
        return frozenset(self.allowed_formats.split(","))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def admin_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.admin_keys.split(",") if k.strip())

    @property
    def inference_keys(self) -> tuple[str, ...]:
        """The keys inference accepts once API keys are set (an admin key serves inference too); none: open."""
        return self.keys + self.admin_key_list if self.keys else ()

    @property
    def hosts(self) -> tuple[str, ...]:
        """``allowed_hosts``, or its default for ``host``: loopback names on a loopback address, else any (``*``)."""
        given = tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())
        if given:
            return given
        loopback = self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")
        return ("localhost", "127.0.0.1", "::1", self.host.lower()) if loopback else ("*",)

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

    @property
    def spool(self) -> Path:
        return self.spool_dir or self.model_store / "heads" / ".spool"


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

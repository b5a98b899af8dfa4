"""The model store on disk: ``manifest.json`` + the exported extractor + ``heads/`` (see :mod:`app.storage.registry`).

Files are written and read through :mod:`app.storage.files` (atomic writes, capped reads). A :class:`ModelStore`
carries the head keys (:class:`app.storage.registry.HeadKeys`) and hands them to its :attr:`~ModelStore.heads`, so
product code opens the store in one way, :meth:`ModelStore.open`, and never reads a head unverified.

``manifest.json`` is read and written by :class:`ModelStore` alone: ``extractor`` is always the fp32
export, ``variants`` holds what was derived from it (``int8``), and which of them is served is the
``precision`` setting (:meth:`ModelStore.choose`), never a rewrite of the file.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.errors import ArtifactError
from app.core.hashing import sha256_file
from app.storage.files import read_json, write_json
from app.storage.registry import HEADS, HeadKeys, HeadStore

if TYPE_CHECKING:
    from app.core.settings import Precision, Settings  # the one list of precisions (validated where settings are read)

MANIFEST = "manifest.json"
CALIBRATION_TABLE = "int8_calibration.json"  # app.learning.quantize.CalibrationTable: the INT8 copy's activation ranges


@dataclass(frozen=True)
class ExtractorInfo:
    """What the manifest says about the exported extractor."""

    path: Path
    sha256: str
    size: int
    resample: str
    pooling: str
    feature_dim: int
    precision: str
    raw: dict[str, Any]
    precision_reason: str = ""  # why this entry is served (set by ModelStore.extractor)

    @classmethod
    def from_entry(cls, root: Path, entry: dict[str, Any]) -> ExtractorInfo:
        """From a manifest entry (``extractor`` or one of ``variants``); KeyError/ValueError if incomplete."""
        return cls(
            path=root / entry["file"],
            sha256=entry["sha256"],
            size=int(entry["input_size"]),
            resample=entry["resample"],
            pooling=entry["pooling"],
            feature_dim=int(entry["feature_dim"]),
            precision=entry.get("precision", "fp32"),
            raw=entry,
        )

    @property
    def fingerprint(self) -> str:
        return self.sha256[:12]

    @property
    def feature_space(self) -> str:
        """The sha256 of the extractor whose features this one reproduces (itself, unless a quantized
        variant was measured to agree with its fp32 parent and says so in the manifest)."""
        return str(self.raw.get("feature_space") or self.sha256)


def int8_gate(entry: dict[str, Any], fp32_sha256: str) -> tuple[bool, str]:
    """Did the int8 ``entry``'s accuracy check (``app.learning.quantize``) pass against the fp32 export; ``passed: …``
    or ``failed: …`` with the figures."""
    check = entry.get("check") or {}
    heads = [h for h in (check.get("heads") or {}).values() if h.get("checked")]
    bar, images = float(check.get("min_agreement") or 0), check.get("images", 0)
    if entry.get("feature_space") == fp32_sha256:
        cosine = f", feature cosine mean {check['cosine_mean']:.5f}" if "cosine_mean" in check else ""
        return True, f"passed: every checked head agrees with fp32 on >= {bar:.1%} of {images} images{cosine}"
    if check.get("reason"):
        return False, f"failed: {check['reason']}"
    if not heads:
        return False, "failed: no head trained on the fp32 extractor was checked"
    low = min(float(h["agreement"]) for h in heads)
    return False, f"failed: lowest head agreement {low:.1%} of {images} images, below {bar:.1%}"


def int8_speed_verdict(*, on_gpu: bool, speed: dict[str, float] | None, min_speedup: float) -> tuple[bool, str]:
    """``precision=auto`` once the int8 variant passed its accuracy gate: serve it (True) or fp32, and why.
    ``speed`` is the start-up self-check (:func:`app.serving.extractor.measure_speedup`), None when it is off."""
    if on_gpu:
        return False, "the CUDA provider serves the fp32 export (the int8 QDQ kernels are for CPUs)"
    if speed is None:
        return True, "start-up self-check off (int8_min_speedup=0)"
    measured = f"{speed['speedup']:.2f}x fp32 on this CPU ({speed['int8_ms']} vs {speed['fp32_ms']} ms/image)"
    if speed["speedup"] >= min_speedup:
        return True, f"start-up self-check: {measured}, >= int8_min_speedup={min_speedup}"
    return False, f"start-up self-check measured it at {measured}, below int8_min_speedup={min_speedup}"


@dataclass(frozen=True)
class ModelStore:
    """One model store. ``keys`` and ``spool`` reach its :attr:`heads`; without them (tools and tests that
    build one by hand) heads are read unsigned-and-unverified, so product code uses :meth:`open`."""

    root: Path
    keys: HeadKeys = field(default_factory=HeadKeys, repr=False)
    spool: Path | None = None
    head_store: str = ""  # s3://bucket/prefix: heads on an object store, served from head_cache (app.storage.mirror)
    head_cache: Path | None = None
    store_timeout_s: float = 10.0

    @classmethod
    def open(cls, settings: Settings) -> ModelStore:
        """The store ``settings`` name, with the signing and verify keys and the spool they configure."""
        return cls(settings.model_store, HeadKeys.from_settings(settings), settings.spool_dir,
                   settings.head_store, settings.head_cache_dir, settings.store_timeout_s)  # fmt: skip

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def heads_dir(self) -> Path:
        return self.root / HEADS

    @property
    def calibration_path(self) -> Path:
        """The INT8 calibration table (committed for the default export; ``tlserve export --calibration-dir`` rewrites it)."""
        return self.root / CALIBRATION_TABLE

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    # --- the manifest: read and written here only -------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """``manifest.json``: ``extractor`` (the fp32 export) and ``variants`` (derived copies, e.g. ``int8``).

        Manifests written before precision became a setting (``extractor`` = the int8 entry, ``variants``
        holding both) are read in today's layout, without rewriting the file.
        """
        if not self.manifest_path.exists():
            raise ArtifactError(f"no {self.manifest_path}: run `tlserve export` first")
        manifest = read_json(self.manifest_path)
        variants = dict(manifest.get("variants") or {})
        legacy_fp32 = variants.pop("fp32", None)
        if isinstance(legacy_fp32, dict) and (manifest.get("extractor") or {}).get("precision", "fp32") != "fp32":
            manifest["extractor"] = legacy_fp32
        manifest["variants"] = variants
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Atomically replace ``manifest.json`` (no ``variants`` key when there are none)."""
        out = {k: v for k, v in manifest.items() if k != "variants" or v}
        write_json(self.manifest_path, out)

    def record_export(self, entry: dict[str, Any]) -> list[str]:
        """Make ``entry`` the fp32 ``extractor``. Variants quantized from these very bytes (same sha256) are
        kept; those of another export are dropped from the manifest (their files stay on disk). Returns the
        names dropped."""
        try:
            manifest = self.read_manifest()
        except ArtifactError:  # first export, or an unreadable manifest: start afresh
            manifest = {}
        kept = {k: v for k, v in (manifest.get("variants") or {}).items() if v.get("parent_sha256") == entry["sha256"]}
        dropped = sorted(set(manifest.get("variants") or {}) - set(kept))
        self.write_manifest({**manifest, "extractor": entry, "variants": kept})
        return dropped

    def record_variant(self, name: str, entry: dict[str, Any]) -> None:
        """Add or replace the derived variant ``name`` (``parent_sha256`` must be the current fp32 export)."""
        manifest = self.read_manifest()
        if entry.get("parent_sha256") != manifest["extractor"]["sha256"]:
            raise ArtifactError(f"the {name} variant was made from another extractor than {self.manifest_path} records")
        self.write_manifest({**manifest, "variants": {**manifest["variants"], name: entry}})

    # --- which extractor is served ----------------------------------------------------------
    def extractor(self, verify: bool = True, precision: Precision = "fp32") -> ExtractorInfo:
        """The extractor to run for ``precision`` (``fp32 | int8 | auto``, see :meth:`choose`); with ``verify``
        its sha256 is checked against the manifest."""
        entry, reason = self.choose(self.read_manifest(), precision)
        try:
            info = ExtractorInfo.from_entry(self.root, entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.manifest_path}: bad extractor entry ({exc})") from None
        if not info.path.exists():
            command = "tlserve export" + (" --int8" if info.precision != "fp32" else "")
            raise ArtifactError(f"{info.path} is missing: run `{command}`")
        mode = info.path.stat().st_mode  # a link to a copy is fine (the sha256 decides); a FIFO or device is not
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{info.path} is not a regular file (mode {stat.filemode(mode)}); the extractor must be one")
        if verify:
            actual = sha256_file(info.path)
            if actual != info.sha256:
                raise ArtifactError(f"{info.path} has sha256 {actual[:12]}…, the manifest says {info.sha256[:12]}…")
        return replace(info, precision_reason=reason)

    def choose(self, manifest: dict[str, Any], precision: Precision) -> tuple[dict[str, Any], str]:
        """The manifest entry to serve and why. ``fp32``: the export. ``int8``: the int8 variant, or an
        ArtifactError naming what is missing. ``auto``: the int8 variant when it passed its accuracy gate
        (so heads trained on fp32 features are served with it) and its file is there, else fp32."""
        fp32 = manifest.get("extractor")
        if not isinstance(fp32, dict) or "sha256" not in fp32:
            raise ArtifactError(f"{self.manifest_path} has no extractor entry: run `tlserve export`")
        if precision == "fp32":
            return fp32, "precision=fp32: the fp32 export"
        int8 = manifest["variants"].get("int8")
        how = f"run `tlserve export --int8` (from {CALIBRATION_TABLE}) or `tlserve export --int8 --calibration-dir DIR`"
        if not isinstance(int8, dict):
            if precision == "int8":
                raise ArtifactError(f"precision=int8 but {self.manifest_path} records no int8 variant: {how}")
            return fp32, "precision=auto: fp32, the manifest records no int8 variant"
        if int8.get("parent_sha256") != fp32["sha256"]:
            if precision == "int8":
                raise ArtifactError(f"precision=int8 but the int8 variant was quantized from another export: {how}")
            return fp32, "precision=auto: fp32, the int8 variant was quantized from another fp32 export"
        passed, gate = int8_gate(int8, fp32["sha256"])
        if precision == "int8":
            refused = "" if passed else "; heads trained on fp32 features are refused"
            return int8, f"precision=int8: the int8 variant (accuracy gate {gate}{refused})"
        if not passed:
            return fp32, f"precision=auto: fp32, the int8 variant's accuracy gate {gate}"
        if not (self.root / str(int8.get("file"))).exists():
            return fp32, f"precision=auto: fp32, the int8 variant's file {int8.get('file')} is missing"
        return int8, f"precision=auto: the int8 variant, accuracy gate {gate}"

    @cached_property
    def heads(self) -> HeadStore:
        """The versioned head store under ``heads/`` (its layout is :mod:`app.storage.registry`'s alone), with this
        store's keys; with ``head_store`` the object store's heads, read from their local mirror
        (:mod:`app.storage.mirror`). One per ModelStore: whether the object store is stale is its state."""
        if not self.head_store:
            return HeadStore(self.heads_dir, self.keys, spool=self.spool)
        from app.storage.mirror import MirroredHeadStore
        from app.storage.objectstore import ObjectStore

        cache = self.head_cache or self.root / ".cache" / "heads"
        return MirroredHeadStore(cache, self.keys, ObjectStore(self.head_store, timeout_s=self.store_timeout_s), spool=self.spool)

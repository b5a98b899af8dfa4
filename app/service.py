"""The data plane: one extractor, the loaded heads, the batcher and the decode pool.

The REST layers (``/v1`` and the ``/v2`` Open Inference Protocol) are thin: they parse inputs
and call :meth:`Service.features` / :meth:`Service.classify`. State is held here, never in
module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app import __version__
from app.batching import Batcher
from app.errors import ArtifactError, HeadNotFound, InputError, NotReady, TlserveError
from app.extractor import Extractor
from app.heads import Head, describe, load_head, read_card
from app.imaging import load_image
from app.metrics import Metrics
from app.settings import Settings
from app.store import ExtractorInfo, ModelStore, valid_head_name

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One image of a request: its bytes and, when it had one, a file name."""

    data: bytes | bytearray | memoryview  # a request body or a view into it: never copied
    name: str | None = None
    error: InputError | None = None  # set when the item was bad before decoding (bad base64, …)


@dataclass
class Decoded:
    item: Item
    image: np.ndarray | None
    error: InputError | None


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_store)
        self.metrics = Metrics()
        self.info: ExtractorInfo | None = None
        self.extractor: Extractor | None = None
        self.batcher: Batcher | None = None
        self.heads: dict[str, Head] = {}
        self._seen_stamps: dict[str, tuple[int, int]] = {}
        self.head_errors: dict[str, str] = {}
        self.decoder = ThreadPoolExecutor(max_workers=settings.decoders, thread_name_prefix="decode")
        self.not_ready_reason: str | None = "starting"
        self.draining = False
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the extractor and heads off the event loop; never raises (not ready instead)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load)
        except TlserveError as exc:
            self.not_ready_reason = exc.message
            log.error("not ready: %s", exc.message)
            return
        except Exception as exc:
            self.not_ready_reason = f"start-up failed: {type(exc).__name__}: {exc}"
            log.exception("not ready: start-up failed")
            return
        assert self.extractor is not None
        s = self.settings
        self.batcher = Batcher(
            self.extractor.run,
            max_batch_size=s.max_batch_size,
            max_queue_delay_ms=s.max_queue_delay_ms,
            max_queue_size=s.max_queue_size,
            metrics=self.metrics,
        )
        self.batcher.start()
        if s.head_poll_interval_s > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_heads())
        self.not_ready_reason = None
        self.metrics.ready.set(1)
        log.info("ready", extra={"heads": sorted(self.heads), "providers": self.extractor.providers})

    def _load(self) -> None:
        s = self.settings
        self.info = self.store.extractor(verify=True)
        self.extractor = Extractor(self.info, provider=s.provider, threads=s.intra_op_threads, spinning=s.ort_spinning)
        if s.require_gpu and not self.extractor.on_gpu:
            raise NotReady(f"require_gpu is set but ONNX Runtime runs on {self.extractor.providers[0]}")
        warm = self.extractor.warm_up((1, min(s.max_batch_size, 8)))
        log.info("warm-up done in %.2fs", warm)
        for name in self.store.head_names():
            try:
                self._load_head(name)
            except TlserveError as exc:
                self.head_errors[name] = exc.message
                log.warning("head %s not loaded: %s", name, exc.message)
        if s.default_head not in self.heads:
            why = self.head_errors.get(s.default_head, "not found in the model store")
            raise NotReady(f"default head {s.default_head!r} is not usable: {why}")
        self.metrics.model_info.info({
            "provider": self.extractor.providers[0],
            "input_size": str(self.info.size),
            "extractor_sha256": self.info.sha256[:12],
            "precision": self.info.precision,
            "version": __version__,
        })  # fmt: skip

    def _card_stamp(self, name: str) -> tuple[int, int]:
        st = os.stat(self.store.head_dir(name) / "card.json")
        return st.st_mtime_ns, st.st_size

    def _load_head(self, name: str) -> Head:
        assert self.info is not None
        self._seen_stamps[name] = self._card_stamp(name)
        head = load_head(self.store, name, self.info.feature_space)
        self.heads[name] = head  # one dict assignment: requests see the old or the new head, never a mix
        self.head_errors.pop(name, None)
        return head

    async def reload_head(self, name: str) -> Head:
        """Verify and load ``name`` again; on any failure the previous version keeps serving."""
        valid_head_name(name)
        if self.info is None:
            raise NotReady(self.not_ready_reason or "not ready")
        async with self._reload_lock:
            try:
                head = await asyncio.get_running_loop().run_in_executor(None, self._load_head, name)
            except FileNotFoundError:
                raise HeadNotFound(f"no head named {name!r}") from None
            except TlserveError as exc:
                self.head_errors[name] = exc.message
                self.metrics.rejections.labels("head_reload_refused").inc()
                log.error("reload of head %s refused: %s", name, exc.message)
                raise
        log.info("head %s loaded (pickle %s)", name, head.sha256[:12])
        return head

    async def _watch_heads(self) -> None:
        """Pick up heads written or changed by ``tlserve train`` (card.json stamp) without a restart."""
        while True:
            await asyncio.sleep(self.settings.head_poll_interval_s)
            for name in self.store.head_names():
                try:
                    stamp = self._card_stamp(name)
                except OSError:
                    continue
                if stamp != self._seen_stamps.get(name):
                    self._seen_stamps[name] = stamp  # a bad card is tried once, not every poll
                    with contextlib.suppress(TlserveError):
                        await self.reload_head(name)

    async def stop(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        if self._watch_task:
            self._watch_task.cancel()
        if self.batcher:
            finished = await self.batcher.drain(self.settings.drain_timeout_s)
            if not finished:
                log.warning("drain timeout: %d images still queued", self.batcher.depth)
            await self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz turns 503 now; accepted work still finishes."""
        self.draining = True
        self.metrics.ready.set(0)

    @property
    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.not_ready_reason:
            return False, self.not_ready_reason
        return True, "ready"

    # --- work -----------------------------------------------------------------------------
    def require_ready(self) -> tuple[Extractor, ExtractorInfo, Batcher]:
        if self.extractor is None or self.info is None or self.batcher is None:
            raise NotReady(f"not ready: {self.not_ready_reason}")
        return self.extractor, self.info, self.batcher

    def head(self, name: str | None) -> Head:
        self.require_ready()
        name = valid_head_name(name or self.settings.default_head)
        head = self.heads.get(name)
        if head is None:
            if name in self.head_errors:
                raise ArtifactError(f"head {name!r} is not loaded: {self.head_errors[name]}")
            read_card(self.store, name)  # raises HeadNotFound with the known names
            raise HeadNotFound(f"head {name!r} exists but is not loaded yet; POST /v1/models/{name}/reload")
        return head

    def _decode_one(self, item: Item, size: int, resample: str) -> Decoded:
        if item.error is not None:
            return Decoded(item, None, item.error)
        s = self.settings
        t0 = time.perf_counter()
        try:
            image = load_image(item.data, size, resample=resample, max_pixels=s.max_image_pixels, formats=s.formats)
        except InputError as exc:
            self.metrics.rejections.labels(exc.code).inc()
            return Decoded(item, None, exc)
        self.metrics.decode.observe(time.perf_counter() - t0)
        return Decoded(item, image, None)

    async def decode(self, items: list[Item]) -> list[Decoded]:
        _, info, _ = self.require_ready()
        loop = asyncio.get_running_loop()
        if len(items) == 1:
            return [await loop.run_in_executor(self.decoder, self._decode_one, items[0], info.size, info.resample)]
        return list(
            await asyncio.gather(
                *(loop.run_in_executor(self.decoder, self._decode_one, it, info.size, info.resample) for it in items)
            )
        )

    async def features(self, items: list[Item]) -> tuple[list[Decoded], np.ndarray]:
        """Decode every item, run the good ones through the batcher; features rows follow the good items."""
        _, info, batcher = self.require_ready()
        decoded = await self.decode(items)
        good = [d.image for d in decoded if d.image is not None]
        if not good:
            return decoded, np.zeros((0, info.feature_dim), np.float32)
        return decoded, await batcher.submit(np.stack(good))

    async def classify(self, items: list[Item], head_name: str | None, top_k: int | None) -> tuple[Head, list[dict[str, Any]]]:
        head = self.head(head_name)
        if top_k is not None and top_k > len(head.classes):
            top_k = len(head.classes)
        decoded, feats = await self.features(items)
        proba = head.predict_proba(feats) if len(feats) else np.zeros((0, len(head.classes)), np.float32)
        results, row = [], 0
        for i, d in enumerate(decoded):
            entry: dict[str, Any] = {"index": i}
            if d.item.name is not None:
                entry["file"] = d.item.name
            if d.error is not None:
                entry["error"] = {"code": d.error.code, "message": d.error.message, "status": d.error.status_code}
                self.metrics.images.labels("classify", head.name, "error").inc()
            else:
                entry.update(describe(head, proba[row], top_k))
                row += 1
                self.metrics.images.labels("classify", head.name, "ok").inc()
            results.append(entry)
        return head, results

    def describe_info(self) -> dict[str, Any]:
        s = self.settings
        ex, info = self.extractor, self.info
        return {
            "version": __version__,
            "ready": self.ready[0],
            "providers": ex.providers if ex else [],
            "gpu": bool(ex and ex.on_gpu),
            "threads": {"intra_op": ex.threads if ex else s.threads, "decode": s.decoders},
            "extractor": {
                k: info.raw.get(k) for k in ("file", "sha256", "input_size", "resample", "pooling", "feature_dim", "precision")
            }
            if info
            else None,
            "batching": {
                "max_batch_size": s.max_batch_size,
                "max_queue_delay_ms": s.max_queue_delay_ms,
                "max_queue_size": s.max_queue_size,
            },
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_images_per_request": s.max_images_per_request,
                "max_image_pixels": s.max_image_pixels,
                "allowed_formats": sorted(s.formats),
                "max_top_k": s.max_top_k,
            },
            "default_head": s.default_head,
            "heads": sorted(self.heads),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

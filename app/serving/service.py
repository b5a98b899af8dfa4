"""The data plane: one extractor, the head registry, the batcher and the decode pool.

The fronts (``/v1`` and the ``/v2`` Open Inference Protocol) are thin: they parse their wire format
into an :class:`~app.serving.inference.InferRequest` and call :meth:`Service.infer`, the one inference
entry point (decode → batch → extractor → head; images counted in the metrics there, once).
Heads — loading, reload, polling, per-head errors — are :class:`~app.storage.registry.HeadRegistry`'s.
State is held here, never in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from app import __version__
from app.core import tracing
from app.core.errors import HeadNotFound, InputError, NotReady, TlserveError
from app.core.imaging import DecodeLimits, configure
from app.core.names import valid_head_name
from app.core.settings import Settings
from app.serving.batching import Batcher
from app.serving.extractor import CUDA, Extractor, choose_providers, measure_speedup
from app.serving.familiarity import Familiarity, for_head
from app.serving.inference import Decoded, InferRequest, InferResult, Item
from app.serving.metrics import Metrics
from app.serving.predict import judge, probabilities
from app.serving.response_cache import ResponseCache
from app.serving.review import Sampler
from app.storage.control import HeadControl
from app.storage.heads import Head
from app.storage.registry import HeadRegistry, Version
from app.storage.store import ExtractorInfo, ModelStore, int8_speed_verdict

log = logging.getLogger(__name__)

OFFLOAD_BANK_ROWS = 2_000
"""Familiarity banks from this many rows are scored off the event loop (a worker thread)."""


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure(settings.max_image_pixels)  # libjpeg's memory cap, before the decode threads exist
        self.limits = DecodeLimits.from_settings(settings)
        self.store = ModelStore.open(settings)
        self.metrics = Metrics(settings.metrics_max_heads, settings.metrics_max_classes, settings.metrics_class_answers)
        self.info: ExtractorInfo | None = None
        self.extractor: Extractor | None = None
        self.batcher: Batcher | None = None
        self.cache = ResponseCache(settings.response_cache_size)
        self.registry = HeadRegistry(self.store.heads, feature_space="",
                                     pinned_cache=settings.pinned_versions_cached)  # fmt: skip
        self.control = HeadControl(self.store.heads, settings.default_head)
        heads = self.store.heads
        self.metrics.store_stale.set_function(lambda: 0.0 if heads.stale_since is None else time.time() - heads.stale_since)
        self.review = Sampler(settings, self.store.heads, self.metrics)
        self.decoder = ThreadPoolExecutor(max_workers=settings.decoders, thread_name_prefix="decode")
        self.not_ready_reason: str | None = "starting"
        self.draining = False
        self.started_at = time.time()
        self._watch_task: asyncio.Task[None] | None = None
        self._familiar: dict[tuple[str, int, str], Familiarity | None] = {}

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
            training_share=s.training_share,
            span_attributes={
                "tlserve.provider": self.extractor.providers[0],
                "tlserve.precision": self.info.precision if self.info else "",
            },
        )
        self.batcher.start()
        self.review.start()
        if s.head_poll_interval_s > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self.registry.watch(s.head_poll_interval_s))
        self.not_ready_reason = None
        self.metrics.ready.set(1)
        log.info("ready", extra={"heads": sorted(self.registry.heads), "providers": self.extractor.providers})

    def _load(self) -> None:
        from threadpoolctl import threadpool_limits

        # One BLAS thread for this process's numpy/scikit-learn work (head, familiarity): its products are
        # small, ONNX Runtime has its own pool, and a second BLAS thread only waits on a busy CPU (measured:
        # a 10,000-row familiarity score at batch 1 took 4.9 ms with two threads, 1.25 ms with one).
        threadpool_limits(1, user_api="blas")
        s = self.settings
        self.info = self.store.extractor(verify=True, precision=s.precision)
        if s.precision == "auto" and self.info.precision == "int8":
            self.info = self._int8_self_check(self.info)
        self.extractor = Extractor(self.info, provider=s.provider, threads=s.intra_op_threads, spinning=s.ort_spinning)
        if s.require_gpu and not self.extractor.on_gpu:
            raise NotReady(f"require_gpu is set but ONNX Runtime runs on {self.extractor.providers[0]}")
        warm = self.extractor.warm_up((1, min(s.max_batch_size, 8)))
        log.info("warm-up done in %.2fs", warm)
        self.registry.feature_space = self.info.feature_space
        self.registry.int8 = self.info.precision == "int8"
        self.registry.load_all()
        for head in list(self.registry.heads.values()):
            with contextlib.suppress(TlserveError):  # a bad familiarity file is reported when the head is used
                self.familiarity(head)
        if s.default_head not in self.registry.heads:
            error = self.registry.error(s.default_head)
            why = error.message if error else "not found in the model store"
            if not self.registry.heads:  # nothing at all to serve
                raise NotReady(f"default head {s.default_head!r} is not usable and no other head loads: {why}")
            # ready with the heads that load; a request for the default head gets its named error (registry.get)
            log.error("default head %r is not usable: %s; serving %s, requests for it get this error",
                      s.default_head, why, ", ".join(sorted(self.registry.heads)))  # fmt: skip
        self.metrics.model_info.info({
            "provider": self.extractor.providers[0],
            "input_size": str(self.info.size),
            "extractor_sha256": self.info.sha256[:12],
            "precision": self.info.precision,
            "precision_reason": self.info.precision_reason,
            "version": __version__,
        })  # fmt: skip

    def _int8_self_check(self, int8: ExtractorInfo) -> ExtractorInfo:
        """``precision=auto`` chose the int8 variant (its gate passed): keep it only off CUDA and when it is
        at least ``int8_min_speedup`` times as fast as fp32 on this CPU, measured now; else the fp32 export."""
        s = self.settings
        fp32 = self.store.extractor(verify=True, precision="fp32")
        on_gpu = choose_providers(s.provider)[0][0] == CUDA
        speed = None
        if not on_gpu and s.int8_min_speedup > 0:
            t0 = time.perf_counter()
            speed = measure_speedup(fp32.path, int8.path, fp32.size, threads=s.threads, spinning=s.ort_spinning)
            log.info("int8 self-check in %.2fs: %s", time.perf_counter() - t0, speed)
        keep, why = int8_speed_verdict(on_gpu=on_gpu, speed=speed, min_speedup=s.int8_min_speedup)
        if keep:
            return replace(int8, precision_reason=f"{int8.precision_reason}; {why}")
        return replace(fp32, precision_reason=f"precision=auto: fp32, the int8 variant passed its accuracy gate but {why}")

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
        await asyncio.get_running_loop().run_in_executor(None, self.review.stop)
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

    def _require_ready(self) -> tuple[ExtractorInfo, Batcher]:
        if self.extractor is None or self.info is None or self.batcher is None:
            raise NotReady(f"not ready: {self.not_ready_reason}")
        return self.info, self.batcher

    # --- heads ----------------------------------------------------------------------------
    def head(self, name: str | None, version: int | None = None) -> Head:
        """The head a request names (default: the configured one), or the error that head got."""
        self._require_ready()
        name = name or self.settings.default_head
        return self.registry.get(name) if version is None else self.registry.get_version(name, version)

    async def head_off_loop(self, name: str | None, version: int | None) -> Head:
        """:meth:`head`, with a pinned version that is not loaded yet read and verified in a thread, not on
        the event loop."""
        if version is not None:
            self._require_ready()
            cached = self.registry.cached_version(valid_head_name(name or self.settings.default_head), version)
            if cached is None:
                return await asyncio.to_thread(self.head, name, version)
            return cached
        return self.head(name, version)

    def head_record(self, name: str) -> tuple[Version, Head | None, TlserveError | None]:
        """What the store holds for ``name`` (its current version's card), the served head, its error."""
        version = self.registry.store.get(name)
        return version, self.registry.heads.get(name), self.registry.error(name)

    def served(self, name: str) -> tuple[Head | None, TlserveError | None]:
        """The version of ``name`` this replica serves (None until it loads one) and why it refuses the
        current one, if it does."""
        return self.registry.heads.get(name), self.registry.error(name)

    async def forget_deleted(self) -> None:
        """Stop serving heads deleted from the store (the next poll would; a deleting request needs it now)."""
        await self.registry.poll()

    def head_names(self) -> list[str]:
        return sorted(set(self.registry.store.names()) | set(self.registry.heads))

    async def reload_head(self, name: str) -> Head:
        """Verify and load ``name`` again; on any failure the previous version keeps serving."""
        self._require_ready()
        try:
            return await self.registry.reload(name)
        except HeadNotFound:
            raise
        except TlserveError as exc:
            self.metrics.rejections.labels("head_reload_refused").inc()
            log.error("reload of head %s refused: %s", name, exc.message)
            raise

    def familiarity(self, head: Head) -> Familiarity | None:
        """``head``'s familiarity model (``None`` when its card has none), loaded once per version. Its
        arrays are checked against the same card the head was verified with (sha256, signature)."""
        key = (head.name, head.version, head.sha256)
        if key not in self._familiar:
            model = for_head(self.registry.store, head, self.info.feature_dim if self.info else None)
            for old in [k for k in self._familiar if k[0] == head.name]:
                del self._familiar[old]  # one version a head in memory (pinned versions load again)
            self._familiar[key] = model
        return self._familiar[key]

    # --- inference ------------------------------------------------------------------------
    def _decode_one(self, item: Item, size: int, resample: str, index: int = 0) -> Decoded:
        if item.error is not None:
            return Decoded(item, None, item.error)
        with tracing.span("decode", {"tlserve.image.index": index, "tlserve.image.bytes": len(item.data)}) as span:
            t0 = time.perf_counter()
            try:
                image = self.limits.load(item.data, size, resample)
            except InputError as exc:
                self.metrics.rejections.labels(exc.code).inc()
                if span is not None:
                    span.set_attribute("tlserve.error", exc.code)
                return Decoded(item, None, exc)
            self.metrics.decode.observe(time.perf_counter() - t0)
        return Decoded(item, image, None)

    async def _decode(self, items: list[Item], info: ExtractorInfo) -> list[Decoded]:
        loop = asyncio.get_running_loop()
        decode = tracing.bind  # each job in the request's trace context (decode spans are its children)
        if len(items) == 1:
            return [await loop.run_in_executor(self.decoder, decode(self._decode_one), items[0], info.size, info.resample, 0)]
        jobs = (
            loop.run_in_executor(self.decoder, decode(self._decode_one), it, info.size, info.resample, i)
            for i, it in enumerate(items)
        )
        return list(await asyncio.gather(*jobs))

    async def infer(self, request: InferRequest) -> InferResult:
        """The one inference path: head lookup (before any work) → response cache → decode → batch →
        extractor → head. Images are counted here, once: ``ok`` (inferred), ``cached``, ``error``."""
        info, batcher = self._require_ready()
        head = await self.head_off_loop(request.head, request.version) if request.classify else None
        items, cache = request.items, self.cache if self.cache.enabled else None
        keys = [cache.key(info.sha256, it.data) if cache is not None and it.error is None else None for it in items]
        hits = {i: v for i, k in enumerate(keys) if k is not None and cache is not None and (v := cache.get(k)) is not None}
        fresh = iter(await self._decode([it for i, it in enumerate(items) if i not in hits], info))
        decoded = [Decoded(it, None, None) if i in hits else next(fresh) for i, it in enumerate(items)]
        failed = [(i, d.error) for i, d in enumerate(decoded) if d.error is not None]
        images = {i: d.image for i, d in enumerate(decoded) if d.image is not None}
        todo = list(images)
        label, counter = head.name if head else "", self.metrics.images
        if failed:
            counter.labels(request.endpoint, label, "error").inc(len(failed))
        if (not todo and not hits) or (failed and request.all_or_nothing):
            empty = np.zeros((0, info.feature_dim), np.float32)
            proba = np.zeros((0, len(head.classes)), np.float32) if head else None
            return InferResult(decoded, empty, head, proba, failed)
        inferred = await batcher.submit(np.stack(list(images.values()))) if todo else None
        by_index = dict(hits)
        for row, i in enumerate(todo):
            assert inferred is not None
            by_index[i] = inferred[row]
            if cache is not None and (key := keys[i]) is not None:
                cache.put(key, inferred[row])
        features = np.stack([by_index[i] for i in sorted(by_index)]).astype(np.float32, copy=False)
        answers = None
        if head:
            with tracing.span("head", {"tlserve.head": head.name, "tlserve.head.version": head.version}):
                answers = probabilities(head, features)  # the offline core's steps (app/serving/predict.py)
        if todo:
            counter.labels(request.endpoint, label, "ok").inc(len(todo))
        if cache is not None:
            self.metrics.cache.labels("hit").inc(len(hits))
            self.metrics.cache.labels("miss").inc(len(todo))
            if hits:
                counter.labels(request.endpoint, label, "cached").inc(len(hits))
        result = InferResult(decoded, features, head, answers.proba if answers else None, failed)
        if head is not None and answers is not None:
            version_key = (head.name, head.version, head.sha256)
            if version_key in self._familiar:
                known = self._familiar[version_key]
            else:  # first use of this version: read its arrays off the event loop
                known = await asyncio.get_running_loop().run_in_executor(None, self.familiarity, head)
            if known is not None:
                if len(known.labels) >= OFFLOAD_BANK_ROWS:  # measured ~12 ms/image at 10,000 rows on a busy CPU
                    answers = await asyncio.get_running_loop().run_in_executor(None, judge, answers, known, features)
                else:
                    answers = judge(answers, known, features)
                result.familiarity, result.in_distribution = answers.familiarity, answers.in_distribution
                result.refuse = (request.ood_policy or self.settings.ood_policy) == "refuse"
            self.metrics.observe_predictions(head, answers.proba, result.familiarity, result.in_distribution, known)
            if head.name in self.review.enabled:
                try:  # sampling never fails a request (the writer thread does the disk work)
                    self.review.offer(head.name, head.version, result)
                except Exception:
                    self.metrics.review_sampled.labels(self.metrics.head_label(head.name), "failed").inc()
                    log.exception("review queue of %s: sampling failed", head.name)
        return result

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
                **{
                    k: info.raw.get(k)
                    for k in ("file", "sha256", "input_size", "resample", "pooling", "feature_dim", "precision")
                },
                "precision_reason": info.precision_reason,
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
            "heads": sorted(self.registry.heads),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

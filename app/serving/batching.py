"""Dynamic batching: concurrent requests' images coalesced into one ONNX Runtime run.

- ``submit(images)`` queues a request's images (split into pieces of at most ``max_batch_size``)
  and awaits their features. The queue is bounded in *images* (``max_queue_size``): when a
  request does not fit, :class:`QueueFull` is raised at once (the API turns it into 503 +
  Retry-After), never a hang.
- One loop takes the first waiting piece, then keeps adding pieces until the batch holds
  ``max_batch_size`` images or ``max_queue_delay_ms`` has passed since its oldest image was
  queued (so images that waited through the previous batch run at once), and runs the batch in a
  dedicated inference thread, so the event loop (and ``/livez``) never waits on the model.
- Results are split back to each piece's future. An exception in a batch reaches every piece
  in that batch; the next batch runs normally. A piece whose request was cancelled (client gone)
  is dropped before the batch is formed, or its result discarded after.
- ``submit(images, background=True)`` is a training job's work (:mod:`app.learning.jobs`): it waits in a queue
  of its own, not bounded by ``max_queue_size`` nor counted in the queue depth (the job bounds itself),
  and yields to requests: one background piece runs only when no request is waiting (a request arriving
  then waits for that piece), and pieces fill the room a request's batch leaves, at most
  ``training_share`` of that batch's images. While requests
  are being served (one ran in the last :data:`IDLE_GAP_S`), background work takes at most
  ``training_share`` of the engine's time (decayed over :data:`SHARE_TAU_S`); an idle service gives it all.
  On a saturated CPU a request's p50 then grows by about ``1 / (1 - training_share)``.
- ``drain()`` refuses new work and waits (bounded) until everything accepted has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.core import tracing
from app.core.errors import InferenceError, QueueFull, ShuttingDown
from app.serving.metrics import Metrics

log = logging.getLogger(__name__)

IDLE_GAP_S = 1.0
"""No request ran for this long: the service is idle and background work may use the whole engine."""
SHARE_TAU_S = 10.0
"""Time constant of the decayed engine-time totals that ``training_share`` is measured on."""


@dataclass
class _Piece:
    images: np.ndarray
    future: asyncio.Future[np.ndarray]
    queued_at: float = field(default_factory=time.perf_counter)
    trace: object = field(default_factory=tracing.capture)  # the request's trace context (None: tracing off)
    background: bool = False  # a training job's images (not a request's: no queue-wait sample)


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        metrics: Metrics | None = None,
        span_attributes: dict[str, str] | None = None,
        training_share: float = 1.0,
    ) -> None:
        self._run = run
        self.training_share = training_share
        self.span_attributes = span_attributes or {}  # on each batch span (provider, precision)
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self._queue: deque[_Piece] = deque()
        self._background: deque[_Piece] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._busy = 0  # images in the running batch
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.batches = 0
        self.images = 0
        self.background_images = 0
        self._engine_s = {"request": 0.0, "background": 0.0}  # decayed engine seconds (SHARE_TAU_S)
        self._decayed_at = time.perf_counter()
        self._last_request = -math.inf  # perf_counter when a request's batch last finished

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    @property
    def depth(self) -> int:
        return self._queued_images

    @property
    def idle(self) -> bool:
        return not self._queue and not self._background and not self._busy

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; wait until queued and running work is done. True if it all finished."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.idle

    async def stop(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for piece in (*self._queue, *self._background):
            if not piece.future.done():
                piece.future.set_exception(ShuttingDown("the server stopped before this request ran"))
        self._queue.clear()
        self._background.clear()
        self._executor.shutdown(wait=True)

    # --- requests -------------------------------------------------------------------------
    async def submit(self, images: np.ndarray, *, background: bool = False, piece: int = 0) -> np.ndarray:
        """Features for ``images`` (uint8 [N, S, S, 3]), in order; ``background``: after every request, in
        pieces of ``piece`` images (default ``max_batch_size``), all queued at once."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self._task is None or self._task.done():
            raise InferenceError("the batch loop is not running")
        n = len(images)
        loop = asyncio.get_running_loop()
        if background:
            step = min(piece, self.max_batch_size) if piece > 0 else self.max_batch_size
            pieces = [_Piece(images[i : i + step], loop.create_future(), background=True) for i in range(0, n, step)]
            self._background.extend(pieces)
            self._wakeup.set()
            return await self._gather(pieces)
        if self._queued_images + n > self.max_queue_size:
            if self.metrics:
                self.metrics.rejections.labels("queue_full").inc()
            raise QueueFull(
                f"queue full: {self._queued_images} images waiting, this request adds {n}, "
                f"max_queue_size is {self.max_queue_size}"
            )
        pieces = [_Piece(images[i : i + self.max_batch_size], loop.create_future()) for i in range(0, n, self.max_batch_size)]
        self._queue.extend(pieces)
        self._queued_images += n
        self._gauge()
        self._wakeup.set()
        return await self._gather(pieces)

    async def _gather(self, pieces: list[_Piece]) -> np.ndarray:
        try:
            results = await asyncio.gather(*(p.future for p in pieces))
        except BaseException:
            for p in pieces:  # client gone or a piece failed: let the rest go too
                p.future.cancel()
            raise
        return results[0] if len(results) == 1 else np.concatenate(results)

    # --- the loop -------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._queued_images)

    def _take(self, room: int) -> list[_Piece]:
        batch: list[_Piece] = []
        while self._queue and len(self._queue[0].images) <= room:
            piece = self._queue.popleft()
            self._queued_images -= len(piece.images)
            if piece.future.done():  # cancelled while queued
                continue
            batch.append(piece)
            room -= len(piece.images)
        self._gauge()
        return batch

    @property
    def background_share(self) -> float:
        """Background work's part of the engine's recent time (decayed over SHARE_TAU_S)."""
        total = self._engine_s["request"] + self._engine_s["background"]
        return self._engine_s["background"] / total if total else 0.0

    def _background_wait(self) -> float:
        """0 when background work may run now, else how long until the service counts as idle."""
        if self.training_share >= 1.0 or self.background_share < self.training_share:
            return 0.0
        return max(0.0, self._last_request + IDLE_GAP_S - time.perf_counter())

    def _account(self, elapsed: float, size: int, background: int) -> None:
        now = time.perf_counter()
        decay = math.exp(-(now - self._decayed_at) / SHARE_TAU_S)
        self._decayed_at = now
        self._engine_s["background"] = self._engine_s["background"] * decay + elapsed * background / size
        self._engine_s["request"] = self._engine_s["request"] * decay + elapsed * (size - background) / size
        self.background_images += background
        if background < size:
            self._last_request = now
        if self.metrics:
            self.metrics.training_share.set(round(self.background_share, 4))
            self.metrics.training_images.inc(background)

    def _take_background(self, room: int, most: int | None = None) -> list[_Piece]:
        batch: list[_Piece] = []
        while self._background and len(self._background[0].images) <= room and (most is None or len(batch) < most):
            piece = self._background.popleft()
            if not piece.future.done():
                batch.append(piece)
                room -= len(piece.images)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue and not self._background:
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._queue:  # only background work waits: one piece, at once (a request arriving now waits for it)
                if (wait := self._background_wait()) > 0:  # over its share while requests are served: wait
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    continue
                batch = self._take_background(self.max_batch_size, most=1)
                if batch:
                    await self._execute(batch, len(batch[0].images), loop)
                continue
            batch = self._take(self.max_batch_size)
            if not batch:
                continue  # every queued piece had been cancelled
            size = sum(len(p.images) for p in batch)
            # The delay counts from when the oldest image was queued, not from now: images that already
            # waited while the previous batch ran are not held back again (no idle engine between batches).
            deadline = loop.time() + self.max_delay - (time.perf_counter() - batch[0].queued_at)
            while size < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                if not self._queue:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    continue
                more = self._take(self.max_batch_size - size)
                if not more:
                    break  # next piece does not fit: run what we have
                batch += more
                size += sum(len(p.images) for p in more)
            if batch:
                # the room requests left, for at most training_share of this batch's images
                most = None if self.training_share >= 1.0 else int(size * self.training_share / (1.0 - self.training_share))
                fill = most != 0 and self._background_wait() == 0
                extra = self._take_background(self.max_batch_size - size, most) if fill else []
                size += sum(len(p.images) for p in extra)
                await self._execute(batch + extra, size, loop)

    async def _execute(self, batch: list[_Piece], size: int, loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        self._busy = size
        try:
            features = await loop.run_in_executor(self._executor, self._run, images)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            log.error("batch of %d images failed: %s", size, exc)
            err = exc if isinstance(exc, InferenceError) else InferenceError(f"inference failed: {type(exc).__name__}")
            if tracing.enabled:
                tracing.batch([(p.trace, p.queued_at, len(p.images)) for p in batch], started, size, self.span_attributes, err)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        finally:
            self._busy = 0
        elapsed = time.perf_counter() - started
        self._account(elapsed, size, sum(len(p.images) for p in batch if p.background))
        if tracing.enabled:
            tracing.batch([(p.trace, p.queued_at, len(p.images)) for p in batch], started, size, self.span_attributes)
        self.batches += 1
        self.images += size
        if self.metrics:
            self.metrics.batch_size.observe(size)
            self.metrics.inference.observe(elapsed)
        offset = 0
        for p in batch:
            k = len(p.images)
            if self.metrics and not p.background:
                self.metrics.queue_wait.observe(started - p.queued_at)
            if not p.future.done():
                p.future.set_result(features[offset : offset + k])
            offset += k

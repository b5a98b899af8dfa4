"""The batcher: coalescing, bounds, error propagation, cancellation, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.core.errors import InferenceError, QueueFull, ShuttingDown
from app.serving.batching import Batcher


class Engine:
    """A real callable standing in for ONNX Runtime: sums pixels, records batch sizes, can block or fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_when = -1

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.batches.append(len(images))
        if len(images) == self.fail_when:
            raise RuntimeError("engine exploded")
        return images.reshape(len(images), -1).sum(axis=1, keepdims=True).astype(np.float32)


def imgs(*values: int) -> np.ndarray:
    return np.stack([np.full((2, 2, 3), v, np.uint8) for v in values])


def run(coro):
    return asyncio.run(coro)


async def started(engine: Engine, **kw) -> Batcher:
    b = Batcher(engine, **{"max_batch_size": 8, "max_queue_delay_ms": 20, "max_queue_size": 64, **kw})
    b.start()
    return b


def test_concurrent_requests_share_one_batch_and_get_their_own_rows() -> None:
    async def main():
        engine = Engine()
        b = await started(engine)
        results = await asyncio.gather(*(b.submit(imgs(i, i)) for i in range(1, 4)))
        await b.stop()
        return engine, results

    engine, results = run(main())
    assert engine.batches == [6]
    for i, r in enumerate(results, start=1):
        np.testing.assert_array_equal(r[:, 0], [i * 12, i * 12])


def test_request_larger_than_batch_is_split_and_reassembled_in_order() -> None:
    async def main():
        engine = Engine()
        b = await started(engine, max_batch_size=4)
        out = await b.submit(imgs(*range(10)))
        await b.stop()
        return engine, out

    engine, out = run(main())
    assert sorted(engine.batches) == [2, 4, 4]
    np.testing.assert_array_equal(out[:, 0], [v * 12 for v in range(10)])


def test_full_queue_refuses_at_once() -> None:
    async def main():
        engine = Engine()
        engine.gate.clear()  # the engine is stuck: nothing leaves the queue
        b = await started(engine, max_batch_size=2, max_queue_size=4, max_queue_delay_ms=0)
        first = asyncio.ensure_future(b.submit(imgs(1, 2)))  # taken into the (blocked) batch
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(imgs(3, 4, 5, 6)))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="max_queue_size is 4"):
            await b.submit(imgs(7))
        engine.gate.set()
        await asyncio.gather(first, queued)
        await b.stop()

    run(main())


def test_exception_reaches_every_request_in_the_batch_and_next_batch_works() -> None:
    async def main():
        engine = Engine()
        engine.fail_when = 3
        b = await started(engine)
        results = await asyncio.gather(b.submit(imgs(1)), b.submit(imgs(2, 3)), return_exceptions=True)
        after = await b.submit(imgs(4))
        await b.stop()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, InferenceError) for r in results)
    assert after[0, 0] == 48


def test_cancelled_request_does_not_poison_the_batch() -> None:
    async def main():
        engine = Engine()
        b = await started(engine, max_queue_delay_ms=50)
        gone = asyncio.ensure_future(b.submit(imgs(9, 9, 9)))
        await asyncio.sleep(0)
        gone.cancel()
        kept = await b.submit(imgs(1))
        await b.stop()
        return engine, kept, b.depth

    engine, kept, depth = run(main())
    assert kept[0, 0] == 12 and depth == 0
    assert engine.batches == [1]  # the cancelled images never reached the engine


def test_drain_finishes_accepted_work_then_refuses() -> None:
    async def main():
        engine = Engine()
        engine.gate.clear()
        b = await started(engine, max_batch_size=1, max_queue_delay_ms=0)
        pending = [asyncio.ensure_future(b.submit(imgs(i))) for i in range(3)]
        await asyncio.sleep(0.02)
        drain = asyncio.ensure_future(b.drain(timeout=5))
        await asyncio.sleep(0.02)
        with pytest.raises(ShuttingDown):
            await b.submit(imgs(5))
        engine.gate.set()
        assert await drain is True
        results = await asyncio.gather(*pending)
        await b.stop()
        return results

    results = run(main())
    assert [r[0, 0] for r in results] == [0, 12, 24]


def test_batch_closes_on_size_without_waiting_for_the_delay() -> None:
    async def main():
        engine = Engine()
        b = await started(engine, max_batch_size=2, max_queue_delay_ms=10_000)
        out = await asyncio.wait_for(asyncio.gather(b.submit(imgs(1)), b.submit(imgs(2))), timeout=5)
        await b.stop()
        return engine, out

    engine, _ = run(main())
    assert engine.batches == [2]


def test_background_work_yields_to_requests_and_fills_the_room_they_leave() -> None:
    """A training job's pieces (background) run after waiting requests, in the room a request batch leaves."""

    async def main():
        engine = Engine()
        b = await started(engine, max_queue_delay_ms=0, max_queue_size=4)
        engine.gate.clear()  # hold the engine: everything below queues behind the first batch
        first = asyncio.ensure_future(b.submit(imgs(9)))
        await asyncio.sleep(0.05)
        job = [asyncio.ensure_future(b.submit(imgs(1, 1, 1), background=True)) for _ in range(3)]
        await asyncio.sleep(0.01)
        request = asyncio.ensure_future(b.submit(imgs(2, 2, 2, 2)))  # queued after the job's pieces
        await asyncio.sleep(0.05)
        assert b.depth == 4  # background images are not counted against max_queue_size or the depth
        engine.gate.set()
        await asyncio.gather(first, request, *job)
        await b.stop()
        return engine, request.result(), [j.result() for j in job]

    engine, request, job = run(main())
    # the request ran before the job pieces queued earlier, with one 3-image piece in the room it left (8 - 4)
    assert engine.batches == [1, 7, 3, 3]
    np.testing.assert_array_equal(request[:, 0], [24] * 4)
    assert all((j[:, 0] == 12).all() for j in job)


def test_queued_background_pieces_fail_cleanly_on_stop() -> None:
    async def main():
        engine = Engine()
        b = await started(engine)
        engine.gate.clear()
        running = asyncio.ensure_future(b.submit(imgs(1)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(b.submit(imgs(1), background=True))
        await asyncio.sleep(0.01)
        threading.Timer(0.2, engine.gate.set).start()  # the engine thread returns while stop() waits for it
        await b.stop()
        await asyncio.sleep(0)
        running.cancel()
        return waiting

    waiting = run(main())
    assert isinstance(waiting.exception(), ShuttingDown)


class TimedEngine(Engine):
    """An engine whose run takes a fixed time per image, so engine-time shares are real."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        time.sleep(0.004 * len(images))
        return super().__call__(images)


async def _serve_while_training(share: float, seconds: float = 1.2) -> tuple[float, int]:
    """A closed loop of one-image requests beside a job that hands one image at a time (as app.learning.jobs does);
    returns background work's part of the engine's images, and the job's images once the requests stopped."""
    b = await started(TimedEngine(), max_queue_delay_ms=0, training_share=share)
    stop_requests = time.perf_counter() + seconds
    done_after: list[float] = []

    async def requests() -> None:
        while time.perf_counter() < stop_requests:
            await b.submit(imgs(1))

    async def job() -> None:
        while len(done_after) < 30:
            await b.submit(imgs(2), background=True)
            if time.perf_counter() > stop_requests:
                done_after.append(time.perf_counter())

    job_task = asyncio.ensure_future(job())
    await requests()
    share_seen = b.background_images / b.images
    await asyncio.wait_for(job_task, 10)  # with no request any more, the job gets the whole engine
    await b.stop()
    return share_seen, len(done_after)


def test_a_training_job_takes_at_most_its_share_of_the_engine_while_requests_are_served() -> None:
    bounded, after = run(_serve_while_training(0.25))
    unbounded, _ = run(_serve_while_training(1.0))
    assert 0.05 < bounded < 0.35  # it progresses, within its share (one piece of overshoot)
    assert unbounded > 0.4  # without the bound it alternates with the requests
    assert after == 30  # once the requests stopped, the job finished


def test_a_training_job_fills_at_most_its_share_of_a_request_batch() -> None:
    """Background pieces queued at once fill the room a request batch leaves only up to ``training_share`` of it."""

    async def main():
        engine = Engine()
        b = await started(engine, max_queue_delay_ms=0, training_share=0.33)
        engine.gate.clear()
        first = asyncio.ensure_future(b.submit(imgs(9)))
        await asyncio.sleep(0.05)
        job = asyncio.ensure_future(b.submit(imgs(*range(1, 9)), background=True, piece=1))  # 8 one-image pieces
        request = asyncio.ensure_future(b.submit(imgs(2, 2, 2, 2)))
        await asyncio.sleep(0.05)
        engine.gate.set()
        await asyncio.gather(first, request)
        features = await asyncio.wait_for(job, 5)  # the rest runs in the gaps (or once the requests stop)
        await b.stop()
        return engine, features

    engine, features = run(main())
    assert engine.batches[:2] == [1, 5]  # 4 request images + int(4 * 0.33 / 0.67) = 1 background image
    assert sum(engine.batches) == 1 + 4 + 8 and set(engine.batches[2:]) == {1}
    np.testing.assert_array_equal(features[:, 0], [12 * v for v in range(1, 9)])  # in order, whatever ran when

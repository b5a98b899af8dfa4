"""The default engine: the whole job in this process, no cluster and no Ray.

A thread pool reads and decodes files a bounded window ahead of the extractor (memory stays flat for
any number of images); the extractor and the head run on batches in this thread; a part is committed
every ``part_rows`` rows. Progress: :func:`app.core.progress.console` (a tqdm bar on a terminal, else a
line every few seconds with images done, images/s and ETA).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from app.batch.compute import Decoded, Model, decode_file, stack
from app.batch.job import Plan, Summary, claim
from app.core.errors import OutputConflict
from app.core.progress import Meter, Mode, console

if TYPE_CHECKING:
    import pyarrow as pa


def run(plan: Plan, *, progress: Mode = "auto") -> Summary:
    model = Model(plan.model)
    claim(plan)
    t0 = time.perf_counter()
    stages = {"read": 0.0, "decode": 0.0, "write": 0.0}
    images = errors = 0
    pending: list[pa.Table] = []
    meter = Meter(console(progress), "batch", len(plan.todo))

    def commit() -> None:
        import pyarrow as pa

        t = time.perf_counter()
        if not plan.output.commit(pa.concat_tables(pending), model.schema, plan.run):
            raise OutputConflict(f"another run took over {plan.job.output}; this one stops")
        stages["write"] += time.perf_counter() - t
        pending.clear()

    for batch in _batches(_decoded(plan, stages), plan.job.batch_size):
        table = model(stack(batch, plan.decode))
        pending.append(table)
        images += len(table)
        errors += len(table) - table.column("error").null_count
        meter.advance(len(table))
        if sum(len(t) for t in pending) >= plan.job.part_rows:
            commit()
    if pending:
        commit()
    meter.finish()
    stages.update(model.seconds)
    return Summary(images, errors, time.perf_counter() - t0, plan.already + images, plan.job.output, "in-process", stages=stages)


def _decoded(plan: Plan, stages: dict[str, float]) -> Iterator[Decoded]:
    """Every file to do, read and decoded by a thread pool, in order; seconds summed over the threads."""
    fs, spec = plan.source.fs, plan.decode

    def work(path: str) -> tuple[Decoded, float, float]:
        t0 = time.perf_counter()
        data: bytes | OSError
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except OSError as exc:
            data = exc
        t1 = time.perf_counter()
        return decode_file(path, data, spec), t1 - t0, time.perf_counter() - t1

    paths = (plan.source.full(rel) for rel in plan.todo)
    ahead = 4 * plan.job.batch_size
    with ThreadPoolExecutor(max_workers=plan.settings.decoders, thread_name_prefix="batch-decode") as pool:
        window: deque[Future[tuple[Decoded, float, float]]] = deque()
        for path in paths:
            window.append(pool.submit(work, path))
            if len(window) >= ahead:
                break
        while window:
            decoded, read_s, decode_s = window.popleft().result()
            stages["read"] += read_s
            stages["decode"] += decode_s
            nxt = next(paths, None)
            if nxt is not None:
                window.append(pool.submit(work, nxt))
            yield decoded


def _batches(items: Iterator[Decoded], n: int) -> Iterator[list[Decoded]]:
    batch: list[Decoded] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch

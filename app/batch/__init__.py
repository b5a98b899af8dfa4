"""Batch jobs: classify, or extract features of, every image under a folder or URI into Parquet.

    tlserve batch SRC --head NAME --output DIR [--features] [--resume] [--ray local|auto|ADDRESS]

One data path whatever the engine (:mod:`app.batch.compute`: the one image loader, the exported
extractor, the head's ``predict_proba`` and :func:`app.storage.heads.describe`, as ``tlserve predict``);
two engines: in-process (the default, :mod:`app.batch.inprocess`) and Ray Data
(:mod:`app.batch.raydata`, with the ``tlserve[ray]`` extra). The output is a folder of atomically
committed Parquet parts (:mod:`app.batch.parquet`) that ``--resume`` continues and
``tlserve train --features DIR`` trains from. Serving never imports this package.
"""

from __future__ import annotations

from app.batch.job import BatchJob, Plan, Summary, plan
from app.batch.parquet import need_pyarrow
from app.core.imaging import configure
from app.core.progress import Mode
from app.core.settings import Settings

__all__ = ["BatchJob", "Plan", "Summary", "plan", "run"]


def run(job: BatchJob, settings: Settings, *, progress: Mode | bool = "auto") -> Summary:
    """Plan the job (every check before any image is read), then run it on its engine. ``progress``:
    :func:`app.core.progress.console`'s modes in-process; on Ray, Ray Data's bars (or its progress lines off a
    terminal) unless ``none``/``False``."""
    need_pyarrow("tlserve batch")
    configure(settings.max_image_pixels)  # libjpeg's memory cap, before decode threads (and Ray's workers) exist
    mode: Mode = ("auto" if progress else "none") if isinstance(progress, bool) else progress
    p = plan(job, settings)
    if not p.todo:
        return Summary(0, 0, 0.0, p.already, job.output, "nothing to do")
    if job.ray is None:
        from app.batch import inprocess

        return inprocess.run(p, progress=mode)
    from app.batch import raydata

    return raydata.run(p, progress=mode != "none")

"""Batch jobs: classify, or extract features of, every image under a folder or URI into Parquet.

    tlserve batch SRC --head NAME --output DIR [--features] [--resume] [--ray local|auto|ADDRESS]

One data path whatever the engine (:mod:`app.batch.compute`: the one image loader, the exported
extractor, the head's ``predict_proba`` and :func:`app.heads.describe`, as ``tlserve predict``);
two engines: in-process (the default, :mod:`app.batch.inprocess`) and Ray Data
(:mod:`app.batch.raydata`, with the ``tlserve[ray]`` extra). The output is a folder of atomically
committed Parquet parts (:mod:`app.batch.parquet`) that ``--resume`` continues and
``tlserve train --features DIR`` trains from. Serving never imports this package.
"""

from __future__ import annotations

from app.batch.job import BatchJob, Plan, Summary, plan
from app.settings import Settings

__all__ = ["BatchJob", "Plan", "Summary", "plan", "run"]


def run(job: BatchJob, settings: Settings, *, progress: bool = True) -> Summary:
    """Plan the job (every check before any image is read), then run it on its engine."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("tlserve batch writes Parquet and needs pyarrow: pip install 'tlserve[ray]' (or pyarrow)") from None
    p = plan(job, settings)
    if not p.todo:
        return Summary(0, 0, 0.0, p.already, job.output, "nothing to do")
    if job.ray is None:
        from app.batch import inprocess

        return inprocess.run(p, progress=progress)
    from app.batch import raydata

    return raydata.run(p, progress=progress)

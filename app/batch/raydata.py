"""The job on Ray Data: Ray reads, schedules, moves and retries; tlserve only says what each step does.

    read_binary_files   (Ray's file source: bytes in parallel, from any pyarrow file system)
    → map_batches(decode_batch)             CPU tasks: the one image loader
    → map_batches(TlserveModel, ActorPoolStrategy(size=N))   the extractor + head, loaded once per actor;
                                             one actor per GPU with the CUDA provider when the cluster has GPUs
    → write_datasink(_PartSink)             Ray's sink API: each write task commits one part atomically

``--ray local`` starts a private Ray instance on loopback inside the command; ``auto`` joins the
cluster this machine belongs to; ``ray://host:port`` (Ray Client) or ``host:port`` a remote one. A
process that already called ``ray.init`` keeps its connection. Usage-stats reporting is off.
Progress: Ray Data's own bars on a terminal, its progress log lines otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from app.batch.compute import Model, ModelSpec, decode_batch
from app.batch.job import Plan, Summary, claim
from app.batch.parquet import Output, schema
from app.core.errors import MalformedRequest, MissingDependency

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

OBJECT_STORE_MB_LOCAL = 1024
"""Object store of a ``--ray local`` instance (Ray's default, 30% of memory, is a lot for one command)."""


def _import_ray(local: bool) -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read when Ray starts; nothing is reported
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "5")
    if local:  # a private instance listens on loopback only (Ray's switch for that reads this at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise MissingDependency("--ray needs Ray: pip install 'tlserve[ray]'") from None
    return ray


def connect(address: str, *, num_cpus: int | None = None) -> Any:
    """Ray, initialised: an existing connection, a local instance, or the cluster at ``address``."""
    ray = _import_ray(address == "local")
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_MB_LOCAL * 2**20, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


class _Tally:
    """Images per actor of the pool (for the summary; it schedules nothing)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def hello(self, actor: str) -> None:
        self.counts.setdefault(actor, 0)

    def add(self, actor: str, n: int) -> None:
        self.counts[actor] = self.counts.get(actor, 0) + n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class TlserveModel:
    """One actor of the pool: the extractor and the head loaded once (see :class:`app.batch.compute.Model`)."""

    def __init__(self, spec: Any, model: Any, tally: Any) -> None:
        import ray

        spec, model = (ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (spec, model))
        self.model = Model(spec, model=model)
        self.tally = tally
        self.id = ray.get_runtime_context().get_actor_id()
        tally.hello.remote(self.id)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        table = self.model(batch)
        self.tally.add.remote(self.id, len(table))
        return table


def _sink(output: Output, sch: pa.Schema, run: str, part_rows: int) -> Any:
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class _PartSink(Datasink[tuple[int, int, bool]]):
        """Each write task concatenates its blocks (at least ``part_rows`` rows) into one committed part."""

        def __init__(self) -> None:
            self.rows = self.errors = self.dropped = 0

        @property
        def min_rows_per_write(self) -> int:
            return part_rows

        def write(self, blocks: Any, ctx: Any) -> tuple[int, int, bool]:  # rows, errors, committed
            import pyarrow as pa

            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if len(t)]
            if not tables:
                return 0, 0, True
            table = pa.concat_tables([t.cast(sch) for t in tables])
            committed = output.commit(table, sch, run)
            return len(table), len(table) - table.column("error").null_count, committed

        def on_write_complete(self, result: Any) -> None:
            for rows, errors, committed in result.write_returns:
                if committed:
                    self.rows += rows
                    self.errors += errors
                else:
                    self.dropped += rows

    return _PartSink()


def run(plan: Plan, *, progress: bool = True) -> Summary:
    job = plan.job
    assert job.ray is not None
    ray = connect(job.ray)
    from ray.data import ActorPoolStrategy, DataContext

    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpus = gpus > 0 and plan.settings.provider != "cpu"
    actors = job.actors or (gpus if use_gpus else max(1, int(cpus // 2)))
    reserved = actors * job.actor_cpus
    if reserved >= cpus:
        raise MalformedRequest(f"--actors {actors} x --actor-cpus {job.actor_cpus:g} = {reserved:g} CPUs leaves none of the "
                         f"cluster's {cpus:g} for reading and decoding: lower --actor-cpus (e.g. 0.5) or --actors")  # fmt: skip
    spec = ModelSpec(plan.info, plan.model.head, plan.model.familiarity, plan.meta, plan.model.top_k,
                     provider="cuda" if use_gpus else "cpu", threads=max(1, int(job.actor_cpus)))  # fmt: skip
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    # the extractor travels in the object store: nodes need no shared model store
    model_ref = ray.put(plan.info.path.read_bytes())
    tally = ray.remote(num_cpus=0)(_Tally).remote()
    claim(plan)
    sink = _sink(plan.output, schema(spec.meta), plan.run, job.part_rows)
    t0 = time.perf_counter()
    fs = plan.source.fs
    ds = ray.data.read_binary_files([plan.source.full(rel) for rel in plan.todo], include_paths=True, filesystem=fs)
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec": plan.decode}, batch_size=job.batch_size, batch_format="numpy")
    ds = ds.map_batches(
        TlserveModel,
        fn_constructor_kwargs={
            "spec": ray.put(spec),
            "model": model_ref,
            "tally": tally,
        },  # the head's familiarity bank may be large
        compute=ActorPoolStrategy(size=actors),
        batch_size=job.batch_size,
        batch_format="numpy",
        num_cpus=job.actor_cpus,
        num_gpus=1 if use_gpus else 0,
    )
    ds.write_datasink(sink)
    seconds = time.perf_counter() - t0
    counts = ray.get(tally.snapshot.remote())
    if sink.dropped:
        log.warning("%d rows were not committed: another run took over %s", sink.dropped, job.output)
    try:
        stats = ds.stats()
    except Exception:  # noqa: BLE001 - stats are a report, never a failure
        stats = ""
    engine = f"ray ({job.ray}, {'CUDA' if use_gpus else 'CPU'})"
    return Summary(sink.rows, sink.errors, seconds, plan.already + sink.rows, job.output, engine, actors=counts, stats=stats)

"""``python -m benchmarks.bench``: how much of the machine the model uses, and how much of the engine the service keeps.

    python -m benchmarks.bench [--quick] [--sweep] [--model-store DIR] [--out DIR] [--set precision=int8]

One run measures, side by side on the same machine and the same exported model:

1. the FLOP ceiling: a large float32 sgemm through numpy's BLAS on every core, and the model's
   GFLOP per image (2 x multiply-adds of every Conv, from the graph's own shapes), so the
   fraction of the ceiling the engine reaches is printed;
2. the reference: a bare ONNX Runtime session on the served model (:func:`app.serving.extractor.create_session`
   with ONNX Runtime's defaults: spinning threads, one intra-op thread per usable CPU), batch 1/8/32
   of real decoded images;
3. ``Extractor`` + head in process (no HTTP, images already decoded) and the decode cost;
4. the real HTTP service (``tlserve serve`` in a subprocess on loopback, started by
   :func:`tests.helpers.server_pool`, the one way a server is launched) under an async load
   generator (:class:`tlserve_client.AsyncClient`, one image per request, closed loop) at concurrency 1/4/16/64: images/s, latency
   p50/p95/p99, errors, and the server's mean batch size (``/metrics`` deltas).

Every HTTP figure is also given as a ratio to the bare engine measured in the same run, which is
what counts on a shared, noisy machine. ``--sweep`` adds a table of service settings (batcher
knobs, spinning, decode threads), one fresh server per row. Results: a printed table,
``<out>/bench.json`` and ``<out>/bench.png``. The model measured is the one the server serves:
``--set precision=int8`` (or ``auto``) benchmarks the manifest's int8 variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.errors import TlserveError
from tests.helpers import server_pool

DEFAULT_DATA = Path("../shared/data/cats_vs_dogs/val")
DEFAULT_OUT = Path("benchmarks/out")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


# --- configuration ----------------------------------------------------------------------------
@dataclass
class BenchConfig:
    store: Path
    out: Path = DEFAULT_OUT
    data: Path = DEFAULT_DATA
    quick: bool = False
    seconds: float = 8.0  # per measurement
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    images: int = 96  # distinct JPEGs cycled by the load generator
    server_env: dict[str, str] = field(default_factory=dict)
    sweep: bool = False
    sweep_concurrency: tuple[int, ...] = (1, 4, 16)
    grid: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        from app.core.settings import Settings

        store = args.model_store or Settings().model_store
        cfg = cls(store=Path(store), out=args.out, data=args.data, quick=args.quick, sweep=args.sweep)
        if args.quick:
            cfg.seconds, cfg.images, cfg.batch_sizes = 0.3, 8, (1, 4)
            cfg.sweep_concurrency = (1, 4)
        if args.seconds:
            cfg.seconds = args.seconds
        if args.concurrency:
            cfg.concurrency = tuple(int(c) for c in args.concurrency.split(","))
        if args.sweep_concurrency:
            cfg.sweep_concurrency = tuple(int(c) for c in args.sweep_concurrency.split(","))
        for row in filter(None, args.grid.split(";")):
            cfg.grid.append(dict(kv.strip().partition("=")[::2] for kv in row.split(",") if kv.strip()))
        for kv in args.set or []:
            key, _, value = kv.partition("=")
            cfg.server_env[f"TLSERVE_{key.upper()}"] = value
        return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few seconds, tiny samples: proves the benchmark works")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where bench.json and bench.png go (default benchmarks/out)")
    p.add_argument("--model-store", type=Path, default=None, help="model store to benchmark (default: TLSERVE_MODEL_STORE)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEGs (searched recursively); synthetic if absent")
    p.add_argument("--seconds", type=float, default=0.0, help="seconds per measurement (default 8, 0.3 with --quick)")
    p.add_argument("--concurrency", default="", help="comma-separated HTTP concurrency levels (default 1,4,16,64)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="server setting, e.g. --set max_queue_delay_ms=5")
    p.add_argument("--sweep", action="store_true", help="also measure a grid of service settings (one server per row)")
    p.add_argument(
        "--grid", default="", help="the sweep's rows: 'FIELD=VALUE,...;FIELD=VALUE' (default: batcher, spinning, decode)"
    )
    p.add_argument("--sweep-concurrency", default="", help="comma-separated concurrency levels of the sweep (default 1,4,16)")


# --- small statistics -------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed(fn: Callable[[], object], seconds: float, min_runs: int = 3, max_runs: int = 10_000) -> tuple[list[float], float]:
    """Durations of back-to-back calls of ``fn`` for about ``seconds`` (after one untimed warm-up call),
    and the CPU seconds this process (all its threads) spent on them."""
    fn()
    durations: list[float] = []
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    while len(durations) < max_runs and (len(durations) < min_runs or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations, time.process_time() - cpu0


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of another process (Linux ``/proc``); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- machine and model --------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from app.core.cpus import available_cpus

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": available_cpus()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        flags = set(fields.get("Flags", "").split())
        info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f in flags]
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(ImportError):
        import numpy

        info["numpy"] = numpy.__version__
    return info


def flop_ceiling(seconds: float, sizes: tuple[int, ...] = (2048, 4096)) -> dict[str, Any]:
    """Best float32 sgemm rate (numpy's BLAS, all cores): GFLOP/s = 2·n³ / time."""
    import numpy as np

    best: dict[str, Any] = {"gflops": 0.0}
    rng = np.random.default_rng(0)
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), np.float32)
        runs, cpu = timed(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), seconds / len(sizes), min_runs=2)
        rate = 2.0 * n**3 / min(runs) / 1e9
        if rate > best["gflops"]:
            best = {
                "gflops": round(rate, 1),
                "gflop_per_cpu_s": round(2.0 * n**3 * len(runs) / cpu / 1e9, 1),
                "method": f"numpy float32 matmul {n}x{n} (best of {len(runs)})",
            }
    return best


def model_gflops(path: Path) -> dict[str, Any]:
    """GFLOP per image: 2 x multiply-adds of every Conv/Gemm/MatMul, from ONNX shape inference at batch 1."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    inferred = shape_inference.infer_shapes(model)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    weights = {init.name: list(numpy_helper.to_array(init).shape) for init in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight_shape(name: str) -> list[int]:
        node = producers.get(name)  # QDQ graphs: weight -> DequantizeLinear -> Conv
        while node is not None and name not in weights:
            name = node.input[0]
            node = producers.get(name)
        return weights.get(name) or shapes.get(name, [])

    macs, convs = 0, 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weight_shape(node.input[1])
            out = shapes.get(node.output[0], [])
            if len(w) == 4 and len(out) == 4:
                macs += out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
                convs += 1
        elif node.op_type in ("Gemm", "MatMul"):
            w = weight_shape(node.input[1])
            out = shapes.get(node.output[0], [])
            if len(w) == 2 and out:
                macs += w[0] * w[1]
    return {"gflop_per_image": round(2 * macs / 1e9, 3), "flop_per_image": 2 * macs, "convs": convs}


# --- inputs -------------------------------------------------------------------------------------
def load_payloads(data: Path, n: int) -> tuple[list[bytes], str]:
    """``n`` JPEG files' bytes from ``data`` (both classes interleaved), or synthetic photos-like JPEGs."""
    files: list[Path] = []
    if data.is_dir():
        groups = [sorted(p for p in d.rglob("*") if p.suffix in IMAGE_SUFFIXES) for d in sorted(data.iterdir()) if d.is_dir()]
        groups = [g for g in groups if g] or [sorted(p for p in data.rglob("*") if p.suffix in IMAGE_SUFFIXES)]
        for i in range(n):
            g = groups[i % len(groups)]
            if i // len(groups) < len(g):
                files.append(g[i // len(groups)])
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} JPEGs from {data}"
    return [synthetic_jpeg(i) for i in range(n)], f"{n} synthetic 500x375 JPEGs ({data} absent)"


def synthetic_jpeg(seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.5)) % 256 for _ in range(3)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def decode_all(payloads: list[bytes], size: int, resample: str) -> Any:
    import numpy as np

    from app.core.imaging import load_image

    return np.stack([load_image(p, size, resample=resample) for p in payloads])


def batch_of(images: Any, n: int) -> Any:
    import numpy as np

    reps = -(-n // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n])


# --- engine and in-process ----------------------------------------------------------------------
class Bare:
    """The reference: a bare ONNX Runtime session (its defaults, one intra-op thread per usable CPU)."""

    def __init__(self, path: Path, images: Any, threads: int) -> None:
        from app.serving.extractor import create_session

        self.session = create_session(path, threads=threads, spinning=True)  # spinning: ONNX Runtime's default
        self.input = self.session.get_inputs()[0].name
        self.images = images

    def measure(self, batch: int, seconds: float) -> dict[str, Any]:
        feed = {self.input: batch_of(self.images, batch)}
        row = _rate_row(batch, timed(lambda: self.session.run(None, feed), seconds))
        time.sleep(0.3)  # let ONNX Runtime's spinning threads go idle before anything else is measured
        return row


def _rate_row(batch: int, timing: tuple[list[float], float]) -> dict[str, Any]:
    runs, cpu = timing
    med = percentile(runs, 50)
    return {
        "batch": batch,
        "runs": len(runs),
        "images_s": round(batch / med, 2),
        "latency_ms": round(med * 1000, 1),
        "cpu_ms_per_image": round(cpu / (batch * len(runs)) * 1000, 2),
    }


def in_process(store: Path, images: Any, payloads: list[bytes], cfg: BenchConfig, settings: Any) -> dict[str, Any]:
    """``Extractor`` (the service's settings) + head on decoded images; decode cost per image."""
    from app.core.imaging import load_image
    from app.serving.extractor import Extractor
    from app.storage.registry import load_head
    from app.storage.store import ModelStore

    ms = ModelStore(store)
    info = ms.extractor(precision=settings.precision)
    ex = Extractor(info, provider="cpu", threads=settings.intra_op_threads, spinning=settings.ort_spinning)
    head_name = pick_head(ms, settings.default_head)
    head = load_head(ms.heads, head_name, info.feature_space) if head_name else None
    rows = []
    for b in cfg.batch_sizes:
        batch = batch_of(images, b)

        def step(batch: Any = batch) -> None:
            feats = ex.run(batch)
            if head is not None:
                head.predict_proba(feats)

        rows.append(_rate_row(b, timed(step, cfg.seconds)))
    it = iter(range(10**9))
    runs, _ = timed(
        lambda: load_image(payloads[next(it) % len(payloads)], info.size, resample=info.resample), min(cfg.seconds, 2.0)
    )
    decode = {"ms_per_image_1_thread": round(percentile(runs, 50) * 1000, 2), "runs": len(runs)}
    return {"head": head_name, "rows": rows, "decode": decode}


def pick_head(store: Any, preferred: str) -> str | None:
    names = store.heads.names()
    return preferred if preferred in names else (names[0] if names else None)


# --- the HTTP service ---------------------------------------------------------------------------
@contextlib.contextmanager
def running_server(store: Path, settings: dict[str, object], log_dir: Path) -> Iterator[tuple[str, int]]:
    """``tlserve serve`` on ``store`` with ``settings`` (:func:`tests.helpers.server_pool`: a free loopback
    port, the response cache off); SIGTERM (drain) on exit. Yields its URL and process id."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with server_pool(log_dir) as start:
        server = start(store, **settings)
        assert server.proc is not None
        yield server.url, server.proc.pid


SERVER_SERIES = ("tlserve_batch_size_images", "tlserve_decode_seconds", "tlserve_inference_seconds", "tlserve_queue_wait_seconds")


def scrape(url: str) -> dict[str, float]:
    """``*_sum``/``*_count`` of the server's histograms that explain where time goes."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in SERVER_SERIES:
            found[name] = float(value)
    return found


def _server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for series, key, scale in (
        ("tlserve_batch_size_images", "mean_batch_size", 1.0),
        ("tlserve_decode_seconds", "decode_ms", 1000.0),
        ("tlserve_inference_seconds", "inference_ms_per_batch", 1000.0),
        ("tlserve_queue_wait_seconds", "queue_wait_ms", 1000.0),
    ):
        count = after.get(series + "_count", 0.0) - before.get(series + "_count", 0.0)
        total = after.get(series + "_sum", 0.0) - before.get(series + "_sum", 0.0)
        means[key] = round(total / count * scale, 2) if count else None
    return means


async def _load(url: str, pid: int, payloads: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients (:class:`tlserve_client.AsyncClient`, no retries), each posting one
    JPEG at a time (multipart, as the client sends it) back to back.

    Every simulated client has its own client and keep-alive connection: one shared httpx pool costs
    CPU that grows with its number of connections (about 6x per request at 64 than at 4, measured),
    and on a 2-core machine the load generator would then be what is measured.
    """
    import httpx
    from tlserve_client import AsyncClient, ClientError

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(10**12))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(AsyncClient(url, retries=0, timeout=300.0, limits=limits)) for _ in range(concurrency)
        ]

        async def worker(client: AsyncClient, until: float, record: bool) -> None:
            while time.perf_counter() < until:
                i = next(counter)
                t0 = time.perf_counter()
                try:
                    response = await client.classify((f"{i}.jpg", payloads[i % len(payloads)]))
                    outcome = "ok" if response.results[0].error is None else response.results[0].error.code
                except ClientError as exc:
                    outcome = f"{exc.status} {exc.code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if not record:
                    continue
                if outcome == "ok":
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

        await asyncio.gather(*(worker(c, time.perf_counter() + warmup, False) for c in clients))
        before = await asyncio.to_thread(scrape, url)
        server0, client0, t0 = process_cpu_seconds(pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(c, t0 + seconds, True) for c in clients))
        wall = time.perf_counter() - t0
        server1, client1 = process_cpu_seconds(pid), time.process_time()
        after = await asyncio.to_thread(scrape, url)
    done = max(len(latencies), 1)
    server_cpu = None if server0 is None or server1 is None else round((server1 - server0) / done * 1000, 1)
    ms = [x * 1000 for x in latencies]
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + sum(errors.values()),
        "images_s": round(len(latencies) / wall, 2),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "server_cpu_ms_per_image": server_cpu,
        "client_cpu_ms_per_image": round((client1 - client0) / done * 1000, 1),
        **_server_means(before, after),
    }


def http_levels(
    url: str, pid: int, payloads: list[bytes], levels: tuple[int, ...], seconds: float, bare: Bare | None, ref_batch: int
) -> list[dict[str, Any]]:
    """Each level, then the bare engine again (batch 1 and ``ref_batch``), so every HTTP row has a bare
    reference measured right before and right after it: the fair ratio on a machine whose speed drifts."""
    rows = []
    for c in levels:
        warmup = min(2.0, max(0.2, seconds / 4))
        row = asyncio.run(_load(url, pid, payloads, c, seconds, warmup))
        if bare is not None:
            short = max(seconds / 2, 0.2)
            row["bare_after"] = {"batch1": bare.measure(1, short), "best": bare.measure(ref_batch, short)}
        rows.append(row)
    return rows


def server_settings(cfg: BenchConfig, head: str | None, settings: Any) -> dict[str, object]:
    """The measured server's settings: the CPU (like the bare reference), the benchmark's threads and
    precision, unless ``--set`` says otherwise."""
    chosen: dict[str, object] = {"provider": "cpu", "intra_op_threads": settings.intra_op_threads,
                                 "precision": settings.precision, "log_level": "warning"}  # fmt: skip
    if head:
        chosen["default_head"] = head
    return {**chosen, **{k[len("TLSERVE_") :].lower(): v for k, v in cfg.server_env.items()}}


# --- the run ------------------------------------------------------------------------------------
def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from app.core.cpus import available_cpus
    from app.core.settings import Settings
    from app.storage.store import ModelStore

    store = ModelStore(cfg.store)
    env_settings = {k[len("TLSERVE_") :].lower(): v for k, v in cfg.server_env.items()}
    settings = Settings(**{**env_settings, "model_store": cfg.store})  # type: ignore[arg-type]
    info = store.extractor(precision=settings.precision)
    head = pick_head(store, settings.default_head)
    if head is None:
        raise FileNotFoundError(f"{cfg.store} has no head to serve: train one first (tlserve train)")
    payloads, source = load_payloads(cfg.data, cfg.images)
    images = decode_all(payloads, info.size, info.resample)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": cfg.quick,
        "machine": machine(),
        "model": {
            "file": info.path.name,
            "sha256": info.sha256,
            "precision": info.precision,
            "precision_reason": info.precision_reason,
            "input_size": info.size,
            "resample": info.resample,
            "pooling": info.pooling,
            **model_gflops(info.path),
        },
        "inputs": source,
        "seconds_per_measurement": cfg.seconds,
    }
    threads = available_cpus()
    log(f"FLOP ceiling (numpy sgemm, {threads} CPUs) ...")
    result["ceiling"] = flop_ceiling(min(cfg.seconds, 4.0), (512, 1024) if cfg.quick else (2048, 4096))
    log("bare ONNX Runtime ...")
    bare = Bare(info.path, images, threads)
    result["bare"] = [bare.measure(b, cfg.seconds) for b in cfg.batch_sizes]
    ref_batch = max(result["bare"], key=lambda r: r["images_s"])["batch"]
    log("Extractor + head in process ...")
    result["in_process"] = in_process(cfg.store, images, payloads, cfg, settings)
    gc.collect()  # the in-process engine must not hold threads while the server is measured
    log(f"HTTP service under load, concurrency {cfg.concurrency} ...")
    with running_server(cfg.store.resolve(), server_settings(cfg, head, settings), cfg.out) as (url, pid):
        import httpx

        result["service"] = httpx.get(url + "/v1/info", timeout=10).json()
        result["http"] = http_levels(url, pid, payloads, cfg.concurrency, cfg.seconds, bare, ref_batch)
    if cfg.sweep:
        result["sweep"] = sweep(cfg, payloads, head, settings, log, bare, ref_batch)
    derive(result)
    return result


def derive(result: dict[str, Any]) -> None:
    """Ratios to the bare engine of the same run, and the fraction of the FLOP ceiling."""
    best = max(result["bare"], key=lambda r: r["images_s"])
    b1 = next((r for r in result["bare"] if r["batch"] == 1), result["bare"][0])
    gflop = result["model"]["gflop_per_image"]
    ref = {
        "bare_best_images_s": best["images_s"],
        "bare_best_batch": best["batch"],
        "bare_batch1_latency_ms": b1["latency_ms"],
        "model_gflops_s": round(best["images_s"] * gflop, 1),
        "fraction_of_ceiling": round(best["images_s"] * gflop / result["ceiling"]["gflops"], 3),
        "bare_cpu_ms_per_image": best["cpu_ms_per_image"],
        # the same fraction in CPU time (GFLOP per CPU-second): unaffected by other processes taking cores
        "fraction_of_ceiling_cpu": round(gflop / (best["cpu_ms_per_image"] / 1000) / result["ceiling"]["gflop_per_cpu_s"], 3),
    }
    result["reference"] = ref
    for row in result["in_process"]["rows"]:
        row["ratio_to_bare"] = round(row["images_s"] / best["images_s"], 3)
    before_best, before_b1 = best, b1
    for row in result["http"] + [r for s in result.get("sweep", []) for r in s["levels"]]:  # in the order measured
        after = row.get("bare_after") or {"best": before_best, "batch1": before_b1}
        ref_rate = (before_best["images_s"] + after["best"]["images_s"]) / 2
        ref_latency = (before_b1["latency_ms"] + after["batch1"]["latency_ms"]) / 2
        row["bare_images_s"] = round(ref_rate, 2)  # the bare engine right before and right after this row
        row["ratio_to_bare"] = round(row["images_s"] / ref_rate, 3)
        row["ratio_to_run_best"] = round(row["images_s"] / best["images_s"], 3)
        row["bare_b1_latency_ms"] = round(ref_latency, 1)
        row["p50_minus_bare_b1_ms"] = round(row["p50_ms"] - ref_latency, 1)
        ref_cpu = (before_best["cpu_ms_per_image"] + after["best"]["cpu_ms_per_image"]) / 2
        server_cpu = row.get("server_cpu_ms_per_image")
        row["cpu_ratio"] = round(ref_cpu / server_cpu, 3) if server_cpu else None  # bare engine CPU / server CPU per image
        before_best, before_b1 = after["best"], after["batch1"]
    http4 = [r["ratio_to_bare"] for r in result["http"] if r["concurrency"] >= 4]
    cpu4 = [r["cpu_ratio"] for r in result["http"] if r["concurrency"] >= 4 and r["cpu_ratio"] is not None]
    c1 = next((r["p50_minus_bare_b1_ms"] for r in result["http"] if r["concurrency"] == 1), None)
    result["targets"] = {
        "http_c>=4_ratio>=0.90": _target(min(http4) if http4 else None, lambda v: v >= 0.9),
        "http_c>=4_cpu_ratio>=0.90": _target(min(cpu4) if cpu4 else None, lambda v: v >= 0.9),
        "p50_c1<=bare_b1+10ms": _target(c1, lambda v: v <= 10),
        "fraction_of_ceiling>=0.80": _target(ref["fraction_of_ceiling"], lambda v: v >= 0.8),
        "fraction_of_ceiling_cpu>=0.80": _target(ref["fraction_of_ceiling_cpu"], lambda v: v >= 0.8),
    }


def _target(value: float | None, ok: Callable[[float], bool]) -> dict[str, Any]:
    return {"value": value, "met": value is not None and ok(value)}


# --- settings sweep -----------------------------------------------------------------------------
def sweep_grid(quick: bool) -> list[dict[str, str]]:
    if quick:
        return [{"max_queue_delay_ms": "0"}, {"ort_spinning": "true"}]
    grid: list[dict[str, str]] = [{}]
    grid += [{"max_batch_size": str(b)} for b in (1, 4, 8, 32)]
    grid += [{"max_queue_delay_ms": str(d)} for d in (0, 2, 5, 10, 25)]
    grid += [{"ort_spinning": "true"}, {"decode_threads": "1"}, {"ort_spinning": "true", "decode_threads": "1"}]
    return grid


def sweep(
    cfg: BenchConfig,
    payloads: list[bytes],
    head: str,
    settings: Any,
    log: Callable[[str], None],
    bare: Bare | None,
    ref_batch: int,
) -> list[dict[str, Any]]:
    rows = []
    for i, overrides in enumerate(cfg.grid or sweep_grid(cfg.quick)):
        chosen = {**server_settings(cfg, head, settings), **overrides}
        log(f"sweep {i + 1}: {overrides or 'defaults'} ...")
        with running_server(cfg.store.resolve(), chosen, cfg.out) as (url, pid):
            levels = http_levels(url, pid, payloads, cfg.sweep_concurrency, cfg.seconds, bare, ref_batch)
        rows.append({"settings": overrides or {"defaults": "yes"}, "levels": levels})
    return rows


# --- output -------------------------------------------------------------------------------------
HEADER = (
    "path",
    "images/s",
    "bare i/s",
    "ratio",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "p50-b1",
    "errors",
    "batch",
    "cpu/img",
    "cpu ratio",
)
WIDTHS = (30, 10, 10, 8, 9, 9, 9, 8, 7, 7, 9, 10)


def _line(*cells: object) -> str:
    out = []
    for i, (cell, w) in enumerate(zip(cells, WIDTHS, strict=True)):
        text = "" if cell is None else (f"{cell:.3f}" if i in (3, 11) and isinstance(cell, float) else str(cell))
        out.append(text.ljust(w) if i == 0 else text.rjust(w))
    return "".join(out)


def render(result: dict[str, Any]) -> str:
    ref, m, model = result["reference"], result["machine"], result["model"]
    best = ref["bare_best_images_s"]
    lines = [
        f"benchmarks.bench  {result['date']}  {m.get('cpu_model', '?')}, {m['cpus']} CPUs  onnxruntime {m.get('onnxruntime', '?')}",
        f"model {model['file']} ({model['precision']}, {model['input_size']}px, {model['pooling']}): "
        f"{model['gflop_per_image']} GFLOP/image; inputs: {result['inputs']}",
        f"FLOP ceiling {result['ceiling']['gflops']} GFLOP/s ({result['ceiling']['method']}); "
        f"model reaches {ref['model_gflops_s']} GFLOP/s = {ref['fraction_of_ceiling']:.0%} of it "
        f"({ref['fraction_of_ceiling_cpu']:.0%} counted per CPU-second)",
        "ratio: images/s over the bare engine's best batch measured right before and right after the row;",
        "p50-b1: p50 minus the bare batch-1 latency measured the same way; cpu/img: CPU ms per image (HTTP rows: the",
        "server process); cpu ratio: bare engine CPU per image / server CPU per image (robust to other processes' load)",
        "",
        _line(*HEADER),
    ]
    for r in result["bare"]:
        lines.append(_line(f"bare ORT batch {r['batch']}", f"{r['images_s']:.2f}", f"{best:.2f}", r["images_s"] / best,
                           f"{r['latency_ms']:.1f}", None, None, None, None, r["batch"], r["cpu_ms_per_image"], None))  # fmt: skip
    for r in result["in_process"]["rows"]:
        lines.append(_line(f"Extractor+head batch {r['batch']}", f"{r['images_s']:.2f}", f"{best:.2f}", r["ratio_to_bare"],
                           f"{r['latency_ms']:.1f}", None, None, None, None, r["batch"], r["cpu_ms_per_image"], None))  # fmt: skip
    lines += [_http_line(f"HTTP concurrency {r['concurrency']}", r) for r in result["http"]]
    lines.append(f"decode+resize (1 thread): {result['in_process']['decode']['ms_per_image_1_thread']} ms/image")
    for s in result.get("sweep", []):
        lines += ["", "sweep " + ",".join(f"{k}={v}" for k, v in s["settings"].items())]
        lines += [_http_line(f"  concurrency {r['concurrency']}", r) for r in s["levels"]]
    lines.append("")
    for name, t in result["targets"].items():
        lines.append(f"target {name}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _http_line(label: str, r: dict[str, Any]) -> str:
    batch = f"{r['mean_batch_size']:.2f}" if r.get("mean_batch_size") is not None else "-"
    return _line(label, f"{r['images_s']:.2f}", f"{r['bare_images_s']:.2f}", r["ratio_to_bare"], f"{r['p50_ms']:.1f}",
                 f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['p50_minus_bare_b1_ms']:+.1f}", r["errors"], batch,
                 r["server_cpu_ms_per_image"], r["cpu_ratio"])  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"ORT b{r['batch']}" for r in result["bare"]] + [f"in-proc b{r['batch']}" for r in result["in_process"]["rows"]]
    labels += [f"HTTP c{r['concurrency']}" for r in result["http"]]
    values = [r["images_s"] for r in result["bare"]] + [r["images_s"] for r in result["in_process"]["rows"]]
    values += [r["images_s"] for r in result["http"]]
    colors = (
        ["#4c72b0"] * len(result["bare"]) + ["#55a868"] * len(result["in_process"]["rows"]) + ["#c44e52"] * len(result["http"])
    )
    ax1.bar(labels, values, color=colors)
    ceiling = result["ceiling"]["gflops"] / result["model"]["gflop_per_image"]
    ax1.axhline(ceiling, color="k", linestyle="--", label=f"FLOP ceiling {ceiling:.1f} img/s")
    ax1.axhline(0.9 * result["reference"]["bare_best_images_s"], color="#c44e52", linestyle=":", label="90% of bare best")
    ax1.set_ylabel("images/s")
    ax1.set_title("throughput")
    ax1.tick_params(axis="x", rotation=45)
    ax1.legend(fontsize=8)
    conc = [r["concurrency"] for r in result["http"]]
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        ax2.plot(conc, [r[q] for r in result["http"]], marker="o", label=q.replace("_ms", ""))
    ax2.axhline(result["reference"]["bare_batch1_latency_ms"], color="k", linestyle="--", label="bare batch-1")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("latency ms")
    ax2.set_title("HTTP latency")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['model']['file']} ({result['model']['precision']}) — {result['machine'].get('cpu_model', '')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "bench.json", out / "bench.png"
    js.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png)
    return js, png


def main(argv: list[str] | None = None) -> int:
    import logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = BenchConfig.from_args(args)
    try:
        result = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except TlserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:  # no store, no head, a server that would not start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    js, png = write(result, cfg.out)
    print(f"\nwritten {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

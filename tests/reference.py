"""An independent pure-numpy VGG16 conv-base forward pass (float64), for checking the export."""

from __future__ import annotations

import numpy as np

from app.learning.weights import LAYERS, POOL_AFTER, Weights

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


def caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """Keras ``preprocess_input(mode="caffe")``: RGB→BGR, minus the BGR mean. NHWC float64."""
    return images.astype(np.float64)[..., ::-1] - CAFFE_MEAN_BGR


def conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NCHW cross-correlation with zero padding 1 (what Keras ``padding="same"`` and ONNX Conv do)."""
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2, w + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((n, kernel.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i : i + h, j : j + w], kernel[:, :, i, j].astype(np.float64))
    return out + bias.astype(np.float64)[None, :, None, None]


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def vgg_features(weights: Weights, images: np.ndarray, pooling: str = "flatten") -> np.ndarray:
    x = caffe_preprocess(images).transpose(0, 3, 1, 2)
    for name in LAYERS:
        x = np.maximum(conv3x3_same(x, *weights[name]), 0.0)
        if name in POOL_AFTER:
            x = maxpool2(x)
    if pooling == "avg":
        return x.mean(axis=(2, 3))
    if pooling == "max":
        return x.max(axis=(2, 3))
    return x.transpose(0, 2, 3, 1).reshape(len(x), -1)  # Keras Flatten order (NHWC)

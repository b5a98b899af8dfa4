"""tlserve: transfer-learning image recognition over HTTP (VGG16 conv base + logistic-regression heads)."""

__version__ = "0.1.0"

"""tlserve: transfer-learning image recognition over HTTP (VGG16 conv base + logistic-regression heads)."""

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``app.__version__``: the release version, written once in ``tlserve_client/_version.py`` for server and client.

    Read on first use: importing the client package loads httpx and pydantic, which ``tlserve --help`` does not need.
    """
    if name == "__version__":
        from tlserve_client._version import __version__

        return __version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

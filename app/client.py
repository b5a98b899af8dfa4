"""Deprecated: the client is :mod:`tlserve_client` now (``pip install ./client``); this alias goes in the next release.

``from app.client import Client`` still works and warns once; write ``from tlserve_client import Client``.
"""

import warnings

import tlserve_client
from tlserve_client import *  # noqa: F403

__all__ = tlserve_client.__all__

warnings.warn(
    "app.client is deprecated and will be removed in the next release; use tlserve_client (pip install ./client)",
    DeprecationWarning,
    stacklevel=2,
)

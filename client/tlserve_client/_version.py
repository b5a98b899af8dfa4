"""The release version, written once: ``tlserve`` and ``tlserve-client`` both read it (their pyprojects and
``app.__version__``), so a client and a server of one release always say the same version."""

__version__ = "0.1.0"

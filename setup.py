"""Build hook: generate the gRPC stubs (``app/grpc/predict_v2_pb2*.py``, ``.pyi``) from ``app/grpc/predict_v2.proto``.

Runs with every build and install (``pip install .``, ``pip install -e .``, ``pip wheel .``), with the
grpcio-tools pinned in ``pyproject.toml``'s ``[build-system]``; the generated files are never committed.
Everything else about the package is in ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = "app/grpc/predict_v2.proto"


def generate_stubs() -> None:
    from grpc_tools import protoc  # a build requirement ([build-system] requires)

    include = Path(protoc.__file__).parent / "_proto"
    out = [f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}"]  # .pyi: typed messages
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", *out, str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})

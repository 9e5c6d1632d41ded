"""Imports the generated muon.v1 stubs.

They are generated at install time into muon_client/_gen (setup.py), or by
the CMake target `muon_python_stubs` into build/python (put that folder on
PYTHONPATH). Generated code is never committed.
"""
import os
import sys

_GEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gen")
if os.path.isdir(_GEN) and _GEN not in sys.path:
    # The generated grpc module imports `muon.v1.optimizer_pb2` absolutely.
    sys.path.insert(0, _GEN)

try:
    from muon.v1 import optimizer_pb2 as pb  # noqa: E402
    from muon.v1 import optimizer_pb2_grpc as pb_grpc  # noqa: E402
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "muon_client: the generated gRPC stubs (muon.v1.optimizer_pb2) were not found. "
        "Install the package (pip install client/python), or build the CMake target "
        "muon_python_stubs and add build/python to PYTHONPATH."
    ) from e

__all__ = ["pb", "pb_grpc"]
